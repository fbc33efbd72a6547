// Private, Kronecker-factored whitening of feature maps (--whitening kron,
// the scatternet preset's default).
//
// Why: DP-SGD on a linear model learns slowly along the directions in which
// the features vary little (the scattering features' second moment spans five
// orders of magnitude), and with a fixed number of noisy steps it never gets
// there. Whitening the features, x -> (S + lam I)^(-1/2) x, makes every
// direction learn at the same pace: +1.1 points at epsilon 3 with the exact
// second moment S (README). S itself is [D, D] with D = 3969: releasing it
// with noise would drown all but its largest eigenvalues. So it is factored,
// S ~ C (x) P: the channels' second moment C = sum_n sum_p u_n[:, p] u_n[:, p]^T
// ([c, c]) and the positions' P = sum_n sum_c u_n[c, :]^T u_n[c, :] ([hw, hw]),
// of every example's features scaled to norm 1 (u_n = x_n / |x_n|).
//
// Privacy: adding or removing one example changes each sum by u u^T, of
// Frobenius norm |u|^2 = 1, so each sum's upper triangle released with
// Gaussian noise of standard deviation `noise_multiplier` is a Gaussian
// mechanism of that noise multiplier: two of them, which the accountants
// compose with DP-SGD's steps as two steps at sampling rate 1. The whitening
// matrices and everything after them are post-processing.
#pragma once

#include <ATen/ATen.h>

#include <utility>

namespace dpsgd {

struct KroneckerWhitening {
  at::Tensor channels;   // [c, c]: (C~ + lam_c I)^(-1/2), C~ the noisy sum with eigenvalues clamped at 0
  at::Tensor positions;  // [hw, hw]: the same for P
  // Features [n, c, h, w] -> channels . x . positions per example, each
  // rescaled to norm sqrt(c h w) (that of group-normalised features), so
  // that per-sample clipping sees what it saw before.
  at::Tensor apply(const at::Tensor& features) const;
};

// The exact sums C ([c, c]) and P ([hw, hw]) above, in double, of features
// [n, c, h, w] each scaled to norm 1.
std::pair<at::Tensor, at::Tensor> second_moments(const at::Tensor& features);

// The two noisy second moments of `features` ([n, c, h, w]) and their
// regularised inverse square roots. lam = regularisation * n / dim (the mean
// eigenvalue of the exact sum times `regularisation`). noise_multiplier 0:
// no noise (not private). The noise is drawn from `gen` (CPU).
KroneckerWhitening private_kronecker_whitening(const at::Tensor& features, double noise_multiplier,
                                               double regularisation, at::Generator gen);

}  // namespace dpsgd
