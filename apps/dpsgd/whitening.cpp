#include "whitening.h"

#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>

namespace dpsgd {
namespace {

// (sum + noise + lam I)^(-1/2) for a symmetric [d, d] sum (double): the
// noise is symmetric, N(0, noise_multiplier^2) on and above the diagonal.
at::Tensor regularised_inverse_sqrt(at::Tensor sum, double noise_multiplier, double lam, at::Generator& gen) {
  const int64_t d = sum.size(0);
  if (noise_multiplier > 0) {
    at::Tensor z = at::randn({d, d}, gen, at::TensorOptions().dtype(at::kDouble)).triu().to(sum.device());
    sum = sum + noise_multiplier * (z + z.triu(1).t());
  }
  auto [eigenvalues, vectors] = at::linalg_eigh(sum);
  const at::Tensor scale = (eigenvalues.clamp_min(0) + lam).rsqrt();
  return at::matmul(vectors * scale, vectors.t());
}

}  // namespace

std::pair<at::Tensor, at::Tensor> second_moments(const at::Tensor& features) {
  TORCH_CHECK(features.dim() == 4 && features.size(0) > 0,
              "dpsgd::second_moments: features must be [n, c, h, w] with n > 0, got ", features.sizes());
  c10::InferenceMode guard;
  const int64_t n = features.size(0), c = features.size(1), hw = features.size(2) * features.size(3);
  const auto opts = features.options().dtype(at::kDouble);
  at::Tensor channel_sum = at::zeros({c, c}, opts), position_sum = at::zeros({hw, hw}, opts);
  // In chunks of examples: the transposed copies of all 60,000 examples would
  // take about 1 GB each.
  constexpr int64_t kChunk = 4096;
  for (int64_t begin = 0; begin < n; begin += kChunk) {
    const int64_t m = std::min(kChunk, n - begin);
    at::Tensor u = features.narrow(0, begin, m).reshape({m, -1});
    u = (u / u.norm(2, {1}, true).clamp_min(1e-12)).reshape({m, c, hw});
    // Sums over examples and positions (channels) / examples and channels (positions).
    const at::Tensor by_channel = u.transpose(0, 1).reshape({c, m * hw});
    const at::Tensor by_position = u.permute({2, 0, 1}).reshape({hw, m * c});
    channel_sum += at::matmul(by_channel, by_channel.t()).to(at::kDouble);
    position_sum += at::matmul(by_position, by_position.t()).to(at::kDouble);
  }
  return {channel_sum, position_sum};
}

KroneckerWhitening private_kronecker_whitening(const at::Tensor& features, double noise_multiplier,
                                               double regularisation, at::Generator gen) {
  TORCH_CHECK(noise_multiplier >= 0 && regularisation > 0,
              "dpsgd::private_kronecker_whitening: the noise multiplier must be >= 0 and the regularisation > 0");
  const auto [channel_sum, position_sum] = second_moments(features);
  c10::InferenceMode guard;
  const double n = double(features.size(0));
  KroneckerWhitening w;
  w.channels = regularised_inverse_sqrt(channel_sum, noise_multiplier, regularisation * n / channel_sum.size(0), gen)
                   .to(features.scalar_type());
  w.positions = regularised_inverse_sqrt(position_sum, noise_multiplier, regularisation * n / position_sum.size(0), gen)
                    .to(features.scalar_type());
  return w;
}

at::Tensor KroneckerWhitening::apply(const at::Tensor& features) const {
  TORCH_CHECK(features.dim() == 4 && features.size(1) == channels.size(0) &&
                  features.size(2) * features.size(3) == positions.size(0),
              "dpsgd::KroneckerWhitening::apply: features of shape ", features.sizes(), " do not match the whitening's ",
              channels.size(0), " channels and ", positions.size(0), " positions");
  c10::InferenceMode guard;
  const int64_t n = features.size(0), c = channels.size(0), hw = positions.size(0);
  at::Tensor x = at::matmul(at::matmul(channels, features.reshape({n, c, hw})), positions).reshape({n, c * hw});
  x = x * (std::sqrt(double(c * hw)) / x.norm(2, {1}, true).clamp_min(1e-12));
  return x.reshape(features.sizes());
}

}  // namespace dpsgd
