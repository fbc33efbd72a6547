// torchfunc/checkpoint.h: recompute instead of store. Mirrors
// torch.utils.checkpoint (which torch.func's grad and vjp refuse) and
// jax.checkpoint with its default policy (save nothing inside f).
//
//   auto block = torchfunc::checkpoint([&](const Tensor& h) { return mlp_block(h); });
//   auto psg = vmap(grad(loss_using(block)), in_dims(none, 0, 0))(params, xs, ys);
//
// checkpoint(f) has f's signature. Its forward runs f with autograd off, so no
// intermediate of f is kept; a backward pass runs f again under vjp at the
// saved inputs (one more evaluation of f per backward). It composes with
// every transform: under jvp it is jvp(f) (forward mode stores nothing
// anyway), under vmap it runs batched, nested grads recompute at every level.
// The results equal f's.
//
// Policies (JAX's dots_saveable, save_only_these_names) are not offered: in
// eager execution the recomputation cannot skip the ops that produced a saved
// value, so a policy would save memory without saving time.
#pragma once

#include <torchfunc/custom_function.h>

namespace torchfunc {

/// checkpoint(f)(args...) == f(args...), recomputing f in the backward pass.
template <class F>
class Checkpointed {
 public:
  explicit Checkpointed(F f) : f_(std::move(f)) {}
  template <class... Args>
  auto operator()(const Args&... args) const {
    auto rules = std::make_shared<detail::CustomRules>();
    rules->name = "checkpoint";
    rules->generate_vmap_rule = true;
    rules->recompute = true;
    return detail::invoke_custom(std::move(rules), f_, detail::NoRule{}, detail::NoRule{}, detail::NoRule{}, args...);
  }

 private:
  F f_;
};

template <class F>
Checkpointed<F> checkpoint(F f) {
  return Checkpointed<F>(std::move(f));
}

}  // namespace torchfunc
