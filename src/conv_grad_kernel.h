// src/conv_grad_kernel.h: per-sample weight gradients of a 2-d convolution,
// computed directly (free of libtorch, so that it compiles with its own flags
// and vectorises; dp.cpp splits the batch over threads).
//
// For sample n, output channel o of group q, input channel c of that group:
//   G[n, o, c, i, j] = sum_{y, x} g[n, o, y, x] * x_pad[n, c', s_h y + d_h i, s_w x + d_w j]
// with c' = q * C_in / groups + c. The loop runs over the output positions
// once per block of taps (c, i, j), with the sample's output gradient
// transposed to [positions, C_out] so that each step is a few multiply-adds
// across output channels from L1: no im2col buffer. Against the folded
// (batch-as-groups) convolution backward that dp.cpp used before: 3-4x faster
// for W10's first layer (1 input channel), level or better on the others.
#pragma once

#include <cstdint>

namespace torchfunc {
namespace dp {
namespace detail {

struct ConvGradShape {
  int64_t c_in, h, w;             // input per sample (unpadded)
  int64_t c_out, h_out, w_out;    // output gradient per sample
  int64_t k_h, k_w;               // kernel
  int64_t s_h, s_w, p_h, p_w, d_h, d_w;
  int64_t groups;
};

/// Samples [n0, n1) of x [N, c_in, h, w] and g [N, c_out, h_out, w_out]
/// (contiguous) into out [N, c_out, c_in / groups, k_h, k_w] (contiguous),
/// and each sample's squared Frobenius norm of it into norm2 [N] (summed in
/// double from the accumulators, so the gradients are not read again).
void per_sample_conv_weight_grad(const ConvGradShape& s, const float* x, const float* g, float* out, float* norm2,
                                 int64_t n0, int64_t n1);
void per_sample_conv_weight_grad(const ConvGradShape& s, const double* x, const double* g, double* out,
                                 double* norm2, int64_t n0, int64_t n1);

}  // namespace detail
}  // namespace dp
}  // namespace torchfunc
