// Tests for vmap (against loops of single-sample calls) and jacrev / jacfwd /
// hessian (against finite differences in double and analytic derivatives).
#include "common.h"

#include <map>

namespace {

Tensor predict(const Tensor& w, const Tensor& b, const Tensor& x) { return torch::tanh(torch::linear(x, w, b)); }

// ---------------------------------------------------------------- vmap

TEST_F(TF, VmapMatchesLoop) {
  Tensor w = torch::randn({4, 3}), xs = torch::randn({6, 3});
  auto f = [](const Tensor& w, const Tensor& x) { return torch::mv(w, x).relu(); };
  Tensor ys = func::vmap(f, func::in_dims(func::none, 0))(w, xs);
  ASSERT_EQ(ys.sizes(), (std::vector<int64_t>{6, 4}));
  for (int64_t i = 0; i < 6; ++i) expect_close(ys[i], f(w, xs[i]));

  // in_dim 1 and negative, out_dims 1
  Tensor xt = xs.t().contiguous();  // [3, 6]
  expect_close(func::vmap(f, func::in_dims(func::none, 1))(w, xt), ys);
  expect_close(func::vmap(f, func::in_dims(func::none, -1))(w, xt), ys);
  expect_close(func::vmap(f, func::in_dims(func::none, 0), 1)(w, xs), ys.t());
  expect_close(func::vmap(f, func::in_dims(func::none, 0), func::out_dims(-1))(w, xs), ys.t());

  // bare int broadcasts to every argument
  Tensor ws = torch::randn({6, 4, 3});
  Tensor y2 = func::vmap(f)(ws, xs);
  for (int64_t i = 0; i < 6; ++i) expect_close(y2[i], f(ws[i], xs[i]));
}

TEST_F(TF, VmapNestedDimsTuplesAndDicts) {
  Tensor a = torch::randn({5, 2}), b = torch::randn({2});
  auto f = [](const std::map<std::string, Tensor>& p, const std::vector<Tensor>& v) {
    return std::make_tuple(p.at("a") * p.at("b") + v[0], v[1].sum());
  };
  std::map<std::string, Tensor> p{{"a", a}, {"b", b}};
  Tensor v0 = torch::randn({2, 5}), v1 = torch::randn({5, 3});
  auto [r0, r1] = func::vmap(f,
                             func::in_dims(func::Dims::dict({{"a", 0}, {"b", func::none}}), func::Dims{1, 0}),
                             func::out_dims(1, 0))(p, std::vector<Tensor>{v0, v1});
  ASSERT_EQ(r0.sizes(), (std::vector<int64_t>{2, 5}));
  for (int64_t i = 0; i < 5; ++i) {
    auto [e0, e1] = f({{"a", a[i]}, {"b", b}}, {v0.select(1, i), v1[i]});
    expect_close(r0.select(1, i), e0);
    expect_close(r1[i], e1);
  }
}

TEST_F(TF, VmapNonTensorArgsAndUnbatchedOutputs) {
  Tensor xs = torch::randn({4, 3});
  Tensor c = torch::randn({3});
  auto f = [&](const Tensor& x, double s) { return std::make_pair(x * s, c * 2); };
  auto [y, k] = func::vmap(f, func::in_dims(0, func::none))(xs, 3.0);
  expect_close(y, xs * 3);
  ASSERT_EQ(k.sizes(), (std::vector<int64_t>{4, 3}));  // not batched: expanded
  expect_close(k[2], c * 2);
  // out_dims none for the unbatched output returns it as is
  auto [y2, k2] = func::vmap(f, func::in_dims(0, func::none), func::out_dims(0, func::none))(xs, 3.0);
  expect_close(k2, c * 2);
}

TEST_F(TF, VmapChunkSizeEqualsUnchunked) {
  Tensor xs = torch::randn({10, 3});
  auto f = [](const Tensor& x) { return std::make_tuple(x.sin(), x.sum()); };
  auto [a, b] = func::vmap(f)(xs);
  for (int64_t cs : {1, 3, 4, 10, 64}) {
    auto [a2, b2] = func::vmap(f, 0, func::out_dims(1, 0), func::VmapOptions().chunk_size(cs))(xs);
    expect_close(a2, a.t());
    expect_close(b2, b);
  }
  // Rejected when the transform is built, not first when it is called.
  EXPECT_ERROR(func::vmap(f, func::VmapOptions().chunk_size(0)), "vmap: chunk_size should be none or greater than 0");
  EXPECT_ERROR(func::vmap(f, func::VmapOptions().chunk_size(-2)), "got -2");
  EXPECT_ERROR(func::jacrev(f, func::JacrevOptions().chunk_size(0)), "chunk_size");
}

TEST_F(TF, VmapRandomnessSameAcrossChunks) {
  // "same": every sample of the whole batch sees the same values, also when
  // the batch runs in chunks; "different" with chunks still gives every
  // sample its own values.
  for (int64_t cs : {1, 2, 3, 5, 8}) {
    SCOPED_TRACE("chunk_size " + std::to_string(cs));
    auto f = [](const Tensor& x) { return x + torch::rand({3}); };
    Tensor same = func::vmap(f, func::VmapOptions().randomness(func::Randomness::Same).chunk_size(cs))(torch::zeros({5, 3}));
    for (int64_t i = 1; i < 5; ++i) expect_close(same[i], same[0], 0);
    Tensor diff =
        func::vmap(f, func::VmapOptions().randomness(func::Randomness::Different).chunk_size(cs))(torch::zeros({5, 3}));
    for (int64_t i = 1; i < 5; ++i) EXPECT_GT((diff[i] - diff[0]).abs().max().item<double>(), 0);
  }
  // The values "same" draws do not depend on the chunking: each chunk draws
  // from the generator state the whole batch started from.
  torch::manual_seed(7);
  Tensor whole = func::vmap([](const Tensor& x) { return x + torch::randn({4}); },
                            func::VmapOptions().randomness(func::Randomness::Same))(torch::zeros({6, 4}));
  torch::manual_seed(7);
  Tensor chunked = func::vmap([](const Tensor& x) { return x + torch::randn({4}); },
                              func::VmapOptions().randomness(func::Randomness::Same).chunk_size(4))(torch::zeros({6, 4}));
  expect_close(chunked, whole, 0);
}

TEST_F(TF, VmapInPlaceResultIsTheInput) {
  // An in-place op on a mapped input returns that input (torch.func too),
  // with the op applied.
  Tensor x = torch::rand({4, 3}, torch::kDouble);
  Tensor expected = x.acos();
  Tensor r = func::vmap([](Tensor t) { return t.acos_(); })(x);
  EXPECT_TRUE(r.is_same(x));
  expect_close(x, expected, 0);
  // Along another dim the result is x with the batch dim moved (a view of x).
  Tensor y = torch::rand({3, 4}, torch::kDouble);
  Tensor moved = func::vmap([](Tensor t) { return t.mul_(2); }, 1)(y);
  EXPECT_EQ(moved.data_ptr(), y.data_ptr());
  expect_close(moved, y.t(), 0);
}

TEST_F(TF, VmapRandomness) {
  Tensor xs = torch::zeros({4, 3});
  auto f = [](const Tensor& x) { return x + torch::rand({3}); };
  EXPECT_ERROR(func::vmap(f)(xs), "random");
  Tensor same = func::vmap(f, func::VmapOptions().randomness(func::Randomness::Same))(xs);
  for (int64_t i = 1; i < 4; ++i) expect_close(same[i], same[0], 0);
  Tensor diff = func::vmap(f, func::VmapOptions().randomness(func::Randomness::Different))(xs);
  EXPECT_GT((diff[1] - diff[0]).abs().max().item<double>(), 0);
  // dropout inside vmap: in-place random on a batched tensor
  EXPECT_ERROR(func::vmap([](const Tensor& x) { return torch::dropout(x, 0.5, true); })(xs), "random");
}

TEST_F(TF, VmapErrors) {
  Tensor x = torch::randn({3, 2}), y = torch::randn({4, 2});
  auto f = [](const Tensor& a, const Tensor& b) { return a + b; };
  EXPECT_ERROR(func::vmap(f)(x, y), "Expected all tensors to have the same size in the mapped dimension");
  EXPECT_ERROR(func::vmap(f)(x, y), "args[1] (in_dim=0): 4");
  EXPECT_ERROR(func::vmap(f, func::in_dims(0, 2))(x, x), "Got in_dim=2 for args[1]");
  EXPECT_ERROR(func::vmap(f, func::in_dims(0, 0, 0))(x, x), "it has 2 elements but the in_dims entry for it is (0, 0, 0)");
  EXPECT_ERROR(func::vmap(f, func::in_dims(func::none, func::none))(x, x), "Expected at least one Tensor to vmap over");
  EXPECT_ERROR(func::vmap([](const Tensor& a, int) { return a; })(x, 3), "which is not a Tensor");
  EXPECT_ERROR(func::vmap([](const Tensor& a) { return a; }, 0, func::none)(x), "out_dim=none");
  EXPECT_ERROR(func::vmap([](const Tensor& a) { return a; }, 0, 5)(x), "out_dim=5");
  EXPECT_ERROR(func::vmap([](const std::vector<Tensor>& v) { return v[0]; }, func::in_dims(func::Dims{0}))(std::vector<Tensor>{x, x}),
               "vmap(f, in_dims=((0,),), ...)(<inputs>)");
  EXPECT_ERROR(func::vmap([](const Tensor& a) { return a; }, func::in_dims(func::Dims::dict({{"w", 0}})))(x),
               "nested entry");
}

// ---------------------------------------------------------------- jacobians

TEST_F(TF, JacrevJacfwdMatchFiniteDifferences) {
  Tensor w = torch::randn({4, 3}, torch::kDouble), b = torch::randn({4}, torch::kDouble),
         x = torch::randn({3}, torch::kDouble);
  Tensor ref = fd_jacobian([&](const Tensor& t) { return predict(w, b, t); }, x);
  Tensor jr = func::jacrev(predict, func::argnum<2>)(w, b, x);
  Tensor jf = func::jacfwd(predict, func::argnum<2>)(w, b, x);
  ASSERT_EQ(jr.sizes(), (std::vector<int64_t>{4, 3}));
  expect_close(jr, ref, 1e-8);
  expect_close(jf, ref, 1e-8);
  for (int64_t cs : {1, 2, 3, 100}) expect_close(func::jacrev(predict, func::argnum<2>, func::JacrevOptions().chunk_size(cs))(w, b, x), ref, 1e-8);

  // Several argnums: tuple of blocks shaped out.shape + in.shape.
  auto [jw, jb] = func::jacrev(predict, func::argnums<0, 1>)(w, b, x);
  ASSERT_EQ(jw.sizes(), (std::vector<int64_t>{4, 4, 3}));
  Tensor refw = fd_jacobian([&](const Tensor& t) { return predict(t, b, x); }, w);
  expect_close(jw, refw, 1e-8);
  expect_close(jb, fd_jacobian([&](const Tensor& t) { return predict(w, t, x); }, b), 1e-8);
  auto [fw, fb] = func::jacfwd(predict, func::argnums<0, 1>)(w, b, x);
  expect_close(fw, refw, 1e-8);
  expect_close(fb, jb, 1e-10);
  EXPECT_ERROR(func::jacrev(predict, func::JacrevOptions().chunk_size(0)), "chunk_size");
}

TEST_F(TF, JacobianOfSeveralOutputsAndAux) {
  Tensor x = torch::randn({3}, torch::kDouble);
  auto f = [](const Tensor& t) { return std::make_pair(std::make_tuple(t.sin(), t.sum() * t.sum()), t.cos()); };
  auto [jr, aux] = func::jacrev(f, func::has_aux)(x);
  expect_close(std::get<0>(jr), torch::diag(x.cos()), 1e-12);
  ASSERT_EQ(std::get<1>(jr).sizes(), (std::vector<int64_t>{3}));
  expect_close(std::get<1>(jr), 2 * x.sum() * torch::ones({3}, torch::kDouble), 1e-12);
  expect_close(aux, x.cos(), 1e-12);
  auto [jf, auxf] = func::jacfwd(f, func::has_aux)(x);
  expect_close(std::get<0>(jf), std::get<0>(jr), 1e-12);
  expect_close(std::get<1>(jf), std::get<1>(jr), 1e-12);
  expect_close(auxf, x.cos(), 1e-12);

  // dict input: result per output is a dict of blocks
  std::map<std::string, Tensor> p{{"a", torch::randn({2}, torch::kDouble)}, {"b", torch::randn({}, torch::kDouble)}};
  auto jd = func::jacrev([](const std::map<std::string, Tensor>& p) { return p.at("a") * p.at("b"); })(p);
  expect_close(jd.at("a"), torch::eye(2, torch::kDouble) * p.at("b"), 1e-12);
  expect_close(jd.at("b"), p.at("a"), 1e-12);
}

// Inputs with no elements give empty Jacobians (out.shape + in.shape), as in
// torch.func (found by the OpInfo sweep: jacfwd raised).
TEST_F(TF, JacobiansOfEmptyInputsAreEmpty) {
  Tensor e = torch::empty({0, 3}, torch::kDouble);
  auto f = [](const Tensor& t) { return t.sin(); };
  for (const Tensor& j : {func::jacfwd(f)(e), func::jacrev(f)(e)})
    EXPECT_EQ(j.sizes(), (std::vector<int64_t>{0, 3, 0, 3}));
  // A non-empty output of an empty input, with aux: shapes [2, 0], aux as f gives it.
  auto g = [](const Tensor& t) { return std::make_pair(t.sum() * torch::ones({2}, t.options()), t.numel() + t.sum()); };
  auto [jf, aux] = func::jacfwd(g, func::has_aux)(torch::empty({0}, torch::kDouble));
  EXPECT_EQ(jf.sizes(), (std::vector<int64_t>{2, 0}));
  EXPECT_EQ(aux.item<double>(), 0.0);
  auto [jr, auxr] = func::jacrev(g, func::has_aux)(torch::empty({0}, torch::kDouble));
  EXPECT_EQ(jr.sizes(), (std::vector<int64_t>{2, 0}));
  (void)auxr;
}

TEST_F(TF, JacobiansWithInPlaceWritesIntoOtherArguments) {
  // f writes x into a non-differentiated argument in place (a buffer), then
  // returns a function of it: the Jacobian is diag(2 cos(x)) by both modes.
  Tensor x = torch::randn({4}, torch::kDouble);
  auto f = [](const Tensor& x, Tensor buf) {
    buf.copy_(x);
    return buf.sin() * 2;
  };
  Tensor expected = torch::diag(2 * x.cos());
  expect_close(func::jacfwd(f)(x, torch::zeros({4}, torch::kDouble)), expected, 1e-12);
  expect_close(func::jacrev(f)(x, torch::zeros({4}, torch::kDouble)), expected, 1e-12);
  // Rows written one by one into a buffer, then the buffer returned.
  auto g = [](const Tensor& x, Tensor buf) {
    for (int64_t i = 0; i < 4; ++i) buf[i] = x[i] * x[i];
    return buf.clone();
  };
  expect_close(func::jacfwd(g)(x, torch::zeros({4}, torch::kDouble)), torch::diag(2 * x), 1e-12);
  expect_close(func::jacrev(g)(x, torch::zeros({4}, torch::kDouble)), torch::diag(2 * x), 1e-12);
  // jvp itself, with the buffer as a second (non-differentiated) argument.
  Tensor t = torch::randn({4}, torch::kDouble);
  auto [out, tan] = func::jvp([&](const Tensor& x) { return f(x, torch::zeros({4}, torch::kDouble)); },
                              std::tuple{x}, std::tuple{t});
  expect_close(tan, 2 * x.cos() * t, 1e-12);
}

TEST_F(TF, JacobiansRejectComplex) {
  // As torch.func: no Jacobians of complex inputs or outputs (no holomorphic
  // option); the error names the transform and the leaf.
  Tensor z = torch::randn({3}, torch::kComplexDouble);
  Tensor r = torch::randn({3}, torch::kDouble);
  auto id = [](const Tensor& t) { return t * 2; };
  EXPECT_ERROR(func::jacrev(id)(z), "jacrev");
  EXPECT_ERROR(func::jacrev(id)(z), "Expected all inputs to be real but received complex tensor at args[0]");
  EXPECT_ERROR(func::jacfwd(id)(z), "Expected all inputs to be real");
  auto to_complex = [](const Tensor& t) { return torch::polar(t.abs() + 1, t); };
  EXPECT_ERROR(func::jacrev(to_complex)(r), "Expected all outputs to be real but received complex tensor at output 0");
  EXPECT_ERROR(func::jacfwd(to_complex)(r), "Expected all outputs to be real");
  EXPECT_ERROR(func::hessian([](const Tensor& t) { return (t * t).sum().abs(); })(z), "real");
}

TEST_F(TF, HessianMatchesAnalyticAndBothCompositions) {
  Tensor x = torch::randn({4}, torch::kDouble);
  auto f = [](const Tensor& t) { return t.pow(3).sum() + t.prod(); };
  Tensor H = func::hessian(f)(x);
  // analytic: diag(6x) + d2 prod
  Tensor ref = torch::diag(6 * x);
  for (int i = 0; i < 4; ++i)
    for (int j = 0; j < 4; ++j)
      if (i != j) {
        double p = 1;
        for (int k = 0; k < 4; ++k)
          if (k != i && k != j) p *= x[k].item<double>();
        ref[i][j] = p;
      }
  expect_close(H, ref, 1e-10);
  expect_close(func::jacrev(func::jacrev(f))(x), ref, 1e-10);
  expect_close(func::jacfwd(func::jacfwd(f))(x), ref, 1e-10);
  expect_close(func::jacrev(func::jacfwd(f))(x), ref, 1e-10);

  // hessian of predict wrt x: [Dout, Din, Din], against FD of jacrev
  Tensor w = torch::randn({5, 4}, torch::kDouble), b = torch::randn({5}, torch::kDouble);
  Tensor Hp = func::hessian(predict, func::argnum<2>)(w, b, x);
  ASSERT_EQ(Hp.sizes(), (std::vector<int64_t>{5, 4, 4}));
  Tensor fdH = fd_jacobian([&](const Tensor& t) { return func::jacrev(predict, func::argnum<2>)(w, b, t); }, x);
  expect_close(Hp, fdH, 1e-7);
}

}  // namespace

