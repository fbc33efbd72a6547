// Tests for grad, grad_and_value, vjp, jvp, linearize and pytrees, each
// against an independent computation (autograd, finite differences, analytic).
#include "common.h"

#include <map>
#include <optional>
#include <unordered_map>

namespace app {
struct Params {
  Tensor w;
  Tensor b;
  double scale;
};
}  // namespace app
TORCHFUNC_REGISTER_STRUCT(app::Params, w, b, scale);

namespace {

Tensor f_sin(const Tensor& x) { return x.sin().sum(); }

// ---------------------------------------------------------------- grad

TEST_F(TF, GradMatchesAnalyticAndAutograd) {
  Tensor x = torch::randn({5}, torch::kDouble);
  Tensor g = func::grad(f_sin)(x);
  expect_close(g, x.cos(), 1e-12);
  auto f = [](const Tensor& t) { return (t * t.exp()).sum() / t.norm(); };
  expect_close(func::grad(f)(x), autograd_grad(f, x), 1e-12);
  EXPECT_FALSE(g.requires_grad());
}

TEST_F(TF, GradArgnums) {
  Tensor a = torch::randn({3}, torch::kDouble), b = torch::randn({3}, torch::kDouble),
         c = torch::randn({3}, torch::kDouble);
  auto f = [](const Tensor& a, const Tensor& b, const Tensor& c) { return (a * b.sin() + c.pow(3)).sum(); };
  auto [ga, gc] = func::grad(f, func::argnums<0, 2>)(a, b, c);
  expect_close(ga, b.sin(), 1e-12);
  expect_close(gc, 3 * c.pow(2), 1e-12);
  Tensor gb = func::grad(f, func::argnum<1>)(a, b, c);
  expect_close(gb, a * b.cos(), 1e-12);
  Tensor gc2 = func::grad(f, func::argnum<-1>)(a, b, c);
  expect_close(gc2, 3 * c.pow(2), 1e-12);
  auto [gc3, ga3] = func::grad(f, func::argnums<2, 0>)(a, b, c);  // order follows argnums
  expect_close(gc3, 3 * c.pow(2), 1e-12);
  expect_close(ga3, b.sin(), 1e-12);
  auto one = func::grad(f, func::argnums<0>)(a, b, c);  // a 1-tuple
  static_assert(std::is_same_v<decltype(one), std::tuple<Tensor>>);
  expect_close(std::get<0>(one), b.sin(), 1e-12);
}

TEST_F(TF, GradHasAuxAndValue) {
  Tensor x = torch::randn({4}, torch::kDouble);
  auto f = [](const Tensor& t) {
    Tensor y = t.sin();
    return std::make_pair(y.sum(), std::map<std::string, Tensor>{{"y", y}, {"twice", 2 * y}});
  };
  auto [g, aux] = func::grad(f, func::has_aux)(x);
  expect_close(g, x.cos(), 1e-12);
  expect_close(aux.at("y"), x.sin(), 1e-12);
  expect_close(aux.at("twice"), 2 * x.sin(), 1e-12);
  EXPECT_FALSE(aux.at("y").requires_grad());
  // aux is an ordinary tensor: usable after the transform.
  expect_close(aux.at("y") + 1, x.sin() + 1, 1e-12);

  auto [g2, v] = func::grad_and_value(f_sin)(x);
  expect_close(g2, x.cos(), 1e-12);
  expect_close(v, x.sin().sum(), 1e-12);

  auto [g3, va] = func::grad_and_value(f, func::has_aux)(x);
  expect_close(g3, x.cos(), 1e-12);
  expect_close(va.first, x.sin().sum(), 1e-12);
  expect_close(va.second.at("y"), x.sin(), 1e-12);
}

TEST_F(TF, GradUnusedInputsGetZeros) {
  Tensor a = torch::randn({3}), b = torch::randn({2, 2});
  auto [ga, gb] = func::grad([](const Tensor& a, const Tensor&) { return a.sum(); }, func::argnums<0, 1>)(a, b);
  ASSERT_TRUE(gb.defined());
  expect_close(gb, torch::zeros({2, 2}));
  // f independent of every input, still zeros
  Tensor g = func::grad([](const Tensor&) { return torch::tensor(3.0); })(a);
  expect_close(g, torch::zeros({3}));
}

TEST_F(TF, GradErrors) {
  Tensor x = torch::randn({3});
  EXPECT_ERROR(func::grad([](const Tensor& t) { return t.sin(); })(x),
               "grad(f)(*args): Expected f(*args) to return a scalar Tensor, got tensor with 1 dims");
  EXPECT_ERROR(func::grad([](const Tensor& t) { return t.sum().reshape({1}); })(x),
               "to return a scalar Tensor");
  EXPECT_ERROR(func::grad([](const Tensor& t) { return t.sum(); })(torch::arange(3)),
               "only floating-point or complex Tensors can be differentiated, but args[0] has dtype Long");
  EXPECT_ERROR(func::grad([](const Tensor&) { return Tensor(); })(x), "undefined Tensor");
  // A user exception propagates unchanged and leaves no level behind.
  EXPECT_THROW(func::grad([](const Tensor& t) -> Tensor { throw std::runtime_error("boom"); })(x),
               std::runtime_error);
  EXPECT_EQ(func::detail::layer_depth(), 0u);
  EXPECT_ERROR(func::grad([](const Tensor& t) -> Tensor { TORCH_CHECK(false, "user says no"); })(x), "user says no");
  expect_close(func::grad(f_sin)(x), x.cos(), 1e-6);  // next transform works
}

TEST_F(TF, GradNoGradOutsideIgnoredInsideRespected) {
  Tensor x = torch::randn({3}, torch::kDouble);
  {
    torch::NoGradGuard ng;
    expect_close(func::grad(f_sin)(x), x.cos(), 1e-12);
  }
  auto f = [](const Tensor& t) {
    Tensor a = t.sin().sum();
    Tensor b;
    {
      torch::NoGradGuard ng;
      b = (t * t).sum();  // not differentiated
    }
    return a + b;
  };
  expect_close(func::grad(f)(x), x.cos(), 1e-12);
}

TEST_F(TF, GradUnderInferenceModeIsCorrect) {
  Tensor g;
  Tensor x;
  {
    c10::InferenceMode im;
    x = torch::randn({3}, torch::kDouble);
    g = func::grad(f_sin)(x);
  }
  expect_close(g, x.cos(), 1e-12);
}

TEST_F(TF, GradOutsideAutogradSeesThrough) {
  // Python's torch.func builds the graph of grad with create_graph, so a
  // tensor captured from the outside that requires grad gets gradients
  // through grad(f).
  Tensor w = torch::randn({3}, torch::kDouble).requires_grad_(true);
  Tensor x = torch::randn({3}, torch::kDouble);
  Tensor g = func::grad([&](const Tensor& t) { return (w * t.sin()).sum(); })(x);  // w * cos x
  g.sum().backward();
  expect_close(w.grad(), x.cos(), 1e-12);
}

// ---------------------------------------------------------------- pytrees

TEST_F(TF, GradOverPytrees) {
  Tensor w = torch::randn({3, 2}, torch::kDouble), b = torch::randn({2}, torch::kDouble);
  Tensor x = torch::randn({3}, torch::kDouble);
  auto ref_w = x.unsqueeze(1).expand({3, 2}) * (x.matmul(w) + b).cos().unsqueeze(0);
  auto ref_b = (x.matmul(w) + b).cos();

  std::map<std::string, Tensor> pm{{"w", w}, {"b", b}};
  auto gm = func::grad([&](const std::map<std::string, Tensor>& p) { return (x.matmul(p.at("w")) + p.at("b")).sin().sum(); })(pm);
  static_assert(std::is_same_v<decltype(gm), std::map<std::string, Tensor>>);
  expect_close(gm.at("w"), ref_w, 1e-12);
  expect_close(gm.at("b"), ref_b, 1e-12);

  std::unordered_map<std::string, Tensor> pu{{"w", w}, {"b", b}};
  auto gu = func::grad([&](const std::unordered_map<std::string, Tensor>& p) { return (x.matmul(p.at("w")) + p.at("b")).sin().sum(); })(pu);
  expect_close(gu.at("w"), ref_w, 1e-12);
  expect_close(gu.at("b"), ref_b, 1e-12);

  torch::OrderedDict<std::string, Tensor> po;
  po.insert("w", w);
  po.insert("b", b);
  auto go = func::grad([&](const torch::OrderedDict<std::string, Tensor>& p) { return (x.matmul(p["w"]) + p["b"]).sin().sum(); })(po);
  expect_close(go["w"], ref_w, 1e-12);
  EXPECT_EQ(go.keys(), po.keys());

  app::Params ps{w, b, 2.5};
  auto gs = func::grad([&](const app::Params& p) { return p.scale * (x.matmul(p.w) + p.b).sin().sum(); })(ps);
  static_assert(std::is_same_v<decltype(gs), app::Params>);
  expect_close(gs.w, 2.5 * ref_w, 1e-12);
  expect_close(gs.b, 2.5 * ref_b, 1e-12);
  EXPECT_EQ(gs.scale, 2.5);  // non-tensor leaf passes through

  std::vector<Tensor> pv{w, b};
  auto gv = func::grad([&](const std::vector<Tensor>& p) { return (x.matmul(p[0]) + p[1]).sin().sum(); })(pv);
  ASSERT_EQ(gv.size(), 2u);
  expect_close(gv[1], ref_b, 1e-12);

  std::tuple<Tensor, std::optional<Tensor>, int> pt{w, b, 7};
  auto gt = func::grad([&](const std::tuple<Tensor, std::optional<Tensor>, int>& p) {
    return (x.matmul(std::get<0>(p)) + *std::get<1>(p)).sin().sum() * std::get<2>(p);
  })(pt);
  expect_close(std::get<0>(gt), 7 * ref_w, 1e-12);
  expect_close(*std::get<1>(gt), 7 * ref_b, 1e-12);
  EXPECT_EQ(std::get<2>(gt), 7);

  std::array<Tensor, 2> pa{w, b};
  auto ga = func::grad([&](const std::array<Tensor, 2>& p) { return (x.matmul(p[0]) + p[1]).sin().sum(); })(pa);
  expect_close(ga[0], ref_w, 1e-12);

  // A non-tensor argument next to a tensor one passes through.
  Tensor gx = func::grad([](const Tensor& t, double s, const std::string& tag) {
    EXPECT_EQ(tag, "hi");
    return s * t.sum();
  })(x, 3.0, std::string("hi"));
  expect_close(gx, torch::full({3}, 3.0, torch::kDouble), 1e-12);
}

TEST_F(TF, TreeFlattenUnflattenMap) {
  std::map<std::string, std::vector<Tensor>> t{{"b", {torch::ones(1)}}, {"a", {torch::zeros(2), torch::ones(3)}}};
  auto leaves = func::tree_flatten(t);
  ASSERT_EQ(leaves.size(), 3u);
  EXPECT_EQ(leaves[0].numel(), 2);  // sorted keys: "a" first
  auto doubled = func::tree_map([](const Tensor& x) { return x * 2 + 1; }, t);
  expect_close(doubled.at("b")[0], torch::full({1}, 3.0));
  auto back = func::tree_unflatten(leaves, t);
  EXPECT_TRUE(back.at("a")[1].equal(t.at("a")[1]));
  EXPECT_ERROR(func::tree_unflatten(std::vector<Tensor>{torch::ones(1)}, t), "the tree has 3 tensor leaves");
}

// ---------------------------------------------------------------- vjp

TEST_F(TF, VjpMatchesAutograd) {
  Tensor x = torch::randn({4}, torch::kDouble), y = torch::randn({4}, torch::kDouble);
  auto f = [](const Tensor& a, const Tensor& b) { return std::make_tuple(a * b.sin(), (a + b).exp()); };
  auto [out, vjp_fn] = func::vjp(f, x, y);
  expect_close(std::get<0>(out), x * y.sin(), 1e-12);
  Tensor c0 = torch::randn({4}, torch::kDouble), c1 = torch::randn({4}, torch::kDouble);
  Tensor xr = x.clone().requires_grad_(true), yr = y.clone().requires_grad_(true);
  auto [o0, o1] = f(xr, yr);
  auto ref = torch::autograd::grad({o0, o1}, {xr, yr}, {c0, c1});
  for (int rep = 0; rep < 2; ++rep) {  // vjp_fn may be called more than once
    auto [gx, gy] = vjp_fn(std::make_tuple(c0, c1));
    expect_close(gx, ref[0], 1e-12);
    expect_close(gy, ref[1], 1e-12);
  }
  auto copy = vjp_fn;  // copyable
  expect_close(std::get<0>(copy(std::make_tuple(c0, c1))), ref[0], 1e-12);
}

TEST_F(TF, VjpHasAuxAndErrors) {
  Tensor x = torch::randn({3}, torch::kDouble);
  auto [out, vjp_fn, aux] = func::vjp([](const Tensor& t) { return std::make_pair(t.sin(), t.cos()); }, func::has_aux, x);
  expect_close(aux, x.cos(), 1e-12);
  auto [g] = vjp_fn(torch::ones({3}, torch::kDouble));
  expect_close(g, x.cos(), 1e-12);
  EXPECT_ERROR(vjp_fn(torch::ones({4}, torch::kDouble)), "Expected cotangents to have the shape");

  auto [o2, fn2] = func::vjp([](const Tensor& t) { return std::vector<Tensor>{t, t * 2}; }, x);
  EXPECT_ERROR(fn2(std::vector<Tensor>{x}), "same structure as the outputs");
  EXPECT_ERROR(func::vjp([](const Tensor& t) { return (t > 0).to(torch::kLong); }, x),
               "All outputs of f must be floating-point or complex");
}

// ---------------------------------------------------------------- jvp

TEST_F(TF, JvpMatchesFiniteDifferences) {
  Tensor x = torch::randn({5}, torch::kDouble), v = torch::randn({5}, torch::kDouble);
  auto f = [](const Tensor& t) { return (t.sin() * t.exp()).cumsum(0); };
  auto [out, tan] = func::jvp(f, std::tuple{x}, std::tuple{v});
  expect_close(out, f(x), 1e-12);
  Tensor J = fd_jacobian(f, x);
  expect_close(tan, J.matmul(v), 1e-7);
  EXPECT_FALSE(tan.requires_grad());

  // Several primals, tuple output, has_aux.
  auto g = [](const Tensor& a, const Tensor& b) {
    return std::make_pair(std::make_tuple(a * b, a.sin()), (a + b).sum());
  };
  Tensor a = torch::randn({3}, torch::kDouble), b = torch::randn({3}, torch::kDouble);
  Tensor ta = torch::randn({3}, torch::kDouble), tb = torch::randn({3}, torch::kDouble);
  auto [o, t, aux] = func::jvp(g, func::has_aux, std::tuple{a, b}, std::tuple{ta, tb});
  expect_close(std::get<0>(t), ta * b + a * tb, 1e-12);
  expect_close(std::get<1>(t), a.cos() * ta, 1e-12);
  expect_close(aux, (a + b).sum(), 1e-12);

  // Output independent of the input: zero tangent.
  Tensor c = torch::ones({2}, torch::kDouble);
  auto [oc, tc] = func::jvp([&](const Tensor&) { return c * 2; }, std::tuple{x}, std::tuple{v});
  expect_close(tc, torch::zeros({2}, torch::kDouble));
}

TEST_F(TF, JvpErrors) {
  Tensor x = torch::randn({3});
  auto f = [](const Tensor& t) { return t.sin(); };
  EXPECT_ERROR(func::jvp(f, std::tuple{x}, std::tuple{torch::randn({4})}), "Expected each tangent to have the shape of its primal");
  EXPECT_ERROR(func::jvp(f, std::tuple{x}, std::tuple{torch::randn({3}, torch::kDouble)}), "dtype");
  auto h = [](const std::vector<Tensor>& v) { return v[0]; };
  EXPECT_ERROR(func::jvp(h, std::tuple{std::vector<Tensor>{x, x}}, std::tuple{std::vector<Tensor>{x}}),
               "Expected primals and tangents to have the same structure");
}

// ---------------------------------------------------------------- linearize

TEST_F(TF, LinearizeDoesNotRerunF) {
  Tensor x = torch::randn({4}, torch::kDouble);
  int calls = 0;
  auto f = [&](const Tensor& t) {
    ++calls;
    return (t.sin() * t).cumsum(0);
  };
  auto [out, jvp_fn] = func::linearize(f, x);
  EXPECT_EQ(calls, 1);
  expect_close(out, (x.sin() * x).cumsum(0), 1e-12);
  Tensor J = fd_jacobian([](const Tensor& t) { return (t.sin() * t).cumsum(0); }, x);
  for (int i = 0; i < 3; ++i) {
    Tensor v = torch::randn({4}, torch::kDouble);
    expect_close(jvp_fn(v), J.matmul(v), 1e-7);
  }
  EXPECT_EQ(calls, 1);
  // Under vmap: all columns of J at once.
  Tensor cols = func::vmap(jvp_fn)(torch::eye(4, torch::kDouble));
  expect_close(cols, J.t(), 1e-7);
  EXPECT_EQ(calls, 1);
  EXPECT_ERROR(jvp_fn(torch::randn({5}, torch::kDouble)), "to have the shape of its primal");
  // A tangent of another dtype is rejected, as jvp itself does.
  EXPECT_ERROR(jvp_fn(torch::randn({4}, torch::kFloat)), "to have the dtype of its primal");
}

// ---------------------------------------------------------------- vjp_fn / jvp_fn inside later transforms

TEST_F(TF, VjpFnTakesPartInLaterTransforms) {
  // A vjp_fn (or linearize's jvp_fn) called inside a transform that starts
  // after its vjp returned is differentiated by that transform. (Level ids
  // are reused: the later grad gets the vjp's old id, which once made the
  // vjp_fn cut the later grad's graph and return 0.)
  Tensor x = torch::tensor(0.7, torch::kDouble), ct = torch::tensor(1.3, torch::kDouble);
  auto [y, vjp_fn] = func::vjp([](const Tensor& t) { return t.sin(); }, x);
  // d/dc [c cos(x)] = cos(x)
  Tensor g = func::grad([&](const Tensor& c) { return std::get<0>(vjp_fn(c)); })(ct);
  expect_close(g, x.cos(), 1e-12);
  // vjp of grad(-cos) = sin: its vjp_fn(c) = c cos(x), so again cos(x).
  auto [s, vjp_sin] = func::vjp(func::grad([](const Tensor& t) { return -t.cos(); }), x);
  expect_close(s, x.sin(), 1e-12);
  expect_close(func::grad([&](const Tensor& c) { return std::get<0>(vjp_sin(c)); })(ct), x.cos(), 1e-12);
  // Per-sample: vmap(grad) over cotangents, and jacrev through vjp_fn.
  Tensor xs = torch::randn({3}, torch::kDouble);
  auto [ys, vjp_vec] = func::vjp([](const Tensor& t) { return t.sin() * t; }, xs);
  Tensor J = torch::diag(xs.cos() * xs + xs.sin());  // d(x sin x)/dx on the diagonal
  expect_close(func::jacrev([&](const Tensor& c) { return std::get<0>(vjp_vec(c)); })(torch::ones({3}, torch::kDouble)), J,
               1e-12);
  expect_close(func::jacfwd([&](const Tensor& c) { return std::get<0>(vjp_vec(c)); })(torch::ones({3}, torch::kDouble)), J,
               1e-12);
  // linearize's jvp_fn inside grad: d/dv sum(J v) = J^T 1.
  auto [lo, jvp_fn] = func::linearize([](const Tensor& t) { return t.sin() * t; }, xs);
  expect_close(func::grad([&](const Tensor& v) { return jvp_fn(v).sum(); })(torch::randn({3}, torch::kDouble)),
               J.sum(0), 1e-10);
}

TEST_F(TF, VjpFnGivesZerosForUnusedPrimalsAndConstantOutputs) {
  // The answer is zeros of each primal's shape (torch.func too), never an
  // error from inside the pullback.
  Tensor x = torch::randn({2}, torch::kDouble), unused = torch::randn({3}, torch::kDouble);
  Tensor c = torch::randn({4}, torch::kDouble);
  auto [y, const_fn] = func::vjp([c](const Tensor&) { return c; }, x);
  auto [g] = const_fn(torch::ones({4}, torch::kDouble));
  expect_close(g, torch::zeros({2}, torch::kDouble), 0);
  auto [y2, fn2] = func::vjp([](const Tensor& a, const Tensor&) { return a * 2; }, x, unused);
  auto [ga, gu] = fn2(torch::ones({2}, torch::kDouble));
  expect_close(ga, torch::full({2}, 2.0, torch::kDouble), 0);
  expect_close(gu, torch::zeros({3}, torch::kDouble), 0);
  // A pytree primal with one unused leaf.
  std::map<std::string, Tensor> tree{{"used", x}, {"unused", unused}};
  auto [y3, fn3] = func::vjp([](const std::map<std::string, Tensor>& m) { return m.at("used").sin(); }, tree);
  auto [gt] = fn3(torch::ones({2}, torch::kDouble));
  expect_close(gt.at("used"), x.cos(), 1e-12);
  expect_close(gt.at("unused"), torch::zeros({3}, torch::kDouble), 0);
  // The pullback of "vjp of a vjp_fn": vjp_fn is linear in its cotangent
  // and does not depend on it through x, so the inner vjp's x-part is zero.
  auto [ys, vjp_sin] = func::vjp([](const Tensor& t) { return t.sin(); }, x);
  auto [gc, pull] = func::vjp([&](const Tensor& ct) { return std::get<0>(vjp_sin(ct)); }, torch::ones({2}, torch::kDouble));
  auto [gct] = pull(torch::ones({2}, torch::kDouble));
  expect_close(gct, x.cos(), 1e-12);
  auto [k, vjp_const] = func::vjp([&](const Tensor& ct) { return std::get<0>(const_fn(ct)); }, torch::ones({4}, torch::kDouble));
  auto [gk] = vjp_const(torch::ones({2}, torch::kDouble));
  expect_close(gk, torch::zeros({4}, torch::kDouble), 0);
  // Errors from a vjp_fn name vjp.
  EXPECT_ERROR(const_fn(torch::ones({5}, torch::kDouble)), "torchfunc::vjp(f, *primals): vjp_fn(cotangents)");
}

}  // namespace

