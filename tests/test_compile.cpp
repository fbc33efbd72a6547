// Capture and replay (include/torchfunc/compile.h). Every compiled result is
// compared with the same function run eagerly on the same new inputs, and the
// transformed workloads also with loops of torch::autograd (independent of
// torchfunc's transforms).
#include "common.h"

namespace nn = torch::nn;
using func::TensorDict;

namespace {

// The graph replays on the small-tensor loops (CompileOptions::
// small_tensor_kernels); the graph is printed where it does not.
::testing::AssertionResult small_loops(const func::Graph& g) {
  if (g.uses_small_tensor_kernels()) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << "the graph does not take the small-tensor loops:\n" << g.str();
}

void expect_dicts_close(const TensorDict& a, const TensorDict& b, double tol = 1e-6) {
  ASSERT_EQ(a.size(), b.size());
  for (const auto& it : a) {
    SCOPED_TRACE(it.key());
    expect_close(it.value(), b[it.key()], tol);
  }
}

Tensor mse(const Tensor& pred, const Tensor& y) { return (pred - y).pow(2).mean(); }

}  // namespace

TEST_F(TF, CompileReplaysAPlainFunctionOnNewInputs) {
  auto f = [](const Tensor& x, const Tensor& w) { return torch::tanh(x.mm(w)).sum(1) + x.sin().mean(); };
  auto cf = func::compile(f);
  Tensor x = torch::randn({5, 3}), w = torch::randn({3, 4});
  expect_close(cf(x, w), f(x, w));  // the capturing call is an eager call
  for (int rep = 0; rep < 3; ++rep) {
    Tensor x2 = torch::randn({5, 3}), w2 = torch::randn({3, 4});
    expect_close(cf(x2, w2), f(x2, w2));
  }
  EXPECT_EQ(cf.num_signatures(), 1u);
  auto g = cf.graphs().at(0);
  EXPECT_EQ(g.num_inputs(), 2u);
  EXPECT_EQ(g.count("aten::mm"), 1u);
  EXPECT_EQ(g.count("aten::tanh"), 1u);
  // A new shape is a new signature, captured again.
  Tensor x3 = torch::randn({7, 3});
  expect_close(cf(x3, w), f(x3, w));
  EXPECT_EQ(cf.num_signatures(), 2u);
  // So are another dtype and other strides (a transposed argument).
  Tensor xd = torch::randn({5, 3}, torch::kDouble), wd = torch::randn({3, 4}, torch::kDouble);
  expect_close(cf(xd, wd), f(xd, wd), 1e-12);
  Tensor wt = torch::randn({4, 3}).t();
  expect_close(cf(x, wt), f(x, wt));
  expect_close(cf(x, wt), f(x, wt));
  EXPECT_EQ(cf.num_signatures(), 4u);
}

TEST_F(TF, CompiledW1AndW2PerSampleGradientsEqualEager) {
  // The benchmark's W1 CNN and W2 MLP (bench/torchfunc_bench.cpp), at small batches.
  nn::Sequential w1(nn::Conv2d(nn::Conv2dOptions(1, 32, 3)), nn::ReLU(), nn::Conv2d(nn::Conv2dOptions(32, 64, 3)),
                    nn::ReLU(), nn::MaxPool2d(2), nn::Flatten(), nn::Linear(9216, 128), nn::ReLU(), nn::Linear(128, 10));
  nn::Sequential w2(nn::Linear(784, 512), nn::ReLU(), nn::Linear(512, 512), nn::ReLU(), nn::Linear(512, 10));
  for (auto* net : {&w1, &w2}) {
    TensorDict params = func::named_parameters(*net);
    auto loss = [net](const TensorDict& p, const Tensor& x, const Tensor& y) {
      return torch::nll_loss(torch::log_softmax(func::functional_call(*net, p, x.unsqueeze(0)), 1), y.unsqueeze(0));
    };
    auto psg = func::vmap(func::grad(loss), func::in_dims(func::none, 0, 0));
    auto compiled = func::compile(psg);
    std::vector<int64_t> shape = net == &w1 ? std::vector<int64_t>{3, 1, 28, 28} : std::vector<int64_t>{6, 784};
    Tensor x = torch::randn(shape), y = torch::randint(10, {shape[0]});
    compiled(params, x, y);
    Tensor x2 = torch::randn(shape), y2 = torch::randint(10, {shape[0]});
    expect_dicts_close(compiled(params, x2, y2), psg(params, x2, y2));
  }
}

