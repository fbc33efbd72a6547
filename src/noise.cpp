// src/noise.cpp: dp::NoiseGenerator (include/torchfunc/noise.h): checks, the
// split of the stream over intra-op threads, dtypes and devices. The
// arithmetic is src/noise_kernel.cpp.
#include <ATen/ATen.h>
#include <ATen/TensorIterator.h>
#include <c10/core/GradMode.h>
#include <torchfunc/noise.h>

#include <algorithm>
#include <cmath>

#include "graph.h"  // detail::is_plain
#include "noise_kernel.h"

namespace torchfunc {
namespace dp {
namespace {

constexpr const char* kAdd = "torchfunc::dp::NoiseGenerator::add_noise_";
constexpr int64_t kGrain = 16384;  // numbers per task: a 668k-parameter model's noise splits over every thread

// t: contiguous. The threads: ATen's own parallel_for, run through a
// TensorIterator (at::parallel_for from our translation unit would run
// serially: libtorch's OpenMP loop is inline in its headers and needs
// -fopenmp, which would bring a second OpenMP runtime next to the wheel's).
template <class T>
void add_cpu(uint64_t seed, uint64_t first_block, const at::Tensor& t, double sd, double scale) {
  at::Tensor flat = t.view(-1);
  const T* base = flat.data_ptr<T>();
  at::TensorIterator iter = at::TensorIteratorConfig()
                                .add_output(flat)
                                .resize_outputs(false)
                                .check_all_same_dtype(false)
                                .set_check_mem_overlap(false)
                                .build();
  iter.for_each(
      [&](char** data, const int64_t* strides, int64_t n, int64_t rows) {
        TORCH_INTERNAL_ASSERT(strides[0] == int64_t(sizeof(T)), "a contiguous 1-d output");
        for (int64_t r = 0; r < rows; ++r) {
          T* out = reinterpret_cast<T*>(data[0] + r * strides[1]);
          detail::add_normal(seed, first_block, out - base, out, n, T(sd), T(scale));
        }
      },
      kGrain);
}

}  // namespace

NoiseGenerator::NoiseGenerator(uint64_t seed, uint64_t offset) : seed_(seed), offset_(offset) {
  TORCH_CHECK(offset % detail::kCounters == 0, "torchfunc::dp::NoiseGenerator: offset must be a multiple of ",
              detail::kCounters, " counters (a value offset() returned), got ", offset, ".");
}

void NoiseGenerator::add_noise_(const at::Tensor& t, double std, double scale) {
  TORCH_CHECK(t.defined(), kAdd, ": the tensor is undefined.");
  TORCH_CHECK(torchfunc::detail::is_plain(t), kAdd, ": got a transform's tensor (a BatchedTensor or a grad/functionalize ",
              "wrapper); add the noise outside vmap / grad / functionalize, to the plain result.");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), kAdd, ": needs a floating-point tensor, got ", t.scalar_type(), ".");
  TORCH_CHECK(std::isfinite(std) && std >= 0, kAdd, ": std must be finite and non-negative, got ", std, ".");
  TORCH_CHECK(std::isfinite(scale), kAdd, ": scale must be finite, got ", scale, ".");
  TORCH_CHECK(!(t.requires_grad() && c10::GradMode::is_enabled()), kAdd, ": the tensor requires grad and grad mode is ",
              "on, so autograd would not see the change; add noise to gradients, to a detached tensor or under ",
              "torch::NoGradGuard.");
  const at::ScalarType drawn = t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const int64_t n = t.numel(), per = drawn == at::kDouble ? detail::numbers_per_block<double>()
                                                          : detail::numbers_per_block<float>();
  const uint64_t first_block = offset_ / detail::kCounters;
  offset_ += uint64_t((n + per - 1) / per) * detail::kCounters;
  if (n == 0) return;
  if (t.is_cpu() && t.scalar_type() == drawn && t.is_contiguous()) {
    if (drawn == at::kFloat) add_cpu<float>(seed_, first_block, t, std, scale);
    else add_cpu<double>(seed_, first_block, t, std, scale);
    t.unsafeGetTensorImpl()->bump_version();  // written through the data pointer
    return;
  }
  // Other layouts, dtypes and devices: the same numbers, drawn into a
  // contiguous CPU tensor, then one add and multiply on t's device.
  at::NoGradGuard no_grad;
  at::Tensor z = at::zeros(t.sizes(), at::TensorOptions().dtype(drawn));
  if (drawn == at::kFloat) add_cpu<float>(seed_, first_block, z, std, 1.0);
  else add_cpu<double>(seed_, first_block, z, std, 1.0);
  t.add_(z.to(t.device(), t.scalar_type())).mul_(scale);
}

at::Tensor NoiseGenerator::randn(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::zeros(sizes, options.requires_grad(false));
  {
    at::NoGradGuard no_grad;
    add_noise_(t, 1.0, 1.0);
  }
  return options.requires_grad() ? t.requires_grad_() : t;
}

}  // namespace dp
}  // namespace torchfunc
