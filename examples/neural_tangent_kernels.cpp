// Empirical neural tangent kernels: the torch.func tutorial, in C++.
//
// For a network f(params, x) with outputs in R^O, the empirical NTK between
// inputs x1 and x2 is J(x1) J(x2)^T, an O x O matrix, where J(x) = df/dparams.
// Two ways to get it for whole batches, both from the tutorial:
//   1. Jacobian contraction: vmap(jacrev(f)) over each batch, then contract the
//      parameter dimension (einsum). Memory: the full per-sample Jacobians.
//   2. NTK-vector products: for each pair (x1, x2) and each basis vector e,
//      J(x2) (J(x1)^T e) = jvp(f(., x2), vjp(f(., x1))(e)); vmap over the basis
//      and over both batches. Never materialises a Jacobian.
// "full" gives [N, M, O, O]; "trace" gives sum_a NTK[n, m, a, a], [N, M].
#include <torch/torch.h>
#include <torchfunc/torchfunc.h>

#include "example_util.h"

namespace func = torchfunc;
namespace nn = torch::nn;
using torch::Tensor;
using func::TensorDict;

struct CNNImpl : nn::Module {
  CNNImpl()
      : conv1(register_module("conv1", nn::Conv2d(nn::Conv2dOptions(3, 32, 3)))),
        conv2(register_module("conv2", nn::Conv2d(nn::Conv2dOptions(32, 32, 3)))),
        conv3(register_module("conv3", nn::Conv2d(nn::Conv2dOptions(32, 32, 3)))),
        fc(register_module("fc", nn::Linear(32 * 26 * 26, 10))) {}
  Tensor forward(Tensor x) {
    x = torch::relu(conv1(x));
    x = torch::relu(conv2(x));
    x = conv3(x);
    return fc(x.flatten(1));
  }
  nn::Conv2d conv1, conv2, conv3;
  nn::Linear fc;
};
TORCH_MODULE(CNN);

// Method 1: contract per-sample Jacobians over the parameters.
Tensor ntk_jacobian_contraction(const std::function<Tensor(const TensorDict&, const Tensor&)>& f_single,
                                const TensorDict& params, const Tensor& x1, const Tensor& x2, bool trace) {
  auto jac = func::vmap(func::jacrev(f_single), func::in_dims(func::none, 0));
  TensorDict j1 = jac(params, x1), j2 = jac(params, x2);  // each [N, O, *param_shape]
  Tensor result;
  for (const auto& item : j1) {
    Tensor a = item.value().flatten(2), b = j2[item.key()].flatten(2);
    Tensor part = trace ? torch::einsum("Naf,Maf->NM", {a, b}) : torch::einsum("Naf,Mbf->NMab", {a, b});
    result = result.defined() ? result + part : part;
  }
  return result;
}

// Method 2: NTK-vector products, vmapped over the basis and both batches.
Tensor ntk_vector_products(const std::function<Tensor(const TensorDict&, const Tensor&)>& f_single,
                           const TensorDict& params, const Tensor& x1, const Tensor& x2, bool trace) {
  auto get_ntk = [&](const Tensor& a, const Tensor& b) {
    auto f_a = [&](const TensorDict& p) { return f_single(p, a); };
    auto f_b = [&](const TensorDict& p) { return f_single(p, b); };
    auto [out, vjp_fn] = func::vjp(f_a, params);
    auto ntk_column = [&](const Tensor& e) {
      TensorDict vjps = std::get<0>(vjp_fn(e));                             // J(a)^T e
      return func::jvp(f_b, std::tuple{params}, std::tuple{vjps}).second;  // J(b) J(a)^T e
    };
    Tensor basis = torch::eye(out.numel(), out.options());
    return func::vmap(ntk_column)(basis);
  };
  Tensor result = func::vmap(func::vmap(get_ntk, func::in_dims(func::none, 0)), func::in_dims(0, func::none))(x1, x2);
  return trace ? torch::einsum("NMKK->NM", {result}) : result;
}

int main(int argc, char** argv) {
  example::Common common;
  CLI::App app{"Empirical NTK of a CNN by Jacobian contraction and by NTK-vector products"};
  common.add_to(app);
  CLI11_PARSE(app, argc, argv);
  common.apply("neural_tangent_kernels");
  const int reps = common.quick ? 1 : 5;
  const int64_t n1 = common.quick ? 4 : 20, n2 = common.quick ? 2 : 5;

  CNN net;
  net->eval();
  Tensor x_train = torch::randn({n1, 3, 32, 32}), x_test = torch::randn({n2, 3, 32, 32});
  TensorDict params = func::named_parameters(net);
  // The network on ONE input, as a function of the parameters.
  std::function<Tensor(const TensorDict&, const Tensor&)> f_single = [&](const TensorDict& p, const Tensor& x) {
    return func::functional_call(net, p, x.unsqueeze(0)).squeeze(0);
  };

  Tensor full1 = ntk_jacobian_contraction(f_single, params, x_train, x_test, false);
  Tensor full2 = ntk_vector_products(f_single, params, x_train, x_test, false);
  Tensor trace1 = ntk_jacobian_contraction(f_single, params, x_train, x_test, true);
  Tensor trace2 = ntk_vector_products(f_single, params, x_train, x_test, true);
  std::printf("full NTK %s, trace NTK %s\n", c10::str(full1.sizes()).c_str(), c10::str(trace1.sizes()).c_str());
  const double scale = full1.abs().max().item<double>();
  example::check_close(full2, full1, 1e-4 * scale, "full: NTK-vector products equal Jacobian contraction");
  example::check_close(trace2, trace1, 1e-4 * scale, "trace: NTK-vector products equal Jacobian contraction");
  example::check_close(trace1, torch::einsum("NMKK->NM", {full1}), 1e-4 * scale, "trace mode equals the trace of full");

  // Independent reference for one pair: Jacobians by plain autograd, one
  // backward pass per output, then J1 J2^T.
  auto autograd_jacobian = [&](const Tensor& x) {
    return example::autograd_jacobian(net->forward(x.unsqueeze(0)).squeeze(0), net->parameters());
  };
  Tensor ref = autograd_jacobian(x_train[1]).matmul(autograd_jacobian(x_test[0]).t());
  example::check_close(full1[1][0], ref, 1e-4 * scale, "NTK[1, 0] equals J(x1) J(x2)^T from autograd");

  double t1 = example::median_ms(reps, [&] { ntk_jacobian_contraction(f_single, params, x_train, x_test, false); });
  double t2 = example::median_ms(reps, [&] { ntk_vector_products(f_single, params, x_train, x_test, false); });
  double t3 = example::median_ms(reps, [&] { ntk_jacobian_contraction(f_single, params, x_train, x_test, true); });
  double t4 = example::median_ms(reps, [&] { ntk_vector_products(f_single, params, x_train, x_test, true); });
  std::printf("timings (median of %d), %lld x %lld inputs:\n", reps, (long long)n1, (long long)n2);
  std::printf("  full:  Jacobian contraction %.1f ms, NTK-vector products %.1f ms\n", t1, t2);
  std::printf("  trace: Jacobian contraction %.1f ms, NTK-vector products %.1f ms\n", t3, t4);
  return example::finish("neural_tangent_kernels");
}