TEST_F(TF, CompiledPerSampleGradientsEqualEagerAndALoop) {
  nn::Sequential net(nn::Linear(6, 16), nn::Tanh(), nn::Linear(16, 3));
  TensorDict params = func::named_parameters(net);
  auto loss = [&](const TensorDict& p, const Tensor& x, const Tensor& y) {
    return torch::nll_loss(torch::log_softmax(func::functional_call(net, p, x.unsqueeze(0)), 1), y.unsqueeze(0));
  };
  auto psg = func::vmap(func::grad(loss), func::in_dims(func::none, 0, 0));
  auto compiled = func::compile(psg);
  Tensor x = torch::randn({8, 6}), y = torch::randint(3, {8});
  compiled(params, x, y);
  Tensor x2 = torch::randn({8, 6}), y2 = torch::randint(3, {8});
  TensorDict got = compiled(params, x2, y2), eager = psg(params, x2, y2);
  expect_dicts_close(got, eager);
  // Independent of the transforms: one autograd.grad per sample.
  std::vector<Tensor> ps;
  for (const auto& it : params) ps.push_back(it.value().detach().requires_grad_());
  for (int64_t i = 0; i < 8; ++i) {
    TensorDict p;
    size_t k = 0;
    for (const auto& it : params) p.insert(it.key(), ps[k++]);
    auto g = torch::autograd::grad({loss(p, x2[i], y2[i])}, ps);
    size_t j = 0;
    for (const auto& it : params) expect_close(got[it.key()][i], g[j++], 1e-5);
  }
  // Nothing of the transforms is left in the graph: plain ATen ops only.
  auto gr = compiled.graphs().at(0);
  EXPECT_GT(gr.num_nodes(), 5u);
  EXPECT_EQ(gr.str().find("functorch"), std::string::npos);
}

// Sizes: a small net, and W8's (hidden 40, 8 tasks of 10 shots).
TEST_F(TF, CompiledMamlMetaStepEqualsEagerAndAutogradLoop) {
  for (auto [H, T, K] : {std::tuple<int64_t, int64_t, int64_t>{20, 4, 5}, {40, 8, 10}}) {
    SCOPED_TRACE("hidden " + std::to_string(H) + ", tasks " + std::to_string(T));
    nn::Sequential net(nn::Linear(1, H), nn::ReLU(), nn::Linear(H, H), nn::ReLU(), nn::Linear(H, 1));
    TensorDict params = func::named_parameters(net);
    auto loss = [&](const TensorDict& p, const Tensor& x, const Tensor& y) { return mse(func::functional_call(net, p, x), y); };
    auto task = [&](const TensorDict& p, const Tensor& a, const Tensor& b, const Tensor& c, const Tensor& d) {
      TensorDict g = func::grad(loss)(p, a, b), q;
      for (const auto& it : p) q.insert(it.key(), it.value() - 0.1 * g[it.key()]);
      return loss(q, c, d);
    };
    auto meta = func::grad([&](const TensorDict& p, const Tensor& a, const Tensor& b, const Tensor& c, const Tensor& d) {
      return func::vmap(task, func::in_dims(func::none, 0, 0, 0, 0))(p, a, b, c, d).mean();
    });
    auto compiled = func::compile(meta);
    auto batch = [T = T, K = K] { return std::vector<Tensor>{torch::randn({T, K, 1}), torch::randn({T, K, 1}), torch::randn({T, K, 1}), torch::randn({T, K, 1})}; };
    auto b0 = batch();
    compiled(params, b0[0], b0[1], b0[2], b0[3]);
    EXPECT_TRUE(small_loops(compiled.graphs().at(0)));
    auto b = batch();
    TensorDict got = compiled(params, b[0], b[1], b[2], b[3]);
    expect_dicts_close(got, meta(params, b[0], b[1], b[2], b[3]));
    // Reference: autograd with create_graph, a loop over tasks.
    std::vector<Tensor> ps;
    for (const auto& it : params) ps.push_back(it.value().detach().requires_grad_());
    auto dict = [&](const std::vector<Tensor>& v) {
      TensorDict d;
      size_t k = 0;
      for (const auto& it : params) d.insert(it.key(), v[k++]);
      return d;
    };
    Tensor total = torch::zeros({});
    for (int64_t i = 0; i < T; ++i) {
      auto g = torch::autograd::grad({loss(dict(ps), b[0][i], b[1][i])}, ps, {}, true, true);
      std::vector<Tensor> q;
      for (size_t k = 0; k < ps.size(); ++k) q.push_back(ps[k] - 0.1 * g[k]);
      total = total + loss(dict(q), b[2][i], b[3][i]);
    }
    auto ref = torch::autograd::grad({total / T}, ps);
    size_t k = 0;
    for (const auto& it : params) expect_close(got[it.key()], ref[k++], 1e-5);
  }
}