// ---------------------------------------------------------------- axis_size, debug_unwrap

TEST_F(TF, VmapAxisSizeWithNothingMapped) {
  Tensor w = torch::randn({3}, torch::kDouble);
  auto twice = [](const Tensor& t) { return t * 2; };
  Tensor out = func::vmap(twice, func::none, 0, func::VmapOptions().axis_size(4))(w);
  expect_close(out, (w * 2).expand({4, 3}), 0);
  // f with no arguments at all
  Tensor ones = func::vmap([] { return torch::ones({2}); }, func::VmapOptions().axis_size(3))();
  expect_close(ones, torch::ones({3, 2}), 0);
  // Different randomness: one draw per sample (rows differ), the same with chunks.
  auto noisy = [](const Tensor& t) { return t + torch::randn_like(t); };
  torch::manual_seed(3);
  Tensor a = func::vmap(noisy, func::none, 0,
                        func::VmapOptions().axis_size(5).randomness(func::Randomness::Different))(w);
  ASSERT_EQ(a.sizes(), (std::vector<int64_t>{5, 3}));
  for (int i = 0; i < 5; ++i)
    for (int j = i + 1; j < 5; ++j) EXPECT_FALSE(a[i].equal(a[j])) << i << " " << j;
  Tensor b = func::vmap(noisy, func::none, 0,
                        func::VmapOptions().axis_size(5).chunk_size(2).randomness(func::Randomness::Same))(w);
  for (int i = 1; i < 5; ++i) EXPECT_TRUE(b[i].equal(b[0]));
  // Agreeing with mapped inputs is allowed; grad through it: d/dw sum_4 (2 w) = 8.
  Tensor xs = torch::randn({4, 3}, torch::kDouble);
  expect_close(func::vmap([](const Tensor& x, const Tensor& t) { return x * t; }, func::in_dims(0, func::none), 0,
                          func::VmapOptions().axis_size(4))(xs, w),
               xs * w, 0);
  Tensor g = func::grad([&](const Tensor& t) {
    return func::vmap(twice, func::none, 0, func::VmapOptions().axis_size(4))(t).sum();
  })(w);
  expect_close(g, torch::full({3}, 8.0, torch::kDouble), 0);
  EXPECT_ERROR(func::vmap([](const Tensor& x) { return x; }, 0, 0, func::VmapOptions().axis_size(3))(xs),
               "axis_size=3 but the mapped inputs have size 4");
  EXPECT_ERROR(func::vmap(twice, func::VmapOptions().axis_size(-1)), "axis_size should be none or at least 0, got -1");
  EXPECT_ERROR(func::vmap(twice, func::none)(w), "give VmapOptions().axis_size(n)");
}

