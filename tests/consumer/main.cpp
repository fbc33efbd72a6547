// Per-sample gradients of a least-squares loss, checked against the analytic
// formula: enough to prove that headers, library and Torch flags reach a
// consumer project.
#include <torch/torch.h>
#include <torchfunc/torchfunc.h>

#include <cstdio>
#include <string>

int main() {
  namespace func = torchfunc;
  using torch::Tensor;
  torch::manual_seed(0);
  Tensor w = torch::randn({5}, torch::kDouble);
  Tensor xs = torch::randn({8, 5}, torch::kDouble);
  Tensor ys = torch::randn({8}, torch::kDouble);
  auto loss = [](const Tensor& w, const Tensor& x, const Tensor& y) { return (w.dot(x) - y).pow(2); };
  Tensor per_sample = func::vmap(func::grad(loss), func::in_dims(func::none, 0, 0))(w, xs, ys);
  Tensor expected = 2 * (xs.matmul(w) - ys).unsqueeze(1) * xs;
  const bool ok = per_sample.sizes() == expected.sizes() && torch::allclose(per_sample, expected);
  std::printf("torchfunc consumer (libtorch %s): per-sample gradients %s\n", TORCH_VERSION, ok ? "match" : "DIFFER");
#ifdef TORCHFUNC_EXPECT_TORCH_VERSION
  // The consumer compiled against the libtorch torchfunc was built with.
  if (std::string(TORCH_VERSION) != TORCHFUNC_EXPECT_TORCH_VERSION) {
    std::printf("torchfunc consumer: expected libtorch %s\n", TORCHFUNC_EXPECT_TORCH_VERSION);
    return 1;
  }
#endif
  return ok ? 0 : 1;
}
