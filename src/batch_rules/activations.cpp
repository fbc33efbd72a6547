// src/batch_rules/activations.cpp: activations libtorch cannot transform.
// hardsigmoid: decomposed inside every transform (no forward-mode formula for
// its backward on 1.13 nor 2.13). rrelu_with_noise: refused under vmap as a
// random op even in eval mode, where nn::RReLU is deterministic (replaced at
// the vmap-mode key), and its backward (missing). Not here: prelu (1.13 only,
// prelu_1_13.cpp).
#include "util.h"

#include <ATen/ExpandUtils.h>
#include <ATen/Functions.h>
#include <ATen/core/Reduction.h>
#include <c10/core/WrapDimMinimal.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <limits>
#include <optional>

namespace torchfunc {
namespace detail {
namespace batch_rules {
namespace {

// ---- hardsigmoid (a decomposition inside every transform) ------------------
// libtorch (1.13 and 2.13) has no forward-mode formula for
// hardsigmoid_backward (nor a decomposition it could run instead), so hessian / jvp(grad) through
// nn::Hardsigmoid failed. Inside transforms it is computed with where: the
// values of ATen's kernel ((x + 3) / 6 clamped to [0, 1]) and its derivative
// (1/6 strictly inside (-3, 3), 0 elsewhere).
at::Tensor hardsigmoid_decomposed(const at::Tensor& self) {
  at::Tensor inside = (self > -3) & (self < 3);
  return at::where(inside, (self + 3) / 6, (self >= 3).to(self.scalar_type()));
}

// ---- rrelu_with_noise (nn::RReLU; rejected under vmap) -------------------------
// libtorch (1.13 and 2.13) lists it among the random ops vmap refuses (a FuncTorchVmapMode kernel),
// even in eval mode, where RReLU is deterministic: leaky_relu with the mean
// slope. Eval mode is decomposed so; training mode (a random slope per
// element) stays an error.
// `Noise` is at::Tensor& where the schema marks noise mutable (2.x:
// Tensor(b!) noise) and const at::Tensor& where it does not (1.13).
template <class Noise>
at::Tensor rrelu_with_noise_vmap_mode(const at::Tensor& self, Noise noise, const at::Scalar& lower,
                                      const at::Scalar& upper, bool training, c10::optional<at::Generator> generator) {
  TORCH_CHECK(!training, "torchfunc::vmap: RReLU in training mode draws a random slope per element, which is not "
                         "supported under vmap; use eval mode (the mean slope) or LeakyReLU.");
  (void)noise;
  (void)generator;
  c10::impl::ExcludeDispatchKeyGuard guard(c10::DispatchKey::FuncTorchVmapMode);
  return at::leaky_relu(self, (lower.toDouble() + upper.toDouble()) / 2);
}

// ---- rrelu_with_noise_backward (nn::RReLU in eval mode) -------------------------
// Its backward in eval mode is leaky_relu's (what ATen computes too).
at::Tensor rrelu_with_noise_backward_batched(const at::Tensor& grad_output, const at::Tensor& self,
                                             const at::Tensor& noise, const at::Scalar& lower,
                                             const at::Scalar& upper, bool training, bool self_is_result) {
  c10::impl::ExcludeDispatchKeyGuard guard(c10::DispatchKey::FuncTorchBatched);
  const int64_t level = current_vmap_level("rrelu_with_noise_backward");
  const int64_t batch = batch_size_at({&grad_output, &self}, level);
  if (batch < 0) return at::rrelu_with_noise_backward(grad_output, self, noise, lower, upper, training, self_is_result);
  TORCH_CHECK(!training, "torchfunc::vmap: RReLU in training mode is not supported under vmap.");
  at::Tensor grad = at::leaky_relu_backward(batch_first(grad_output, level, batch), batch_first(self, level, batch),
                                            (lower.toDouble() + upper.toDouble()) / 2, self_is_result);
  return ft::makeBatched(grad, 0, level);
}

}  // namespace

void register_activation_rules(BatchRuleRegistrar& r) {
  // A decomposition inside every transform (see hardsigmoid_decomposed).
  r.replace(BatchRuleRegistrar::front_mode(), "hardsigmoid", TORCH_FN(hardsigmoid_decomposed));
  // rrelu_with_noise is refused under vmap as a random op even in eval mode,
  // where nn::RReLU is deterministic (1.13 and 2.13).
  if (!r.replace(BatchRuleRegistrar::vmap_mode(), "rrelu_with_noise",
                 TORCH_FN(rrelu_with_noise_vmap_mode<at::Tensor&>)))
    r.replace(BatchRuleRegistrar::vmap_mode(), "rrelu_with_noise",
              TORCH_FN(rrelu_with_noise_vmap_mode<const at::Tensor&>));
  r.add("rrelu_with_noise_backward", "", TORCH_FN(rrelu_with_noise_backward_batched));
}

}  // namespace batch_rules
}  // namespace detail
}  // namespace torchfunc
