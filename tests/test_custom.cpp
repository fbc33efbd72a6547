// tests/test_custom.cpp: custom_function (own vjp / jvp / vmap rules) and
// checkpoint under every transform, against closed forms, finite differences
// in double, loops of single-sample calls and the function without rules.
#include "common.h"

#include <atomic>

namespace {

struct Counts {
  int forward = 0, vjp = 0, jvp = 0, vmap = 0;
};

/// exp with its own rules (generated vmap rule); counts its calls.
auto make_exp(Counts& c) {
  return func::custom_function("my_exp",
                               [&c](const Tensor& x) {
                                 ++c.forward;
                                 return x.exp();
                               })
      .vjp([&c](const Tensor& g, const Tensor& y, const Tensor&) {
        ++c.vjp;
        return g * y;
      })
      .jvp([&c](const Tensor& t, const Tensor& y, const Tensor&) {
        ++c.jvp;
        return t * y;
      })
      .generate_vmap_rule();
}

/// sign with the straight-through gradient (identity) in both modes.
auto make_st_sign(Counts& c) {
  return func::custom_function("st_sign",
                               [&c](const Tensor& x) {
                                 ++c.forward;
                                 return x.sign();
                               })
      .vjp([&c](const Tensor& g, const Tensor&, const Tensor&) {
        ++c.vjp;
        return g;
      })
      .jvp([&c](const Tensor& t, const Tensor&, const Tensor&) {
        ++c.jvp;
        return t;
      })
      .generate_vmap_rule();
}

/// log-sum-exp over the last dim, stable for large inputs, with a hand-written
/// vmap rule (move the batch dim first and call itself on the physical tensor).
struct Lse {
  Counts& c;
  auto fn() const {
    Counts* cp = &c;
    auto base = func::custom_function("stable_logsumexp", [cp](const Tensor& x) {
                  ++cp->forward;
                  Tensor m = std::get<0>(x.max(-1, true));
                  return (m + (x - m).exp().sum(-1, true).log()).squeeze(-1);
                })
                    .vjp([cp](const Tensor& g, const Tensor& y, const Tensor& x) {
                      ++cp->vjp;
                      return g.unsqueeze(-1) * (x - y.unsqueeze(-1)).exp();
                    })
                    .jvp([cp](const Tensor& t, const Tensor& y, const Tensor& x) {
                      ++cp->jvp;
                      return (t * (x - y.unsqueeze(-1)).exp()).sum(-1);
                    });
    return base.vmap([cp, base](const func::VmapInfo& info, const std::vector<func::OptDim>& dims,
                                const Tensor& x) {
      ++cp->vmap;
      EXPECT_EQ(x.size(*dims[0]), info.batch_size);
      return std::make_pair(base(x.movedim(*dims[0], 0)), std::vector<func::OptDim>{0});
    });
  }
  Tensor operator()(const Tensor& x) const { return fn()(x); }
};

Tensor ref_lse(const Tensor& x) { return torch::logsumexp(x, -1); }

/// Central differences of a scalar function of a double tensor.
Tensor fd_grad(const std::function<Tensor(const Tensor&)>& f, const Tensor& x, double h = 1e-6) {
  Tensor g = torch::zeros_like(x);
  auto flat = g.view(-1);
  for (int64_t i = 0; i < x.numel(); ++i) {
    Tensor xp = x.clone(), xm = x.clone();
    xp.view(-1)[i] += h;
    xm.view(-1)[i] -= h;
    flat[i] = (f(xp) - f(xm)).item<double>() / (2 * h);
  }
  return g;
}

}  // namespace

class CustomFunction : public TF {};