TEST_F(TF, CompiledCnnPerSampleGradientsAndJacobiansEqualEager) {
  nn::Sequential cnn(nn::Conv2d(nn::Conv2dOptions(1, 4, 3)), nn::ReLU(), nn::MaxPool2d(2), nn::Flatten(),
                     nn::Linear(4 * 3 * 3, 5));
  TensorDict params = func::named_parameters(cnn);
  auto loss = [&](const TensorDict& p, const Tensor& x, const Tensor& y) {
    return torch::cross_entropy_loss(func::functional_call(cnn, p, x.unsqueeze(0)), y.unsqueeze(0));
  };
  auto psg = func::vmap(func::grad(loss), func::in_dims(func::none, 0, 0));
  auto c1 = func::compile(psg);
  Tensor x = torch::randn({6, 1, 8, 8}), y = torch::randint(5, {6});
  c1(params, x, y);
  Tensor x2 = torch::randn({6, 1, 8, 8}), y2 = torch::randint(5, {6});
  expect_dicts_close(c1(params, x2, y2), psg(params, x2, y2));
  // jacrev / jacfwd / hessian of a small function.
  auto h = [](const Tensor& v) { return (v.sin() * v.cos().sum()).sum() + v.pow(3).sum(); };
  auto jac = [](const Tensor& v) { return torch::tanh(v.outer(v)).sum(0); };
  auto ch = func::compile(func::hessian(h));
  auto cr = func::compile(func::jacrev(jac));
  auto cfw = func::compile(func::jacfwd(jac));
  Tensor v = torch::randn({5});
  ch(v), cr(v), cfw(v);
  Tensor v2 = torch::randn({5});
  expect_close(ch(v2), func::hessian(h)(v2));
  expect_close(cr(v2), func::jacrev(jac)(v2));
  expect_close(cfw(v2), func::jacfwd(jac)(v2));
}