// ---------------------------------------------------------------- options of vjp_fn, jvp, linearize

TEST_F(TF, VjpFnOptionsRetainAndCreateGraph) {
  Tensor x = torch::randn({3}, torch::kDouble);
  auto [out, fn] = func::vjp([](const Tensor& t) { return t.sin(); }, x);
  Tensor ct = torch::ones({3}, torch::kDouble);
  expect_close(std::get<0>(fn(ct)), x.cos(), 1e-12);  // retains by default
  expect_close(std::get<0>(fn(ct, func::VjpFnOptions().retain_graph(false))), x.cos(), 1e-12);
  EXPECT_ERROR(fn(ct), "this vjp_fn's graph was freed by an earlier call with VjpFnOptions().retain_graph(false)");
  // create_graph: d/dx sum(vjp_fn(1)(x) * x) = d/dx sum(cos x * x) = cos x - x sin x
  // when the gradient is recorded; cos x when it is a constant (create_graph false).
  auto inner = [](const Tensor& t, func::VjpFnOptions o) {
    auto [y, f] = func::vjp([](const Tensor& u) { return u.sin(); }, t);
    return (std::get<0>(f(torch::ones_like(y), o)) * t).sum();
  };
  expect_close(func::grad([&](const Tensor& t) { return inner(t, func::VjpFnOptions()); })(x),
               x.cos() - x * x.sin(), 1e-12);
  expect_close(func::grad([&](const Tensor& t) { return inner(t, func::VjpFnOptions().create_graph(true)); })(x),
               x.cos() - x * x.sin(), 1e-12);
  expect_close(func::grad([&](const Tensor& t) { return inner(t, func::VjpFnOptions().create_graph(false)); })(x),
               x.cos(), 1e-12);
}