TEST_F(TF, DebugUnwrapShowsWhatTheTransformWraps) {
  Tensor xs = torch::randn({4, 3}, torch::kDouble);
  EXPECT_TRUE(func::debug_unwrap(xs).is_same(xs));
  func::vmap([&](const Tensor& x) {
    Tensor plain = func::debug_unwrap(x);
    EXPECT_EQ(plain.sizes(), xs.sizes());
    EXPECT_TRUE(plain.equal(xs));
    return x;
  })(xs);
  func::grad([&](const Tensor& x) {
    Tensor plain = func::debug_unwrap(x);
    EXPECT_TRUE(plain.equal(xs[0]));
    EXPECT_TRUE(func::debug_unwrap(plain).is_same(plain));
    return x.sum();
  })(xs[0]);
  // vmap(grad): one level down is the vmap-level tensor (one sample's shape),
  // all the way down the whole batch.
  func::vmap(func::grad([&](const Tensor& x) {
    EXPECT_EQ(func::debug_unwrap(x, /*recurse=*/false).sizes(), (std::vector<int64_t>{3}));
    Tensor plain = func::debug_unwrap(x);
    EXPECT_EQ(plain.sizes(), xs.sizes());
    EXPECT_TRUE(plain.equal(xs));
    return x.sum();
  }))(xs);
}