// CompileOptions::small_tensor_kernels: the ops it covers, against eager
// (ATen's kernels) and the ATen replay of the same graph, with broadcasting,
// transposed and expanded operands, every reduction form, mm / bmm of
// transposed operands; graphs it does not cover keep the ATen replay.
TEST_F(TF, CompileSmallTensorKernelsMatchAten) {
  auto f = [](const Tensor& x, const Tensor& w, const Tensor& b, const Tensor& v) {
    Tensor h = torch::relu(x.mm(w) + b);                // [6, 5] + [5]
    Tensor t = torch::tanh(h.t().mm(x) * 0.5);           // [5, 4]: transposed operand
    Tensor s = torch::sigmoid(t - t.mean(std::vector<int64_t>{0}, true)) / 3;  // keepdim mean, div by a scalar
    Tensor r = (s.pow(2) + s.pow(3) - s.neg().exp().log()).sqrt().abs() + (x.sin() * x.cos()).sum();
    Tensor bm = torch::bmm(v, v.transpose(1, 2));        // [3, 2, 2] from [3, 2, 7]
    Tensor red = bm.sum(std::vector<int64_t>{-1}) + bm.mean(std::vector<int64_t>{0, 2}, true).squeeze(2) + v.sum(std::vector<int64_t>{}).expand({3, 2});
    Tensor z = torch::zeros_like(b) + torch::ones_like(b) * 2 - b.clone() * 1.5 + (b + 1) - (b - 2);
    return std::make_tuple(r, red, z / b.unsqueeze(0).expand({2, 5}), x.mean());
  };
  // Gradients: threshold_backward, tanh_backward, sigmoid_backward, sums over broadcast dims.
  auto g = func::grad([](const Tensor& x, const Tensor& w, const Tensor& b) {
    return (torch::sigmoid(torch::tanh(torch::relu(x.mm(w) + b)))).pow(2).mean();
  }, func::argnums<0, 1, 2>);
  Tensor x = torch::randn({6, 4}), w = torch::randn({4, 5}), b = torch::rand({5}) + 0.5, v = torch::randn({3, 2, 7});
  func::CompileOptions aten_only;
  aten_only.small_tensor_kernels = false;
  auto cf = func::compile(f), cf_aten = func::compile(f, aten_only);
  auto cg = func::compile(g), cg_aten = func::compile(g, aten_only);
  cf(x, w, b, v), cf_aten(x, w, b, v), cg(x, w, b), cg_aten(x, w, b);  // capture
  ASSERT_TRUE(small_loops(cf.graphs().at(0)));
  ASSERT_TRUE(small_loops(cg.graphs().at(0)));
  EXPECT_FALSE(cf_aten.graphs().at(0).uses_small_tensor_kernels());
  EXPECT_NE(cf.graphs().at(0).str().find("small tensors"), std::string::npos);
  for (int rep = 0; rep < 3; ++rep) {
    Tensor x2 = torch::randn({6, 4}), w2 = torch::randn({4, 5}), b2 = torch::rand({5}) + 0.5, v2 = torch::randn({3, 2, 7});
    auto got = cf(x2, w2, b2, v2), ref = f(x2, w2, b2, v2), aten = cf_aten(x2, w2, b2, v2);
    expect_close(std::get<0>(got), std::get<0>(ref), 1e-5);
    expect_close(std::get<1>(got), std::get<1>(ref), 1e-5);
    expect_close(std::get<2>(got), std::get<2>(ref), 1e-5);
    expect_close(std::get<3>(got), std::get<3>(ref), 1e-6);
    expect_close(std::get<0>(got), std::get<0>(aten), 1e-5);
    auto gg = cg(x2, w2, b2), gr = g(x2, w2, b2);
    expect_close(std::get<0>(gg), std::get<0>(gr), 1e-6);
    expect_close(std::get<1>(gg), std::get<1>(gr), 1e-6);
    expect_close(std::get<2>(gg), std::get<2>(gr), 1e-6);
  }
  // Division by a number and the integer exponents ATen special-cases round as ATen's kernels do.
  auto q = func::compile([](const Tensor& t) { return std::make_tuple(t / 3, t.pow(3), t.pow(-1), t.pow(0.5)); });
  Tensor pos = torch::rand({64, 33}) + 0.1;
  q(pos);
  ASSERT_TRUE(small_loops(q.graphs().at(0)));
  auto qa = q(pos);
  auto same = [](const Tensor& a, const Tensor& b) { EXPECT_TRUE(torch::equal(a, b)); };
  same(std::get<0>(qa), pos / 3);
  same(std::get<1>(qa), pos.pow(3));
  same(std::get<2>(qa), pos.pow(-1));
  expect_close(std::get<3>(qa), pos.pow(0.5), 1e-6);  // std::pow: not always ATen's last bit
  // 0-dim constants of other dtypes next to float32 tensors (libtorch 1.13
  // lowers x * 2 to mul.Tensor(x, tensor(2))): read as numbers, as ATen does.
  const Tensor two = torch::tensor(2), third = torch::tensor(1.0 / 3, torch::kDouble), yes = torch::tensor(true),
               six = torch::tensor(6);
  auto k = func::compile([=](const Tensor& t) {
    return std::make_tuple(t * two, t / third, t.add(third, 2), t.add(yes), t.sub(six, 0.5));
  });
  k(pos);
  ASSERT_TRUE(small_loops(k.graphs().at(0)));
  for (int rep = 0; rep < 2; ++rep) {
    Tensor t = torch::randn({64, 33});  // the shape captured: the graph checked above
    auto ka = k(t);
    EXPECT_TRUE(torch::equal(std::get<0>(ka), t * two));
    EXPECT_TRUE(torch::equal(std::get<1>(ka), t / third));
    EXPECT_TRUE(torch::equal(std::get<2>(ka), t.add(third, 2)));
    EXPECT_TRUE(torch::equal(std::get<3>(ka), t.add(yes)));
    EXPECT_TRUE(torch::equal(std::get<4>(ka), t.sub(six, 0.5)));
  }
  // alpha * number not exact in float, or alpha != 1 between two tensors:
  // ATen rounds the product once or twice (fused in its vectorised loops
  // only), so each of these keeps the ATen replay.
  for (auto fn : std::vector<std::function<Tensor(const Tensor&)>>{[=](const Tensor& t) { return t.add(third, 2.5); },
                                                                 [](const Tensor& t) { return t.add(1.0 / 3, 2.5); },
                                                                 [](const Tensor& t) { return t.sub(t.sin(), 0.3); }}) {
    auto kf = func::compile(fn);
    kf(pos);
    EXPECT_FALSE(kf.graphs().at(0).uses_small_tensor_kernels()) << kf.graphs().at(0).str();
    EXPECT_TRUE(torch::equal(kf(pos), fn(pos)));
  }
  // Read as a tensor (not the number operand of add/sub/mul/div): the ATen replay.
  auto kt = func::compile([=](const Tensor& t) { return two - t; });
  kt(pos);
  EXPECT_FALSE(kt.graphs().at(0).uses_small_tensor_kernels());
  EXPECT_NE(kt.graphs().at(0).str().find("as a tensor"), std::string::npos) << kt.graphs().at(0).str();
  expect_close(kt(pos), two - pos, 0);
  // Results are fresh tensors: a later replay does not write them.
  auto first = cg(x, w, b);
  Tensor kept = std::get<1>(first).clone();
  cg(torch::randn({6, 4}), torch::randn({4, 5}), torch::rand({5}));
  EXPECT_TRUE(torch::equal(std::get<1>(first), kept));
  // An input returned, a result returned twice, a view of an input: as eagerly.
  auto h = func::compile([](const Tensor& a) { Tensor c = a.sin(); return std::make_tuple(a, c, c, a.t()); });
  Tensor a = torch::randn({3, 2});
  h(a);
  ASSERT_TRUE(small_loops(h.graphs().at(0)));
  auto out = h(a);
  EXPECT_TRUE(std::get<0>(out).is_same(a));
  EXPECT_TRUE(std::get<1>(out).is_same(std::get<2>(out)));
  EXPECT_TRUE(std::get<3>(out).is_alias_of(a));
  expect_close(std::get<3>(out), a.t(), 0);
  expect_close(std::get<1>(out), a.sin(), 1e-6);
  // Graph::run with inputs of another layout than captured: the ATen replay.
  func::Graph graph = func::make_graph(f, x, w, b, v).optimized(func::CompileOptions());
  ASSERT_TRUE(small_loops(graph));
  Tensor xt = torch::randn({4, 6}).t();
  auto ran = graph.run({xt, w, b, v});
  expect_close(ran[3], xt.mean(), 1e-6);
  // Not covered: an op (cumsum), a dtype (double), a size (2^17 elements).
  auto other = func::compile([](const Tensor& t) { return t.cumsum(0) * 2; });
  other(x);
  EXPECT_FALSE(other.graphs().at(0).uses_small_tensor_kernels());
  EXPECT_NE(other.graphs().at(0).str().find("small-tensor loops: aten::cumsum (or these arguments of it) is not covered"),
            std::string::npos) << other.graphs().at(0).str();
  expect_close(other(x), x.cumsum(0) * 2, 1e-6);
  auto dbl = func::compile([](const Tensor& t) { return t.sin() * 2; });
  Tensor xd = torch::randn({6, 4}, torch::kDouble);
  dbl(xd);
  EXPECT_FALSE(dbl.graphs().at(0).uses_small_tensor_kernels());
  Tensor big = torch::randn({1 << 17});
  dbl(big);
  std::string why;
  for (const auto& gr : dbl.graphs()) {
    EXPECT_FALSE(gr.uses_small_tensor_kernels()) << gr.str();
    why += gr.str();
  }
  EXPECT_NE(why.find("Double[6, 4]: not float32"), std::string::npos) << why;
  EXPECT_NE(why.find("131072 elements, more than 65536"), std::string::npos) << why;
  expect_close(dbl(big), big.sin() * 2, 1e-6);
}

