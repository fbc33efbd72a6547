// apps/dpsgd/augment.h: the random views of augmentation multiplicity
// (--augmentations): one example's K views are averaged before clipping
// (torchfunc::dp::ClipOptions::group_size).
#pragma once

#include <torch/torch.h>

namespace dpsgd {

// K random views of each image [n, 1, H, W] -> [n K, 1, H, W] (an image's views
// are consecutive rows): shifted by up to `shift` pixels (edges replicated)
// and, with `flip`, mirrored left-right with probability 1/2. The draws come
// from this rank's own generator, so ranks keep drawing masks and noise alike.
inline at::Tensor augment(const at::Tensor& x, int64_t K, int64_t shift, bool flip, at::Generator& gen) {
  const int64_t n = x.size(0) * K, H = x.size(2), W = x.size(3);
  namespace F = torch::nn::functional;
  at::Tensor padded =
      F::pad(x.repeat_interleave(K, 0), F::PadFuncOptions({shift, shift, shift, shift}).mode(torch::kReplicate));
  auto draw = [&](int64_t high) { return torch::randint(0, high, {n, 1, 1}, gen, torch::kLong).to(x.device()); };
  const auto longs = torch::TensorOptions().dtype(torch::kLong).device(x.device());
  at::Tensor rows = torch::arange(H, longs).view({1, H, 1}) + draw(2 * shift + 1);
  at::Tensor cols = torch::arange(W, longs).view({1, 1, W});
  if (flip) cols = torch::where(draw(2).to(torch::kBool), W - 1 - cols, cols);
  cols = cols + draw(2 * shift + 1);
  return padded.index({torch::arange(n, longs).view({n, 1, 1}), 0, rows, cols}).unsqueeze(1);
}

}  // namespace dpsgd
