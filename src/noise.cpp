// src/noise.cpp: dp::NoiseGenerator (include/torchfunc/noise.h): checks, the
// split of the stream over intra-op threads, dtypes and devices. The
// arithmetic is src/noise_kernel.cpp.
#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <torchfunc/noise.h>

#include <algorithm>
#include <cmath>

#include "graph.h"  // detail::is_plain, detail::capturing
#include "noise_kernel.h"
#include "parallel.h"

namespace torchfunc {
namespace dp {
namespace {

constexpr const char* kAdd = "torchfunc::dp::NoiseGenerator::add_noise_";
constexpr int64_t kGrain = 16384;  // numbers per task: a 668k-parameter model's noise splits over every thread

// t: contiguous. Any split of it gives the same numbers.
template <class T>
void add_cpu(uint64_t seed, uint64_t first_block, const at::Tensor& t, double sd, double scale) {
  T* base = t.data_ptr<T>();
  torchfunc::detail::parallel_ranges(t.numel(), kGrain, [&](int64_t begin, int64_t end) {
    detail::add_normal(seed, first_block, begin, base + begin, end - begin, T(sd), T(scale));
  });
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
  // The numbers are written on the host, which a capture does not record: a
  // replay would return the gradients without noise.
  TORCH_CHECK(!torchfunc::detail::capturing(), kAdd, ": called inside a function being captured (compile, make_graph, ",
              "aot_function); the noise is written on the host and a replay would not add it. Add the noise outside ",
              "the compiled function, to its results.");
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
