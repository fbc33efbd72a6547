// torchfunc_bench: the workloads of ../shared/WORKLOADS.md (W1-W10) and their
// plain baselines, one case per process run (allocation history changes
// timings). bench/workloads.py is the same on Python's torch.func / functorch;
// bench/run.py runs both side by side.
//
//   torchfunc_bench --list
//   torchfunc_bench --case W2/vmap --threads 1 --reps 50
//   torchfunc_bench --all --reps 1          (smoke run: every case once)
// Prints one JSON object per case: {"case", "median_us", "reps", ...}.
#include <torch/cuda.h>
#include <torch/torch.h>
#include <torchfunc/torchfunc.h>

#include <CLI/CLI.hpp>
#include <nlohmann/json.hpp>

#include <chrono>
#include <cstdlib>
#include <cstdio>
#include <functional>
#include <map>
#include <thread>

#include "model.h"  // apps/dpsgd: the demo's CNN (W10)

namespace func = torchfunc;
namespace nn = torch::nn;
namespace F = torch::nn::functional;
using torch::Tensor;
using func::TensorDict;

namespace {

using Call = std::function<void()>;

// --device: W1, W2 and W9 run on it (scripts/gpu-check.sh uses cuda); the
// other cases are CPU only.
c10::Device g_device(c10::kCPU);
bool g_print_graph = false;  // --graph: compiled cases print their captured graph to stderr
template <class C>
void maybe_print_graph(const C& compiled) {
  if (!g_print_graph) return;
  for (const auto& g : compiled.graphs()) std::fprintf(stderr, "%s(%zu nodes)\n", g.str().c_str(), g.num_nodes());
}
bool device_case(const std::string& name) { return name.rfind("W1/", 0) == 0 || name.rfind("W2/", 0) == 0 || name.rfind("W9/", 0) == 0; }
struct Case {
  std::string name, what;
  std::function<Call()> setup;  // builds inputs, returns the timed call
};

// ---- models ---------------------------------------------------------------------

struct CnnImpl : nn::Module {  // W1
  CnnImpl()
      : conv1(register_module("conv1", nn::Conv2d(nn::Conv2dOptions(1, 32, 3)))),
        conv2(register_module("conv2", nn::Conv2d(nn::Conv2dOptions(32, 64, 3)))),
        fc1(register_module("fc1", nn::Linear(9216, 128))),
        fc2(register_module("fc2", nn::Linear(128, 10))) {}
  Tensor forward(Tensor x) {
    x = torch::relu(conv2(torch::relu(conv1(x))));
    x = torch::max_pool2d(x, 2).flatten(1);
    return fc2(torch::relu(fc1(x)));
  }
  nn::Conv2d conv1, conv2;
  nn::Linear fc1, fc2;
};
TORCH_MODULE(Cnn);

nn::Sequential mlp(int64_t in, int64_t hidden, int64_t out) {
  return nn::Sequential(nn::Linear(in, hidden), nn::ReLU(), nn::Linear(hidden, hidden), nn::ReLU(),
                        nn::Linear(hidden, out));
}

struct NtkCnnImpl : nn::Module {  // W7
  NtkCnnImpl()
      : conv1(register_module("conv1", nn::Conv2d(nn::Conv2dOptions(3, 32, 3)))),
        conv2(register_module("conv2", nn::Conv2d(nn::Conv2dOptions(32, 32, 3)))),
        conv3(register_module("conv3", nn::Conv2d(nn::Conv2dOptions(32, 32, 3)))),
        fc(register_module("fc", nn::Linear(32 * 26 * 26, 10))) {}
  Tensor forward(Tensor x) { return fc(conv3(torch::relu(conv2(torch::relu(conv1(x))))).flatten(1)); }
  nn::Conv2d conv1, conv2, conv3;
  nn::Linear fc;
};
TORCH_MODULE(NtkCnn);

Tensor predict(const Tensor& W, const Tensor& b, const Tensor& x) { return torch::tanh(F::linear(x, W, b)); }

Tensor nll(const Tensor& logits, const Tensor& y) { return torch::nll_loss(torch::log_softmax(logits, 1), y); }

// ---- W1/W2: per-sample gradients ------------------------------------------------------

template <class M>
std::vector<Case> per_sample_cases(const std::string& id, std::function<M()> make, std::vector<int64_t> x_shape) {
  // compiled: the same function captured once (torchfunc/compile.h) before timing.
  auto setup = [=](bool compiled) {
    auto model = std::make_shared<M>(make());
    (*model)->to(g_device);
    auto x = torch::randn(x_shape, g_device), y = torch::randint(10, {x_shape[0]}, torch::TensorOptions(g_device).dtype(torch::kLong));
    auto params = std::make_shared<TensorDict>(func::named_parameters(*model));
    auto loss = [model](const TensorDict& p, const Tensor& xi, const Tensor& yi) {
      return nll(func::functional_call(*model, p, xi.unsqueeze(0)), yi.unsqueeze(0));
    };
    auto f = func::vmap(func::grad(loss), func::in_dims(func::none, 0, 0));
    if (!compiled) return Call([=]() mutable { f(*params, x, y); });
    auto cf = func::compile(f);
    cf(*params, x, y);  // capture
    maybe_print_graph(cf);
    return Call([=]() mutable { cf(*params, x, y); });
  };
  auto setup_vmap = [=] { return setup(false); };
  auto setup_compiled = [=] { return setup(true); };
  auto setup_loop = [=] {
    auto model = std::make_shared<M>(make());
    (*model)->to(g_device);
    auto x = torch::randn(x_shape, g_device), y = torch::randint(10, {x_shape[0]}, torch::TensorOptions(g_device).dtype(torch::kLong));
    return Call([=] {
      auto ps = (*model)->parameters();
      std::vector<std::vector<Tensor>> per(ps.size());
      for (int64_t i = 0; i < x.size(0); ++i) {
        auto g = torch::autograd::grad({nll((*model)->forward(x[i].unsqueeze(0)), y[i].unsqueeze(0))}, ps);
        for (size_t k = 0; k < ps.size(); ++k) per[k].push_back(g[k]);
      }
      for (auto& v : per) torch::stack(v);
    });
  };
  return {{id + "/vmap", "vmap(grad(loss over functional_call))", setup_vmap},
          {id + "/compiled", "compile(vmap(grad(loss over functional_call))), captured before timing", setup_compiled},
          {id + "/loop", "baseline: loop of single-sample autograd.grad", setup_loop}};
}

// ---- W10: one DP-SGD step vs the plain step ---------------------------------------------
// Both steps: a batch of exactly the expected size B (a Poisson batch's size
// varies; the same B keeps the two sides' shapes equal), cross-entropy, SGD
// with momentum 0.9. The DP step clips every example's gradient to C = 1,
// sums, adds N(0, sigma^2 C^2) noise with sigma = 1 and divides by B.

Tensor per_sample_ce(const Tensor& out, const Tensor& y) {
  return F::cross_entropy(out, y, F::CrossEntropyFuncOptions().reduction(torch::kNone));
}

std::vector<Case> dp_cases() {
  struct Model {
    std::string name;
    std::function<nn::Sequential()> make;
    std::vector<int64_t> sample_shape;
  };
  const std::vector<Model> models = {{"cnn", [] { return dpsgd::make_model("tanh"); }, {1, 28, 28}},
                                     {"mlp", [] { return mlp(784, 512, 10); }, {784}}};
  std::vector<Case> cases;
  for (const auto& m : models)
    for (int64_t batch : {256, 2048}) {
      const std::string tail = "/" + m.name + "/" + std::to_string(batch);
      std::vector<int64_t> shape{batch};
      shape.insert(shape.end(), m.sample_shape.begin(), m.sample_shape.end());
      // mode: "plain", "ghost" (dp::clipped_grad_sum on the Sequential: per-layer
      // norms) or "vmap" (the vmap(grad) overload, in chunks of 256 as the demo).
      auto setup = [=](std::string mode) {
        return [=] {
          auto model = std::make_shared<nn::Sequential>(m.make());
          auto opt = std::make_shared<torch::optim::SGD>((*model)->parameters(),
                                                         torch::optim::SGDOptions(0.05).momentum(0.9));
          Tensor x = torch::randn(shape), y = torch::randint(10, {batch});
          auto noise = std::make_shared<func::dp::NoiseGenerator>(0);
          return Call([=] {
            if (mode == "plain") {
              opt->zero_grad();
              F::cross_entropy((*model)->forward(x), y).backward();
              opt->step();
              return;
            }
            const auto clip = func::dp::ClipOptions().max_norm(1.0);
            TensorDict sums;
            const int64_t chunk = mode == "vmap" ? 256 : batch;
            for (int64_t s = 0; s < batch; s += chunk) {
              Tensor xs = x.narrow(0, s, std::min(chunk, batch - s)), ys = y.narrow(0, s, xs.size(0));
              auto r = mode == "ghost" ? func::dp::clipped_grad_sum(*model, per_sample_ce, xs, ys, clip)
                                       : func::dp::clipped_grad_sum(model->ptr(), per_sample_ce, xs, ys, clip);
              for (const auto& g : r.grad_sum)
                if (sums.contains(g.key())) sums[g.key()] += g.value();
                else sums.insert(g.key(), g.value());
            }
            // sigma C = 1 here; the noise is drawn and added in one pass on all threads.
            for (auto& g : sums) noise->add_noise_(g.value(), 1.0, 1.0 / double(batch));
            func::set_grads(*model, sums);
            opt->step();
          });
        };
      };
      cases.push_back({"W10/nonprivate_step" + tail, "plain step: mean cross-entropy, backward, SGD", setup("plain")});
      cases.push_back({"W10/dp_step" + tail, "DP-SGD step: dp::clipped_grad_sum (ghost/materialised per layer), noise, SGD",
                       setup("ghost")});
      cases.push_back({"W10/dp_step_vmap" + tail, "DP-SGD step: vmap(grad) per-sample gradients (chunks of 256), clip, noise, SGD",
                       setup("vmap")});
    }
  return cases;
}

// ---- the cases ------------------------------------------------------------------------

std::vector<Case> all_cases() {
  std::vector<Case> cases;
  auto add = [&](std::vector<Case> cs) { cases.insert(cases.end(), cs.begin(), cs.end()); };
  add(per_sample_cases<Cnn>("W1", [] { return Cnn(); }, {64, 1, 28, 28}));
  add(per_sample_cases<nn::Sequential>("W2", [] { return mlp(784, 512, 10); }, {256, 784}));

  // W3: ensemble of 10 MLPs, shared minibatch.
  auto ensemble_models = [] {
    std::vector<nn::Sequential> models;
    for (int i = 0; i < 10; ++i) models.push_back(mlp(784, 128, 10));
    return models;
  };
  cases.push_back({"W3/vmap", "vmap(functional_call) over stacked models, in_dims (0, 0, none)", [=] {
                     auto models = ensemble_models();
                     auto [stacked, b] = func::stack_module_state(models);
                     // Inference: functorch 1.13's combine_state_for_ensemble hands
                     // out parameters that do not require grad, so both sides time
                     // the forward without recording an autograd graph.
                     TensorDict p;
                     for (const auto& it : stacked) p.insert(it.key(), it.value().detach());
                     auto base = std::make_shared<nn::Sequential>(models[0]);
                     auto fmodel = [base](const TensorDict& pp, const TensorDict& bb, const Tensor& x) {
                       return func::functional_call(*base, std::make_tuple(pp, bb), x);
                     };
                     auto f = func::vmap(fmodel, func::in_dims(0, 0, func::none));
                     Tensor x = torch::randn({64, 784});
                     return Call([=]() mutable { f(p, b, x); });
                   }});
  cases.push_back({"W3/loop", "baseline: loop over the 10 models", [=] {
                     auto models = ensemble_models();
                     Tensor x = torch::randn({64, 784});
                     return Call([=]() mutable {
                       std::vector<Tensor> outs;
                       for (auto& m : models) outs.push_back(m->forward(x));
                       torch::stack(outs);
                     });
                   }});

  // W4-W6: transforms of predict(W, b, x). `inputs` draws (W, b, x); the case
  // times f(W, b, x).
  auto jac_inputs = [](int64_t din, int64_t dout) {
    return [=] { return std::tuple{torch::randn({dout, din}), torch::randn({dout}), torch::randn({din})}; };
  };
  auto batch_inputs = [] { return std::tuple{torch::randn({33, 31}), torch::randn({33}), torch::randn({64, 31})}; };
  auto predict_case = [&](std::string name, std::string what, auto inputs, auto f) {
    cases.push_back({std::move(name), std::move(what), [=] {
                       auto [W, b, x] = inputs();
                       return Call([=] { f(W, b, x); });
                     }});
  };
  auto rows = [](const Tensor& W, const Tensor& b, const Tensor& x) {
    Tensor xr = x.detach().requires_grad_(true);
    Tensor y = predict(W, b, xr);
    std::vector<Tensor> r;
    for (int64_t i = 0; i < y.size(0); ++i) r.push_back(torch::autograd::grad({y[i]}, {xr}, {}, true)[0]);
    return torch::stack(r);
  };
  const auto x_only = func::argnum<2>;
  const auto batched = func::in_dims(func::none, func::none, 0);

  predict_case("W4/jacrev", "jacrev(predict, argnums x), D = 256", jac_inputs(256, 256), func::jacrev(predict, x_only));
  predict_case("W4/jacfwd", "jacfwd(predict, argnums x), D = 256", jac_inputs(256, 256), func::jacfwd(predict, x_only));
  predict_case("W4/rows", "baseline: one autograd.grad per output row", jac_inputs(256, 256), rows);

  // W5: batched Jacobians, batch 64, Din 31, Dout 33.
  predict_case("W5/vmap_jacrev", "vmap(jacrev(predict)), in_dims (none, none, 0)", batch_inputs,
               func::vmap(func::jacrev(predict, x_only), batched));
  predict_case("W5/vmap_jacfwd", "vmap(jacfwd(predict)), in_dims (none, none, 0)", batch_inputs,
               func::vmap(func::jacfwd(predict, x_only), batched));
  predict_case("W5/loop", "baseline: per sample, one autograd.grad per output row", batch_inputs,
               [rows](const Tensor& W, const Tensor& b, const Tensor& x) {
                 for (int64_t i = 0; i < x.size(0); ++i) rows(W, b, x[i]);
               });

  // W6: Hessians.
  predict_case("W6/hessian", "hessian(predict, argnums x), D = 16", jac_inputs(16, 16), func::hessian(predict, x_only));
  predict_case("W6/jacrev_jacrev", "jacrev(jacrev(predict)), D = 16", jac_inputs(16, 16),
               func::jacrev(func::jacrev(predict, x_only), x_only));
  auto summed = [](const Tensor& W, const Tensor& b, const Tensor& xi) { return predict(W, b, xi).sum(); };
  predict_case("W6/vmap_hessian", "vmap(hessian(x -> predict(W, b, x).sum())), batch 64, 31 -> 33", batch_inputs,
               func::vmap(func::hessian(summed, x_only), batched));
  predict_case("W6/rows", "baseline: hessian of predict (D = 16) by double autograd, row by row", jac_inputs(16, 16),
               [](const Tensor& W, const Tensor& b, const Tensor& x) {
                 Tensor xr = x.detach().requires_grad_(true);
                 Tensor y = predict(W, b, xr);
                 std::vector<Tensor> out;
                 for (int64_t i = 0; i < y.size(0); ++i) {
                   Tensor g = torch::autograd::grad({y[i]}, {xr}, {}, true, true)[0];
                   std::vector<Tensor> r;
                   for (int64_t j = 0; j < xr.size(0); ++j) r.push_back(torch::autograd::grad({g[j]}, {xr}, {}, true)[0]);
                   out.push_back(torch::stack(r));
                 }
                 torch::stack(out);
               });

  // W7: empirical NTK.
  cases.push_back({"W7/vmap_jacrev", "vmap(jacrev(f_single)) on both batches + contraction (full NTK)", [=] {
                     auto net = std::make_shared<NtkCnn>();
                     auto params = func::named_parameters(*net);
                     Tensor x1 = torch::randn({20, 3, 32, 32}), x2 = torch::randn({5, 3, 32, 32});
                     auto f_single = [net](const TensorDict& p, const Tensor& x) {
                       return func::functional_call(*net, p, x.unsqueeze(0)).squeeze(0);
                     };
                     auto jac = func::vmap(func::jacrev(f_single), func::in_dims(func::none, 0));
                     return Call([=]() mutable {
                       TensorDict j1 = jac(params, x1), j2 = jac(params, x2);
                       Tensor r;
                       for (const auto& it : j1) {
                         Tensor part = torch::einsum("Naf,Mbf->NMab", {it.value().flatten(2), j2[it.key()].flatten(2)});
                         r = r.defined() ? r + part : part;
                       }
                     });
                   }});

  // W8: one MAML meta-step.
  // mse: the same meta-step with torch::mse_loss, which goes through
  // mse_loss_backward (no batching rule in libtorch; torchfunc registers one).
  auto maml_setup = [](bool transforms, bool mse = false, bool compiled = false) {
    auto net = std::make_shared<nn::Sequential>(nn::Linear(1, 40), nn::ReLU(), nn::Linear(40, 40), nn::ReLU(),
                                                nn::Linear(40, 1));
    auto params = func::named_parameters(*net);
    Tensor xs = torch::randn({8, 10, 1}), ys = torch::randn({8, 10, 1}), xq = torch::randn({8, 10, 1}),
           yq = torch::randn({8, 10, 1});
    auto loss = [net, mse](const TensorDict& p, const Tensor& x, const Tensor& y) {
      Tensor pred = func::functional_call(*net, p, x);
      return mse ? torch::mse_loss(pred, y) : (pred - y).pow(2).mean();
    };
    if (transforms) {
      auto task = [loss](const TensorDict& p, const Tensor& a, const Tensor& b, const Tensor& c, const Tensor& d) {
        TensorDict g = func::grad(loss)(p, a, b), q;
        for (const auto& it : p) q.insert(it.key(), it.value() - 0.1 * g[it.key()]);
        return loss(q, c, d);
      };
      auto meta = func::grad([task](const TensorDict& p, const Tensor& a, const Tensor& b, const Tensor& c,
                                    const Tensor& d) {
        return func::vmap(task, func::in_dims(func::none, 0, 0, 0, 0))(p, a, b, c, d).mean();
      });
      if (compiled) {
        auto cmeta = func::compile(meta);
        cmeta(params, xs, ys, xq, yq);  // capture
        maybe_print_graph(cmeta);
        return Call([=] { cmeta(params, xs, ys, xq, yq); });
      }
      return Call([=] { meta(params, xs, ys, xq, yq); });
    }
    return Call([=] {
      auto ps = (*net)->parameters();
      Tensor total = torch::zeros({});
      for (int64_t i = 0; i < 8; ++i) {
        auto g = torch::autograd::grad({((*net)->forward(xs[i]) - ys[i]).pow(2).mean()}, ps, {}, true, true);
        TensorDict q;
        size_t k = 0;
        for (const auto& it : params) q.insert(it.key(), ps[k] - 0.1 * g[k]), ++k;
        total = total + (func::functional_call(*net, q, xq[i]) - yq[i]).pow(2).mean();
      }
      torch::autograd::grad({total / 8}, ps);
    });
  };
  cases.push_back({"W8/vmap_grad", "grad(mean of vmap over tasks of (inner grad step, query loss))",
                   [=] { return maml_setup(true); }});
  cases.push_back({"W8/vmap_grad_mse", "W8/vmap_grad with torch::mse_loss as the loss",
                   [=] { return maml_setup(true, true); }});
  cases.push_back({"W8/compiled", "compile(W8/vmap_grad): the meta-step captured once, replayed",
                   [=] { return maml_setup(true, false, true); }});
  cases.push_back({"W8/loop", "baseline: loop over tasks, autograd with create_graph", [=] { return maml_setup(false); }});

  // AOT: functorch's aot_autograd tutorial case, cos(cos(a + b + c + d)), as 16
  // blocks h = f(h, b, c, d) (so that what each block saves for the backward adds
  // up, as in a deep model), forward and backward: eager autograd, aot_function
  // (default partition) and min-cut.
  for (std::string mode : {"eager", "aot", "min_cut"}) {
    cases.push_back({"AOT/cos_cos/" + mode, "16 blocks of cos(cos(a+b+c+d)) [2M] forward + backward, " + mode, [=] {
      std::vector<Tensor> xs;
      for (int i = 0; i < 4; ++i) xs.push_back(torch::randn({1 << 21}, torch::requires_grad()));
      auto fn = [](const Tensor& a, const Tensor& b, const Tensor& c, const Tensor& d) { return (a + b + c + d).cos().cos(); };
      auto chain = [xs](auto&& f) {
        Tensor h = xs[0];
        for (int k = 0; k < 16; ++k) h = f(h, xs[1], xs[2], xs[3]);
        torch::autograd::grad({h.sum()}, xs);
      };
      if (mode == "eager") return Call([=] { chain(fn); });
      auto f = func::aot_function(fn, func::AotOptions{mode == "min_cut" ? func::Partition::MinCut : func::Partition::Default, {}});
      if (g_print_graph) {
        chain(f);
        for (const auto& g : f.graphs())
          std::fprintf(stderr, "forward:\n%sbackward:\n%ssaved %lld bytes\n", g->forward.str().c_str(),
                       g->backward.str().c_str(), static_cast<long long>(g->saved_bytes));
      }
      return Call([=] { chain(f); });
    }});
  }

  // W9: per-call overhead.
  auto sin = [](const Tensor& t) { return torch::sin(t); };
  cases.push_back({"W9/grad_sin", "grad(sin) on a 0-dim tensor", [=] {
                     Tensor x = torch::randn({}, g_device);
                     auto f = func::grad(sin);
                     return Call([=] { f(x); });
                   }});
  cases.push_back({"W9/vmap_sin", "vmap(sin) on [64]", [=] {
                     Tensor x = torch::randn({64}, g_device);
                     auto f = func::vmap(sin);
                     return Call([=] { f(x); });
                   }});
  cases.push_back({"W9/jvp_sin", "jvp(sin) on [64]", [=] {
                     Tensor x = torch::randn({64}, g_device), t = torch::randn({64}, g_device);
                     return Call([=] { func::jvp(sin, std::tuple{x}, std::tuple{t}); });
                   }});
  cases.push_back({"W9/vjp_sin", "vjp(sin) on [64] and calling its vjp_fn", [=] {
                     Tensor x = torch::randn({64}, g_device), ct = torch::randn({64}, g_device);
                     return Call([=] {
                       auto [out, fn] = func::vjp(sin, x);
                       fn(ct);
                     });
                   }});
  // Peak memory of chunked Jacobians (bench/chunk_memory.py runs each in a
  // fresh process and reads its peak RSS): a 256 MiB float32 Jacobian by
  // jacfwd (2048 inputs, 32768 outputs) and a 256 MiB Hessian (8192 inputs),
  // unchunked and in chunks. C++ only: torch.func chunks neither.
  for (int64_t cs : {0, 2048, 512, 64}) {
    const std::string tag = cs ? std::to_string(cs) : "none";
    cases.push_back({"MEM/jacfwd/" + tag, "jacfwd of tanh(outer(a, x)) [32768] w.r.t. x [2048], chunk_size " + tag, [=] {
                       Tensor x = torch::randn({2048}), a = torch::randn({16});
                       auto f = [a](const Tensor& t) { return torch::tanh(torch::outer(a, t)).reshape({-1}); };
                       func::JacfwdOptions o;
                       if (cs) o.chunk_size(cs);
                       return Call([=] { func::jacfwd(f, o)(x); });
                     }});
    cases.push_back({"MEM/hessian/" + tag, "hessian of sum(tanh(x) cos(x)) + sum(x)^2 w.r.t. x [8192], chunk_size " + tag, [=] {
                       Tensor x = torch::randn({8192}) * 0.1;
                       auto f = [](const Tensor& t) { return (torch::tanh(t) * t.cos()).sum() + t.sum().pow(2); };
                       func::HessianOptions o;
                       if (cs) o.chunk_size(cs);
                       return Call([=] { func::hessian(f, o)(x); });
                     }});
  }
  // Where forward and reverse mode cost the same (jacobian()'s rule, see
  // kJacobianCrossover): the Jacobian of f: R^n -> R^m by jacrev and by
  // jacfwd, for m/n from 1/8 to 8, on two functions: an MLP (matmuls
  // dominate) and an elementwise-heavy map. bench/jacobian_crossover.py
  // prints the ratios. C++ only: torch.func has no jacobian().
  for (int64_t n : {64, 256}) {
    for (int64_t m : {n / 8, n / 4, n / 2, n, 2 * n, 4 * n, 8 * n}) {
      const std::string size = std::to_string(n) + "x" + std::to_string(m);
      for (const char* mode : {"rev", "fwd"}) {
        const bool rev = std::string(mode) == "rev";
        cases.push_back({std::string("XO/mlp/") + mode + "/" + size,
                         std::string(mode) + " Jacobian of W2 tanh(W1 x), x [" + std::to_string(n) + "], out [" +
                             std::to_string(m) + "], hidden 256",
                         [=] {
                           Tensor W1 = torch::randn({256, n}) / std::sqrt(double(n)), W2 = torch::randn({m, 256}) / 16;
                           Tensor x = torch::randn({n});
                           auto f = [=](const Tensor& v) { return W2.mv(torch::tanh(W1.mv(v))); };
                           return rev ? Call([=] { func::jacrev(f)(x); }) : Call([=] { func::jacfwd(f)(x); });
                         }});
        cases.push_back({std::string("XO/elementwise/") + mode + "/" + size,
                         std::string(mode) + " Jacobian of sin(A x) * tanh(A x) + exp(-(A x)^2), A [" +
                             std::to_string(m) + ", " + std::to_string(n) + "]",
                         [=] {
                           Tensor A = torch::randn({m, n}) / std::sqrt(double(n));
                           Tensor x = torch::randn({n});
                           auto f = [=](const Tensor& v) {
                             Tensor z = A.mv(v);
                             return torch::sin(z) * torch::tanh(z) + torch::exp(-z * z);
                           };
                           return rev ? Call([=] { func::jacrev(f)(x); }) : Call([=] { func::jacfwd(f)(x); });
                         }});
      }
    }
  }
  // Transforms in several application threads at once (libtorch 2.x: no
  // process-wide lock; 1.13 runs them one at a time). The same 8 calls of
  // vmap(grad) over a small MLP, run by 1, 2 or 8 threads (intra-op threads
  // as --threads, usually 1); no torch.func counterpart (Python's GIL).
  for (int app_threads : {1, 2, 8}) {
    cases.push_back({"MT/vmap_grad_x8_t" + std::to_string(app_threads),
                     "8 calls of vmap(grad) over an MLP 784-128-10, batch 64, spread over " +
                         std::to_string(app_threads) + " application thread(s)",
                     [=] {
                       // One model copy per thread: functional_call sets a
                       // module's members for the call, so threads must not
                       // share one module object (torchfunc raises if they do).
                       auto model = mlp(784, 128, 10);
                       TensorDict params = func::named_parameters(model);
                       Tensor x = torch::randn({64, 784});
                       Tensor y = torch::randint(10, {64});
                       std::vector<std::function<void()>> per_thread;
                       for (int t = 0; t < app_threads; ++t) {
                         auto copy = std::dynamic_pointer_cast<nn::SequentialImpl>(model->clone());
                         auto loss = [copy](const TensorDict& p, const Tensor& xi, const Tensor& yi) {
                           Tensor logits = func::functional_call(copy, p, xi.unsqueeze(0));
                           return torch::nll_loss(torch::log_softmax(logits, 1), yi.unsqueeze(0));
                         };
                         auto f = func::vmap(func::grad(loss), func::in_dims(func::none, 0, 0));
                         per_thread.push_back([=] { f(params, x, y); });
                       }
                       const int intra = torch::get_num_threads();
                       return Call([=] {
                         std::vector<std::thread> ts;
                         for (int t = 0; t < app_threads; ++t)
                           ts.emplace_back([&, t] {
                             torch::set_num_threads(intra);
                             for (int k = t; k < 8; k += app_threads) per_thread[t]();
                           });
                         for (auto& th : ts) th.join();
                       });
                     }});
  }
  add(dp_cases());
  cases.push_back({"W9/autograd_sin", "baseline: autograd.grad of sin on a 0-dim tensor", [=] {
                     Tensor x = torch::randn({}, g_device);
                     return Call([=] {
                       Tensor xr = x.detach().requires_grad_(true);
                       torch::autograd::grad({torch::sin(xr)}, {xr});
                     });
                   }});
  return cases;
}

nlohmann::json run_case(const Case& c, int reps, double min_time_s) {
  torch::manual_seed(0);
  Call call = c.setup();
  int warmup = std::max(1, std::min(5, reps / 10));
  if (g_device.is_cuda()) {  // time whole calls: wait for the GPU after each
    Call inner = call;
    call = [inner] {
      inner();
      torch::cuda::synchronize();
    };
  }
  for (int i = 0; i < warmup; ++i) call();
  std::vector<double> us;
  auto start = std::chrono::steady_clock::now();
  while (int(us.size()) < reps ||
         std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() < min_time_s) {
    auto t0 = std::chrono::steady_clock::now();
    call();
    us.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count());
    if (us.size() >= size_t(reps) * 20) break;
  }
  std::vector<double> sorted = us;
  std::sort(sorted.begin(), sorted.end());
  return {{"case", c.name}, {"what", c.what}, {"side", "torchfunc"}, {"median_us", sorted[sorted.size() / 2]},
          {"min_us", sorted.front()}, {"reps", sorted.size()}, {"threads", torch::get_num_threads()},
          {"torch", TORCH_VERSION}, {"device", g_device.str()}};
}

}  // namespace

