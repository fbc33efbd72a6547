// src/compat.h: every difference between libtorch 1.13 and 2.x that
// torchfunc depends on lives here, and only here.
//
// 1.13: c10::optional, int64_t batch sizes, TransformType/RandomnessType in
//       at::functorch.
// 2.x:  std::optional (c10::optional is an alias), c10::SymInt batch sizes,
//       same entry points.
#pragma once

#include <ATen/functorch/BatchedTensorImpl.h>
#include <ATen/functorch/DynamicLayer.h>
#include <ATen/functorch/TensorWrapper.h>
#include <ATen/functorch/VmapInterpreter.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/enum_tag.h>
#include <c10/util/Exception.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/version.h>

#include <cstdint>
#include <memory>
#include <type_traits>

namespace torchfunc {
namespace compat {

namespace ft = at::functorch;

#if TORCH_VERSION_MAJOR >= 2
inline int64_t push_vmap_layer(int64_t batch_size, ft::RandomnessType r) {
  return ft::initAndPushDynamicLayer(ft::TransformType::Vmap, c10::SymInt(batch_size), r);
}
inline int64_t vmap_batch_size(const ft::VmapInterpreterPtr& vi) { return vi.batchSize().guard_int(__FILE__, __LINE__); }
#else
inline int64_t vmap_batch_size(const ft::VmapInterpreterPtr& vi) { return vi.batchSize(); }
inline int64_t push_vmap_layer(int64_t batch_size, ft::RandomnessType r) {
  return ft::initAndPushDynamicLayer(ft::TransformType::Vmap, batch_size, r);
}
#endif

// Tag::pointwise exists from 2.x; on 1.13 aot_function's min-cut partition
// knows pointwise ops by name only (src/aot.cpp).
inline bool is_pointwise(const c10::OperatorHandle& op) {
#if TORCH_VERSION_MAJOR >= 2
  return op.hasTag(at::Tag::pointwise);
#else
  (void)op;
  return false;
#endif
}

// libtorch 1.13: code that exists only for it sits in files named *_1_13.cpp
// (built only for it; see CMakeLists.txt) and runs where this is true.
#define TORCHFUNC_LIBTORCH_1_13 (TORCH_VERSION_MAJOR < 2)
constexpr bool kLibtorch113 = TORCHFUNC_LIBTORCH_1_13;

// libtorch's nll_loss_forward / nll_loss_backward batching rules take a
// negative ignore_index to mean "ignore nothing" and fail on the default
// -100 as soon as a target equals it, and its cross_entropy_loss
// decomposition batches a boolean-mask index_put_ (label smoothing with an
// ignored target). True of 1.13 and of the 2.x sources we have read; replaced
// on every version until a fixed one is known.
constexpr bool kReplaceNllLossBatchRules = true;

// Drops c10 warnings while alive (the dispatcher warns when a kernel replaces
// another, which BatchRuleRegistrar::replace does on purpose).
// Warning handlers live in c10::WarningUtils on 2.x (c10::Warning on 1.13), and
// 2.x's handler receives one c10::Warning object.
#if TORCH_VERSION_MAJOR >= 2
namespace warning_api = c10::WarningUtils;
#else
namespace warning_api = c10::Warning;
#endif
/// While alive, this thread's warnings go to pass() first; the ones it
/// returns true for go on to the handler installed before it.
class WarningFilter : public c10::WarningHandler {
 public:
  WarningFilter() : prev_(warning_api::get_warning_handler()) { warning_api::set_warning_handler(this); }
  ~WarningFilter() override { warning_api::set_warning_handler(prev_); }
  WarningFilter(const WarningFilter&) = delete;
  WarningFilter& operator=(const WarningFilter&) = delete;
  virtual bool pass(const std::string& msg) = 0;
#if TORCH_VERSION_MAJOR >= 2
  void process(const c10::Warning& w) override {
    if (pass(w.msg()) && prev_) prev_->process(w);
  }
#else
  void process(const c10::SourceLocation& loc, const std::string& msg, const bool verbatim) override {
    if (pass(msg) && prev_) prev_->process(loc, msg, verbatim);
  }
#endif