TEST_F(CustomFunction, ExpValuesAndDerivativesToDepthThree) {
  Counts c;
  auto my_exp = make_exp(c);
  Tensor x = torch::randn({5}, torch::kDouble);
  EXPECT_TRUE(torch::allclose(my_exp(x), x.exp()));
  auto f = [&](const Tensor& v) { return my_exp(v).sum(); };
  c = {};
  Tensor g = func::grad(f)(x);
  EXPECT_TRUE(torch::allclose(g, x.exp()));
  EXPECT_EQ(c.forward, 1);
  EXPECT_EQ(c.vjp, 1);
  // Finite differences of f itself (no rule involved in the reference).
  EXPECT_TRUE(torch::allclose(g, fd_grad([&](const Tensor& v) { return v.exp().sum(); }, x), 1e-6, 1e-6));
  // d2/dx2 and d3/dx3 of a scalar: exp again, through the vjp rule's own derivative.
  Tensor s = torch::tensor(0.3, torch::kDouble);
  auto e = [&](const Tensor& v) { return my_exp(v); };
  EXPECT_NEAR(func::grad(func::grad(e))(s).item<double>(), std::exp(0.3), 1e-12);
  EXPECT_NEAR(func::grad(func::grad(func::grad(e)))(s).item<double>(), std::exp(0.3), 1e-12);
  // Forward mode, against finite differences.
  Tensor v = torch::randn({5}, torch::kDouble);
  c = {};
  auto [y, dy] = func::jvp(my_exp, std::make_tuple(x), std::make_tuple(v));
  EXPECT_EQ(c.jvp, 1);
  EXPECT_EQ(c.vjp, 0);
  const double h = 1e-6;
  EXPECT_TRUE(torch::allclose(dy, ((x + h * v).exp() - (x - h * v).exp()) / (2 * h), 1e-6, 1e-6));
  // Jacobians and the Hessian, forward over reverse.
  EXPECT_TRUE(torch::allclose(func::jacrev(my_exp)(x), torch::diag(x.exp())));
  EXPECT_TRUE(torch::allclose(func::jacfwd(my_exp)(x), torch::diag(x.exp())));
  EXPECT_TRUE(torch::allclose(func::hessian(f)(x), torch::diag(x.exp())));
  // Under functionalize.
  EXPECT_TRUE(torch::allclose(func::functionalize(my_exp)(x), x.exp()));
  EXPECT_TRUE(torch::allclose(func::grad(func::functionalize(f))(x), x.exp()));
  // jvp of grad (forward over reverse) and grad of jvp.
  Tensor hvp = func::jvp(func::grad(f), std::make_tuple(x), std::make_tuple(v)).second;
  EXPECT_TRUE(torch::allclose(hvp, x.exp() * v));
}

TEST_F(CustomFunction, ExpUnderVmapBatchesTheRules) {
  Counts c;
  auto my_exp = make_exp(c);
  Tensor xs = torch::randn({6, 3}, torch::kDouble);
  c = {};
  EXPECT_TRUE(torch::allclose(func::vmap(my_exp)(xs), xs.exp()));
  // Once, batched, not 6 times (libtorch 1.13: the generated rule loops).
  EXPECT_EQ(c.forward, TORCH_VERSION_MAJOR >= 2 ? 1 : 6);
  auto f = [&](const Tensor& v) { return (my_exp(v) * v).sum(); };
  c = {};
  Tensor psg = func::vmap(func::grad(f))(xs);
  EXPECT_EQ(c.vjp, 1);  // the vjp rule ran once, on the batch
  for (int64_t b = 0; b < xs.size(0); ++b) {
    Tensor xb = xs[b];
    EXPECT_TRUE(torch::allclose(psg[b], xb.exp() * (1 + xb))) << b;
  }
  // grad of vmap: the generated rule's gradient reaches a shared input.
  Tensor w = torch::randn({3}, torch::kDouble);
  auto g = [&](const Tensor& wv) {
    return func::vmap([&](const Tensor& x) { return my_exp(x * wv).sum(); })(xs).sum();
  };
  Tensor gw = func::grad(g)(w);
  Tensor ref = (xs * (xs * w).exp()).sum(0);
  EXPECT_TRUE(torch::allclose(gw, ref));
  // vmap of vmap, and vmap of jvp.
  Tensor xss = torch::randn({2, 4, 3}, torch::kDouble);
  EXPECT_TRUE(torch::allclose(func::vmap(func::vmap(my_exp))(xss), xss.exp()));
  Tensor vs = torch::randn({6, 3}, torch::kDouble);
  auto tan = func::vmap([&](const Tensor& x, const Tensor& t) {
    return func::jvp(my_exp, std::make_tuple(x), std::make_tuple(t)).second;
  })(xs, vs);
  EXPECT_TRUE(torch::allclose(tan, xs.exp() * vs));
  // Per-sample Hessians.
  Tensor hs = func::vmap(func::hessian([&](const Tensor& v) { return my_exp(v).sum(); }))(xs);
  for (int64_t b = 0; b < xs.size(0); ++b) EXPECT_TRUE(torch::allclose(hs[b], torch::diag(xs[b].exp())));
}

