// Per-sample gradients: the torch.func tutorial, in C++.
//
// A CNN classifies a batch of 28x28 images. Ordinary backward gives the
// gradient of the batch loss; DP-SGD, influence functions and gradient-noise
// studies need the gradient of EACH sample's loss. The loop computes them one
// backward pass at a time; torchfunc computes all of them in one call:
//
//   vmap(grad(loss of functional_call(model, params, x)), in_dims(none, 0, 0))
//
// `grad` differentiates with respect to the parameter dict; `vmap` maps that
// over the batch dimension of data and targets (params are shared: none).
#include <torch/torch.h>
#include <torchfunc/torchfunc.h>

#include "example_util.h"

namespace func = torchfunc;
namespace nn = torch::nn;
using torch::Tensor;

// The tutorial's model.
struct SimpleCNNImpl : nn::Module {
  SimpleCNNImpl()
      : conv1(register_module("conv1", nn::Conv2d(nn::Conv2dOptions(1, 32, 3)))),
        conv2(register_module("conv2", nn::Conv2d(nn::Conv2dOptions(32, 64, 3)))),
        fc1(register_module("fc1", nn::Linear(9216, 128))),
        fc2(register_module("fc2", nn::Linear(128, 10))) {}
  Tensor forward(Tensor x) {
    x = torch::relu(conv1(x));
    x = torch::relu(conv2(x));
    x = torch::max_pool2d(x, 2).flatten(1);
    x = torch::relu(fc1(x));
    return torch::log_softmax(fc2(x), 1);
  }
  nn::Conv2d conv1;
  nn::Conv2d conv2;
  nn::Linear fc1, fc2;
};
TORCH_MODULE(SimpleCNN);

int main(int argc, char** argv) {
  example::Common common;
  int64_t batch = 64;
  CLI::App app{"Per-sample gradients of a CNN with vmap(grad(...)), checked against a loop"};
  common.add_to(app);
  app.add_option("--batch", batch, "batch size")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  if (common.quick) batch = 8;
  common.apply("per_sample_grads");
  const int reps = common.quick ? 2 : 10;

  SimpleCNN model;
  Tensor data = torch::randn({batch, 1, 28, 28});
  Tensor targets = torch::randint(10, {batch});

  // The loss of ONE sample, as a function of the parameters. vmap hands
  // `sample` and `target` without their batch dimension; the model wants one.
  auto compute_loss = [&](const func::TensorDict& params, const Tensor& sample, const Tensor& target) {
    Tensor prediction = func::functional_call(model, params, sample.unsqueeze(0));
    return torch::nll_loss(prediction, target.unsqueeze(0));
  };
  auto per_sample_grads = func::vmap(func::grad(compute_loss), func::in_dims(func::none, 0, 0));
  func::TensorDict params = func::named_parameters(model);

  // The reference: one backward pass per sample.
  auto loop = [&] {
    std::vector<std::vector<Tensor>> grads;
    for (int64_t i = 0; i < batch; ++i) {
      model->zero_grad();
      torch::nll_loss(model->forward(data[i].unsqueeze(0)), targets[i].unsqueeze(0)).backward();
      std::vector<Tensor> g;
      for (const auto& p : model->parameters()) g.push_back(p.grad().clone());
      grads.push_back(std::move(g));
    }
    return grads;
  };

  std::printf("per-sample gradients of %lld samples, %lld parameter tensors\n", (long long)batch,
              (long long)params.size());
  func::TensorDict ft = per_sample_grads(params, data, targets);
  auto ref = loop();
  size_t k = 0;
  for (const auto& item : ft) {
    std::vector<Tensor> rows;
    for (int64_t i = 0; i < batch; ++i) rows.push_back(ref[i][k]);
    // The tutorial's tolerance: a max_pool2d window whose inputs nearly tie
    // may pick differently in batch-1 and batch-n convolutions.
    example::check_close(item.value(), torch::stack(rows), 3e-3,
                         item.key() + " " + c10::str(item.value().sizes()) + " equals the loop");
    ++k;
  }

  double t_vmap = example::median_ms(reps, [&] { per_sample_grads(params, data, targets); });
  double t_loop = example::median_ms(reps, [&] { loop(); });
  std::printf("timings (median of %d): vmap(grad) %.2f ms, loop of %lld backward passes %.2f ms, speed-up %.2fx\n", reps,
              t_vmap, (long long)batch, t_loop, t_loop / t_vmap);
  return example::finish("per_sample_grads");
}
