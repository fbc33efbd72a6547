// torchfunc/noise.h: the Gaussian noise of DP-SGD, fast and reproducible.
//
// libtorch's CPU normal_ draws from one Mersenne Twister, serially, in three
// passes for g.add_(randn_like(g), std).div_(B) (2.5 ms for the 668k
// parameters of a 784-512-512-10 MLP on one core, the same on two).
// NoiseGenerator is counter-based (Philox4x32-10, Salmon et al. SC'11, the
// generator of PyTorch's CUDA backend): number k of the stream is a pure
// function of (seed, k). So the noise is drawn on all intra-op threads and
// added in the same pass, it is the same bits on any number of threads, on
// any x86-64 instruction set and on every rank that shares the seed, and a
// run can be resumed from (seed, offset) alone.
//
//   dp::NoiseGenerator noise(seed);
//   for (auto& g : grads) noise.add_noise_(g, sigma * C, 1.0 / B);  // g <- (g + sigma C z) / B
//
// Numbers are Box-Muller normals from 32-bit words (float: the radius's
// uniform has 30 bits, so |z| <= 6.45; double: 53 bits, |z| <= 8.57). Like
// torch.randn it is a statistical generator, not a cryptographic one: for
// a threat model that includes an adversary predicting the noise from the
// seed, keep the seed secret (e.g. drawn from std::random_device).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace torchfunc {
namespace dp {

class NoiseGenerator {
 public:
  /// offset: where in the stream to start, in counters (what offset() said).
  explicit NoiseGenerator(uint64_t seed, uint64_t offset = 0);

  /// t <- (t + std * z) * scale with z i.i.d. N(0, 1), in place, in one pass
  /// over t. Floating-point t on any device (float32 and float64 are drawn in
  /// their own precision on the CPU's threads; other dtypes and devices take
  /// float32 / float64 numbers drawn on the CPU and copied). Not for a tensor
  /// that autograd records (requires_grad with grad mode on).
  void add_noise_(const at::Tensor& t, double std, double scale = 1.0);

  /// A tensor of i.i.d. N(0, 1) numbers (floating-point dtype; float32 by default).
  at::Tensor randn(at::IntArrayRef sizes, const at::TensorOptions& options = {});

  uint64_t seed() const { return seed_; }
  /// Counters used so far. Each call starts on a fresh block of 64 counters
  /// (256 float32 or 128 float64 numbers) and uses ceil(numel / block) blocks.
  uint64_t offset() const { return offset_; }

 private:
  uint64_t seed_, offset_;
};

}  // namespace dp
}  // namespace torchfunc
