#include "scattering.h"

#include <c10/util/Exception.h>

#include <cmath>

namespace dpsgd {
namespace {

constexpr double kPi = 3.14159265358979323846;

// Row u of the grid repeated over the 5 periods [-2M, 3M): the Gaussians are
// far narrower than 2M, so five periods are the periodisation to double
// precision.
at::Tensor coords(int64_t n, int64_t period_offset) {
  return at::arange(n, at::kDouble) + double(period_offset * n);
}

// Keeps the lowest frequencies of a spectrum (zeroes the band that folding by
// 2^res would alias), then folds it onto the grid subsampled by 2^res.
at::Tensor periodize(const at::Tensor& spectrum, int res) {
  if (res == 0) return spectrum;
  const int64_t M = spectrum.size(0), N = spectrum.size(1), k = int64_t(1) << res;
  at::Tensor masked = spectrum.clone();
  const int64_t len_m = int64_t(M * (1 - std::ldexp(1.0, -res))), start_m = int64_t(M * std::ldexp(1.0, -res - 1));
  const int64_t len_n = int64_t(N * (1 - std::ldexp(1.0, -res))), start_n = int64_t(N * std::ldexp(1.0, -res - 1));
  masked.slice(0, start_m, start_m + len_m).zero_();
  masked.slice(1, start_n, start_n + len_n).zero_();
  return masked.view({k, M / k, k, N / k}).sum(2).sum(0);
}

// Subsampling by k in space is folding (and averaging) the spectrum.
at::Tensor subsample_fourier(const at::Tensor& x, int64_t k) {
  if (k == 1) return x;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end() - 2);
  const int64_t M = x.size(-2), N = x.size(-1);
  shape.insert(shape.end(), {k, M / k, k, N / k});
  return x.reshape(shape).mean(-2).mean(-3);
}

}  // namespace

at::Tensor gabor_2d(int64_t M, int64_t N, double sigma, double theta, double xi, double slant) {
  const double c = std::cos(theta), s = std::sin(theta);
  // curv = R diag(1, slant^2) R^T / (2 sigma^2)
  const double d = slant * slant, k = 1.0 / (2 * sigma * sigma);
  const double c00 = (c * c + d * s * s) * k, c01 = (c * s - d * s * c) * k, c11 = (s * s + d * c * c) * k;
  at::Tensor re = at::zeros({M, N}, at::kDouble), im = at::zeros({M, N}, at::kDouble);
  for (int64_t ex = -2; ex <= 2; ++ex) {
    at::Tensor xx = coords(M, ex).unsqueeze(1);
    for (int64_t ey = -2; ey <= 2; ++ey) {
      at::Tensor yy = coords(N, ey).unsqueeze(0);
      at::Tensor envelope = at::exp(-(c00 * xx * xx + 2 * c01 * xx * yy + c11 * yy * yy));
      at::Tensor phase = xi * c * xx + xi * s * yy;
      re += envelope * at::cos(phase);
      im += envelope * at::sin(phase);
    }
  }
  return at::complex(re, im) / (2 * kPi * sigma * sigma / slant);
}

at::Tensor morlet_2d(int64_t M, int64_t N, double sigma, double theta, double xi, double slant) {
  at::Tensor wave = gabor_2d(M, N, sigma, theta, xi, slant);
  at::Tensor envelope = gabor_2d(M, N, sigma, theta, 0, slant);
  return wave - envelope * (wave.sum() / envelope.sum());
}