TEST_F(TF, CompileEliminatesDeadCodeAndCommonSubexpressions) {
  auto f = [](const Tensor& x) {
    Tensor unused = x.exp().cumsum(0);
    (void)unused;
    return x.sin() * x.sin() + x.cos();
  };
  Tensor x = torch::randn({4});
  auto raw = func::make_graph(f, x);
  EXPECT_EQ(raw.count("aten::sin"), 2u);
  EXPECT_EQ(raw.count("aten::exp"), 1u);
  auto opt = raw.optimized({});
  EXPECT_EQ(opt.count("aten::sin"), 1u);
  EXPECT_EQ(opt.count("aten::exp"), 0u);
  EXPECT_EQ(opt.count("aten::cumsum"), 0u);
  Tensor x2 = torch::randn({4});
  expect_close(opt.run({x2})[0], f(x2));
  expect_close(raw.run({x2})[0], f(x2));
  // Not merged: reads separated by an in-place write.
  auto g = [](const Tensor& x) {
    Tensor y = x.clone();
    Tensor a = y.sin();
    y.add_(1);
    return a + y.sin();
  };
  auto og = func::make_graph(g, x).optimized({});
  EXPECT_EQ(og.count("aten::sin"), 2u);
  expect_close(og.run({x2})[0], g(x2));
  // Not merged either: reads through a view written in place.
  auto h = [](const Tensor& x) {
    Tensor y = x.clone();
    Tensor a = y.sum();
    y.view({-1}).mul_(2);
    return a + y.sum();
  };
  auto oh = func::make_graph(h, x).optimized({});
  EXPECT_EQ(oh.count("aten::sum"), 2u);
  expect_close(oh.run({x2})[0], h(x2));
}

