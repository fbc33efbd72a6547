// src/parallel.h: ATen's intra-op threads for our own loops.
#pragma once

#include <ATen/TensorIterator.h>

#include <algorithm>
#include <cstdint>

namespace torchfunc {
namespace detail {

/// fn(begin, end) over [0, n) in ranges of whole multiples of `grain` (the
/// last one cut at n), on ATen's intra-op threads. Through a TensorIterator
/// over one byte per grain: at::parallel_for from our translation units would
/// run serially (libtorch's OpenMP loop is inline in its headers and needs
/// -fopenmp, which would bring a second OpenMP runtime next to the wheel's).
template <class Fn>
void parallel_ranges(int64_t n, int64_t grain, const Fn& fn) {
  if (n <= 0) return;
  grain = std::max<int64_t>(grain, 1);
  at::Tensor chunks = at::empty({(n + grain - 1) / grain}, at::TensorOptions().dtype(at::kByte));
  const char* base = static_cast<const char*>(chunks.data_ptr());
  at::TensorIterator iter =
      at::TensorIteratorConfig().add_output(chunks).resize_outputs(false).check_all_same_dtype(false).build();
  iter.for_each(
      [&](char** data, const int64_t* strides, int64_t size, int64_t rows) {
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t first = data[0] + r * strides[1] - base;
          fn(first * grain, std::min(n, (first + size) * grain));
        }
      },
      /*grain_size=*/1);
}

}  // namespace detail
}  // namespace torchfunc