TEST_F(TF, HessianHasAux) {
  Tensor x = torch::randn({3}, torch::kDouble);
  auto [H, aux] = func::hessian([](const Tensor& t) { return std::make_pair(t.pow(3).sum(), t.exp()); },
                                func::has_aux)(x);
  expect_close(H, torch::diag(6 * x), 1e-10);
  expect_close(aux, x.exp(), 1e-12);
  expect_close(aux * 2, x.exp() * 2, 1e-12);  // aux is a plain tensor outside
  // argnums with has_aux
  Tensor y = torch::randn({3}, torch::kDouble);
  auto [Hy, aux2] = func::hessian([](const Tensor& a, const Tensor& b) { return std::make_pair((a * b * b).sum(), b); },
                                  func::argnum<1>, func::has_aux)(x, y);
  expect_close(Hy, torch::diag(2 * x), 1e-10);
  expect_close(aux2, y, 0);
}

// ---------------------------------------------------------------- fallback_report

TEST_F(TF, FallbackReportCountsAndModes) {
  // aten::take has no batching rule on 1.13 or 2.13: libtorch loops over the batch.
  Tensor xs = torch::randn({4, 5}, torch::kDouble);
  Tensor idx = torch::tensor({0, 3, 4});
  auto f = [&](const Tensor& x) { return torch::take(x, idx) + torch::take(x * 2, idx); };
  Tensor loop = torch::stack({f(xs[0]), f(xs[1]), f(xs[2]), f(xs[3])});
  auto calls_of = [](const std::string& op) {
    for (const auto& e : func::fallback_report())
      if (e.op == op) return e.calls;
    return int64_t{0};
  };
  func::reset_fallback_report();
  EXPECT_TRUE(func::fallback_report().empty());
  {
    FallbackLog log;  // Warn (the default): libtorch's warning is passed on
    expect_close(func::vmap(f)(xs), loop, 0);
    EXPECT_NE(log.ops.find("aten::take"), std::string::npos) << log.ops;
  }
  EXPECT_EQ(calls_of("aten::take"), 2);  // two batched calls (each looping over 4 samples)
  // Nested vmaps: the inner level's fallback calls take once per inner sample
  // on tensors still batched at the outer level, each an outer fallback:
  // 1 + 2 calls for a 2 x 2 batch.
  func::vmap(func::vmap([&](const Tensor& r) { return torch::take(r, torch::tensor({0})); }))(xs.view({2, 2, 5}));
  EXPECT_EQ(calls_of("aten::take"), 5);
  {
    const auto prev = func::set_fallback_mode(func::FallbackMode::Silent);
    EXPECT_EQ(prev, func::FallbackMode::Warn);
    FallbackLog log;
    expect_close(func::vmap(f)(xs), loop, 0);
    EXPECT_EQ(log.ops, "");
    EXPECT_EQ(calls_of("aten::take"), 7);
    func::set_fallback_mode(func::FallbackMode::Error);
    EXPECT_ERROR(func::vmap(f)(xs), "aten::take has no batching rule, so libtorch would run it once per sample");
    EXPECT_ERROR(func::vmap(func::grad([&](const Tensor& x) { return f(x).sum(); }))(xs), "torchfunc::vmap");
    // Ops with batching rules are unaffected.
    expect_close(func::vmap([](const Tensor& x) { return x.sin(); })(xs), xs.sin(), 0);
    func::set_fallback_mode(func::FallbackMode::Warn);
  }
  EXPECT_EQ(func::fallback_mode(), func::FallbackMode::Warn);
  expect_close(func::vmap(f)(xs), loop, 0);
  func::reset_fallback_report();
  EXPECT_EQ(calls_of("aten::take"), 0);
}

