// src/batch_rules/util.h: what torchfunc's batching rules share (the files
// of src/batch_rules/, one per op family): the current vmap level, the
// [B, ...] physical layout, the pointwise-loss rule templates, and
// BatchRuleRegistrar, the one place that decides whether a rule of ours
// registers. Each family file defines one register_*_rules function below;
// registry.cpp calls them all once.
#pragma once

#include "../compat.h"

#include <ATen/ATen.h>
#include <ATen/core/Reduction.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <array>
#include <memory>
#include <string>
#include <vector>

namespace torchfunc {
namespace detail {
namespace batch_rules {

namespace ft = at::functorch;

inline int64_t current_vmap_level(const char* op) {
  auto layer = ft::maybeCurrentDynamicLayer();
  TORCH_INTERNAL_ASSERT(layer.has_value(), "torchfunc: ", op, " batching rule called outside vmap");
  return layer->layerId();
}

// The batch size of the first operand batched at `level` (null entries are
// skipped); -1 if none is.
inline int64_t batch_size_at(std::initializer_list<const at::Tensor*> ts, int64_t level) {
  for (const at::Tensor* t : ts)
    if (t)
      if (auto* b = compat::batched_at(*t, level)) return b->value().size(b->bdim());
  return -1;
}

// The [B, ...] layout the rules below work on: batch dim first; an operand
// not batched at `level` is expanded to B as a view.
inline at::Tensor batch_first(const at::Tensor& t, int64_t level, int64_t batch) {
  if (auto* b = compat::batched_at(t, level)) return b->bdim() == 0 ? b->value() : b->value().movedim(b->bdim(), 0);
  std::vector<int64_t> shape{batch};
  shape.insert(shape.end(), t.sizes().begin(), t.sizes().end());
  return t.unsqueeze(0).expand(shape);
}

// ---- pointwise losses -------------------------------------------------------
// Each loss is elementwise before its reduction. The rule brings every operand
// to the physical layout [B, *logical] (batch dim first, unbatched operands
// expanded as views, lower logical ranks padded with size-1 dims so they
// broadcast as they would per sample), runs the op with reduction none, and
// applies the reduction per sample.

struct Aligned {
  std::array<at::Tensor, 3> t;  // physical [B, ...] operands, set only if batch >= 0
  int64_t batch = -1;            // -1: nothing is batched at this level
};

inline Aligned align(std::array<const at::Tensor*, 3> in, int64_t level) {
  Aligned out;
  out.batch = batch_size_at({in[0], in[1], in[2]}, level);
  if (out.batch < 0) return out;
  int64_t rank = 0;  // the largest per-sample rank
  for (size_t i = 0; i < in.size(); ++i) {
    if (!in[i]) continue;
    out.t[i] = batch_first(*in[i], level, out.batch);
    rank = std::max<int64_t>(rank, out.t[i].dim() - 1);
  }
  for (size_t i = 0; i < in.size(); ++i)
    while (in[i] && out.t[i].dim() < rank + 1) out.t[i] = out.t[i].unsqueeze(1);
  return out;
}

// Per-sample reduction of a [B, ...] elementwise loss.
inline at::Tensor reduce_per_sample(const at::Tensor& loss, int64_t reduction) {
  if (reduction == at::Reduction::None) return loss;
  at::Tensor flat = loss.reshape({loss.size(0), -1});
  return reduction == at::Reduction::Mean ? flat.mean(1) : flat.sum(1);
}

// Scale of a per-sample backward computed with reduction none: 1/numel of one
// sample for mean (what the op would use on the unbatched input).
inline at::Tensor scale_backward(const at::Tensor& grad, int64_t reduction) {
  if (reduction != at::Reduction::Mean) return grad;
  const int64_t per_sample = grad.numel() / std::max<int64_t>(grad.size(0), 1);
  return grad / static_cast<double>(std::max<int64_t>(per_sample, 1));
}

// Forward: Op(self, target, reduction, extra...) -> loss.
template <auto Op, class... Extra>
at::Tensor loss_rule(const at::Tensor& self, const at::Tensor& target, int64_t reduction, Extra... extra) {
  c10::impl::ExcludeDispatchKeyGuard guard(c10::DispatchKey::FuncTorchBatched);
  const int64_t level = current_vmap_level("loss");
  Aligned a = align({&self, &target, nullptr}, level);
  if (a.batch < 0) return Op(self, target, reduction, extra...);
  at::Tensor loss = reduce_per_sample(Op(a.t[0], a.t[1], at::Reduction::None, extra...), reduction);
  return ft::makeBatched(loss, 0, level);
}

// Backward: Op(grad_output, self, target, reduction, extra...) -> grad_self.
// With reduction mean/sum grad_output is one scalar per sample ([B] -> [B, 1, ...]).
template <auto Op, class... Extra>
at::Tensor loss_backward_rule(const at::Tensor& grad_output, const at::Tensor& self, const at::Tensor& target,
                              int64_t reduction, Extra... extra) {
  c10::impl::ExcludeDispatchKeyGuard guard(c10::DispatchKey::FuncTorchBatched);
  const int64_t level = current_vmap_level("loss backward");
  Aligned a = align({&grad_output, &self, &target}, level);
  if (a.batch < 0) return Op(grad_output, self, target, reduction, extra...);
  at::Tensor grad = Op(a.t[0], a.t[1].contiguous(), a.t[2], at::Reduction::None, extra...);
  return ft::makeBatched(scale_backward(grad, reduction), 0, level);
}

/// Registers torchfunc's rules into libtorch's dispatcher and records their
/// names (own_batch_rules()). `add` registers only where this libtorch has no
/// batching rule of its own (compat::has_batch_rule), so a libtorch that ships
/// one keeps it; `replace` overrides libtorch's kernel (where it is known to
/// be wrong) at the given key. A schema that differs from our signature keeps
/// libtorch's behaviour for that op only; the tests check which rules
/// register on the libtorch we build against.
class BatchRuleRegistrar {
 public:
  explicit BatchRuleRegistrar(std::vector<std::string>& names) : names_(names) {}

