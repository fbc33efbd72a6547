// src/batch_rules/pooling.cpp: the upsample backward ops and
// max_pool3d_with_indices (+ backward), missing in 1.13 (a per-sample loop
// for every Upsample / MaxPool3d layer).
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

// ---- upsample backward ops ----------------------------------------------------
// grad_output [B, N, C, *spatial] is folded into [B*N, C, *spatial] (the ops
// treat N as independent images) and the result unfolded again.
template <class... Rest>
struct UpsampleBackward {
  using Fn = at::Tensor (*)(const at::Tensor&, at::IntArrayRef, at::IntArrayRef, Rest...);
  template <Fn Op>
  static at::Tensor rule(const at::Tensor& grad_output, at::IntArrayRef output_size, at::IntArrayRef input_size,
                         Rest... rest) {
    c10::impl::ExcludeDispatchKeyGuard guard(c10::DispatchKey::FuncTorchBatched);
    const int64_t level = current_vmap_level("upsample backward");
    auto* b = compat::batched_at(grad_output, level);
    if (!b) return Op(grad_output, output_size, input_size, rest...);
    at::Tensor g = b->value().movedim(b->bdim(), 0);
    const int64_t batch = g.size(0);
    std::vector<int64_t> folded(input_size.begin(), input_size.end());
    folded[0] *= batch;
    at::Tensor grad = Op(g.flatten(0, 1), output_size, folded, rest...);
    std::vector<int64_t> shape{batch};
    shape.insert(shape.end(), input_size.begin(), input_size.end());
    return ft::makeBatched(grad.view(shape), 0, level);
  }
};
using Scale = c10::optional<double>;

// ---- max_pool3d_with_indices (+ backward) ----------------------------------
// Pooling treats images independently: [B, C, D, H, W] (per-sample input
// without N) is an ordinary batch, and [B, N, ...] folds into [B*N, ...].
// Indices are positions inside one image, so they survive the folding.
at::Tensor fold_images(const at::Tensor& t) { return t.dim() == 6 ? t.flatten(0, 1) : t; }
at::Tensor unfold_images(const at::Tensor& t, const at::Tensor& like) {
  if (like.dim() != 6) return t;
  std::vector<int64_t> shape{like.size(0), like.size(1)};
  shape.insert(shape.end(), t.sizes().begin() + 1, t.sizes().end());
  return t.view(shape);
}

std::tuple<at::Tensor, at::Tensor> max_pool3d_batched(const at::Tensor& self, at::IntArrayRef kernel,
                                                      at::IntArrayRef stride, at::IntArrayRef padding,
                                                      at::IntArrayRef dilation, bool ceil_mode) {
  c10::impl::ExcludeDispatchKeyGuard guard(c10::DispatchKey::FuncTorchBatched);
  const int64_t level = current_vmap_level("max_pool3d_with_indices");
  auto* b = compat::batched_at(self, level);
  if (!b) return at::max_pool3d_with_indices(self, kernel, stride, padding, dilation, ceil_mode);
  at::Tensor x = b->value().movedim(b->bdim(), 0);
  TORCH_CHECK(x.dim() == 5 || x.dim() == 6, "max_pool3d: Expected 4D or 5D tensor for input, but got a ",
              x.dim() - 1, "-D tensor per sample");
  auto [out, idx] = at::max_pool3d_with_indices(fold_images(x), kernel, stride, padding, dilation, ceil_mode);
  return {ft::makeBatched(unfold_images(out, x), 0, level), ft::makeBatched(unfold_images(idx, x), 0, level)};
}

at::Tensor max_pool3d_backward_batched(const at::Tensor& grad_output, const at::Tensor& self, at::IntArrayRef kernel,
                                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                       bool ceil_mode, const at::Tensor& indices) {
  c10::impl::ExcludeDispatchKeyGuard guard(c10::DispatchKey::FuncTorchBatched);
  const int64_t level = current_vmap_level("max_pool3d_with_indices_backward");
  const int64_t batch = batch_size_at({&grad_output, &self, &indices}, level);
  if (batch < 0) {
    return at::max_pool3d_with_indices_backward(grad_output, self, kernel, stride, padding, dilation, ceil_mode,
                                                indices);
  }
  at::Tensor x = batch_first(self, level, batch);
  at::Tensor g = batch_first(grad_output, level, batch), idx = batch_first(indices, level, batch);
  at::Tensor grad = at::max_pool3d_with_indices_backward(fold_images(g), fold_images(x).contiguous(), kernel, stride,
                                                         padding, dilation, ceil_mode, fold_images(idx));
  return ft::makeBatched(unfold_images(grad, x), 0, level);
}

}  // namespace

void register_pooling_rules(BatchRuleRegistrar& r) {
  r.add("max_pool3d_with_indices", "", TORCH_FN(max_pool3d_batched));
  r.add("max_pool3d_with_indices_backward", "", TORCH_FN(max_pool3d_backward_batched));
  r.add("upsample_nearest1d_backward", "", TORCH_FN((UpsampleBackward<Scale>::rule<&at::upsample_nearest1d_backward>)));
  r.add("upsample_nearest2d_backward", "",
      TORCH_FN((UpsampleBackward<Scale, Scale>::rule<&at::upsample_nearest2d_backward>)));
  r.add("upsample_nearest3d_backward", "",
      TORCH_FN((UpsampleBackward<Scale, Scale, Scale>::rule<&at::upsample_nearest3d_backward>)));
  r.add("upsample_linear1d_backward", "",
      TORCH_FN((UpsampleBackward<bool, Scale>::rule<&at::upsample_linear1d_backward>)));
  r.add("upsample_bilinear2d_backward", "",
      TORCH_FN((UpsampleBackward<bool, Scale, Scale>::rule<&at::upsample_bilinear2d_backward>)));
  r.add("upsample_bicubic2d_backward", "",
      TORCH_FN((UpsampleBackward<bool, Scale, Scale>::rule<&at::upsample_bicubic2d_backward>)));
  r.add("upsample_trilinear3d_backward", "",
      TORCH_FN((UpsampleBackward<bool, Scale, Scale, Scale>::rule<&at::upsample_trilinear3d_backward>)));
}

}  // namespace batch_rules
}  // namespace detail
}  // namespace torchfunc