TEST_F(CustomFunction, StraightThroughSign) {
  Counts c;
  auto st = make_st_sign(c);
  Tensor x = torch::randn({7}, torch::kDouble);
  Tensor w = torch::randn({7}, torch::kDouble);
  EXPECT_TRUE(torch::equal(st(x), x.sign()));
  // The gradient of sum(st(x) * w) is w (sign's own derivative would give 0).
  EXPECT_TRUE(torch::allclose(func::grad([&](const Tensor& v) { return (st(v) * w).sum(); })(x), w));
  // f(x) = sum(st(x) * x): grad = sign(x) + x; the second derivative is 1 + 1
  // per element (the straight-through part is differentiated by the rule).
  auto f = [&](const Tensor& v) { return (st(v) * v).sum(); };
  EXPECT_TRUE(torch::allclose(func::grad(f)(x), x.sign() + x));
  EXPECT_TRUE(torch::allclose(func::hessian(f)(x), 2 * torch::eye(7, torch::kDouble)));
  EXPECT_TRUE(torch::allclose(func::jacrev(func::grad(f))(x), 2 * torch::eye(7, torch::kDouble)));
  // Forward mode passes tangents through.
  Tensor v = torch::randn({7}, torch::kDouble);
  EXPECT_TRUE(torch::allclose(func::jvp(st, std::make_tuple(x), std::make_tuple(v)).second, v));
  // vmap(grad) against a loop of single-sample grads.
  Tensor xs = torch::randn({5, 7}, torch::kDouble);
  Tensor psg = func::vmap(func::grad(f))(xs);
  for (int64_t b = 0; b < 5; ++b) EXPECT_TRUE(torch::allclose(psg[b], func::grad(f)(xs[b])));
  // Plain autograd (no transform) uses the rule too.
  Tensor leaf = x.clone().requires_grad_(true);
  c = {};
  (st(leaf) * w).sum().backward();
  EXPECT_EQ(c.vjp, 1);
  EXPECT_TRUE(torch::allclose(leaf.grad(), w));
}

TEST_F(CustomFunction, StableLogSumExpWithItsOwnVmapRule) {
  Counts c;
  Lse lse{c};
  // Stable where the naive formula overflows.
  Tensor big = torch::tensor({1000.0, 1001.0, 999.0}, torch::kDouble);
  EXPECT_NEAR(lse(big).item<double>(), ref_lse(big).item<double>(), 1e-9);
  EXPECT_TRUE(std::isinf(big.exp().sum().log().item<double>()));
  Tensor x = torch::randn({4}, torch::kDouble) * 3;
  EXPECT_TRUE(torch::allclose(func::grad(lse)(x), torch::softmax(x, -1)));
  // Hessian (jacfwd over jacrev: the jvp rule of the function and of its vjp
  // rule's ops) against finite differences of the closed-form gradient.
  Tensor hx = func::hessian(lse)(x);
  Tensor fd = torch::stack({fd_grad([&](const Tensor& v) { return torch::softmax(v, -1)[0]; }, x),
                            fd_grad([&](const Tensor& v) { return torch::softmax(v, -1)[1]; }, x),
                            fd_grad([&](const Tensor& v) { return torch::softmax(v, -1)[2]; }, x),
                            fd_grad([&](const Tensor& v) { return torch::softmax(v, -1)[3]; }, x)});
  EXPECT_TRUE(torch::allclose(hx, fd, 1e-6, 1e-6));
  EXPECT_TRUE(torch::allclose(func::jacfwd(func::jacrev(lse))(x), func::jacrev(func::jacrev(lse))(x)));
  // The user's vmap rule: called once per vmap, batch dim anywhere.
  Tensor xs = torch::randn({4, 6}, torch::kDouble);
  c = {};
  Tensor ys = func::vmap(lse, func::in_dims(1))(xs);
  EXPECT_EQ(c.vmap, 1);
  for (int64_t b = 0; b < 6; ++b) EXPECT_NEAR(ys[b].item<double>(), ref_lse(xs.select(1, b)).item<double>(), 1e-12);
  // vmap(grad) and vmap(jvp) through the vmap rule.
  Tensor g = func::vmap(func::grad(lse))(xs);
  EXPECT_TRUE(torch::allclose(g, torch::softmax(xs, -1)));
  Tensor ts = torch::randn({4, 6}, torch::kDouble);
  Tensor jt = func::vmap([&](const Tensor& a, const Tensor& t) {
    return func::jvp(lse, std::make_tuple(a), std::make_tuple(t)).second;
  })(xs, ts);
  EXPECT_TRUE(torch::allclose(jt, (torch::softmax(xs, -1) * ts).sum(-1)));
}

