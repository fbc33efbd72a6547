// torchfunc/dp.h: the clipped sum of per-sample gradients for DP-SGD,
// without materialising every per-sample gradient where a layer's structure
// allows (ghost clipping and book-keeping: Li et al. 2022, Bu et al. 2023).
//
// For a layer with input a_i [T x d] and output gradient g_i [T x p] of
// example i, the per-sample weight gradient is G_i = g_i^T a_i, so
//   ||G_i||^2 = sum_{t,t'} (a_t . a_t')(g_t . g_t')   (ghost: O(T^2 (p + d)))
// or ||g_i^T a_i||^2 computed directly (materialised: O(T p d)); the choice is
// per layer (FastDP's rule: ghost when 2 T^2 <= p d). With the clip factors
// c_i = min(1, C / (||grad_i|| + eps)) the clipped sum is g^T diag(c) a: one
// more product from what the single backward pass kept, no second pass.
// Linear, Conv1d/Conv2d (any stride, padding, dilation, groups; zero padding)
// and Embedding get these rules; LayerNorm and GroupNorm materialise their
// small per-sample gradients (sum of g * x^ over positions, x^ the input
// normalised without affine parameters); any other layer with parameters gets its
// per-sample gradients by vmap over a vjp of that layer alone, and any model
// that is not an nn::Sequential by vmap(grad) of the whole model.
#pragma once

#include <torch/nn/modules/container/sequential.h>
#include <torchfunc/functional_call.h>
#include <torchfunc/grad.h>
#include <torchfunc/vmap.h>

#include <functional>

namespace torchfunc {
namespace dp {

/// How a layer's per-sample gradient norm is computed.
enum class NormMode {
  Auto,         // per layer: ghost when 2 T^2 <= p d, else materialised
  Ghost,        // always the T x T Gram products
  Materialize,  // always the per-sample gradient itself
};

struct ClipOptions {
  /// C, the bound on every example's gradient norm (all parameters together).
  TORCH_ARG(double, max_norm) = 1.0;
  TORCH_ARG(NormMode, mode) = NormMode::Auto;
  /// c_i = min(1, C / (norm_i + eps)), as Opacus.
  TORCH_ARG(double, eps) = 1e-6;
  /// Augmentation multiplicity (De et al. 2022): every K consecutive rows of
  /// the batch are K views of one example, whose gradient is the mean of
  /// theirs, clipped once. The batch size must be a multiple of K; norms are
  /// then one per example ([B / K]), losses stay one per row ([B]).
  TORCH_ARG(int64_t, group_size) = 1;
};

struct ClippedGradients {
  TensorDict grad_sum;  // sum_i c_i grad_i, keyed like named_parameters(model)
  at::Tensor norms;     // [B / group_size] per-sample gradient norms, before clipping
  at::Tensor losses;    // [B] per-row losses
};

/// loss(output, target) -> [B] per-sample losses (reduction none): the
/// gradient of example i is that of losses[i].
using PerSampleLoss = std::function<at::Tensor(const at::Tensor&, const at::Tensor&)>;

/// The clipped per-sample gradient sum of an nn::Sequential over a batch
/// (dim 0 of x and y). Every child must treat the samples of its input
/// independently (no BatchNorm in training mode). One forward and one
/// backward pass; parameters that do not require grad are left out.
///   auto r = dp::clipped_grad_sum(model, per_sample_nll, x, y, dp::ClipOptions().max_norm(1.0));
///   noisy = r.grad_sum[k] + sigma * C * randn  ...
ClippedGradients clipped_grad_sum(torch::nn::Sequential& model, const PerSampleLoss& loss, const at::Tensor& x,
                                  const at::Tensor& y, const ClipOptions& options = {});

namespace detail {
void check_inputs(const at::Tensor& x, const at::Tensor& y, const ClipOptions& options);
ClippedGradients clip_materialized(TensorDict per_sample_grads, at::Tensor losses, const ClipOptions& options);
}  // namespace detail

/// Any other model (a module holder or shared_ptr whose forward takes one
/// Tensor): per-sample gradients by vmap(grad(functional_call)), then clipped
/// and summed. Same result as the Sequential overload, more memory.
template <class M>
ClippedGradients clipped_grad_sum(M& model, const PerSampleLoss& loss, const at::Tensor& x, const at::Tensor& y,
                                  const ClipOptions& options = {}) {
  detail::check_inputs(x, y, options);
  TensorDict params;
  for (const auto& p : torchfunc::detail::module_ref(model).named_parameters())
    if (p.value().requires_grad()) params.insert(p.key(), p.value().detach());
  auto one = [&](const TensorDict& p, const at::Tensor& xi, const at::Tensor& yi) {
    return loss(functional_call(model, p, xi.unsqueeze(0)), yi.unsqueeze(0)).squeeze(0);
  };
  auto [grads, losses] = vmap(grad_and_value(one), in_dims(none, 0, 0))(params, x, y);
  return detail::clip_materialized(std::move(grads), losses, options);
}

}  // namespace dp
}  // namespace torchfunc
