// src/noise_kernel.h: the arithmetic behind dp::NoiseGenerator
// (include/torchfunc/noise.h), free of libtorch so that it compiles with its
// own flags (src/noise_kernel.cpp: no errno from sqrt, no fused
// multiply-adds) and vectorises.
//
// The stream is cut into blocks of kCounters Philox counters. Block b uses the
// counters c = b * kCounters + i (i < kCounters) as {lo(c), hi(c), 0, 0}, the
// seed as the key {lo(seed), hi(seed)}: word w of counter c is
// at::philox_engine(seed, 0, c)'s w-th number. A block gives
//   float:  4 * kCounters numbers: Box-Muller on the word pairs (0, 1) and
//           (2, 3) of each counter; number j * kCounters + i is counter i's
//           j-th normal (j = 0, 1 from words 0, 1; j = 2, 3 from words 2, 3);
//   double: 2 * kCounters numbers from words (0, 1) as the radius's uniform
//           and (2, 3) as the angle's; number j * kCounters + i, j = 0, 1.
// Box-Muller on (a, b): u = (a's uniform) in (0, 1], r = sqrt(-2 ln u); the
// angle 2 pi v turns in quarter turns by b's top two bits; z = (r cos, r sin).
#pragma once

#include <cstdint>

namespace torchfunc {
namespace dp {
namespace detail {

constexpr int64_t kCounters = 64;

/// Numbers per block for float (4 per counter) and double (2 per counter).
template <class T>
constexpr int64_t numbers_per_block() {
  return sizeof(T) == 4 ? 4 * kCounters : 2 * kCounters;
}

/// The Philox4x32-10 words of counters b * kCounters + i: words[w][i].
void philox_block(uint64_t seed, uint64_t block, uint32_t (*words)[kCounters]);

/// With z_k number k of the stream counted from block first_block on:
/// out[j] = (out[j] + sd * z_{start + j}) * scale for j < n. Any start and n
/// (the blocks cut at either end are drawn whole into a scratch block), so
/// threads may split a tensor anywhere and still get the same numbers.
void add_normal(uint64_t seed, uint64_t first_block, int64_t start, float* out, int64_t n, float sd, float scale);
void add_normal(uint64_t seed, uint64_t first_block, int64_t start, double* out, int64_t n, double sd, double scale);

}  // namespace detail
}  // namespace dp
}  // namespace torchfunc
