// src/noise_kernel.cpp: Philox4x32-10 (Salmon et al., SC'11) and Box-Muller
// over blocks of counters, written as loops over small arrays so that the
// compiler vectorises them; see src/noise_kernel.h for the stream's layout.
// Built with -fno-math-errno (sqrt without a branch) and -ffp-contract=off
// (no fused multiply-adds): every operation is then one correctly rounded
// IEEE operation, so the AVX-512, AVX2 and baseline clones below (and any
// other machine) give the same bits.
#include "noise_kernel.h"
#include "vector_clones.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace torchfunc {
namespace dp {
namespace detail {
namespace {

constexpr int64_t N = kCounters;

TORCHFUNC_INLINE void philox(uint64_t seed, uint64_t block, uint32_t* __restrict x0, uint32_t* __restrict x1,
                             uint32_t* __restrict x2, uint32_t* __restrict x3) {
  for (int64_t i = 0; i < N; ++i) {
    const uint64_t c = block * uint64_t(N) + uint64_t(i);
    x0[i] = uint32_t(c);
    x1[i] = uint32_t(c >> 32);
    x2[i] = 0;
    x3[i] = 0;
  }
  uint32_t k0 = uint32_t(seed), k1 = uint32_t(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    for (int64_t i = 0; i < N; ++i) {
      const uint64_t p0 = uint64_t(0xD2511F53u) * x0[i], p1 = uint64_t(0xCD9E8D57u) * x2[i];
      const uint32_t y0 = uint32_t(p1 >> 32) ^ x1[i] ^ k0, y2 = uint32_t(p0 >> 32) ^ x3[i] ^ k1;
      x1[i] = uint32_t(p1);
      x3[i] = uint32_t(p0);
      x0[i] = y0;
      x2[i] = y2;
    }
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
}

template <class To, class From>
TORCHFUNC_INLINE To bits_as(From f) {
  static_assert(sizeof(To) == sizeof(From), "same width");
  To t;
  std::memcpy(&t, &f, sizeof(To));
  return t;
}

// (cs, sn) turned by q quarter turns, without branches: odd q swaps the two,
// then the signs follow q (0: +c +s, 1: -s +c, 2: -c -s, 3: +s -c).
template <class T, class I>  // I: the unsigned integer of T's width
TORCHFUNC_INLINE void quarter_turns(uint32_t q, T cs, T sn, T& c, T& s) {
  constexpr int sign = int(8 * sizeof(I)) - 1;
  const I ci = bits_as<I>(cs), si = bits_as<I>(sn);
  const I swap = I(0) - I(q & 1), keep = ~swap;
  I cq = (ci & keep) | (si & swap), sq = (si & keep) | (ci & swap);
  cq ^= I((q ^ (q >> 1)) & 1) << sign;
  sq ^= I(q >> 1) << sign;
  c = bits_as<T>(cq);
  s = bits_as<T>(sq);
}

// float: u = f 2^-30 with f = (a >> 2) + 1 (so |z| <= sqrt(60 ln 2) = 6.45);
// ln f from its exponent e and mantissa m in [sqrt(1/2), sqrt(2)) by the
// series 2 atanh(s), s = (m - 1) / (m + 1), |s| < 0.172 (next term < 1e-9);
// the angle's quarter from b's top two bits, the rest from its next 24 bits;
// sin and cos on [0, pi/2) by Taylor series (next terms < 6e-8).
TORCHFUNC_INLINE void box_muller(const uint32_t* __restrict a, const uint32_t* __restrict b, float* __restrict z0,
                                 float* __restrict z1, float sd, float scale) {
  for (int64_t i = 0; i < N; ++i) {
    int32_t fb = bits_as<int32_t>(float(int32_t(a[i] >> 2) + 1));
    int32_t e = ((fb >> 23) & 0xff) - 127 - 30;
    fb = (fb & 0x7fffff) | 0x3f800000;
    const int32_t big = fb > 0x3fb504f3 ? 1 : 0;  // m > sqrt(2): halve it
    fb -= big << 23;
    e += big;
    const float m = bits_as<float>(fb), s = (m - 1.0f) / (m + 1.0f), s2 = s * s;
    const float ln_m = 2.0f * s * (1.0f + s2 * (1.0f / 3 + s2 * (1.0f / 5 + s2 * (1.0f / 7 + s2 * (1.0f / 9)))));
    const float fe = float(e);
    const float ln_u = fe * 0.693145751953125f + (fe * 1.428606765330187e-06f + ln_m);  // ln 2 in two parts
    const float r = std::sqrt(-2.0f * ln_u);
    const float x = float(int32_t((b[i] >> 6) & 0xFFFFFF)) * (1.5707963267948966f / 16777216.0f), x2 = x * x;
    const float sn =
        x * (1.0f + x2 * (-1.0f / 6 + x2 * (1.0f / 120 + x2 * (-1.0f / 5040 + x2 * (1.0f / 362880 + x2 * (-1.0f / 39916800))))));
    const float cs = 1.0f + x2 * (-0.5f + x2 * (1.0f / 24 + x2 * (-1.0f / 720 + x2 * (1.0f / 40320 +
                                                                    x2 * (-1.0f / 3628800 + x2 * (1.0f / 479001600))))));
    float c, sv;
    quarter_turns<float, uint32_t>(b[i] >> 30, cs, sn, c, sv);
    z0[i] = (z0[i] + sd * (r * c)) * scale;
    z1[i] = (z1[i] + sd * (r * sv)) * scale;
  }
}

// 1 / n! for the double series, and the series' coefficients (-1)^j / (2j+1)!, (-1)^j / (2j)!.
constexpr double inv_factorial(int n) { return n <= 1 ? 1.0 : inv_factorial(n - 1) / double(n); }
struct SinCosCoefficients {
  double sin[12], cos[12];
  constexpr SinCosCoefficients() : sin(), cos() {
    for (int j = 0; j < 12; ++j) {
      sin[j] = (j % 2 ? -1.0 : 1.0) * inv_factorial(2 * j + 1);
      cos[j] = (j % 2 ? -1.0 : 1.0) * inv_factorial(2 * j);
    }
  }
};
constexpr SinCosCoefficients kSinCos{};

// double: u = f 2^-53 with f = 53 bits of (a0, a1) + 1 (|z| <= 8.57); the same
// log series to s^21 and Taylor series to x^23 / x^22 (next terms < 1e-17);
// the angle from 2 + 51 bits of (b0, b1).
TORCHFUNC_INLINE void box_muller(const uint32_t* __restrict a0, const uint32_t* __restrict a1,
                                 const uint32_t* __restrict b0, const uint32_t* __restrict b1, double* __restrict z0,
                                 double* __restrict z1, double sd, double scale) {
  for (int64_t i = 0; i < N; ++i) {
    const int64_t k = int64_t((uint64_t(a0[i]) << 21) | (a1[i] >> 11));
    int64_t fb = bits_as<int64_t>(double(k + 1));
    int64_t e = ((fb >> 52) & 0x7ff) - 1023 - 53;
    fb = (fb & 0xfffffffffffffLL) | 0x3ff0000000000000LL;
    const int64_t big = fb > 0x3ff6a09e667f3bccLL ? 1 : 0;
    fb -= big << 52;
    e += big;
    const double m = bits_as<double>(fb), s = (m - 1.0) / (m + 1.0), s2 = s * s;
    double series = 1.0 / 21;
#pragma GCC unroll 16
    for (int j = 9; j >= 0; --j) series = 1.0 / (2 * j + 1) + s2 * series;
    const double fe = double(e);
    const double ln_u = fe * 6.93147180369123816490e-01 + (fe * 1.90821492927058770002e-10 + 2.0 * s * series);
    const double r = std::sqrt(-2.0 * ln_u);
    const int64_t v = int64_t((uint64_t(b0[i] & 0x3fffffffu) << 21) | (b1[i] >> 11));
    const double x = double(v) * (1.5707963267948966 / 2251799813685248.0), x2 = x * x;  // 2^51
    // sin x = x sum_j (-1)^j x^2j / (2j+1)!, cos x = sum_j (-1)^j x^2j / (2j)!, j <= 11 (Horner)
    double sn = kSinCos.sin[11], cs = kSinCos.cos[11];
#pragma GCC unroll 16
    for (int j = 10; j >= 0; --j) {
      sn = kSinCos.sin[j] + x2 * sn;
      cs = kSinCos.cos[j] + x2 * cs;
    }
    sn *= x;
    double c, sv;
    quarter_turns<double, uint64_t>(b0[i] >> 30, cs, sn, c, sv);
    z0[i] = (z0[i] + sd * (r * c)) * scale;
    z1[i] = (z1[i] + sd * (r * sv)) * scale;
  }
}

TORCHFUNC_INLINE void block(uint64_t seed, uint64_t b, float* out, float sd, float scale) {
  alignas(64) uint32_t w[4][N];
  philox(seed, b, w[0], w[1], w[2], w[3]);
  box_muller(w[0], w[1], out, out + N, sd, scale);
  box_muller(w[2], w[3], out + 2 * N, out + 3 * N, sd, scale);
}

TORCHFUNC_INLINE void block(uint64_t seed, uint64_t b, double* out, double sd, double scale) {
  alignas(64) uint32_t w[4][N];
  philox(seed, b, w[0], w[1], w[2], w[3]);
  box_muller(w[0], w[1], w[2], w[3], out, out + N, sd, scale);
}

template <class T>
TORCHFUNC_INLINE void add_normal_impl(uint64_t seed, uint64_t first_block, int64_t start, T* out, int64_t n, T sd,
                                      T scale) {
  constexpr int64_t per = numbers_per_block<T>();
  uint64_t b = first_block + uint64_t(start / per);
  int64_t k = 0;
  // A block cut by either end of the range: the same numbers, drawn into a scratch block.
  auto partial = [&](int64_t from, int64_t count) {
    alignas(64) T z[per] = {};
    block(seed, b++, z, T(1), T(1));
    for (int64_t j = 0; j < count; ++j) out[k + j] = (out[k + j] + sd * z[from + j]) * scale;
    k += count;
  };
  if (start % per != 0) partial(start % per, std::min(per - start % per, n));
  for (; k + per <= n; k += per) block(seed, b++, out + k, sd, scale);
  if (k < n) partial(0, n - k);
}

}  // namespace

void philox_block(uint64_t seed, uint64_t block, uint32_t (*words)[kCounters]) {
  philox(seed, block, words[0], words[1], words[2], words[3]);
}

TORCHFUNC_VECTOR_CLONES
void add_normal(uint64_t seed, uint64_t first_block, int64_t start, float* out, int64_t n, float sd, float scale) {
  add_normal_impl(seed, first_block, start, out, n, sd, scale);
}

TORCHFUNC_VECTOR_CLONES
void add_normal(uint64_t seed, uint64_t first_block, int64_t start, double* out, int64_t n, double sd,
                double scale) {
  add_normal_impl(seed, first_block, start, out, n, sd, scale);
}

}  // namespace detail
}  // namespace dp
}  // namespace torchfunc