// ---------------------------------------------------------------- chunked jacfwd and hessian

TEST_F(TF, JacfwdAndHessianChunksEqualUnchunked) {
  Tensor x = torch::randn({7}, torch::kDouble), y = torch::randn({7}, torch::kDouble);
  auto f = [](const Tensor& a, const Tensor& b) { return torch::tanh(torch::outer(a, b)).sum(1) * a.exp(); };
  auto s = [](const Tensor& a) { return torch::outer(a, a.sin()).reshape({-1}).logsumexp(0); };
  const Tensor J = func::jacfwd(f)(x, y), H = func::hessian(s)(x);
  expect_close(J, func::jacrev(f)(x, y), 1e-12);  // (independent of chunking)
  for (int64_t cs : {1, 2, 3, 7, 100}) {
    SCOPED_TRACE("chunk_size " + std::to_string(cs));
    expect_close(func::jacfwd(f, func::JacfwdOptions().chunk_size(cs))(x, y), J, 1e-12);
    auto [Jx, Jy] = func::jacfwd(f, func::argnums<0, 1>, func::JacfwdOptions().chunk_size(cs))(x, y);
    expect_close(Jx, J, 1e-12);
    expect_close(Jy, func::jacfwd(f, func::argnum<1>)(x, y), 1e-12);
    expect_close(func::hessian(s, func::HessianOptions().chunk_size(cs))(x), H, 1e-12);
    auto [Ha, aux] = func::hessian([&](const Tensor& a) { return std::make_pair(s(a), a.cos()); }, func::has_aux,
                                   func::HessianOptions().chunk_size(cs))(x);
    expect_close(Ha, H, 1e-12);
    expect_close(aux, x.cos(), 0);
    // Under vmap and grad (the chunks are concatenated there, not copied).
    Tensor xs = torch::randn({3, 7}, torch::kDouble);
    Tensor hb = func::vmap(func::hessian(s, func::HessianOptions().chunk_size(cs)))(xs);
    for (int i = 0; i < 3; ++i) expect_close(hb[i], func::hessian(s)(xs[i]), 1e-12);
    Tensor g = func::grad([&](const Tensor& a) { return func::jacfwd(f, func::JacfwdOptions().chunk_size(cs))(a, y).sum(); })(x);
    expect_close(g, func::grad([&](const Tensor& a) { return func::jacfwd(f)(a, y).sum(); })(x), 1e-12);
  }
  EXPECT_ERROR(func::jacfwd(f, func::JacfwdOptions().chunk_size(0)), "torchfunc::jacfwd: Expected chunk_size to be a positive integer, but got 0");
  EXPECT_ERROR(func::hessian(s, func::HessianOptions().chunk_size(-1)), "torchfunc::hessian: Expected chunk_size to be a positive integer, but got -1");
}