 private:
  c10::WarningHandler* prev_;
};
class QuietWarnings : public WarningFilter {
 public:
  bool pass(const std::string&) override { return false; }
};

inline int64_t push_grad_layer(bool prev_grad_mode) {
  return ft::initAndPushDynamicLayer(ft::TransformType::Grad, c10::nullopt, c10::nullopt, prev_grad_mode);
}

inline int64_t push_functionalize_layer(bool add_back_views) {
  return ft::initAndPushDynamicLayer(ft::TransformType::Functionalize, c10::nullopt, c10::nullopt, c10::nullopt,
                                     c10::nullopt, add_back_views);
}

inline int64_t push_jvp_layer(bool prev_fwd_grad_mode) {
  return ft::initAndPushDynamicLayer(ft::TransformType::Jvp, c10::nullopt, c10::nullopt, c10::nullopt,
                                     prev_fwd_grad_mode);
}

// libtorch 1.13 keeps each level's "is alive" flag in one process-wide map
// keyed by level id, and level ids restart at 1 in every thread: two threads
// inside transforms at once collide (an internal assert). 2.x keeps that flag
// on the thread's own layer. So on 1.13 we run transforms of different threads
// one at a time (see LayerGuard in levels.cpp); on 2.x they run concurrently.
#if TORCH_VERSION_MAJOR >= 2
constexpr bool kSerializeThreads = false;
#else
constexpr bool kSerializeThreads = true;
#endif

/// True if this libtorch has a batching rule for aten::<op>.<overload> (or
/// the op does not exist): at FuncTorchBatched, or on 2.x at the alias key
/// FuncTorchBatchedDecomposition, which hasKernelForDispatchKey(FuncTorchBatched)
/// does not see (nanmean, nll_loss*, prelu, unsafe_chunk, ... are there).
inline bool has_batch_rule(const char* op, const char* overload) {
  auto handle = c10::Dispatcher::singleton().findSchema({std::string("aten::") + op, overload});
  if (!handle.has_value()) return true;
  if (handle->hasKernelForDispatchKey(c10::DispatchKey::FuncTorchBatched)) return true;
#if TORCH_VERSION_MAJOR >= 2
  if (handle->hasKernelForDispatchKey(c10::DispatchKey::FuncTorchBatchedDecomposition)) return true;
#endif
  return false;
}

// Autograd nodes are held by std::shared_ptr up to some 2.x release (1.13,
// 2.6) and by c10::intrusive_ptr after it (2.13).
template <class N>
auto make_node() {
  if constexpr (std::is_base_of_v<c10::intrusive_ptr_target, N>) {
    return c10::make_intrusive<N>();
  } else {
    return std::make_shared<N>();
  }
}
template <class N>
auto node_ptr(N* node) {
  if constexpr (std::is_base_of_v<c10::intrusive_ptr_target, N>) {
    return node->getptr();
  } else {
    return node->shared_from_this();
  }
}

inline size_t layer_depth() { return ft::getDynamicLayerStack().size(); }

inline void pop_layer() { ft::popDynamicLayerAndDeleteMetadata(); }

/// (value, bdim) if t is batched at exactly `level`.
inline ft::BatchedTensorImpl* batched_at(const at::Tensor& t, int64_t level) {
  auto* b = ft::maybeGetBatchedImpl(t);
  return (b && b->level() == level) ? b : nullptr;
}

inline ft::TensorWrapper* wrapper_of(const at::Tensor& t) { return ft::maybeGetTensorWrapper(t); }

/// True while this thread runs an autograd backward pass (the engine sets the
/// current graph task on its CPU and device threads). Same spelling in 2.x.
inline bool inside_autograd_backward() { return torch::autograd::get_current_graph_task_nodes_in_graph() != nullptr; }

/// The wrapped value if t is a dead TensorWrapper (its level was popped);
/// t itself otherwise. Results of a vjp_fn / linearize jvp_fn, which run a
/// graph recorded at a popped level, are unwrapped with this and never by
/// level id: ids are reused, so a later transform at the same depth has the
/// dead level's id, and unwrapping "that level" would cut its graph.
inline at::Tensor unwrap_dead(const at::Tensor& t) {
  auto* w = ft::maybeGetTensorWrapper(t);
  return (w && !w->is_alive()) ? w->value() : t;
}

/// The wrapped value if t is a TensorWrapper of `level` (alive or not).
inline at::Tensor unwrap_grad(const at::Tensor& t, int64_t level) {
  auto* w = ft::maybeGetTensorWrapper(t);
  if (!w) return t;
  auto lvl = w->level();
  if (lvl.has_value() && *lvl == level) return w->value();
  if (!lvl.has_value()) return ft::unwrapIfDead(t);
  return t;
}

// torch::nn options hold some settings (Conv padding, padding_mode) in a
// variant: c10::variant on 1.13, std::variant on 2.x.
template <class T, class V>
const T* variant_get_if(const V& v) {
#if TORCH_VERSION_MAJOR >= 2
  return std::get_if<T>(&v);
#else
  return c10::get_if<T>(&v);
#endif
}

}  // namespace compat
}  // namespace torchfunc
