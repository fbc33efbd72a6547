// src/batch_rules/prelu_1_13.cpp: batching rules only libtorch 1.13 needs
// (built only against libtorch < 2; dropping 1.13 deletes this file).
//
// aten::prelu / prelu_backward: 1.13's own rules fail for nn::PReLU's default
// one-element weight and for 1-D inputs (an error or an internal assert, even
// under a plain vmap). 2.x batches _prelu_kernel(_backward) itself.
#include "util.h"

#include <ATen/Functions.h>

namespace torchfunc {
namespace detail {
namespace batch_rules {
namespace {

// ---- prelu --------------------------------------------------------------------
// Per sample, prelu(x, w) = x > 0 ? x : w * x with w broadcast along x's
// channel dim (dim 1 when x has rank >= 2), and w has 1 element or one per
// channel.

// w [B, *w_shape] viewed to broadcast against x [B, *S].
at::Tensor prelu_weight_view(const at::Tensor& x, const at::Tensor& w) {
  const int64_t rank = x.dim() - 1, batch = x.size(0);
  const int64_t channels = rank >= 2 ? x.size(2) : 1;
  const int64_t params = w.numel() / std::max<int64_t>(batch, 1);
  TORCH_CHECK(w.dim() <= 2, "prelu: Expected `weight` to be a scalar or 1D tensor, but got ndim = ", w.dim() - 1);
  TORCH_CHECK(params == 1 || params == channels,
              "Mismatch of parameter numbers and input channel size. Found parameter numbers = ", params,
              " and channel size = ", channels, ".");
  std::vector<int64_t> shape(static_cast<size_t>(x.dim()), 1);
  shape[0] = batch;
  if (params > 1) shape[2] = params;
  return w.reshape(shape);
}

at::Tensor prelu_batched(const at::Tensor& self, const at::Tensor& weight) {
  c10::impl::ExcludeDispatchKeyGuard guard(c10::DispatchKey::FuncTorchBatched);
  const int64_t level = current_vmap_level("prelu");
  const int64_t batch = batch_size_at({&self, &weight}, level);
  if (batch < 0) return at::prelu(self, weight);
  at::Tensor x = batch_first(self, level, batch);
  at::Tensor w = prelu_weight_view(x, batch_first(weight, level, batch));
  return ft::makeBatched(at::where(x > 0, x, w * x), 0, level);
}

std::tuple<at::Tensor, at::Tensor> prelu_backward_batched(const at::Tensor& grad_output, const at::Tensor& self,
                                                          const at::Tensor& weight) {
  c10::impl::ExcludeDispatchKeyGuard guard(c10::DispatchKey::FuncTorchBatched);
  const int64_t level = current_vmap_level("prelu_backward");
  const int64_t batch = batch_size_at({&grad_output, &self, &weight}, level);
  if (batch < 0) return at::prelu_backward(grad_output, self, weight);
  at::Tensor x = batch_first(self, level, batch);
  at::Tensor g = batch_first(grad_output, level, batch);
  at::Tensor w_phys = batch_first(weight, level, batch);
  at::Tensor w = prelu_weight_view(x, w_phys);
  at::Tensor positive = x > 0;
  at::Tensor grad_self = at::where(positive, g, w * g);
  // d/dw: x * g where x <= 0, summed over everything but the channel dim.
  at::Tensor per_elem = at::where(positive, at::zeros_like(x), x * g);
  std::vector<int64_t> dims;
  for (int64_t d = 1; d < x.dim(); ++d)
    if (!(w.dim() > 2 && w.size(2) > 1 && d == 2)) dims.push_back(d);
  at::Tensor grad_weight = dims.empty() ? per_elem : per_elem.sum(dims);
  grad_weight = grad_weight.reshape(w_phys.sizes());
  return {ft::makeBatched(grad_self, 0, level), ft::makeBatched(grad_weight, 0, level)};
}

}  // namespace

void register_libtorch_1_13_rules(BatchRuleRegistrar& r) {
  r.replace(BatchRuleRegistrar::batched(), "prelu", TORCH_FN(prelu_batched));
  r.replace(BatchRuleRegistrar::batched(), "prelu_backward", TORCH_FN(prelu_backward_batched));
}

}  // namespace batch_rules
}  // namespace detail
}  // namespace torchfunc
