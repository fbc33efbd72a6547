// Jacobians, Hessians, and batches of them: the torch.func tutorial, in C++.
//
// predict(W, b, x) = tanh(linear(x, W, b)). Its Jacobian with respect to x
// can be computed row by row with autograd (one backward per output), in one
// call with reverse mode (jacrev: a vmap over vjp) or forward mode (jacfwd: a
// vmap over jvp). jacrev wins when outputs are few, jacfwd when inputs are few;
// the table below shows the crossover. hessian is jacfwd(jacrev(f)). vmap
// turns any of them into a batched Jacobian or Hessian.
#include <torch/torch.h>
#include <torchfunc/torchfunc.h>

#include "example_util.h"

namespace func = torchfunc;
using torch::Tensor;

Tensor predict(const Tensor& weight, const Tensor& bias, const Tensor& x) {
  return torch::tanh(torch::nn::functional::linear(x, weight, bias));
}

// The reference: one autograd call per output row.
Tensor jacobian_rows(const Tensor& W, const Tensor& b, const Tensor& x) {
  Tensor xr = x.detach().requires_grad_(true);
  return example::autograd_jacobian(predict(W, b, xr), {xr});
}

int main(int argc, char** argv) {
  example::Common common;
  CLI::App app{"jacrev, jacfwd, hessian and their batched forms, checked against autograd loops"};
  common.add_to(app);
  CLI11_PARSE(app, argc, argv);
  common.apply("jacobians_hessians");
  const int reps = common.quick ? 2 : 20;

  // --- one Jacobian, three ways -------------------------------------------------
  const int64_t D = 16;
  Tensor weight = torch::randn({D, D}), bias = torch::randn({D}), x = torch::randn({D});
  auto jac_rev = func::jacrev(predict, func::argnum<2>)(weight, bias, x);
  auto jac_fwd = func::jacfwd(predict, func::argnum<2>)(weight, bias, x);
  Tensor jac_loop = jacobian_rows(weight, bias, x);
  std::printf("Jacobian of predict wrt x, D = %lld: %s\n", (long long)D, c10::str(jac_rev.sizes()).c_str());
  example::check_close(jac_rev, jac_loop, 1e-5, "jacrev equals the row-by-row autograd loop");
  example::check_close(jac_fwd, jac_rev, 1e-5, "jacfwd equals jacrev");
  // Analytic: d tanh(Wx + b) / dx = diag(1 - tanh^2) W.
  Tensor analytic = (1 - predict(weight, bias, x).pow(2)).unsqueeze(1) * weight;
  example::check_close(jac_rev, analytic, 1e-5, "jacrev equals diag(1 - y^2) W");

  // Both arguments at once: argnums<0, 2> gives a tuple {dy/dW, dy/dx}.
  auto [dW, dx] = func::jacrev(predict, func::argnums<0, 2>)(weight, bias, x);
  std::printf("jacrev(predict, argnums<0, 2>): dW %s, dx %s\n", c10::str(dW.sizes()).c_str(),
              c10::str(dx.sizes()).c_str());
  example::check_close(dx, jac_loop, 1e-5, "the x part of the two-argument Jacobian");

  // --- jacrev vs jacfwd: who wins where ------------------------------------------
  std::printf("\njacrev vs jacfwd (median ms of %d), Jacobian of predict wrt x:\n", reps);
  std::printf("  %6s %6s %10s %10s %10s  %s\n", "Din", "Dout", "jacrev", "jacfwd", "rows loop", "faster");
  std::vector<std::pair<int64_t, int64_t>> sizes = {{16, 2048}, {64, 1024}, {256, 256}, {1024, 64}, {2048, 16}};
  if (common.quick) sizes = {{8, 128}, {128, 8}};
  for (auto [din, dout] : sizes) {
    Tensor W = torch::randn({dout, din}), b = torch::randn({dout}), xi = torch::randn({din});
    double tr = example::median_ms(reps, [&] { func::jacrev(predict, func::argnum<2>)(W, b, xi); });
    double tf = example::median_ms(reps, [&] { func::jacfwd(predict, func::argnum<2>)(W, b, xi); });
    double tl = example::median_ms(std::max(1, reps / 4), [&] { jacobian_rows(W, b, xi); });
    std::printf("  %6lld %6lld %10.3f %10.3f %10.3f  %s\n", (long long)din, (long long)dout, tr, tf, tl,
                tr < tf ? "jacrev" : "jacfwd");
  }

  // --- Hessians -----------------------------------------------------------------
  auto hess = func::hessian(predict, func::argnum<2>)(weight, bias, x);
  auto fwd_rev = func::jacfwd(func::jacrev(predict, func::argnum<2>), func::argnum<2>)(weight, bias, x);
  auto rev_rev = func::jacrev(func::jacrev(predict, func::argnum<2>), func::argnum<2>)(weight, bias, x);
  std::printf("\nHessian of predict wrt x: %s\n", c10::str(hess.sizes()).c_str());
  example::check_close(hess, fwd_rev, 1e-5, "hessian equals jacfwd(jacrev)");
  example::check_close(rev_rev, fwd_rev, 1e-5, "jacrev(jacrev) equals jacfwd(jacrev)");
  // Analytic: d2 y_i / dx_j dx_k = -2 y_i (1 - y_i^2) W_ij W_ik.
  Tensor y = predict(weight, bias, x);
  Tensor hess_analytic = (-2 * y * (1 - y * y)).view({D, 1, 1}) * weight.unsqueeze(2) * weight.unsqueeze(1);
  example::check_close(hess, hess_analytic, 1e-4, "hessian equals -2 y (1 - y^2) W W^T per output");
  double t_fr = example::median_ms(reps, [&] { func::jacfwd(func::jacrev(predict, func::argnum<2>), func::argnum<2>)(weight, bias, x); });
  double t_rr = example::median_ms(reps, [&] { func::jacrev(func::jacrev(predict, func::argnum<2>), func::argnum<2>)(weight, bias, x); });
  std::printf("  jacfwd(jacrev) %.3f ms, jacrev(jacrev) %.3f ms (median of %d)\n", t_fr, t_rr, reps);

  // --- batches of Jacobians and Hessians ------------------------------------------
  const int64_t batch = common.quick ? 8 : 64, din = 31, dout = 33;
  Tensor Wb = torch::randn({dout, din}), bb = torch::randn({dout}), xs = torch::randn({batch, din});
  auto batched_jac = func::vmap(func::jacrev(predict, func::argnum<2>), func::in_dims(func::none, func::none, 0));
  Tensor J = batched_jac(Wb, bb, xs);
  std::vector<Tensor> loop_j;
  for (int64_t i = 0; i < batch; ++i) loop_j.push_back(jacobian_rows(Wb, bb, xs[i]));
  std::printf("\nbatched Jacobians, batch %lld, Din %lld, Dout %lld: %s\n", (long long)batch, (long long)din,
              (long long)dout, c10::str(J.sizes()).c_str());
  example::check_close(J, torch::stack(loop_j), 1e-5, "vmap(jacrev) equals a loop of row-by-row Jacobians");
  Tensor Jf = func::vmap(func::jacfwd(predict, func::argnum<2>), func::in_dims(func::none, func::none, 0))(Wb, bb, xs);
  example::check_close(Jf, J, 1e-5, "vmap(jacfwd) equals vmap(jacrev)");
  // The tutorial's trick: predict is per-sample, so the Jacobian of the SUM
  // over the batch with respect to the whole batch holds the same numbers.
  auto summed = [&](const Tensor& xb) { return predict(Wb, bb, xb).sum(0); };
  Tensor Jsum = func::jacrev(summed)(xs).movedim(1, 0);
  example::check_close(Jsum, J, 1e-5, "jacrev of the batch sum, moved, equals vmap(jacrev)");

  auto scalar = [](const Tensor& W, const Tensor& b, const Tensor& xi) { return predict(W, b, xi).sum(); };
  Tensor H = func::vmap(func::hessian(scalar, func::argnum<2>), func::in_dims(func::none, func::none, 0))(Wb, bb, xs);
  std::vector<Tensor> loop_h;
  for (int64_t i = 0; i < batch; ++i) {
    // Reference Hessian: autograd rows of the autograd gradient.
    Tensor xi = xs[i].detach().requires_grad_(true);
    Tensor g = torch::autograd::grad({scalar(Wb, bb, xi)}, {xi}, {}, true, true)[0];
    loop_h.push_back(example::autograd_jacobian(g, {xi}));
  }
  std::printf("batched Hessians of sum(predict): %s\n", c10::str(H.sizes()).c_str());
  example::check_close(H, torch::stack(loop_h), 1e-4, "vmap(hessian) equals a loop of autograd Hessians");

  double tb1 = example::median_ms(reps, [&] { batched_jac(Wb, bb, xs); });
  double tb2 = example::median_ms(std::max(1, reps / 4), [&] {
    for (int64_t i = 0; i < batch; ++i) jacobian_rows(Wb, bb, xs[i]);
  });
  std::printf("  vmap(jacrev) %.3f ms vs loop of row-by-row Jacobians %.3f ms: %.1fx\n", tb1, tb2, tb2 / tb1);
  return example::finish("jacobians_hessians");
}
