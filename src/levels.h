// src/levels.h: what the flat core of every transform shares: the guard that
// pushes and pops one functorch level (with thread serialisation on 1.13 and
// the innermost transform's name), the shared forward-AD level, mode scopes,
// and the grad-family helpers (wrapping inputs for a level, autograd::grad
// with zeros for unused inputs). The transforms themselves live in
// grad_vjp.cpp, jvp_linearize.cpp, vmap.cpp and jacobians.cpp.
//
// Each *_flat function owns one functorch level for exactly its own scope
// (RAII: every exit path, including a user's exception, pops what it pushed),
// wraps the flat inputs for that level, calls back into the header template
// that rebuilds the user's arguments, and unwraps the results BEFORE the level
// is popped (Note [unwrap before pop]).
//
// Note [unwrap before pop]
//   A TensorWrapper of a grad level dies with the level. Unwrapping after the
//   pop loses the link to the outer level's graph: grad(grad(f)) would return
//   zeros instead of failing. So results are unwrapped while the level lives.
//
// Note [grad and vjp interaction with no_grad]
//   As in torch.func: a NoGradGuard *outside* grad(f) does not stop f from
//   being differentiated (we enable grad mode inside the level and record the
//   outer mode on the level, which restores it for outer levels), while a
//   NoGradGuard *inside* f is respected.
//
// Note [one forward-AD level]
//   libtorch 1.13 supports one forward-AD level at a time, process-wide.
//   Like torch.func, every jvp shares dual level 0 (nesting works because
//   each functorch level has its own TensorWrappers); a process-wide count
//   keeps it alive while any thread is inside a jvp.
#pragma once

#include <torchfunc/detail/core.h>

#include <ATen/ATen.h>
#include <c10/core/InferenceMode.h>

#include <string>
#include <vector>

#include "compat.h"

namespace torchfunc {
namespace detail {

namespace ft = at::functorch;

/// What the first transform of the process sets up (batching rules, checks,
/// the allocator); every later call pays a single static check.
void setup_once();

/// How many custom-function calls have lowered this thread's layer stack
/// (custom_function.cpp's Lowered) and not yet restored it.
int& lowered_depth();
/// libtorch 1.13 only: it keeps level metadata in a global map keyed by
/// level id, so no level can be pushed while a lowered level holds its id.
[[noreturn]] void fail_push_while_lowered(const char* api);

/// Holds the process-wide transform lock while this thread is inside its
/// outermost transform (only where compat::kSerializeThreads).
class ThreadSerializer {
 public:
  ThreadSerializer();
  ~ThreadSerializer();
  ThreadSerializer(const ThreadSerializer&) = delete;
  ThreadSerializer& operator=(const ThreadSerializer&) = delete;
};

/// Pushes one functorch level and pops it (and anything left above it) on
/// every exit path. `api` names the transform in messages raised by code that
/// does not know which transform runs (innermost_transform()).
class LayerGuard {
 public:
  template <class Push>
  LayerGuard(const char* api, Push&& push) : depth_(compat::layer_depth()) {
    setup_once();
    if (compat::kLibtorch113 && lowered_depth() > 0) fail_push_while_lowered(api);
    level_ = push();
    entered(api);
  }
  ~LayerGuard();
  LayerGuard(const LayerGuard&) = delete;
  LayerGuard& operator=(const LayerGuard&) = delete;
  int64_t level() const { return level_; }

 private:
  void entered(const char* api);
  ThreadSerializer serializer_;  // constructed first, released last
  size_t depth_;
  int64_t level_ = 0;
};

/// Keeps forward-AD dual level 0 alive while any thread is inside a jvp
/// (Note [one forward-AD level]).
class DualLevelGuard {
 public:
  DualLevelGuard();
  ~DualLevelGuard();
  DualLevelGuard(const DualLevelGuard&) = delete;
  DualLevelGuard& operator=(const DualLevelGuard&) = delete;
};

class FwGradModeGuard {
 public:
  explicit FwGradModeGuard(bool enabled) : prev_(c10::AutogradState::get_tls_state().get_fw_grad_mode()) {
    c10::AutogradState::get_tls_state().set_fw_grad_mode(enabled);
  }
  ~FwGradModeGuard() { c10::AutogradState::get_tls_state().set_fw_grad_mode(prev_); }

 private:
  bool prev_;
};

/// Under c10::InferenceMode autograd records nothing, which would make every
/// gradient silently zero. AD transforms leave inference mode for their own
/// scope, so they compute correct results there too.
class AutodiffScope {
 public:
  AutodiffScope() {
    if (c10::InferenceMode::is_enabled()) no_inference_.emplace(false);
  }

 private:
  c10::optional<c10::InferenceMode> no_inference_;
};

inline bool is_differentiable_dtype(const at::Tensor& t) { return t.is_floating_point() || t.is_complex(); }

/// "[2, 3]"
std::string shape_str(at::IntArrayRef s);

// ---- shared by the grad family (grad, vjp, linearize, jacrev) ---------------

/// Wraps every input for grad level `lvl`; diff inputs also require grad.
Tensors wrap_for_grad(const Tensors& inputs, const std::vector<char>& diff, int64_t lvl, const char* api,
                      LeafName name, Tensors& diff_wrapped);
/// While alive, this thread runs the backward pass a torchfunc transform
/// takes at the top level (grad, vjp_fn, jacrev, ...): nothing will
/// differentiate that level's backward at that level again (its results are
/// unwrapped). level(): that level's id, 0 below every layer, -1 if none.
class OwnBackward {
 public:
  OwnBackward();
  ~OwnBackward();
  OwnBackward(const OwnBackward&) = delete;
  OwnBackward& operator=(const OwnBackward&) = delete;
  static int64_t level();

 private:
  int64_t prev_;
};

/// torch.autograd.grad that treats unused inputs and outputs that do not
/// require grad as giving zero gradients (never undefined tensors).
Tensors autograd_grad(const Tensors& outputs, const Tensors& inputs, const Tensors& grad_outputs,
                      bool retain_graph, bool create_graph);
void unwrap_all(Tensors& ts, int64_t lvl);
void check_tensor_outputs(const FlatResult& res, const char* api);

/// The graph a vjp recorded (shared by copies of vjp_fn; jacrev reads which
/// inputs it differentiates).
struct VjpState {
  Tensors outputs;          // wrapped, primary only
  Tensors inputs;           // wrapped diff inputs
  std::vector<size_t> where;  // position of each diff input in the flat inputs
  size_t num_inputs = 0;
  std::vector<std::vector<int64_t>> out_sizes;
  bool freed = false;  // a call with retain_graph(false) released the graph
  const char* api = "vjp(f, *primals): vjp_fn(cotangents)";  // what errors call the pullback
};

}  // namespace detail
}  // namespace torchfunc
