// src/small_kernels.h: float32 loops over small strided tensors, for compile's
// direct replay (src/direct_replay.cpp). No libtorch header: at the sizes of
// an overhead-bound graph (a few thousand elements per op) ATen's per-op work
// (dispatch, TensorIterator set-up, allocation: about 1.5 us an op) is what
// a replay costs, and these loops cost tens of nanoseconds to start.
#pragma once

#include <cstdint>

namespace torchfunc {
namespace detail {
namespace small {

constexpr int kMaxDims = 8;

/// Elements p[sum_d i_d * stride[d]] for i in [0, size). Operands of one
/// call share the output's shape: broadcast dimensions have stride 0.
struct View {
  float* p = nullptr;
  int ndim = 0;
  int64_t size[kMaxDims] = {};
  int64_t stride[kMaxDims] = {};
};

enum class Unary : uint8_t { Copy, Neg, Relu, Abs, Exp, Log, Sqrt, Tanh, Sigmoid, Sin, Cos, Pow, AddScalar, MulScalar, DivScalar, Fill };
enum class Binary : uint8_t { Add, Sub, Mul, Div, ThresholdBackward, TanhBackward, SigmoidBackward };

/// out = op(x) (a: the number of AddScalar, MulScalar, DivScalar, Pow, Fill).
void unary(Unary op, const View& out, const View& x, float a);
/// out = op(x, y) (alpha: ThresholdBackward's threshold; unused otherwise).
void binary(Binary op, const View& out, const View& x, const View& y, float alpha);
/// out = scale * (sum of x over the dimensions where out_b has stride 0),
/// summed in double; out_b is out seen with x's shape. acc: room for out's
/// element count of doubles.
void sum(const View& out_b, const View& x, float scale, double* acc);
/// c[b] = a[b] @ bm[b] for b < batch: views of 3 dimensions [batch, rows, cols]
/// (stride 0 on the batch dimension of an mm operand). work: k * (n rounded up
/// to 16) floats.
void gemm(const View& c, const View& a, const View& bm, float* work);

}  // namespace small
}  // namespace detail
}  // namespace torchfunc