TEST_F(CustomFunction, PytreeArgumentsAndOutputs) {
  // f({a, b}, s, alpha) = {a * b * alpha, s.exp()} with a non-tensor argument.
  int vjp_calls = 0;
  auto f = func::custom_function("pair_fn",
                                 [](const std::vector<Tensor>& ab, const Tensor& s, double alpha) {
                                   return std::make_pair(ab[0] * ab[1] * alpha, s.exp());
                                 })
               .vjp([&](const std::pair<Tensor, Tensor>& g, const std::pair<Tensor, Tensor>& out,
                        const std::vector<Tensor>& ab, const Tensor&, double alpha) {
                 ++vjp_calls;
                 return std::make_tuple(std::vector<Tensor>{g.first * ab[1] * alpha, g.first * ab[0] * alpha},
                                        g.second * out.second, alpha);
               });
  Tensor a = torch::randn({3}, torch::kDouble), b = torch::randn({3}, torch::kDouble),
         s = torch::randn({2}, torch::kDouble);
  auto loss = [&](const std::vector<Tensor>& ab, const Tensor& sv) {
    auto [p, q] = f(ab, sv, 2.0);
    return p.sum() + q.sum();
  };
  auto [gab, gs] = func::grad(loss, func::argnums<0, 1>)(std::vector<Tensor>{a, b}, s);
  EXPECT_EQ(vjp_calls, 1);
  EXPECT_TRUE(torch::allclose(gab[0], 2 * b));
  EXPECT_TRUE(torch::allclose(gab[1], 2 * a));
  EXPECT_TRUE(torch::allclose(gs, s.exp()));
}

TEST_F(CustomFunction, InsideFunctionalCall) {
  // A module whose forward uses a custom function: per-sample gradients.
  Counts c;
  auto st = make_st_sign(c);
  torch::nn::Linear lin(4, 3);
  lin->to(torch::kDouble);
  auto params = func::named_parameters(*lin);
  Tensor xs = torch::randn({5, 4}, torch::kDouble);
  auto loss = [&](const func::TensorDict& p, const Tensor& x) {
    return st(func::functional_call(*lin, p, x)).sum();
  };
  auto psg = func::vmap(func::grad(loss), func::in_dims(func::none, 0))(params, xs);
  // Straight-through: d/dW sum(W x + b) per sample.
  for (int64_t b = 0; b < 5; ++b) {
    EXPECT_TRUE(torch::allclose(psg["weight"][b], torch::ones({3, 1}, torch::kDouble) * xs[b].unsqueeze(0)));
    EXPECT_TRUE(torch::allclose(psg["bias"][b], torch::ones({3}, torch::kDouble)));
  }
}