  template <class Kernel>
  void add(const char* op, const char* overload, Kernel kernel) {
    if (compat::has_batch_rule(op, overload)) return;
    const std::string full = *overload ? std::string(op) + "." + overload : std::string(op);
    try {
      batched().impl(full.c_str(), std::move(kernel));
      names_.push_back("aten::" + full);
    } catch (const c10::Error&) {
    }
  }

  /// True if it registered (false: this libtorch's schema differs).
  template <class Kernel>
  bool replace(torch::Library& at_key, const char* op, Kernel kernel) {
    compat::QuietWarnings quiet;  // "Overriding a previously registered kernel"
    try {
      at_key.impl(op, std::move(kernel));
      names_.push_back(std::string("aten::") + op);
      return true;
    } catch (const c10::Error&) {
      return false;
    }
  }

  // The registrations live as long as these libraries: the whole process.
  static torch::Library& batched() { return library(c10::DispatchKey::FuncTorchBatched); }
  static torch::Library& vmap_mode() { return library(c10::DispatchKey::FuncTorchVmapMode); }
  /// The key every op passes first inside any transform: a kernel there is a
  /// decomposition whose ops then go through every active transform.
  static torch::Library& front_mode() { return library(c10::DispatchKey::FuncTorchDynamicLayerFrontMode); }

 private:
  static torch::Library& library(c10::DispatchKey key);
  std::vector<std::string>& names_;
};

// One per op family (the file of the same name).
void register_loss_rules(BatchRuleRegistrar& r);        // losses.cpp
void register_activation_rules(BatchRuleRegistrar& r);  // activations.cpp
void register_reduction_rules(BatchRuleRegistrar& r);   // reductions.cpp
void register_indexing_rules(BatchRuleRegistrar& r);    // indexing.cpp
void register_pooling_rules(BatchRuleRegistrar& r);     // pooling.cpp
/// Rules for libtorch 1.13 only (prelu_1_13.cpp; not built for 2.x).
void register_libtorch_1_13_rules(BatchRuleRegistrar& r);

}  // namespace batch_rules
}  // namespace detail
}  // namespace torchfunc