TEST_F(TF, CompileForwardsViewsWithTheirBasesLayout) {
  // view(sizes) of a contiguous tensor and a transpose of a transpose have
  // the base's layout: the reads use the base, no as_strided is replayed.
  auto f = [](const Tensor& x) {
    Tensor same = x.view(x.sizes());
    Tensor back = x.t().t();
    return same.sin() + back.cos() + x.t().exp().t();  // two real views (x.t() and exp's .t())
  };
  Tensor x = torch::randn({3, 5});
  auto raw = func::make_graph(f, x);
  auto opt = raw.optimized({});
  EXPECT_EQ(opt.count("aten::as_strided") + opt.count("aten::view") + opt.count("aten::t"), 2u) << opt.str();
  EXPECT_EQ(raw.count("aten::t"), 4u);  // as captured
  Tensor x2 = torch::randn({3, 5});
  expect_close(opt.run({x2})[0], f(x2));
  // Kept: a same-layout view that is a result (the caller gets its own tensor),
  // and one whose storage is written in place (metadata could change).
  auto g = [](const Tensor& x) { return x.view(x.sizes()); };
  auto og = func::make_graph(g, x).optimized({});
  EXPECT_EQ(og.num_nodes(), 1u) << og.str();
  Tensor r = og.run({x2})[0];
  EXPECT_NE(r.unsafeGetTensorImpl(), x2.unsafeGetTensorImpl());
  EXPECT_TRUE(r.is_alias_of(x2));
  auto h = [](const Tensor& x) {
    Tensor y = x.clone();
    Tensor v = y.view(y.sizes());
    v.mul_(2);
    return y.sin() + v;
  };
  auto oh = func::make_graph(h, x).optimized({});
  EXPECT_GE(oh.count("aten::as_strided") + oh.count("aten::view"), 1u) << oh.str();
  expect_close(oh.run({x2})[0], h(x2));
}

TEST_F(TF, CompileResultsAliasAsEagerly) {
  // Eagerly x * 1 is a new tensor and two sin(x) are two tensors: compiled,
  // the identity is not forwarded to the input and CSE does not merge two
  // results, so writing one result changes neither the input nor another.
  auto f = [](const Tensor& x) { return std::make_tuple(x * 1, x.sin(), x.sin(), (x * 1).exp()); };
  auto cf = func::compile(f);
  Tensor x = torch::randn({4});
  cf(x);  // captures
  Tensor x2 = torch::randn({4}), keep = x2.clone();
  auto [a, b, c, d] = cf(x2);
  EXPECT_FALSE(a.is_alias_of(x2));
  EXPECT_FALSE(b.is_alias_of(c));
  a.add_(1);
  b.add_(1);
  expect_close(x2, keep);
  expect_close(c, keep.sin());
  expect_close(d, keep.exp());
  // What eagerly is one tensor stays one: a result returned twice, the input returned.
  auto g = [](const Tensor& x) {
    Tensor y = x.cos();
    return std::make_tuple(y, y, x);
  };
  auto cg = func::compile(g);
  cg(x);
  auto [p, q, r] = cg(x2);
  EXPECT_TRUE(p.is_same(q));
  EXPECT_TRUE(r.is_same(x2));
  // The optimisations still apply inside: x * 1 feeding exp is forwarded, and
  // the two sin(x) of an intermediate sum are computed once.
  auto h = [](const Tensor& x) { return (x * 1).exp() + x.sin() + x.sin(); };
  auto oh = func::make_graph(h, x).optimized({});
  EXPECT_EQ(oh.count("aten::mul"), 0u) << oh.str();
  EXPECT_EQ(oh.count("aten::sin"), 1u) << oh.str();
  expect_close(oh.run({x2})[0], h(x2));
}

TEST_F(TF, CompileKeepsMutationsViewsAndConstantsMeaningful) {
  // An in-place update of an argument happens at every replay.
  auto inc = func::compile([](const Tensor& x) {
    x.add_(1);
    return x.view({-1}).narrow(0, 0, 2);
  });
  Tensor a = torch::zeros({2, 2});
  inc(a);
  Tensor b = torch::zeros({2, 2});
  Tensor v = inc(b);
  inc(b);
  expect_close(b, torch::full({2, 2}, 2.0));
  expect_close(v, torch::full({2}, 2.0));  // a view of b, as eagerly
  // Tensors the function closes over are read at every replay.
  Tensor w = torch::ones({3});
  auto scale = func::compile([&w](const Tensor& x) { return x * w; });
  Tensor x = torch::randn({3});
  scale(x);
  {
    torch::NoGradGuard ng;
    w.mul_(3);
  }
  expect_close(scale(x), x * 3);
  // Tensors built from host data inside the function (torch::tensor) keep their values,
  // also when the function then updates them in place.
  auto table = func::compile([](const Tensor& x) {
    Tensor c = torch::tensor({1.0f, 2.0f, 3.0f});
    c.mul_(2);
    return x * c;
  });
  table(x);
  table(x);
  expect_close(table(x), x * torch::tensor({2.0f, 4.0f, 6.0f}));
}

