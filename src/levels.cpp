// src/levels.cpp: level guards, one-time setup, the forward-AD level and the
// grad-family helpers declared in levels.h; small helpers of detail/core.h.
// Not here: any transform (see levels.h).
#include "levels.h"

#include <ATen/FunctionalTensorWrapper.h>
#include <c10/core/GradMode.h>

#include <torchfunc/debug_unwrap.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/forward_grad.h>

#include <mutex>
#include <sstream>

#include "variable_hooks.h"

namespace torchfunc {
namespace detail {

size_t layer_depth() { return compat::layer_depth(); }

void fail(const std::string& msg) { TORCH_CHECK(false, "torchfunc::", msg); }

void ensure_batch_rules();              // batch_rules/registry.cpp: rules and decompositions libtorch lacks
void use_allocator_from_environment();  // allocator.cpp: TORCHFUNC_CACHING_ALLOCATOR
void ensure_escape_check();             // escaped.cpp: escaped grad-level tensors raise

void setup_once() {
  static const bool done = [] {
    use_allocator_from_environment();
    ensure_escape_check();
    ensure_batch_rules();
    install_variable_hooks();
    return true;
  }();
  (void)done;
}

// ---- small helpers ------------------------------------------------------------

std::vector<std::string> split_field_names(const char* names) {
  std::vector<std::string> out;
  std::string cur;
  for (const char* p = names; *p; ++p) {
    if (*p == ',') {
      out.push_back(cur);
      cur.clear();
    } else if (*p != ' ' && *p != '\t' && *p != '\n') {
      cur += *p;
    }
  }
  out.push_back(cur);
  return out;
}

std::string join_keys(const std::vector<std::string>& keys) {
  std::string s = "[";
  for (size_t i = 0; i < keys.size(); ++i) s += (i ? ", '" : "'") + keys[i] + "'";
  return s + "]";
}

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream o;
  o << s;
  return o.str();
}

// ---- level guards ---------------------------------------------------------------

namespace {
std::mutex& serial_mutex() {
  static std::mutex m;
  return m;
}
thread_local int t_serial_depth = 0;

// The api string of each transform this thread is inside, innermost last.
thread_local std::vector<const char*> t_transforms;
}  // namespace

ThreadSerializer::ThreadSerializer() {
  if (compat::kSerializeThreads && t_serial_depth++ == 0) serial_mutex().lock();
}
ThreadSerializer::~ThreadSerializer() {
  if (compat::kSerializeThreads && --t_serial_depth == 0) serial_mutex().unlock();
}

int& lowered_depth() {
  thread_local int depth = 0;
  return depth;
}

void fail_push_while_lowered(const char* api) {
  fail(std::string(api) + ": on libtorch 1.13, transforms cannot run inside a custom_function's forward or vmap "
       "rule (1.13 keeps level metadata in one map keyed by level id, and the custom function has set its "
       "level aside). Apply the transform outside the custom function, or use libtorch 2.x.");
}

void LayerGuard::entered(const char* api) { t_transforms.push_back(api); }

LayerGuard::~LayerGuard() {
  t_transforms.pop_back();
  while (compat::layer_depth() > depth_) {
    try {
      compat::pop_layer();
    } catch (...) {
      break;
    }
  }
}

const char* innermost_transform() { return t_transforms.empty() ? nullptr : t_transforms.back(); }

// Note [one forward-AD level]
namespace {
std::mutex g_dual_mutex;
int64_t g_dual_refs = 0;
}  // namespace

DualLevelGuard::DualLevelGuard() {
  std::lock_guard<std::mutex> lock(g_dual_mutex);
  if (g_dual_refs == 0) {
    const uint64_t idx = torch::autograd::ForwardADLevel::get_next_idx();
    TORCH_INTERNAL_ASSERT(idx == 0, "torchfunc: unexpected forward-AD level ", idx);
  }
  ++g_dual_refs;
}
DualLevelGuard::~DualLevelGuard() {
  std::lock_guard<std::mutex> lock(g_dual_mutex);
  if (--g_dual_refs == 0) {
    try {
      torch::autograd::ForwardADLevel::release_idx(0);
    } catch (...) {
    }
  }
}

// ---- grad-family helpers ----------------------------------------------------------

namespace {
thread_local int64_t t_own_backward_level = -1;
}
OwnBackward::OwnBackward() : prev_(t_own_backward_level) {
  const auto top = ft::maybeCurrentDynamicLayer();
  t_own_backward_level = top.has_value() ? top->layerId() : 0;
}
OwnBackward::~OwnBackward() { t_own_backward_level = prev_; }
int64_t OwnBackward::level() { return t_own_backward_level; }

/// Wraps every input for grad level `lvl`; diff inputs also require grad.
Tensors wrap_for_grad(const Tensors& inputs, const std::vector<char>& diff, int64_t lvl, const char* api,
                      LeafName name, Tensors& diff_wrapped) {
  Tensors out;
  out.reserve(inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) {
    const at::Tensor& t = inputs[i];
    if (!t.defined()) {
      TORCH_CHECK(!diff[i], "torchfunc::", api, ": cannot differentiate with respect to ", name(i),
                  ", which is an undefined Tensor.");
      out.push_back(t);
      continue;
    }
    at::Tensor w = ft::makeTensorWrapper(t, lvl);
    if (diff[i]) {
      TORCH_CHECK(is_differentiable_dtype(t), "torchfunc::", api,
                  ": only floating-point or complex Tensors can be differentiated, but ", name(i),
                  " has dtype ", t.scalar_type(), ". Pass it as a non-differentiated argument (argnums) "
                  "or convert it with .to(torch::kFloat).");
      InternalRequiresGrad internal;
      w.requires_grad_(true);
      diff_wrapped.push_back(w);
    }
    out.push_back(std::move(w));
  }
  return out;
}

/// torch.autograd.grad that treats unused inputs and outputs that do not
/// require grad as giving zero gradients (never undefined tensors).
Tensors autograd_grad(const Tensors& outputs, const Tensors& inputs, const Tensors& grad_outputs,
                      bool retain_graph, bool create_graph) {
  if (inputs.empty()) return {};
  Tensors outs, gos;
  for (size_t i = 0; i < outputs.size(); ++i) {
    if (outputs[i].requires_grad()) {
      outs.push_back(outputs[i]);
      if (!grad_outputs.empty()) gos.push_back(grad_outputs[i]);
    }
  }
  Tensors result;
  if (outs.empty()) {
    result.reserve(inputs.size());
    for (const auto& in : inputs) result.push_back(at::zeros_like(compat::unwrap_dead(in)));
    return result;
  }
  {
    OwnBackward own;
    result = torch::autograd::grad(outs, inputs, gos, retain_graph, create_graph, /*allow_unused=*/true);
  }
  // (Zeros of the plain value where the inputs belong to a popped level: a
  // vjp_fn called after its vjp returned.)
  for (size_t j = 0; j < result.size(); ++j)
    if (!result[j].defined()) result[j] = at::zeros_like(compat::unwrap_dead(inputs[j]));
  return result;
}

void unwrap_all(Tensors& ts, int64_t lvl) {
  for (auto& t : ts)
    if (t.defined()) t = compat::unwrap_grad(t, lvl);
}

void check_tensor_outputs(const FlatResult& res, const char* api) {
  for (size_t k = 0; k < res.num_primary; ++k) {
    TORCH_CHECK(res.leaves[k].defined(), "torchfunc::", api, ": output ", k,
                " of f is an undefined Tensor; every output must be a defined Tensor.");
  }
}

}  // namespace detail
}  // namespace torchfunc

// ---- debug_unwrap (include/torchfunc/debug_unwrap.h) -------------------------------

namespace torchfunc {

at::Tensor debug_unwrap(const at::Tensor& t, bool recurse) {
  at::Tensor cur = t;
  while (cur.defined()) {
    at::Tensor next;
    if (auto* b = at::functorch::maybeGetBatchedImpl(cur)) {
      next = b->value();
    } else if (auto* w = compat::wrapper_of(cur)) {
      next = w->value();
    } else if (at::functionalization::impl::isFunctionalTensor(cur)) {
      next = at::functionalization::impl::from_functional_tensor(cur);
    } else {
      break;
    }
    cur = std::move(next);
    if (!recurse) break;
  }
  return cur;
}

}  // namespace torchfunc
