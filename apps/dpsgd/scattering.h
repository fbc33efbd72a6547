// A 2-D wavelet scattering transform (Mallat 2012; Bruna & Mallat 2013) in
// torch ops: the fixed, untrained feature extractor of the demo's
// `--preset scatternet` (Tramer & Boneh, ICLR 2021: ScatterNet features + a
// linear model under DP-SGD). Same definitions and output layout as kymatio's
// Scattering2D (J, L, max_order 2), so features agree with the ones in the
// literature; written from the definitions, not from kymatio's code.
//
//   S0 = x * phi_J                                     (1 channel)
//   S1 = |x * psi_{j1,t1}| * phi_J                     (J L channels)
//   S2 = ||x * psi_{j1,t1}| * psi_{j2,t2}| * phi_J     (L^2 J(J-1)/2, j2 > j1)
// each subsampled by 2^J: [B, 1, M, N] -> [B, K, M / 2^J, N / 2^J].
//
// The filters: Morlet wavelets psi(u) = g_sigma(u) (e^{i xi.u} - beta) with an
// elliptic Gaussian envelope (sigma = 0.8 2^j, slant 4/L, xi = 3 pi / 4 / 2^j,
// angle (L/2 - 1 - t) pi / L), beta chosen for zero mean, and the Gaussian
// low-pass phi (sigma = 0.8 2^(J-1)). They are built in space on the padded
// grid, periodised, and kept as their (real) DFTs; all filtering is in the
// Fourier domain, subsampling by folding the spectrum. The input is padded by
// reflection to a multiple of 2^J with 2^(J-1)+ pixels of margin on each side,
// which one output pixel on each border then drops.
#pragma once

#include <ATen/ATen.h>

#include <vector>

namespace dpsgd {

/// The filter g_sigma(u) e^{i xi (cos theta, sin theta).u} on an M x N grid,
/// periodised (u over 5 x 5 copies of the grid), normalised to unit integral
/// of the envelope: complex, in space. slant < 1 stretches the envelope
/// across the direction theta.
at::Tensor gabor_2d(int64_t M, int64_t N, double sigma, double theta, double xi, double slant = 1.0);

/// The Morlet wavelet: gabor_2d minus beta times its envelope, beta such that
/// the sum over the grid is zero. Complex, in space.
at::Tensor morlet_2d(int64_t M, int64_t N, double sigma, double theta, double xi, double slant);

class Scattering2D {
 public:
  /// For images of M x N pixels; J >= 1 scales, L >= 1 orientations.
  Scattering2D(int64_t M, int64_t N, int J = 2, int L = 8);

  /// [B, M, N] or [B, 1, M, N] (float or double) -> [B, channels(), M/2^J, N/2^J].
  at::Tensor forward(const at::Tensor& x) const;
  /// Features of many images, `chunk` at a time (bounded memory).
  at::Tensor forward_chunked(const at::Tensor& x, int64_t chunk = 500) const;

  int64_t channels() const { return 1 + J_ * L_ + int64_t(L_) * L_ * J_ * (J_ - 1) / 2; }
  int J() const { return J_; }
  int L() const { return L_; }
  int64_t padded_rows() const { return Mp_; }
  int64_t padded_cols() const { return Np_; }
  /// DFT of the wavelet of scale j, orientation t, periodised to the grid
  /// subsampled by 2^res (res <= j): real [Mp/2^res, Np/2^res], double.
  const at::Tensor& psi(int j, int t, int res) const { return psi_[j][res][t]; }
  /// DFT of the low-pass filter at resolution res: real, double.
  const at::Tensor& phi(int res) const { return phi_[res]; }

 private:
  int64_t M_, N_, Mp_, Np_;
  int J_, L_;
  std::vector<at::Tensor> phi_;                         // [res]
  std::vector<std::vector<std::vector<at::Tensor>>> psi_;  // [j][res][t]
  std::vector<std::vector<at::Tensor>> psi_stack_;      // [j][res]: [L, Mp/2^res, Np/2^res]
};

}  // namespace dpsgd
