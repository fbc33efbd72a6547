// Model ensembling: the torch.func tutorial, in C++.
//
// Ten MLPs of the same architecture (different initial weights) predict on
// MNIST-sized inputs. Instead of a loop over the models, stack their
// parameters along a new leading dimension with stack_module_state and vmap
// one functional_call over it: one batched forward for the whole ensemble.
//   - one minibatch shared by all models: in_dims(0, 0, none)
//   - a different minibatch per model:    in_dims(0, 0, 0)
#include <torch/torch.h>
#include <torchfunc/torchfunc.h>

#include "example_util.h"

namespace func = torchfunc;
namespace nn = torch::nn;
using torch::Tensor;

struct SimpleMLPImpl : nn::Module {
  SimpleMLPImpl()
      : fc1(register_module("fc1", nn::Linear(784, 128))),
        fc2(register_module("fc2", nn::Linear(128, 128))),
        fc3(register_module("fc3", nn::Linear(128, 10))) {}
  Tensor forward(Tensor x) {
    x = torch::relu(fc1(x.flatten(1)));
    x = torch::relu(fc2(x));
    return fc3(x);
  }
  nn::Linear fc1, fc2, fc3;
};
TORCH_MODULE(SimpleMLP);

int main(int argc, char** argv) {
  example::Common common;
  int64_t num_models = 10, minibatch = 64;
  CLI::App app{"An ensemble of MLPs with stack_module_state + vmap, checked against a loop over the models"};
  common.add_to(app);
  app.add_option("--models", num_models, "ensemble size")->capture_default_str();
  app.add_option("--minibatch", minibatch, "minibatch size")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  common.apply("ensembling");
  const int reps = common.quick ? 3 : 50;

  std::vector<SimpleMLP> models(num_models);
  Tensor data = torch::randn({num_models, minibatch, 1, 28, 28});  // one minibatch per model
  Tensor shared = data[0];                                           // or the same one for all

  auto [params, buffers] = func::stack_module_state(models);
  std::printf("%lld models stacked: fc1.weight is %s\n", (long long)num_models,
              c10::str(params["fc1.weight"].sizes()).c_str());
  // The "base" module only supplies the architecture; its own tensors are not used.
  SimpleMLP base = models[0];
  auto fmodel = [&](const func::TensorDict& p, const func::TensorDict& b, const Tensor& x) {
    return func::functional_call(base, std::make_tuple(p, b), x);
  };
  auto ensemble_shared = func::vmap(fmodel, func::in_dims(0, 0, func::none));
  auto ensemble_each = func::vmap(fmodel);

  auto loop_shared = [&] {
    std::vector<Tensor> out;
    for (auto& m : models) out.push_back(m->forward(shared));
    return torch::stack(out);
  };
  auto loop_each = [&] {
    std::vector<Tensor> out;
    for (int64_t i = 0; i < num_models; ++i) out.push_back(models[i]->forward(data[i]));
    return torch::stack(out);
  };

  torch::NoGradGuard no_grad;  // inference only, for the timings
  Tensor same = ensemble_shared(params, buffers, shared);
  Tensor each = ensemble_each(params, buffers, data);
  std::printf("predictions: %s\n", c10::str(same.sizes()).c_str());
  example::check_close(same, loop_shared(), 1e-5, "one shared minibatch: vmap equals the loop over models");
  example::check_close(each, loop_each(), 1e-5, "one minibatch per model: vmap equals the loop over models");

  double t1 = example::median_ms(reps, [&] { ensemble_shared(params, buffers, shared); });
  double t2 = example::median_ms(reps, [&] { loop_shared(); });
  double t3 = example::median_ms(reps, [&] { ensemble_each(params, buffers, data); });
  double t4 = example::median_ms(reps, [&] { loop_each(); });
  std::printf("timings (median of %d):\n", reps);
  std::printf("  shared minibatch:    vmap %.3f ms, loop %.3f ms, speed-up %.2fx\n", t1, t2, t2 / t1);
  std::printf("  minibatch per model: vmap %.3f ms, loop %.3f ms, speed-up %.2fx\n", t3, t4, t4 / t3);
  return example::finish("ensembling");
}