TEST_F(TF, ChunkedVmapOutsideTransformsKeepsAutograd) {
  // Outside transforms chunks are copied into one result; plain autograd
  // through that result must equal autograd through the unchunked one.
  Tensor w = torch::randn({5, 3}, torch::kDouble).requires_grad_();
  Tensor xs = torch::randn({9, 3}, torch::kDouble);
  auto f = [&](const Tensor& x) { return torch::tanh(torch::mv(w, x)); };
  Tensor a = func::vmap(f, 0, 0, func::VmapOptions().chunk_size(4))(xs);
  auto ga = torch::autograd::grad({a.pow(2).sum()}, {w})[0];
  Tensor b = func::vmap(f)(xs);
  auto gb = torch::autograd::grad({b.pow(2).sum()}, {w})[0];
  expect_close(a, b, 1e-12);
  expect_close(ga, gb, 1e-12);
  // and out_dims other than 0, and an unbatched output, with chunks
  auto [p, q] = func::vmap([&](const Tensor& x) { return std::make_tuple(f(x), w.sum()); }, 0, func::out_dims(1, func::none),
                           func::VmapOptions().chunk_size(2))(xs);
  expect_close(p, b.t(), 1e-12);
  expect_close(q, w.sum(), 0);
}

// ---------------------------------------------------------------- rearrange