TEST_F(TF, CompileRefusesWhatAReplayCannotReproduce) {
  Tensor x = torch::randn({4});
  auto item = func::compile([](const Tensor& v) { return v * v.sum().item<float>(); });
  EXPECT_ERROR(item(x), "compile: aten::item reads tensor data on the host");
  EXPECT_EQ(item.num_signatures(), 0u);
  auto branch = func::compile([](const Tensor& v) { return (v.sum() > 0).item<bool>() ? v : -v; });
  EXPECT_ERROR(branch(x), "compile: aten::");
  auto nz = func::compile([](const Tensor& v) { return v.nonzero(); });
  EXPECT_ERROR(nz(x), "aten::nonzero");
  auto mask = func::compile([](const Tensor& v) { return v.index({v > 0}); });
  EXPECT_ERROR(mask(x), "depends on tensor data");
  auto noise = func::compile([](const Tensor& v) { return v + torch::randn_like(v); });
  EXPECT_ERROR(noise(x), "global generator");
  auto drop = func::compile([](const Tensor& v) { return torch::dropout(v, 0.5, true); });
  EXPECT_ERROR(drop(x), "global generator");
  auto pv = func::compile(func::vmap([](const Tensor& v) { return v * torch::rand({}); }, 0, func::Randomness::Different));
  EXPECT_ERROR(pv(torch::randn({3, 2})), "global generator");
  // Integer indexing has a static shape and is replayed.
  auto gather = func::compile([](const Tensor& v, const Tensor& idx) { return v.index({idx}); });
  Tensor idx = torch::tensor({3, 0, 0});
  gather(x, idx);
  Tensor idx2 = torch::tensor({1, 2, 3});
  expect_close(gather(x, idx2), x.index({idx2}));
}

TEST_F(TF, CompileReplaysRandomOpsWithAGivenGenerator) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(7);
  auto gen_ref = at::make_generator<at::CPUGeneratorImpl>(7);
  auto noisy = [](at::Generator g) {
    return [g](const Tensor& v) { return v + at::normal(0.0, 1.0, v.sizes(), g); };
  };
  auto cf = func::compile(noisy(gen));
  auto ef = noisy(gen_ref);
  Tensor x = torch::randn({5});
  for (int i = 0; i < 3; ++i) expect_close(cf(x), ef(x));  // same draws, the generator advanced as eagerly
}

TEST_F(TF, CompileMisuseIsAClearErrorAndLeavesNoState) {
  Tensor x = torch::randn({3});
  // Arguments that require grad: the replay would not be differentiable.
  auto f = func::compile([](const Tensor& v) { return v.sin(); });
  Tensor p = torch::randn({3}, torch::requires_grad());
  EXPECT_ERROR(f(p), "input 0 requires grad");
  {
    torch::NoGradGuard ng;
    expect_close(f(p), p.sin());
  }
  // A closed-over tensor that requires grad.
  auto g = func::compile([p](const Tensor& v) { return v * p; });
  EXPECT_ERROR(g(x), "requires grad and is not an argument");
  // Inside a transform.
  EXPECT_ERROR(func::vmap([&](const Tensor& v) { return f(v); })(torch::randn({2, 3})), "inside a transform");
  // Nested capture.
  auto outer = func::compile([&](const Tensor& v) { return f(v) * 2; });
  EXPECT_ERROR(outer(x), "another capture");
  // The function's own exception leaves nothing behind, and the next call captures.
  bool fail = true;
  auto thrower = func::compile([&](const Tensor& v) {
    Tensor y = v.exp();
    if (fail) throw std::runtime_error("user error");
    return y;
  });
  EXPECT_THROW(thrower(x), std::runtime_error);
  fail = false;
  expect_close(thrower(x), x.exp());
  // Too many signatures.
  auto few = func::compile([](const Tensor& v) { return v * 2; }, func::CompileOptions{true, true, true, 2});
  few(torch::randn({1})), few(torch::randn({2}));
  EXPECT_ERROR(few(torch::randn({3})), "max_signatures");
  // Number leaves are part of the signature.
  auto scaled = func::compile([](const Tensor& v, double s) { return v * s; });
  expect_close(scaled(x, 2.0), x * 2);
  expect_close(scaled(x, 3.0), x * 3);
  EXPECT_EQ(scaled.num_signatures(), 2u);
}

TEST_F(TF, MakeGraphPrintsTheLoweredOps) {
  auto f = func::grad([](const Tensor& x) { return x.sin().sum(); });
  auto g = func::make_graph(f, torch::randn({3}));
  std::string s = g.str();
  EXPECT_NE(s.find("aten::sin"), std::string::npos) << s;
  EXPECT_NE(s.find("aten::cos"), std::string::npos) << s;  // the backward, lowered
  EXPECT_NE(s.find("return ("), std::string::npos) << s;
  Tensor x2 = torch::randn({3});
  expect_close(g.run({x2})[0], x2.cos());
  EXPECT_ERROR(g.run({}), "expected 1 inputs");
}

// ---- aot_function (include/torchfunc/aot.h) ------------------------------------------

