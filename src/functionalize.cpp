// src/functionalize.cpp: the functionalization level (one functorch
// Functionalize layer; libtorch's FunctionalTensorWrapper does the work).
// What torch.func's Python does around that layer (wrap the inputs, unwrap
// the outputs, sync the inputs and copy their mutations back) lives in
// torch_python, so it is written here.
#include <ATen/FunctionalTensorWrapper.h>

#include "levels.h"

namespace torchfunc {
namespace detail {

namespace {

namespace fz = at::functionalization::impl;

bool functional_at(const at::Tensor& t, int64_t level) {
  return t.defined() && fz::isFunctionalTensor(t) && fz::unsafeGetFunctionalWrapper(t)->level() == level;
}

/// The plain value of an output of this level, with every pending update of
/// its aliases applied (as views again when add_back_views).
at::Tensor unwrap_output(const at::Tensor& t, int64_t level, bool add_back_views) {
  if (!functional_at(t, level)) return t;  // e.g. a Tensor f captured from outside
  auto* w = fz::unsafeGetFunctionalWrapper(t);
  at::functionalization::impl::FunctionalizationReapplyViewsGuard views(add_back_views);
  if (w->apply_updates()) w->regenerate_from_base();
  return w->value();
}

/// Copies what f did to an input (data, and shape where f resized it) back
/// into the caller's tensor.
void copy_back_mutation(const at::Tensor& user, const at::Tensor& wrapped, const char* api, LeafName name,
                        size_t i) {
  auto* w = fz::unsafeGetFunctionalWrapper(wrapped);
  w->sync_();
  const at::Tensor& now = w->value();
  if (now.unsafeGetTensorImpl() == user.unsafeGetTensorImpl()) return;  // never replaced: not mutated
  // (autograd would refuse the copy with a message that names no transform)
  TORCH_CHECK(!(user.requires_grad() && user.is_leaf() && c10::GradMode::is_enabled()), "torchfunc::", api, ": f "
              "mutated ", name(i), ", a leaf Tensor that requires grad (e.g. the argument an enclosing grad "
              "differentiates), so the mutation cannot be copied back into it. Mutate a clone inside f instead.");
  if (user.nbytes() != now.nbytes()) user.resize_(now.sizes());
  if (user.sizes() != now.sizes()) user.as_strided_(now.sizes(), now.strides());
  user.copy_(now);
}

}  // namespace

Tensors functionalize_flat(const Tensors& inputs, bool reapply_views, FlatFn f, const char* api, LeafName name) {
  LayerGuard layer(api, [&] { return compat::push_functionalize_layer(reapply_views); });
  const int64_t lvl = layer.level();
  Tensors wrapped;
  wrapped.reserve(inputs.size());
  std::vector<char> ours;  // wrapped here (an inner level may relabel the wrapper)
  for (const auto& t : inputs) {
    ours.push_back(0);
    // Already functional: functionalize directly inside functionalize (an
    // internal assert in libtorch, and in torch.func). The outer level
    // removes this input's mutations and copies them back.
    if (!t.defined() || fz::isFunctionalTensor(t)) {
      wrapped.push_back(t);
      continue;
    }
    ours.back() = 1;
    at::Tensor w = fz::to_functional_tensor(t);
    fz::unsafeGetFunctionalWrapper(w)->set_level(lvl);
    wrapped.push_back(std::move(w));
  }
  FlatResult res;
  f(wrapped, res);
  Tensors outs;
  outs.reserve(res.leaves.size());
  for (const auto& o : res.leaves) outs.push_back(unwrap_output(o, lvl, reapply_views));
  // Before the level is popped (Note [unwrap before pop]): the inputs'
  // pending mutations are applied, then copied to the caller's tensors.
  for (size_t i = 0; i < inputs.size(); ++i)
    if (ours[i]) copy_back_mutation(inputs[i], wrapped[i], api, name, i);
  return outs;
}

}  // namespace detail
}  // namespace torchfunc
