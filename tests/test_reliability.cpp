// Exceptions and threads: an exception thrown at any point of a transformed
// function, at any nesting depth and inside module forwards under
// functional_call, leaves the thread's transform state, the forward-AD level
// and every module exactly as they were; and 8 threads running mixed
// transforms (some of them throwing) for a fixed time get the single-thread
// results.
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <random>
#include <thread>

#include <ATen/CPUGeneratorImpl.h>

#include "common.h"

namespace nn = torch::nn;
using func::TensorDict;

namespace {

/// Numbered points in a user function where it may throw. A run with
/// target -1 counts the points; a run with target k throws at point k, an
/// exception of one of three kinds (std::runtime_error, c10::Error, int).
struct Injector {
  int target = -1;
  int count = 0;
  void point() {
    if (count++ != target) return;
    switch (target % 3) {
      case 0: throw std::runtime_error("injected failure");
      case 1: TORCH_CHECK(false, "injected c10::Error");
      default: throw 42;  // not even a std::exception
    }
  }
};

/// A module whose forward has injection points and runs a submodule, so
/// functional_call swaps tensors at two depths.
struct NetImpl : nn::Module {
  NetImpl() {
    fc1 = register_module("fc1", nn::Linear(3, 4));
    fc2 = register_module("fc2", nn::Linear(4, 2));
    scale = register_buffer("scale", torch::full({2}, 1.5, torch::kDouble));
    to(torch::kDouble);
    static const bool registered = (func::register_module_members<NetImpl>(&NetImpl::scale), true);
    (void)registered;
  }
  Tensor forward(const Tensor& x) {
    if (inj) inj->point();
    Tensor h = torch::tanh(fc1(x));
    if (hook) h = h + hook();
    if (inj) inj->point();
    return fc2(h) * scale;
  }
  nn::Linear fc1{nullptr}, fc2{nullptr};
  Tensor scale;
  Injector* inj = nullptr;
  std::function<Tensor()> hook;  // runs inside forward
};
TORCH_MODULE(Net);

struct Snapshot {
  std::vector<Tensor> values;  // clones
  std::vector<c10::TensorImpl*> impls;
  std::vector<bool> requires_grad;
  bool training = false;
};
Snapshot snapshot(nn::Module& m) {
  Snapshot s;
  auto add = [&](const Tensor& t) {
    s.values.push_back(t.detach().clone());
    s.impls.push_back(t.unsafeGetTensorImpl());
    s.requires_grad.push_back(t.requires_grad());
  };
  for (const auto& p : m.named_parameters()) add(p.value());
  for (const auto& b : m.named_buffers()) add(b.value());
  s.training = m.is_training();
  return s;
}
bool unchanged(nn::Module& m, const Snapshot& s) {
  Snapshot now = snapshot(m);
  if (now.values.size() != s.values.size() || now.training != s.training) return false;
  for (size_t i = 0; i < s.values.size(); ++i)
    if (now.impls[i] != s.impls[i] || now.requires_grad[i] != s.requires_grad[i] || !now.values[i].equal(s.values[i]))
      return false;
  return true;
}

using Results = std::vector<Tensor>;
struct Composition {
  std::string name;
  std::function<Results(Injector&)> run;
};

/// The compositions under test, over fixed data and one module (each thread
/// passes its own copy). Points sit before, between and after inner
/// transforms, so every depth of every stack gets an exception.
std::vector<Composition> compositions(Net net) {
  auto gen = at::detail::createCPUGenerator(7);  // not the global one: threads call this too
  auto randn = [&](at::IntArrayRef size) { return torch::randn(size, gen, torch::kDouble); };
  Tensor x = randn({3}), xs = randn({5, 3}), v = randn({3}), ys = randn({5, 2}), w4 = randn({4, 4});
  TensorDict params = func::named_parameters(net);
  const TensorDict buffers = func::named_buffers(net);
  for (const auto& b : buffers.items()) params.insert(b.key(), b.value());

  // f: R^3 -> R with two points; g: R^3 -> R^3 with a point and an inner grad.
  auto f = [](Injector& in) {
    return [&in](const Tensor& t) {
      in.point();
      Tensor r = (t.sin() * t).sum();
      in.point();
      return r;
    };
  };
  auto g = [f](Injector& in) {
    return [&in, f](const Tensor& t) {
      in.point();
      Tensor inner = func::grad(f(in))(t);  // a transform inside the function
      in.point();
      return inner * t.cos();
    };
  };
  std::vector<Composition> c;
  c.push_back({"grad", [=](Injector& in) { return Results{func::grad(f(in))(x)}; }});
  c.push_back({"grad_and_value(has_aux)", [=](Injector& in) {
                 auto [gr, val] = func::grad_and_value(
                     [&](const Tensor& t) {
                       in.point();
                       return std::make_pair((t * t).sum(), t.exp());
                     },
                     func::has_aux)(x);
                 return Results{gr, val.first, val.second};
               }});
  c.push_back({"vmap", [=](Injector& in) { return Results{func::vmap(g(in))(xs)}; }});
  c.push_back({"vmap(chunk_size=2)", [=](Injector& in) {
                 return Results{func::vmap(g(in), 0, 0, func::VmapOptions().chunk_size(2))(xs)};
               }});
  c.push_back({"vjp+vjp_fn", [=](Injector& in) {
                 auto [out, fn] = func::vjp(g(in), x);
                 in.point();
                 return Results{out, std::get<0>(fn(v))};
               }});
  c.push_back({"jvp", [=](Injector& in) {
                 auto [out, t] = func::jvp(g(in), std::tuple{x}, std::tuple{v});
                 return Results{out, t};
               }});
  c.push_back({"linearize+jvp_fn", [=](Injector& in) {
                 auto [out, fn] = func::linearize(g(in), x);
                 in.point();
                 return Results{out, fn(v)};
               }});
  c.push_back({"jacrev(chunk_size=2)", [=](Injector& in) {
                 return Results{func::jacrev(g(in), func::JacrevOptions().chunk_size(2))(x)};
               }});
  c.push_back({"jacfwd", [=](Injector& in) { return Results{func::jacfwd(g(in))(x)}; }});
  c.push_back({"hessian", [=](Injector& in) { return Results{func::hessian(f(in))(x)}; }});
  c.push_back({"vmap(grad(grad))", [=](Injector& in) {
                 return Results{func::vmap([&](const Tensor& t) {
                   in.point();
                   return func::grad([&](const Tensor& u) { return g(in)(u).sum(); })(t);
                 })(xs)};
               }});
  c.push_back({"jvp(vmap(jacrev))", [=](Injector& in) {
                 auto fn = [&](const Tensor& a) { return func::vmap(func::jacrev(g(in)))(a); };
                 auto [out, t] = func::jvp(fn, std::tuple{xs}, std::tuple{xs.cos()});
                 return Results{out, t};
               }});
  c.push_back({"grad(vjp_fn inside)", [=](Injector& in) {
                 return Results{func::grad([&](const Tensor& t) {
                   auto [out, fn] = func::vjp(g(in), t);
                   in.point();
                   return (std::get<0>(fn(v)) * out).sum();
                 })(x)};
               }});
  c.push_back({"grad(functionalize)", [=](Injector& in) {
                 return Results{func::grad(func::functionalize([&](const Tensor& t) {
                   Tensor u = t.clone();
                   in.point();
                   u.mul_(t.sin());  // in place, removed by functionalize
                   in.point();
                   return u.sum();
                 }))(x)};
               }});
  // The batched attempt fails at .item(); then a loop over the samples.
  c.push_back({"vmap(sequential_fallback)", [=](Injector& in) {
                 return Results{func::vmap(
                     [&](const Tensor& t) {
                       in.point();
                       const double s = t.sum().item<double>();
                       in.point();
                       return g(in)(t) * s;
                     },
                     func::VmapOptions().sequential_fallback(true))(xs)};
               }});
  c.push_back({"jacobian", [=](Injector& in) { return Results{func::jacobian(g(in))(x)}; }});
  c.push_back({"linear_transpose+transpose_fn", [=](Injector& in) {
                 auto t = func::linear_transpose(
                     [&](const Tensor& u) {
                       in.point();
                       return w4.slice(1, 0, 3).matmul(u);
                     },
                     x);
                 in.point();
                 return Results{std::get<0>(t(torch::ones({4}, torch::kDouble)))};
               }});
  // Module forwards under functional_call, at two depths, inside vmap(grad).
  c.push_back({"vmap(grad(functional_call))", [=](Injector& in) mutable {
                 net->inj = &in;
                 auto loss = [&](const TensorDict& p, const Tensor& xi, const Tensor& yi) {
                   in.point();
                   return (func::functional_call(net, p, xi) - yi).pow(2).sum();
                 };
                 TensorDict gr = func::vmap(func::grad(loss), func::in_dims(func::none, 0, 0))(params, xs, ys);
                 net->inj = nullptr;
                 return gr.values();
               }});
  // functional_call of a submodule while the module itself runs under
  // functional_call: the swaps nest and must unwind in order.
  c.push_back({"functional_call(fc1) inside functional_call(net)", [=](Injector& in) mutable {
                 net->inj = &in;
                 auto outer = [&](const Tensor& wt) {
                   net->hook = [&] {
                     TensorDict inner;
                     inner.insert("weight", wt);
                     in.point();
                     Tensor a = func::functional_call(net->fc1, inner, torch::ones({3}, torch::kDouble));
                     in.point();
                     return a;
                   };
                   return func::functional_call(net, params, x).sum();
                 };
                 Tensor gr;
                 try {
                   gr = func::grad(outer)(w4.narrow(1, 0, 3));
                 } catch (...) {
                   net->hook = nullptr;
                   throw;
                 }
                 net->hook = nullptr;
                 net->inj = nullptr;
                 return Results{gr};
               }});
  return c;
}

bool same(const Results& a, const Results& b) {
  if (a.size() != b.size()) return false;
  for (size_t i = 0; i < a.size(); ++i)
    if (a[i].sizes() != b[i].sizes() || (a[i] - b[i]).abs().max().item<double>() > 1e-12) return false;
  return true;
}

/// Runs `c` throwing at point `target`; returns "" or what went wrong.
std::string run_throwing(const Composition& c, int target, Net& net, const Snapshot& module_before) {
  const ThreadState before = ThreadState::now();
  Injector in{target};
  bool thrown = false;
  try {
    c.run(in);
  } catch (const c10::Error& e) {
    thrown = std::string(e.what()).find("injected") != std::string::npos;
    if (!thrown) return std::string("unexpected c10::Error: ") + e.what_without_backtrace();
  } catch (const std::runtime_error& e) {
    thrown = std::string(e.what()) == "injected failure";
  } catch (int) {
    thrown = true;
  }
  net->inj = nullptr;
  if (!thrown) return "did not throw";
  const ThreadState after = ThreadState::now();
  if (after != before) return "thread state before " + before.str() + " after " + after.str();
  if (func::detail::layer_depth() != 0) return "a level was left behind";
  if (!unchanged(*net, module_before)) return "the module's tensors changed";
  return "";
}

TEST_F(TF, ExceptionsAtEveryPointOfEveryDepthRestoreEverything) {
  Net net;
  const Snapshot module_before = snapshot(*net);
  int total = 0;
  // Under three outer modes: the default, no_grad and forward grad disabled.
  for (int mode = 0; mode < 3; ++mode) {
    c10::optional<torch::NoGradGuard> no_grad;
    c10::optional<c10::AutoFwGradMode> no_fw;
    if (mode == 1) no_grad.emplace();
    if (mode == 2) no_fw.emplace(false);
    for (const auto& c : compositions(net)) {
      SCOPED_TRACE(c.name + " (outer mode " + std::to_string(mode) + ")");
      Injector counter;
      const Results ref = c.run(counter);
      ASSERT_GT(counter.count, 0);
      for (int k = 0; k < counter.count; ++k) {
        const std::string problem = run_throwing(c, k, net, module_before);
        EXPECT_EQ(problem, "") << "exception at point " << k << " of " << counter.count;
        ++total;
      }
      // No dual level is left alive, and the next run gives the same results.
      EXPECT_EQ(torch::autograd::ForwardADLevel::try_get_by_idx(0), nullptr);
      Injector again;
      EXPECT_TRUE(same(c.run(again), ref));
      EXPECT_TRUE(unchanged(*net, module_before));
    }
  }
  std::printf("exceptions: %d injected, each left the transform state and the module as they were\n", total);
}

TEST_F(TF, EightThreadsOfMixedTransformsForAFixedTimeMatchOneThread) {
  // Seconds each thread runs (TORCHFUNC_THREAD_SECONDS, default 3). Each
  // thread has its own module copy (functional_call swaps a module's tensors,
  // so one module is not shared by threads) and alternates clean runs, which
  // must give the single-thread results, with runs that throw at a random point.
  double seconds = 3;
  if (const char* s = std::getenv("TORCHFUNC_THREAD_SECONDS")) seconds = std::atof(s);
  Net net;
  std::vector<Results> ref;
  const auto base = compositions(net);
  for (const auto& c : base) {
    Injector in;
    ref.push_back(c.run(in));
  }
  std::vector<int> points(base.size());
  for (size_t i = 0; i < base.size(); ++i) {
    Injector in;
    base[i].run(in);
    points[i] = in.count;
  }
  constexpr int kThreads = 8;
  std::vector<std::string> problems(kThreads);
  std::vector<long> clean(kThreads, 0), thrown(kThreads, 0);
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(seconds);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&, t] {
      Net own;
      {
        torch::NoGradGuard ng;
        auto src = net->parameters(), dst = own->parameters();
        for (size_t i = 0; i < src.size(); ++i) dst[i].copy_(src[i]);
      }
      const Snapshot before = snapshot(*own);
      auto mine = compositions(own);
      std::mt19937 rng(1234 + t);
      while (std::chrono::steady_clock::now() < deadline && problems[t].empty()) {
        const size_t i = rng() % mine.size();
        if (rng() % 2) {
          Injector in;
          if (!same(mine[i].run(in), ref[i])) problems[t] = mine[i].name + ": results differ from one thread's";
          ++clean[t];
        } else {
          const std::string p = run_throwing(mine[i], static_cast<int>(rng() % points[i]), own, before);
          if (!p.empty()) problems[t] = mine[i].name + ": " + p;
          ++thrown[t];
        }
      }
    });
  }
  for (auto& th : threads) th.join();
  long n_clean = 0, n_thrown = 0;
  for (int t = 0; t < kThreads; ++t) {
    EXPECT_EQ(problems[t], "") << "thread " << t;
    EXPECT_GT(clean[t] + thrown[t], 0) << "thread " << t << " ran nothing";
    n_clean += clean[t];
    n_thrown += thrown[t];
  }
  std::printf("threads: %d threads for %.1f s ran %ld clean compositions (all equal to one thread's) and %ld "
              "throwing ones (all restored)\n",
              kThreads, seconds, n_clean, n_thrown);
}

}  // namespace
