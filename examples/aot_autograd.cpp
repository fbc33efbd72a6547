// AOT Autograd in C++: functorch's "aot_autograd_optimizations" tutorial,
// ported, and compile() on a transformed function.
//
// 1. aot_function on the tutorial's cos(cos(a + b + c + d)): the captured
//    forward and backward graphs, printed (the tutorial's "print compiler"),
//    results and gradients checked against eager autograd.
// 2. The min-cut rematerialisation partition: the forward saves nothing but
//    its arguments and the backward recomputes the cheap ops; same gradients,
//    fewer bytes held between forward and backward.
// 3. Timings of eager, aot_function and min-cut (forward + backward).
// 4. compile() on a MAML meta-step (grad of vmap of an inner grad step, the
//    maml tutorial's shape): the transforms run once, at capture; the replay
//    calls the plain ATen ops they lowered to. Checked against the eager
//    transforms and timed.
#include <torch/torch.h>
#include <torchfunc/torchfunc.h>

#include "example_util.h"

namespace func = torchfunc;
using func::TensorDict;
using torch::Tensor;

namespace {

Tensor fn(const Tensor& a, const Tensor& b, const Tensor& c, const Tensor& d) { return (a + b + c + d).cos().cos(); }

std::vector<Tensor> leaves(int64_t n) {
  std::vector<Tensor> v;
  for (int i = 0; i < 4; ++i) v.push_back(torch::randn({n}, torch::requires_grad()));
  return v;
}

}  // namespace

int main(int argc, char** argv) {
  example::Common common;
  int64_t size = 1 << 21, reps = 10;
  CLI::App app{"aot_function and compile, checked against eager autograd and the eager transforms"};
  common.add_to(app);
  app.add_option("--size", size, "elements of a, b, c, d")->capture_default_str();
  app.add_option("--reps", reps, "timed repetitions")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  if (common.quick) {
    size = 1000;
    reps = 2;
  }
  common.apply("aot_autograd");

  // ---- 1. aot_function, default partition ----------------------------------------------
  std::printf("1. aot_function(cos(cos(a + b + c + d))), the captured graphs\n");
  auto x = leaves(size);
  Tensor ref = fn(x[0], x[1], x[2], x[3]);
  auto ref_grads = torch::autograd::grad({ref.sum()}, x);
  auto aot = func::aot_function(fn);
  Tensor y = aot(x[0], x[1], x[2], x[3]);
  auto grads = torch::autograd::grad({y.sum()}, x);
  auto g = aot.graphs().at(0);
  std::printf("forward graph:\n%sbackward graph:\n%s", g->forward.str().c_str(), g->backward.str().c_str());
  example::check_close(y, ref.detach(), 1e-6, "aot_function's result equals eager");
  for (int i = 0; i < 4; ++i) example::check_close(grads[i], ref_grads[i], 1e-6, "gradient " + std::to_string(i) + " equals eager autograd's");

  // ---- 2. min-cut rematerialisation ------------------------------------------------------
  std::printf("2. Partition::MinCut: save less, recompute the cheap ops in the backward\n");
  auto cut = func::aot_function(fn, func::AotOptions{func::Partition::MinCut, {}});
  Tensor yc = cut(x[0], x[1], x[2], x[3]);
  auto grads_c = torch::autograd::grad({yc.sum()}, x);
  auto gc = cut.graphs().at(0);
  std::printf("forward graph:\n%sbackward graph:\n%s", gc->forward.str().c_str(), gc->backward.str().c_str());
  for (int i = 0; i < 4; ++i) example::check_close(grads_c[i], ref_grads[i], 1e-6, "min-cut gradient " + std::to_string(i) + " equals eager autograd's");
  std::printf("  saved for the backward, besides the arguments: default %lld bytes (%zu values), min-cut %lld bytes\n",
              static_cast<long long>(g->saved_bytes), g->num_saved, static_cast<long long>(gc->saved_bytes));
  example::check(gc->saved_bytes < g->saved_bytes, "min-cut saves fewer bytes than the default partition");

  // ---- 3. timings --------------------------------------------------------------------------
  std::printf("3. forward + backward, median of %lld\n", static_cast<long long>(reps));
  auto step = [&](auto&& f) { return [&] { torch::autograd::grad({f(x[0], x[1], x[2], x[3]).sum()}, x); }; };
  double t_eager = example::median_ms(static_cast<int>(reps), step(fn));
  double t_aot = example::median_ms(static_cast<int>(reps), step(aot));
  double t_cut = example::median_ms(static_cast<int>(reps), step(cut));
  std::printf("  eager %.2f ms, aot_function %.2f ms, min-cut %.2f ms (%lld elements)\n", t_eager, t_aot, t_cut,
              static_cast<long long>(size));

  // ---- 4. compile a transformed function -----------------------------------------------
  std::printf("4. compile(grad(mean of vmap(inner grad step, query loss))): a MAML meta-step\n");
  torch::nn::Sequential net(torch::nn::Linear(1, 40), torch::nn::ReLU(), torch::nn::Linear(40, 40), torch::nn::ReLU(),
                            torch::nn::Linear(40, 1));
  TensorDict params = func::named_parameters(net);
  auto loss = [&](const TensorDict& p, const Tensor& xs, const Tensor& ys) {
    return (func::functional_call(net, p, xs) - ys).pow(2).mean();
  };
  auto task = [&](const TensorDict& p, const Tensor& a, const Tensor& b, const Tensor& c, const Tensor& d) {
    TensorDict gr = func::grad(loss)(p, a, b), q;
    for (const auto& it : p) q.insert(it.key(), it.value() - 0.1 * gr[it.key()]);
    return loss(q, c, d);
  };
  auto meta = func::grad([&](const TensorDict& p, const Tensor& a, const Tensor& b, const Tensor& c, const Tensor& d) {
    return func::vmap(task, func::in_dims(func::none, 0, 0, 0, 0))(p, a, b, c, d).mean();
  });
  auto compiled = func::compile(meta);
  auto batch = [] {
    return std::vector<Tensor>{torch::randn({8, 10, 1}), torch::randn({8, 10, 1}), torch::randn({8, 10, 1}),
                               torch::randn({8, 10, 1})};
  };
  auto b0 = batch();
  compiled(params, b0[0], b0[1], b0[2], b0[3]);  // captures
  auto mg = compiled.graphs().at(0);
  std::printf("  captured: %zu ATen ops (%zu mm, %zu bmm), %zu inputs, %zu outputs\n", mg.num_nodes(), mg.count("aten::mm"),
              mg.count("aten::bmm"), mg.num_inputs(), mg.num_outputs());
  auto b1 = batch();
  TensorDict got = compiled(params, b1[0], b1[1], b1[2], b1[3]), want = meta(params, b1[0], b1[1], b1[2], b1[3]);
  for (const auto& it : want) example::check_close(got[it.key()], it.value(), 1e-6, "meta-gradient " + it.key() + " equals the eager transforms'");
  const int r = common.quick ? 2 : 200;
  double t_meta = example::median_ms(r, [&] { meta(params, b1[0], b1[1], b1[2], b1[3]); });
  double t_comp = example::median_ms(r, [&] { compiled(params, b1[0], b1[1], b1[2], b1[3]); });
  std::printf("  eager transforms %.3f ms, compiled %.3f ms (%.1fx)\n", t_meta, t_comp, t_meta / t_comp);
  return example::finish("aot_autograd");
}