TEST_F(CustomFunction, MissingRulesAndBadRulesAreClearErrors) {
  auto fwd_only = func::custom_function("fwd_only", [](const Tensor& x) { return x * 2; });
  Tensor x = torch::randn({3});
  EXPECT_TRUE(torch::allclose(fwd_only(x), x * 2));  // no transform: no rule needed
  auto s = [&](const Tensor& v) { return fwd_only(v).sum(); };
  EXPECT_ERROR(func::grad(s)(x), "custom_function 'fwd_only': no vjp rule");
  EXPECT_ERROR(func::jvp(fwd_only, std::make_tuple(x), std::make_tuple(x)), "custom_function 'fwd_only': no jvp rule");
  EXPECT_ERROR(func::vmap(fwd_only)(torch::randn({2, 3})), "custom_function 'fwd_only': no vmap rule");
  EXPECT_ERROR(func::jacfwd(fwd_only)(x), "no jvp rule");
  Tensor leaf = x.clone().requires_grad_(true);
  EXPECT_ERROR(fwd_only(leaf), "no vjp rule");

  auto bad_shape = func::custom_function("bad_shape", [](const Tensor& x) { return x * 2; })
                       .vjp([](const Tensor& g, const Tensor&, const Tensor&) { return g.sum(); });
  EXPECT_ERROR(func::grad([&](const Tensor& v) { return bad_shape(v).sum(); })(x),
               "custom_function 'bad_shape': the vjp rule returned a Tensor of shape []");
  auto bad_count = func::custom_function("bad_count", [](const Tensor& x) { return x * 2; })
                       .vjp([](const Tensor& g, const Tensor&, const Tensor&) { return std::make_tuple(g, g); });
  EXPECT_ERROR(func::grad([&](const Tensor& v) { return bad_count(v).sum(); })(x), "the vjp rule returned 2 Tensors");
  auto bad_vmap = func::custom_function("bad_vmap", [](const Tensor& x) { return x * 2; })
                      .vmap([](const func::VmapInfo&, const std::vector<func::OptDim>&, const Tensor& x) {
                        return std::make_pair(x.sum(0), std::vector<func::OptDim>{0});
                      });
  EXPECT_ERROR(func::vmap(bad_vmap)(torch::randn({2, 3})), "output 0 of the vmap rule has size 3");

  // An exception inside a rule, deep in a composition: the stack, the modes
  // and a module used through functional_call are as they were.
  auto throws = func::custom_function("throws", [](const Tensor& x) { return x * 2; })
                    .vjp([](const Tensor&, const Tensor&, const Tensor&) -> Tensor {
                      TORCH_CHECK(false, "boom in the vjp rule");
                    })
                    .generate_vmap_rule();
  torch::nn::Linear lin(3, 3);
  Tensor w_before = lin->weight.detach().clone();
  auto params = func::named_parameters(*lin);
  auto loss = [&](const func::TensorDict& p, const Tensor& v) {
    return throws(func::functional_call(*lin, p, v)).sum();
  };
  EXPECT_ERROR(func::vmap(func::grad(loss), func::in_dims(func::none, 0))(params, torch::randn({2, 3})),
               "boom in the vjp rule");
  EXPECT_TRUE(torch::equal(lin->weight, w_before));
  EXPECT_TRUE(lin->weight.requires_grad());
  EXPECT_TRUE(torch::allclose(lin(x), torch::addmm(lin->bias, x.unsqueeze(0), lin->weight.t()).squeeze(0)));
}

TEST_F(CustomFunction, TransformsInsideTheForward) {
  // The forward itself uses vmap (row-wise exp-normalise), under grad.
  auto rows = func::custom_function("rowwise", [](const Tensor& x) {
                return func::vmap([](const Tensor& r) { return r.exp() / r.exp().sum(); })(x);
              }).vjp([](const Tensor& g, const Tensor& y, const Tensor&) {
    return y * (g - (g * y).sum(-1, true));
  });
  Tensor x = torch::randn({3, 4}, torch::kDouble);
  Tensor w = torch::randn({3, 4}, torch::kDouble);
  auto f = [&](const Tensor& v) { return (rows(v) * w).sum(); };
  if (TORCH_VERSION_MAJOR >= 2) {
    Tensor ref = func::grad([&](const Tensor& v) { return (torch::softmax(v, -1) * w).sum(); })(x);
    EXPECT_TRUE(torch::allclose(func::grad(f)(x), ref));
  } else {
    EXPECT_ERROR(func::grad(f)(x), "on libtorch 1.13, transforms cannot run inside a custom_function's forward");
  }
}