TEST_F(TF, JvpStrict) {
  Tensor x = torch::randn({3}, torch::kDouble), v = torch::randn({3}, torch::kDouble);
  const auto strict = func::JvpOptions().strict(true);
  auto [y, dy] = func::jvp([](const Tensor& t) { return t.sin(); }, std::tuple{x}, std::tuple{v}, strict);
  expect_close(dy, x.cos() * v, 1e-12);
  EXPECT_ERROR(func::jvp([](const Tensor&) { return torch::ones({2}); }, std::tuple{x}, std::tuple{v}, strict),
               "output 0 of f is independent of the inputs");
  EXPECT_ERROR(func::jvp([](const Tensor& t) { return std::make_tuple(t * 2, torch::ones({2})); }, std::tuple{x},
                         std::tuple{v}, strict),
               "output 1 of f is independent of the inputs (it has no tangent). This is not allowed with "
               "JvpOptions().strict(true)");
  // Not strict: a zero tangent; has_aux with strict: aux is not checked.
  auto [z, dz] = func::jvp([](const Tensor&) { return torch::ones({2}); }, std::tuple{x}, std::tuple{v});
  expect_close(dz, torch::zeros({2}), 0);
  auto [o, t, aux] = func::jvp([](const Tensor& u) { return std::make_pair(u * 3, torch::ones({1})); }, func::has_aux,
                               std::tuple{x}, std::tuple{v}, strict);
  expect_close(t, 3 * v, 1e-12);
  expect_close(aux, torch::ones({1}), 0);
}

TEST_F(TF, LinearizeHasAux) {
  Tensor x = torch::randn({3}, torch::kDouble), v = torch::randn({3}, torch::kDouble);
  int calls = 0;
  auto f = [&](const Tensor& t) {
    ++calls;
    return std::make_pair(t.sin() * t, t.cos());
  };
  auto [out, jvp_fn, aux] = func::linearize(f, func::has_aux, x);
  EXPECT_EQ(calls, 1);
  expect_close(out, x.sin() * x, 1e-12);
  expect_close(aux, x.cos(), 1e-12);
  expect_close(aux + 1, x.cos() + 1, 1e-12);  // a plain tensor outside
  expect_close(jvp_fn(v), (x.cos() * x + x.sin()) * v, 1e-12);
  EXPECT_EQ(calls, 1);
}
