// src/conv_grad_kernel.cpp: see src/conv_grad_kernel.h. Fixed-size blocks
// (KB kernel taps x OB output channels of accumulators, one load of the
// output gradient per KB multiply-adds) so that the compiler keeps them in
// vector registers; remainders use smaller blocks.
#include "conv_grad_kernel.h"
#include "vector_clones.h"

#include <algorithm>
#include <cstring>
#include <vector>

namespace torchfunc {
namespace dp {
namespace detail {
namespace {

// One sample's padded input and transposed output gradient.
template <class T>
struct Sample {
  const T* xp;   // [c_in, hp, wp]
  const T* gt;   // [h_out * w_out, c_out]
  int64_t hp, wp;
};

// OB values of T in one GCC / Clang vector (lowered to what the clone's
// instruction set has: one zmm, two ymm, four xmm registers for 16 floats).
template <class T, int OB>
struct Vec {
  typedef T type __attribute__((vector_size(OB * sizeof(T))));
};
template <class T>
struct Vec<T, 1> {
  typedef T type;
};

// For the KB taps whose input offsets (into the padded sample, from output
// position (0, 0)) are off[0..KB): acc[kk][o] = sum_{y,x} gt[y, x, o0 + o] *
// xp[s_h y * wp + s_w x + off[kk]], written to out[o * out_o_stride + kk];
// their squares added to norm2.
template <int KB, int OB, class T>
TORCHFUNC_INLINE void block(const ConvGradShape& s, const Sample<T>& p, const int64_t* off, int64_t o0, T* out,
                            int64_t out_o_stride, double& norm2) {
  using V = typename Vec<T, OB>::type;
  V acc[KB];
  int64_t o_[KB];
  for (int kk = 0; kk < KB; ++kk) {
    acc[kk] = V{};
    o_[kk] = off[kk];
  }
  const int64_t sw = s.s_w, step = s.c_out, w_out = s.w_out;
  for (int64_t y = 0; y < s.h_out; ++y) {
    const T* xr = p.xp + s.s_h * y * p.wp;
    const T* gv = p.gt + y * w_out * step + o0;
    for (int64_t x = 0; x < w_out; ++x, xr += sw, gv += step) {
      V g;
      std::memcpy(&g, gv, sizeof(V));
      for (int kk = 0; kk < KB; ++kk) acc[kk] += xr[o_[kk]] * g;
    }
  }
  V squares = V{};
  for (int kk = 0; kk < KB; ++kk) {
    squares += acc[kk] * acc[kk];
    T a[OB];
    std::memcpy(a, &acc[kk], sizeof(V));
    for (int o = 0; o < OB; ++o) out[o * out_o_stride + kk] = a[o];
  }
  T sq[OB];
  std::memcpy(sq, &squares, sizeof(V));
  for (int o = 0; o < OB; ++o) norm2 += double(sq[o]);
}

// Taps [t, t + KB) of group q, every output channel of the group.
template <int KB, class T>
TORCHFUNC_INLINE void taps(const ConvGradShape& s, const Sample<T>& p, const int64_t* off, int64_t q, int64_t t,
                           T* out_q, int64_t per_out_channel, double& norm2) {
  const int64_t og = s.c_out / s.groups;
  int64_t o = 0;
  for (; o + 16 <= og; o += 16)
    block<KB, 16>(s, p, off + t, q * og + o, out_q + o * per_out_channel + t, per_out_channel, norm2);
  for (; o + 4 <= og; o += 4)
    block<KB, 4>(s, p, off + t, q * og + o, out_q + o * per_out_channel + t, per_out_channel, norm2);
  for (; o < og; ++o) block<KB, 1>(s, p, off + t, q * og + o, out_q + o * per_out_channel + t, per_out_channel, norm2);
}

template <class T>
TORCHFUNC_INLINE void run(const ConvGradShape& s, const T* x, const T* g, T* out, T* norm2, int64_t n0, int64_t n1) {
  const int64_t hp = s.h + 2 * s.p_h, wp = s.w + 2 * s.p_w, positions = s.h_out * s.w_out;
  const int64_t cg = s.c_in / s.groups, og = s.c_out / s.groups;
  const int64_t per_out_channel = cg * s.k_h * s.k_w;  // taps per output channel: out's stride between them
  std::vector<T> xp(size_t(s.c_in * hp * wp), T(0)), gt(size_t(positions * s.c_out));
  // Tap (c, i, j) of group q reads the padded input at this offset from the output position's corner.
  std::vector<int64_t> off(size_t(s.groups * per_out_channel));
  for (int64_t q = 0; q < s.groups; ++q)
    for (int64_t c = 0; c < cg; ++c)
      for (int64_t i = 0; i < s.k_h; ++i)
        for (int64_t j = 0; j < s.k_w; ++j)
          off[size_t((q * cg + c) * s.k_h * s.k_w + i * s.k_w + j)] = ((q * cg + c) * hp + s.d_h * i) * wp + s.d_w * j;
  for (int64_t n = n0; n < n1; ++n) {
    const T* xn = x + n * s.c_in * s.h * s.w;
    for (int64_t c = 0; c < s.c_in; ++c)  // the padding stays zero from the first fill
      for (int64_t r = 0; r < s.h; ++r)
        std::memcpy(&xp[size_t((c * hp + r + s.p_h) * wp + s.p_w)], xn + (c * s.h + r) * s.w, size_t(s.w) * sizeof(T));
    const T* gn = g + n * s.c_out * positions;
    for (int64_t o = 0; o < s.c_out; ++o)
      for (int64_t t = 0; t < positions; ++t) gt[size_t(t * s.c_out + o)] = gn[o * positions + t];
    const Sample<T> p{xp.data(), gt.data(), hp, wp};
    T* on = out + n * s.c_out * per_out_channel;
    double n2 = 0;
    for (int64_t q = 0; q < s.groups; ++q) {
      const int64_t* offq = off.data() + q * per_out_channel;
      T* out_q = on + q * og * per_out_channel;
      int64_t t = 0;
      for (; t + 8 <= per_out_channel; t += 8) taps<8>(s, p, offq, q, t, out_q, per_out_channel, n2);
      for (; t + 4 <= per_out_channel; t += 4) taps<4>(s, p, offq, q, t, out_q, per_out_channel, n2);
      for (; t < per_out_channel; ++t) taps<1>(s, p, offq, q, t, out_q, per_out_channel, n2);
    }
    norm2[n] = T(n2);
  }
}

}  // namespace

TORCHFUNC_VECTOR_CLONES void per_sample_conv_weight_grad(const ConvGradShape& s, const float* x, const float* g,
                                                         float* out, float* norm2, int64_t n0, int64_t n1) {
  run(s, x, g, out, norm2, n0, n1);
}

TORCHFUNC_VECTOR_CLONES void per_sample_conv_weight_grad(const ConvGradShape& s, const double* x, const double* g,
                                                         double* out, double* norm2, int64_t n0, int64_t n1) {
  run(s, x, g, out, norm2, n0, n1);
}

}  // namespace detail
}  // namespace dp
}  // namespace torchfunc