int main(int argc, char** argv) {
  std::string which;
  bool all = false, list = false;
  int reps = 20, threads = 1;
  double min_time = 0.0;
  CLI::App app{"torchfunc benchmarks (WORKLOADS.md W1-W10); one JSON line per case"};
  app.add_option("--case", which, "run one case, e.g. W2/vmap");
  app.add_flag("--all", all, "run every case (smoke test with --reps 1)");
  app.add_flag("--list", list, "list the cases");
  app.add_option("--reps", reps, "timed calls per case (at least)")->capture_default_str();
  app.add_option("--min-time", min_time, "keep timing until this many seconds have passed")->capture_default_str();
  app.add_option("--threads", threads, "intra-op threads")->capture_default_str();
  app.add_flag("--graph", g_print_graph, "compiled cases: print the captured graph (stderr)");
  std::string device = "cpu";
  app.add_option("--device", device, "cpu or cuda (W1, W2, W9 only)")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  torch::set_num_threads(threads);
  g_device = c10::Device(device);
  if (g_device.is_cuda() && !torch::cuda::is_available()) {
    std::fprintf(stderr, "torchfunc_bench: --device cuda, but no CUDA device is available\n");
    return 2;
  }
  // bench/run.py's "cache" mode: torchfunc's opt-in caching CPU allocator
  // (torchfunc would switch at the first transform; here it covers set-up too).
  const char* cache = std::getenv("TORCHFUNC_CACHING_ALLOCATOR");
  if (cache && std::string(cache) == "1") func::use_caching_cpu_allocator();
  auto cases = all_cases();
  if (list) {
    for (const auto& c : cases) std::printf("%-18s %s\n", c.name.c_str(), c.what.c_str());
    return 0;
  }
  int ran = 0;
  for (const auto& c : cases) {
    if (!all && c.name != which) continue;
    if (all && c.name.rfind("MEM/", 0) == 0) continue;  // GiBs each: bench/chunk_memory.py runs them
    if (!g_device.is_cpu() && !device_case(c.name)) {
      if (all) continue;
      std::fprintf(stderr, "torchfunc_bench: case %s runs on the CPU only\n", c.name.c_str());
      return 2;
    }
    std::printf("%s\n", run_case(c, reps, min_time).dump().c_str());
    std::fflush(stdout);
    ++ran;
  }
  if (ran == 0) {
    std::fprintf(stderr, "torchfunc_bench: no case '%s' (see --list)\n", which.c_str());
    return 2;
  }
  return 0;
}
