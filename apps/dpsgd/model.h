// The demo's model: the CNN of Papernot et al. (AAAI 2021), also Opacus' and
// TF Privacy's MNIST model. Header-only: bench/ times DP-SGD steps of it (W10).
#pragma once

#include <torch/nn.h>

#include <cmath>
#include <stdexcept>
#include <string>

namespace dpsgd {

// A bank of Gabor filters [channels, 1, size, size]: filter k is oriented
// at pi * ((k / 2) mod 8) / 8, in cosine (k even) or sine (k odd) phase, at
// scale 1.6^(k / 16); each has zero mean and Euclidean norm `norm`. The e2e
// preset starts the CNN's first convolution from it instead of random
// weights: oriented edge and bar detectors, what the first layer of a
// trained CNN and the scattering transform's wavelets look like. Nothing in
// it comes from the data, so it costs no privacy; DP-SGD trains it further.
struct GaborOptions {
  double sigma = 1.5;       // the Gaussian envelope's width along the wave (pixels)
  double wavelength = 4.0;  // pixels
  double aspect = 0.5;      // the envelope is 1 / aspect times longer across the wave
  double norm = 1.0;
};

inline torch::Tensor gabor_bank(int64_t channels, int64_t size, const GaborOptions& o = GaborOptions()) {
  TORCH_CHECK(channels > 0 && size > 0 && o.sigma > 0 && o.wavelength > 0 && o.norm > 0,
              "dpsgd::gabor_bank: channels, size, sigma, wavelength and norm must be positive");
  const double centre = (size - 1) / 2.0;
  const auto grid = torch::arange(size, torch::kDouble).sub(centre);
  const auto ys = grid.view({size, 1}).expand({size, size}), xs = grid.view({1, size}).expand({size, size});
  auto bank = torch::empty({channels, 1, size, size}, torch::kDouble);
  for (int64_t k = 0; k < channels; ++k) {
    const double theta = double((k / 2) % 8) * M_PI / 8, phase = double(k % 2) * M_PI / 2;
    const double scale = std::pow(1.6, double(k / 16)), s = o.sigma * scale, wavelength = o.wavelength * scale;
    const auto along = xs * std::cos(theta) + ys * std::sin(theta), across = -xs * std::sin(theta) + ys * std::cos(theta);
    auto g = torch::exp(-(along * along + (o.aspect * o.aspect) * across * across) / (2 * s * s)) *
             torch::cos(2 * M_PI * along / wavelength + phase);
    g = g - g.mean();
    bank[k][0].copy_(g / g.norm() * o.norm);
  }
  return bank.to(torch::kFloat);
}

// norm_groups > 0: a GroupNorm of that many groups after each convolution
// (before its activation), as the e2e preset's levers (De et al. 2022).
// conv1_init "gabor": the first convolution's weights start as gabor_bank
// (its bias as PyTorch's default); "random": PyTorch's default. Either way
// the default initialisation draws from the generator, so the rest of the
// model starts the same.
inline torch::nn::Sequential make_model(const std::string& activation, int64_t norm_groups = 0,
                                        const std::string& conv1_init = "random") {
  if (conv1_init != "random" && conv1_init != "gabor") {
    throw std::invalid_argument("unknown --conv1-init '" + conv1_init + "' (random, gabor)");
  }
  namespace nn = torch::nn;
  auto act = [&]() -> nn::AnyModule {
    if (activation == "tanh") return nn::AnyModule(nn::Tanh());
    if (activation == "relu") return nn::AnyModule(nn::ReLU());
    throw std::invalid_argument("unknown --activation '" + activation + "' (tanh, relu)");
  };
  nn::Sequential m;
  auto norm = [&](int64_t channels) {
    if (norm_groups > 0) m->push_back(nn::GroupNorm(nn::GroupNormOptions(norm_groups, channels)));
  };
  nn::Conv2d conv1(nn::Conv2dOptions(1, 16, 8).stride(2).padding(2));  // 28 -> 13
  if (conv1_init == "gabor") {
    torch::NoGradGuard no_grad;
    conv1->weight.copy_(gabor_bank(16, 8));
  }
  m->push_back(conv1);
  norm(16);
  m->push_back(act());
  m->push_back(nn::MaxPool2d(nn::MaxPool2dOptions(2).stride(1)));  // 13 -> 12
  m->push_back(nn::Conv2d(nn::Conv2dOptions(16, 32, 4).stride(2)));  // 12 -> 5
  norm(32);
  m->push_back(act());
  m->push_back(nn::MaxPool2d(nn::MaxPool2dOptions(2).stride(1)));  // 5 -> 4
  m->push_back(nn::Flatten());
  m->push_back(nn::Linear(32 * 4 * 4, 32));
  m->push_back(act());
  m->push_back(nn::Linear(32, 10));
  return m;
}

// The scatternet preset's model: a linear layer over (fixed) features of the
// given shape, from zero (Tramer & Boneh, ICLR 2021).
inline torch::nn::Sequential make_linear_model(c10::IntArrayRef feature_shape, int64_t classes) {
  namespace nn = torch::nn;
  int64_t d = 1;
  for (int64_t s : feature_shape) d *= s;
  nn::Linear linear(d, classes);
  torch::NoGradGuard no_grad;
  linear->weight.zero_();
  linear->bias.zero_();
  return nn::Sequential(nn::Flatten(), linear);
}

}  // namespace dpsgd