TEST_F(TF, AotFunctionTrainsLikeEagerAutograd) {
  // The same MLP trained for three SGD steps eagerly and through aot_function.
  auto make = [] {
    torch::manual_seed(3);
    return std::vector<Tensor>{torch::randn({8, 5}, torch::requires_grad()), torch::randn({8}, torch::requires_grad()),
                               torch::randn({2, 8}, torch::requires_grad())};
  };
  auto loss = [](const std::vector<Tensor>& p, const Tensor& x, const Tensor& y) {
    Tensor h = torch::tanh(torch::addmm(p[1], x, p[0].t()));
    return torch::cross_entropy_loss(h.mm(p[2].t()), y);
  };
  auto pe = make(), pa = make();
  auto f = func::aot_function(loss);
  torch::optim::SGD oe(pe, torch::optim::SGDOptions(0.1).momentum(0.9)), oa(pa, torch::optim::SGDOptions(0.1).momentum(0.9));
  for (int step = 0; step < 3; ++step) {
    Tensor x = torch::randn({6, 5}), y = torch::randint(2, {6});
    oe.zero_grad();
    oa.zero_grad();
    Tensor le = loss(pe, x, y), la = f(pa, x, y);
    expect_close(la, le, 1e-6);
    ASSERT_TRUE(la.requires_grad());
    le.backward();
    la.backward();
    for (size_t k = 0; k < pe.size(); ++k) expect_close(pa[k].grad(), pe[k].grad(), 1e-6);
    oe.step();
    oa.step();
  }
  for (size_t k = 0; k < pe.size(); ++k) expect_close(pa[k], pe[k], 1e-5);
  EXPECT_EQ(f.graphs().size(), 1u);
  // Arguments without requires_grad get no gradient and cost nothing in the backward.
  Tensor x = torch::randn({6, 5}, torch::requires_grad()), yx = torch::randint(2, {6});
  Tensor lx = f(pa, x, yx);
  EXPECT_EQ(f.graphs().size(), 2u);  // requires_grad is part of the signature
  auto gx = torch::autograd::grad({lx}, {x});
  auto gx_ref = torch::autograd::grad({loss(pa, x, yx)}, {x});
  expect_close(gx[0], gx_ref[0], 1e-6);
}

TEST_F(TF, AotFunctionMinCutSavesLessOnTheTutorialCase) {
  // functorch's aot_autograd tutorial: cos(cos(a + b + c + d)).
  auto fn = [](const Tensor& a, const Tensor& b, const Tensor& c, const Tensor& d) { return (a + b + c + d).cos().cos(); };
  std::vector<Tensor> in;
  for (int i = 0; i < 4; ++i) in.push_back(torch::randn({1000}, torch::requires_grad()));
  Tensor ct = torch::randn({1000});
  auto ref = torch::autograd::grad({fn(in[0], in[1], in[2], in[3])}, in, {ct});
  for (auto part : {func::Partition::Default, func::Partition::MinCut}) {
    auto f = func::aot_function(fn, func::AotOptions{part, {}});
    for (int rep = 0; rep < 2; ++rep) {
      Tensor y = f(in[0], in[1], in[2], in[3]);
      expect_close(y, fn(in[0], in[1], in[2], in[3]).detach());
      auto g = torch::autograd::grad({y}, in, {ct});
      for (int i = 0; i < 4; ++i) expect_close(g[i], ref[i], 1e-6);
    }
  }
  auto def = func::aot_function(fn, func::AotOptions{func::Partition::Default, {}});
  auto cut = func::aot_function(fn, func::AotOptions{func::Partition::MinCut, {}});
  def(in[0], in[1], in[2], in[3]), cut(in[0], in[1], in[2], in[3]);
  auto gd = def.graphs().at(0), gc = cut.graphs().at(0);
  EXPECT_EQ(gd->saved_bytes, 2 * 1000 * 4);  // a + b + c + d and its cos, as autograd saves them
  EXPECT_EQ(gc->saved_bytes, 0);             // only the arguments: the backward recomputes the rest
  EXPECT_GE(gc->backward.count("aten::cos"), 1u);
  EXPECT_EQ(gd->backward.count("aten::cos"), 0u);
}

TEST_F(TF, AotFunctionMisuseIsAClearError) {
  Tensor w = torch::randn({3}, torch::requires_grad());
  auto f = func::aot_function([](const Tensor& v) { return (v * v).sum(); });
  Tensor y = f(w);
  y.backward({}, /*retain_graph=*/false);
  EXPECT_ERROR(y.backward(), "backward ran twice");
  Tensor y2 = f(w);
  EXPECT_ERROR(torch::autograd::grad({y2}, {w}, {}, true, true), "not differentiable");
  auto ints = func::aot_function([](const Tensor& v) { return v.argmax(); });
  EXPECT_ERROR(ints(w), "aot_function: capturing the forward and backward: torchfunc::vjp(f, *primals): All outputs of f must be floating-point");
  // Without arguments that require grad it is compile's replay.
  Tensor x = torch::randn({3});
  expect_close(f(x), (x * x).sum());
  EXPECT_FALSE(f(x).requires_grad());
}