Scattering2D::Scattering2D(int64_t M, int64_t N, int J, int L) : M_(M), N_(N), J_(J), L_(L) {
  TORCH_CHECK(J >= 1 && L >= 1, "Scattering2D: J and L must be >= 1 (got J = ", J, ", L = ", L, ")");
  const int64_t step = int64_t(1) << J;
  TORCH_CHECK(M > 0 && N > 0, "Scattering2D: empty image size");
  Mp_ = ((M + step) / step + 1) * step;
  Np_ = ((N + step) / step + 1) * step;
  TORCH_CHECK((Mp_ - M + 1) / 2 < M && (Np_ - N + 1) / 2 < N, "Scattering2D: an image of ", M, " x ", N,
              " is too small for J = ", J, " (reflection padding needs more pixels than the image has)");
  auto spectrum = [&](const at::Tensor& filter) { return at::real(at::fft_fft2(filter)).contiguous(); };
  at::Tensor low = spectrum(gabor_2d(Mp_, Np_, 0.8 * std::ldexp(1.0, J - 1), 0, 0));
  for (int res = 0; res < J; ++res) phi_.push_back(periodize(low, res));
  psi_.resize(J);
  psi_stack_.resize(J);
  for (int j = 0; j < J; ++j) {
    const int levels = std::min(j + 1, std::max(J - 1, 1));
    psi_[j].resize(levels);
    for (int t = 0; t < L; ++t) {
      const double theta = (int(L - L / 2.0 - 1) - t) * kPi / L;
      at::Tensor full = spectrum(morlet_2d(Mp_, Np_, 0.8 * std::ldexp(1.0, j), theta, 0.75 * kPi / std::ldexp(1.0, j),
                                           4.0 / L));
      for (int res = 0; res < levels; ++res) psi_[j][res].push_back(periodize(full, res));
    }
    for (int res = 0; res < levels; ++res) psi_stack_[j].push_back(at::stack(psi_[j][res]));
  }
}

at::Tensor Scattering2D::forward(const at::Tensor& input) const {
  TORCH_CHECK((input.dim() == 3 || (input.dim() == 4 && input.size(1) == 1)) && input.size(-2) == M_ &&
                  input.size(-1) == N_,
              "Scattering2D: expected images [B, ", M_, ", ", N_, "] or [B, 1, ", M_, ", ", N_, "], got ",
              input.sizes());
  TORCH_CHECK(input.is_floating_point(), "Scattering2D: expected a floating-point tensor, got ", input.scalar_type());
  const auto real = input.options();
  auto filter = [&](const at::Tensor& f) { return f.to(real); };
  at::Tensor x = input.dim() == 3 ? input.unsqueeze(1) : input;
  const int64_t top = (Mp_ - M_) / 2, left = (Np_ - N_) / 2;
  x = at::reflection_pad2d(x, {left, Np_ - N_ - left, top, Mp_ - M_ - top}).squeeze(1);
  at::Tensor X = at::fft_fft2(x);  // [B, Mp, Np]
  // |.| of a filtered spectrum, back in the Fourier domain.
  auto modulus = [](const at::Tensor& spectrum) { return at::fft_fft2(at::abs(at::fft_ifft2(spectrum))); };
  // Low-pass at resolution res, subsampled to the output grid, border dropped.
  auto average = [&](const at::Tensor& spectrum, int res) {
    at::Tensor out = at::real(at::fft_ifft2(subsample_fourier(spectrum * filter(phi_[res]), int64_t(1) << (J_ - res))));
    return out.slice(-2, 1, out.size(-2) - 1).slice(-1, 1, out.size(-1) - 1);
  };
  std::vector<at::Tensor> first{average(X, 0).unsqueeze(1)}, second;
  for (int j1 = 0; j1 < J_; ++j1) {
    at::Tensor U1 = modulus(subsample_fourier(X.unsqueeze(1) * filter(psi_stack_[j1][0]), int64_t(1) << j1));
    first.push_back(average(U1, j1));  // [B, L, Mo, No]
    std::vector<at::Tensor> children;  // per (j1, t1): all (j2 > j1, t2), in kymatio's order
    for (int j2 = j1 + 1; j2 < J_; ++j2) {
      at::Tensor U2 = modulus(subsample_fourier(U1.unsqueeze(2) * filter(psi_stack_[j2][j1]), int64_t(1) << (j2 - j1)));
      children.push_back(average(U2, j2));  // [B, L, L, Mo, No]
    }
    if (!children.empty()) second.push_back(at::cat(children, 2).flatten(1, 2));
  }
  first.insert(first.end(), second.begin(), second.end());
  return at::cat(first, 1);
}

at::Tensor Scattering2D::forward_chunked(const at::Tensor& x, int64_t chunk) const {
  std::vector<at::Tensor> parts;
  for (int64_t i = 0; i < x.size(0); i += chunk) parts.push_back(forward(x.slice(0, i, i + chunk)));
  return at::cat(parts);
}

}  // namespace dpsgd
