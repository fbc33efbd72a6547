// src/small_kernels.cpp: see src/small_kernels.h. One loop per run along the
// last (coalesced) dimension; contiguous and broadcast runs get loops the
// compiler vectorises.
#include "small_kernels.h"
#include "vector_clones.h"

#include <algorithm>
#include <cmath>
#include <cstring>

// Each entry point is compiled once per instruction set with everything it
// calls inlined (flatten), the loops' lambdas included.
#if defined(__GNUC__) || defined(__clang__)
#define TORCHFUNC_SMALL_KERNEL TORCHFUNC_VECTOR_CLONES __attribute__((flatten))
#else
#define TORCHFUNC_SMALL_KERNEL TORCHFUNC_VECTOR_CLONES
#endif

namespace torchfunc {
namespace detail {
namespace small {
namespace {

// Merges dimensions that are one run in every operand and drops size-1 ones,
// so that the inner loop is as long as the layouts allow.
template <int K>
void coalesce(View (&v)[K]) {
  int nd = 0;
  const int n0 = v[0].ndim;
  for (int d = 0; d < n0; ++d) {
    if (v[0].size[d] == 1) continue;
    bool merge = nd > 0;
    for (int k = 0; k < K && merge; ++k) {
      merge = v[k].stride[nd - 1] == v[k].stride[d] * v[k].size[d];
    }
    if (merge) {
      for (int k = 0; k < K; ++k) {
        v[k].size[nd - 1] *= v[k].size[d];
        v[k].stride[nd - 1] = v[k].stride[d];
      }
    } else {
      for (int k = 0; k < K; ++k) {
        v[k].size[nd] = v[k].size[d];
        v[k].stride[nd] = v[k].stride[d];
      }
      ++nd;
    }
  }
  for (int k = 0; k < K; ++k) v[k].ndim = nd;
}

// fn(off, n, st) for each run of n elements along the last dimension: the
// operands' element offsets of its first element and their strides along it.
template <int K, class Fn>
TORCHFUNC_INLINE void for_each_run(const View (&v)[K], Fn&& fn) {
  const int nd = v[0].ndim;
  int64_t off[K] = {}, st[K] = {};
  if (nd == 0) {
    fn(off, int64_t(1), st);
    return;
  }
  int64_t outer = 1;
  for (int d = 0; d < nd - 1; ++d) outer *= v[0].size[d];
  const int64_t n = v[0].size[nd - 1];
  if (outer == 0 || n == 0) return;
  for (int k = 0; k < K; ++k) st[k] = v[k].stride[nd - 1];
  int64_t idx[kMaxDims] = {};
  for (int64_t r = 0; r < outer; ++r) {
    fn(off, n, st);
    for (int d = nd - 2; d >= 0; --d) {
      for (int k = 0; k < K; ++k) off[k] += v[k].stride[d];
      if (++idx[d] < v[0].size[d]) break;
      for (int k = 0; k < K; ++k) off[k] -= v[k].stride[d] * v[0].size[d];
      idx[d] = 0;
    }
  }
}

template <class F>
TORCHFUNC_INLINE void map1(const View& out, const View& x, F f) {
  View v[2] = {out, x};
  coalesce(v);
  for_each_run(v, [&](const int64_t* off, int64_t n, const int64_t* st) {
    float* o = out.p + off[0];
    const float* a = x.p + off[1];
    if (st[0] == 1 && st[1] == 1) {
      for (int64_t i = 0; i < n; ++i) o[i] = f(a[i]);
    } else if (st[0] == 1 && st[1] == 0) {
      const float y = f(a[0]);
      for (int64_t i = 0; i < n; ++i) o[i] = y;
    } else {
      for (int64_t i = 0; i < n; ++i) o[i * st[0]] = f(a[i * st[1]]);
    }
  });
}

template <class F>
TORCHFUNC_INLINE void map2(const View& out, const View& x, const View& y, F f) {
  View v[3] = {out, x, y};
  coalesce(v);
  for_each_run(v, [&](const int64_t* off, int64_t n, const int64_t* st) {
    float* o = out.p + off[0];
    const float* a = x.p + off[1];
    const float* b = y.p + off[2];
    if (st[0] == 1 && st[1] == 1 && st[2] == 1) {
      for (int64_t i = 0; i < n; ++i) o[i] = f(a[i], b[i]);
    } else if (st[0] == 1 && st[1] == 1 && st[2] == 0) {
      const float bb = b[0];
      for (int64_t i = 0; i < n; ++i) o[i] = f(a[i], bb);
    } else if (st[0] == 1 && st[1] == 0 && st[2] == 1) {
      const float aa = a[0];
      for (int64_t i = 0; i < n; ++i) o[i] = f(aa, b[i]);
    } else {
      for (int64_t i = 0; i < n; ++i) o[i * st[0]] = f(a[i * st[1]], b[i * st[2]]);
    }
  });
}

}  // namespace

TORCHFUNC_SMALL_KERNEL
void unary(Unary op, const View& out, const View& x, float a) {
  switch (op) {
    case Unary::Copy: return map1(out, x, [](float v) { return v; });
    case Unary::Neg: return map1(out, x, [](float v) { return -v; });
    // NaN stays NaN, as ATen's clamp_min(x, 0).
    case Unary::Relu: return map1(out, x, [](float v) { return v > 0.f || v != v ? v : 0.f; });
    case Unary::Abs: return map1(out, x, [](float v) { return std::fabs(v); });
    case Unary::Exp: return map1(out, x, [](float v) { return std::exp(v); });
    case Unary::Log: return map1(out, x, [](float v) { return std::log(v); });
    case Unary::Sqrt: return map1(out, x, [](float v) { return std::sqrt(v); });
    case Unary::Tanh: return map1(out, x, [](float v) { return std::tanh(v); });
    case Unary::Sigmoid: return map1(out, x, [](float v) { return 1.f / (1.f + std::exp(-v)); });
    case Unary::Sin: return map1(out, x, [](float v) { return std::sin(v); });
    case Unary::Cos: return map1(out, x, [](float v) { return std::cos(v); });
    // The exponents ATen's kernel computes without pow, computed as it does.
    case Unary::Pow:
      if (a == 2.f) return map1(out, x, [](float v) { return v * v; });
      if (a == 3.f) return map1(out, x, [](float v) { return v * v * v; });
      if (a == -1.f) return map1(out, x, [](float v) { return 1.f / v; });
      if (a == -2.f) return map1(out, x, [](float v) { return 1.f / (v * v); });
      return map1(out, x, [a](float v) { return std::pow(v, a); });
    case Unary::AddScalar: return map1(out, x, [a](float v) { return v + a; });
    case Unary::MulScalar: return map1(out, x, [a](float v) { return v * a; });
    case Unary::DivScalar: return map1(out, x, [a](float v) { return v / a; });
    case Unary::Fill: return map1(out, out, [a](float) { return a; });
  }
}

TORCHFUNC_SMALL_KERNEL
void binary(Binary op, const View& out, const View& x, const View& y, float alpha) {
  switch (op) {
    case Binary::Add: return map2(out, x, y, [](float a, float b) { return a + b; });
    case Binary::Sub: return map2(out, x, y, [](float a, float b) { return a - b; });
    case Binary::Mul: return map2(out, x, y, [](float a, float b) { return a * b; });
    case Binary::Div: return map2(out, x, y, [](float a, float b) { return a / b; });
    // x: the gradient, y: the forward input (ATen: self <= threshold ? 0 : grad).
    case Binary::ThresholdBackward:
      return map2(out, x, y, [alpha](float g, float v) { return v <= alpha ? 0.f : g; });
    // y: the forward output.
    case Binary::TanhBackward: return map2(out, x, y, [](float g, float t) { return g * (1.f - t * t); });
    case Binary::SigmoidBackward: return map2(out, x, y, [](float g, float s) { return g * ((1.f - s) * s); });
  }
}

TORCHFUNC_SMALL_KERNEL
void sum(const View& out_b, const View& x, float scale, double* acc) {
  // The accumulators: out's kept dimensions, contiguous in x's order.
  View a;
  a.ndim = x.ndim;
  int64_t count = 1;
  for (int d = x.ndim - 1; d >= 0; --d) {
    a.size[d] = x.size[d];
    const bool kept = out_b.stride[d] != 0 && x.size[d] != 1;
    a.stride[d] = kept ? count : 0;
    if (kept) count *= x.size[d];
  }
  std::memset(acc, 0, sizeof(double) * count);
  View v[2] = {a, x};
  coalesce(v);
  for_each_run(v, [&](const int64_t* off, int64_t n, const int64_t* st) {
    double* s = acc + off[0];
    const float* b = x.p + off[1];
    if (st[0] == 0) {
      double t = 0;
      for (int64_t i = 0; i < n; ++i) t += b[i * st[1]];
      *s += t;
    } else {
      for (int64_t i = 0; i < n; ++i) s[i * st[0]] += b[i * st[1]];
    }
  });
  // Written back in the same order: out_b with the reduced dimensions cut to one.
  View o = out_b;
  for (int d = 0; d < o.ndim; ++d) {
    if (a.stride[d] == 0) {
      o.size[d] = 1;
      o.stride[d] = 0;
    }
  }
  View w[1] = {o};
  coalesce(w);
  int64_t i = 0;
  for_each_run(w, [&](const int64_t* off, int64_t n, const int64_t* st) {
    float* p = o.p + off[0];
    for (int64_t j = 0; j < n; ++j) p[j * st[0]] = static_cast<float>(acc[i++] * scale);
  });
}

namespace {

// 16 floats in one GCC / Clang vector (one zmm, two ymm or four xmm
// registers); V16u: the same, loaded from any float address.
typedef float V16 __attribute__((vector_size(64)));
typedef float V16u __attribute__((vector_size(64), aligned(4)));

// c[i, j] for MR rows and cols <= 16 * NV columns = sum_r a[i, r] * b[r, j],
// b: k rows of at least 16 * NV floats, ldb apart. MR * NV accumulators in
// registers over the k products.
template <int MR, int NV>
TORCHFUNC_INLINE void gemm_block(const float* a, int64_t sa_row, int64_t sa_k, const float* b, int64_t ldb,
                                 int64_t k, float* c, int64_t sc_row, int64_t sc_col, int64_t cols) {
  V16 acc[MR][NV];
  for (int i = 0; i < MR; ++i) {
    for (int v = 0; v < NV; ++v) acc[i][v] = V16{};
  }
  for (int64_t r = 0; r < k; ++r) {
    const float* br = b + r * ldb;
    V16 bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = *reinterpret_cast<const V16u*>(br + 16 * v);
    for (int i = 0; i < MR; ++i) {
      const float s = a[i * sa_row + r * sa_k];
      for (int v = 0; v < NV; ++v) acc[i][v] += s * bv[v];
    }
  }
  for (int i = 0; i < MR; ++i) {
    float* ci = c + i * sc_row;
    if (sc_col == 1 && cols == 16 * NV) {
      for (int v = 0; v < NV; ++v) *reinterpret_cast<V16u*>(ci + 16 * v) = acc[i][v];
    } else {
      for (int64_t j = 0; j < cols; ++j) ci[j * sc_col] = acc[i][j / 16][j % 16];
    }
  }
}

// All rows of c for the columns [j0, j0 + cols) of b (as gemm_block's b).
template <int NV>
TORCHFUNC_INLINE void gemm_columns(const float* a, const View& av, const float* b, int64_t ldb, int64_t k,
                                   float* c, const View& cv, int64_t cols) {
  const int64_t m = cv.size[1];
  int64_t i = 0;
  for (; i + 4 <= m; i += 4) {
    gemm_block<4, NV>(a + i * av.stride[1], av.stride[1], av.stride[2], b, ldb, k, c + i * cv.stride[1],
                      cv.stride[1], cv.stride[2], cols);
  }
  for (; i < m; ++i) {
    gemm_block<1, NV>(a + i * av.stride[1], av.stride[1], av.stride[2], b, ldb, k, c + i * cv.stride[1],
                      cv.stride[1], cv.stride[2], cols);
  }
}

}  // namespace

TORCHFUNC_SMALL_KERNEL
void gemm(const View& c, const View& a, const View& bm, float* work) {
  const int64_t batch = c.size[0], n = c.size[2], k = a.size[2];
  const int64_t ld = (n + 15) / 16 * 16;
  for (int64_t b = 0; b < batch; ++b) {
    const float* ab = a.p + b * a.stride[0];
    const float* bb = bm.p + b * bm.stride[0];
    float* cb = c.p + b * c.stride[0];
    // Rows of bm[b] read in place where they are contiguous; what is not (the
    // last n % 16 columns, or all of a transposed bm) is packed into work as
    // k rows of ld floats, zero past n.
    const bool in_place = bm.stride[2] == 1;
    const int64_t first_packed = in_place ? n / 16 * 16 : 0;
    if (first_packed < n && bm.stride[1] < bm.stride[2]) {  // a transposed bm: read along its rows
      for (int64_t j = first_packed; j < n; ++j) {
        const float* col = bb + j * bm.stride[2];
        for (int64_t r = 0; r < k; ++r) work[r * ld + j] = col[r * bm.stride[1]];
      }
    } else if (first_packed < n) {
      for (int64_t r = 0; r < k; ++r) {
        for (int64_t j = first_packed; j < n; ++j) work[r * ld + j] = bb[r * bm.stride[1] + j * bm.stride[2]];
      }
    }
    for (int64_t r = 0; r < k && first_packed < n; ++r) {
      for (int64_t j = n; j < ld; ++j) work[r * ld + j] = 0.f;
    }
    for (int64_t j0 = 0; j0 < n;) {
      const bool packed = j0 >= first_packed;
      const float* bj = packed ? work + j0 : bb + j0;
      const int64_t ldb = packed ? ld : bm.stride[1];
      float* cj = cb + j0 * c.stride[2];
      // 32 columns at a time from memory read in place only where all 32 are there.
      const int64_t avail = packed ? ld - j0 : first_packed - j0;
      if (avail >= 32 && n - j0 > 16) {
        const int64_t cols = std::min<int64_t>(32, n - j0);
        gemm_columns<2>(ab, a, bj, ldb, k, cj, c, cols);
        j0 += cols;
      } else {
        const int64_t cols = std::min<int64_t>(16, n - j0);
        gemm_columns<1>(ab, a, bj, ldb, k, cj, c, cols);
        j0 += cols;
      }
    }
  }
}

}  // namespace small
}  // namespace detail
}  // namespace torchfunc