class Checkpoint : public TF {
 protected:
  std::atomic<int> calls{0};
  std::function<Tensor(const Tensor&, const Tensor&)> block = [this](const Tensor& h, const Tensor& w) {
    ++calls;
    return torch::tanh(torch::matmul(h, w)).sin();
  };
  std::function<Tensor(const Tensor&, const Tensor&)> ck = func::checkpoint(block);
  Tensor w = torch::randn({4, 4}, torch::kDouble), x = torch::randn({4}, torch::kDouble);
  Tensor f(const Tensor& wv, const Tensor& xv) { return block(block(xv, wv), wv).sum(); }
  Tensor fc(const Tensor& wv, const Tensor& xv) { return ck(ck(xv, wv), wv).sum(); }
  std::function<Tensor(const Tensor&, const Tensor&)> F = [this](const Tensor& a, const Tensor& b) { return f(a, b); };
  std::function<Tensor(const Tensor&, const Tensor&)> FC = [this](const Tensor& a, const Tensor& b) { return fc(a, b); };
};

TEST_F(Checkpoint, SameResultsAndTheForwardIsRecomputed) {
  calls = 0;
  EXPECT_TRUE(torch::allclose(fc(w, x), f(w, x)));
  EXPECT_EQ(calls.load(), 4);
  calls = 0;
  Tensor g = func::grad(FC)(w, x);
  EXPECT_EQ(calls.load(), 4);  // each block: once forward, once recomputed in the backward
  EXPECT_TRUE(torch::allclose(g, func::grad(F)(w, x)));
  EXPECT_TRUE(torch::allclose(g, fd_grad([&](const Tensor& wv) { return f(wv, x); }, w), 1e-6, 1e-6));
  // Plain autograd.
  Tensor wl = w.clone().requires_grad_(true);
  calls = 0;
  fc(wl, x).backward();
  EXPECT_EQ(calls.load(), 4);
  EXPECT_TRUE(torch::allclose(wl.grad(), g));
}

TEST_F(Checkpoint, Nested) {
  EXPECT_TRUE(torch::allclose(func::hessian(FC, func::argnum<1>)(w, x), func::hessian(F, func::argnum<1>)(w, x)));
}

TEST_F(Checkpoint, ReverseOverReverse) {
  EXPECT_TRUE(torch::allclose(func::jacrev(func::grad(FC, func::argnum<1>), func::argnum<1>)(w, x),
                              func::hessian(F, func::argnum<1>)(w, x)));
}

TEST_F(Checkpoint, ForwardMode) {
  Tensor v = torch::randn({4}, torch::kDouble);
  auto jx = [&](const std::function<Tensor(const Tensor&, const Tensor&)>& fn) {
    return func::jvp([&](const Tensor& xv) { return fn(w, xv); }, std::make_tuple(x), std::make_tuple(v)).second;
  };
  EXPECT_TRUE(torch::allclose(jx(FC), jx(F)));
}

TEST_F(Checkpoint, PerSampleGradients) {
  Tensor xs = torch::randn({5, 4}, torch::kDouble);
  auto psg = func::vmap(func::grad(FC), func::in_dims(func::none, 0))(w, xs);
  auto ref = func::vmap(func::grad(F), func::in_dims(func::none, 0))(w, xs);
  EXPECT_TRUE(torch::allclose(psg, ref));
}

TEST_F(Checkpoint, GradientPenaltyInsideATransform) {
  // A user's autograd::grad with create_graph inside f, differentiated again
  // by the enclosing grad: the recomputation must be recorded at that level.
  auto penalty = [&](const std::function<Tensor(const Tensor&, const Tensor&)>& fn) {
    return [&, fn](const Tensor& wv) {
      Tensor xr = x * 1.0;
      Tensor gx = torch::autograd::grad({fn(wv, xr)}, {wv}, {}, true, true)[0];
      return gx.pow(2).sum();
    };
  };
  Tensor ref = func::grad(penalty(F))(w);
  EXPECT_TRUE(torch::allclose(func::grad(penalty(FC))(w), ref));
  EXPECT_GT(ref.abs().sum().item<double>(), 0);
}
