// The demo's model: the CNN of Papernot et al. (AAAI 2021), also Opacus' and
// TF Privacy's MNIST model. Header-only: bench/ times DP-SGD steps of it (W10).
#pragma once

#include <torch/nn.h>

#include <stdexcept>
#include <string>

namespace dpsgd {

// norm_groups > 0: a GroupNorm of that many groups after each convolution
// (before its activation), as the e2e preset's levers (De et al. 2022).
inline torch::nn::Sequential make_model(const std::string& activation, int64_t norm_groups = 0) {
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
  m->push_back(nn::Conv2d(nn::Conv2dOptions(1, 16, 8).stride(2).padding(2)));  // 28 -> 13
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