TEST_F(TF, RearrangeMatchesPermuteAndReshape) {
  Tensor x = torch::randn({2, 6, 4, 5}, torch::kDouble);
  expect_close(func::rearrange(x, "b c h w -> b (c h w)"), x.reshape({2, -1}), 0);
  expect_close(func::rearrange(x, "b c h w -> b h w c"), x.permute({0, 2, 3, 1}), 0);
  expect_close(func::rearrange(x, "b c h w -> (b c) h w"), x.reshape({12, 4, 5}), 0);
  // a composed left dimension with one inferred axis; given sizes checked
  expect_close(func::rearrange(x, "b (c1 c) h w -> b c h (w c1)", {{"c1", 2}}),
               x.view({2, 2, 3, 4, 5}).permute({0, 2, 3, 4, 1}).reshape({2, 3, 4, 10}), 0);
  expect_close(func::rearrange(x, "b (c1 c2) h w -> c2 c1 b h w", {{"c1", 3}, {"c2", 2}}),
               x.view({2, 3, 2, 4, 5}).permute({2, 1, 0, 3, 4}), 0);
  // ellipsis, unit dimensions
  expect_close(func::rearrange(x, "... w -> w ..."), x.movedim(-1, 0), 0);
  expect_close(func::rearrange(x, "b ... -> b (...)"), x.flatten(1), 0);
  expect_close(func::rearrange(x, "b c h w -> b 1 c h w ()"), x.unsqueeze(1).unsqueeze(-1), 0);
  expect_close(func::rearrange(x.unsqueeze(1), "b 1 c h w -> b c h w"), x, 0);
  expect_close(func::rearrange(x, "... -> ..."), x, 0);
  // Inside transforms: vmap over the batch equals the batched pattern;
  // grad through it is the inverse rearrangement of the cotangent.
  expect_close(func::vmap([](const Tensor& s) { return func::rearrange(s, "c h w -> (c h) w"); })(x),
               func::rearrange(x, "b c h w -> b (c h) w"), 0);
  Tensor wt = torch::randn({2, 4, 5, 6}, torch::kDouble);
  Tensor g = func::grad([&](const Tensor& s) { return (func::rearrange(s, "b c h w -> b h w c") * wt).sum(); })(x);
  expect_close(g, wt.permute({0, 3, 1, 2}), 0);
  const std::string p = "b c h w -> b (c h w)";
  EXPECT_ERROR(func::rearrange(x, "b c h w"), "torchfunc::rearrange(\"b c h w\"): expected exactly one '->'");
  EXPECT_ERROR(func::rearrange(x, "b c h -> b c h"), "the left side names 3 dimensions, but the tensor has 4");
  EXPECT_ERROR(func::rearrange(x, "b c h w -> b c h"), "axis 'w' is on the left side but not on the right");
  EXPECT_ERROR(func::rearrange(x, "b c h w -> b c h w z"), "axis 'z' is on the right side but not on the left");
  EXPECT_ERROR(func::rearrange(x, "b c c w -> b c w"), "axis 'c' appears twice on the left side");
  EXPECT_ERROR(func::rearrange(x, "b (c1 c2) h w -> b c1 c2 h w"), "more than one axis of unknown size ('c1' and 'c2')");
  EXPECT_ERROR(func::rearrange(x, "b (c1 c) h w -> b c1 c h w", {{"c1", 4}}),
               "the dimension (c1 c) has size 6, which is not a multiple of the product of its given sizes, 4");
  EXPECT_ERROR(func::rearrange(x, "b c h w -> b c h w", {{"c", 5}}), "axis 'c' has size 6 in the tensor but 5 in axes_lengths");
  EXPECT_ERROR(func::rearrange(x, "b c h w -> b c h w", {{"k", 5}}), "axes_lengths gives 'k', which the pattern does not use");
  EXPECT_ERROR(func::rearrange(x, "b ((c h) w) -> b c h w"), "nested parentheses on the left side");
  EXPECT_ERROR(func::rearrange(x, "b (c h w -> b c h w"), "'(' without ')' on the left side");
  EXPECT_ERROR(func::rearrange(x, "b c h w -> ... b c h w"), "'...' on the right side only");
  EXPECT_ERROR(func::rearrange(x, "b c 2w h -> b c h 2w"), "'2w' on the left side is not an axis name");
  EXPECT_ERROR(func::rearrange(x, "1 c h w -> c h w"), "'1' on the left side stands for a dimension of size 1, but dimension 0 has size 2");
  EXPECT_ERROR(func::rearrange(x, "b (...) -> b ..."), "'...' inside parentheses on the left side");
}
