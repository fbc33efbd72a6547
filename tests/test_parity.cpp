// Tests for functionalize (against eager results, and a dispatcher-level op
// log of what libtorch really runs), linear_transpose (closed forms and the
// inner-product identity), jacobian (closed forms, and which mode it picks,
// seen by counting calls of f) and vmap's sequential_fallback (against loops
// of single-sample calls).
#include "common.h"

#include <ATen/FunctionalTensorWrapper.h>
#include <ATen/record_function.h>
#include <ATen/core/dispatch/Dispatcher.h>

namespace {

// ---------------------------------------------------------------- functionalize

struct LoggedOp {
  std::string name;
  bool mutates = false;  // the schema writes to an argument
  bool aliases = false;  // the schema returns a view of an argument
};
thread_local std::vector<LoggedOp>* t_log = nullptr;
thread_local int t_plain_depth = 0;  // plain-input ops running now: ops they call are their own business

struct PlainOp : at::ObserverContext {};

std::unique_ptr<at::ObserverContext> log_start(const at::RecordFunction& fn) {
  if (!t_log) return nullptr;
  auto name = fn.operator_name();
  if (!name) return nullptr;
  for (const auto& v : fn.inputs()) {
    if (!v.isTensor() || !v.toTensor().defined()) continue;
    const at::Tensor& t = v.toTensor();
    // The call on the wrappers (functionalization rewrites it), or its shape
    // check on meta tensors (computes nothing).
    if (at::functionalization::impl::isFunctionalTensor(t) || t.is_meta()) return nullptr;
  }
  if (t_plain_depth++ == 0) {
    auto op = c10::Dispatcher::singleton().findOp(*name);
    if (op) {
      const auto& schema = op->schema();
      LoggedOp e{name->name + (name->overload_name.empty() ? "" : "." + name->overload_name), schema.is_mutable(),
                 false};
      for (const auto& r : schema.returns()) e.aliases = e.aliases || r.alias_info() != nullptr;
      t_log->push_back(e);
    }
  }
  return std::make_unique<PlainOp>();
}

void log_end(const at::RecordFunction&, at::ObserverContext* ctx) {
  if (ctx) --t_plain_depth;
}

/// Records the ops that reach libtorch's kernels below functionalization:
/// calls whose Tensor arguments are all plain (not functional wrappers, not
/// meta tensors) and
/// that no other such call made (a kernel's own internal ops are its
/// business), on this thread while alive.
class OpLog {
 public:
  OpLog() {
    t_log = &ops;
    handle_ = at::addThreadLocalCallback(
        at::RecordFunctionCallback(&log_start, &log_end).needsInputs(true).scopes({at::RecordScope::FUNCTION}));
  }
  ~OpLog() {
    at::removeCallback(handle_);
    t_log = nullptr;
  }
  std::vector<LoggedOp> ops;

 private:
  at::CallbackHandle handle_;
};

// Mutates intermediates, a view of one, and its input x.
Tensor mutating(Tensor x) {
  Tensor y = x.clone();
  y.add_(1);
  Tensor v = y.view({-1});
  v.mul_(2);  // through a view: y changes too
  y.select(0, 0).sub_(0.5);
  x.mul_(3);
  return torch::sin(y) + x;
}

Tensor mutating_ref(const Tensor& x0) {
  Tensor x = x0.clone();
  return mutating(x);
}

TEST_F(TF, FunctionalizeGivesEagerResultsAndCopiesInputMutationsBack) {
  Tensor x0 = torch::randn({3, 4}, torch::kDouble);
  for (auto remove : {func::Remove::Mutations, func::Remove::MutationsAndViews}) {
    Tensor x = x0.clone(), xe = x0.clone();
    const void* impl = x.unsafeGetTensorImpl();
    Tensor y = func::functionalize(mutating, func::FunctionalizeOptions().remove(remove))(x);
    Tensor ye = mutating(xe);
    expect_close(y, ye, 0);
    expect_close(x, xe, 0);  // x.mul_(3) reached the caller's tensor
    EXPECT_EQ(x.unsafeGetTensorImpl(), impl);
    EXPECT_FALSE(at::functionalization::impl::isFunctionalTensor(y));
  }
  // An input f does not mutate keeps its data.
  Tensor a = torch::randn({5}), a_copy = a.clone();
  Tensor r = func::functionalize([](const Tensor& t) { Tensor u = t * 2; u.add_(1); return u; })(a);
  expect_close(r, a_copy * 2 + 1, 0);
  expect_close(a, a_copy, 0);
  // A mutation through a view of an input, and a resize of an empty input.
  Tensor b = torch::zeros({2, 3});
  func::functionalize([](Tensor t) { t.select(1, 2).fill_(7); return t.sum(); })(b);
  EXPECT_EQ(b.select(1, 2).sum().item<double>(), 14.0);
  EXPECT_EQ(b.sum().item<double>(), 14.0);
  Tensor e = torch::empty({0});
  func::functionalize([](Tensor t) { t.resize_({2}); t.fill_(3); return t; })(e);
  ASSERT_EQ(e.sizes(), (std::vector<int64_t>{2}));
  expect_close(e, torch::full({2}, 3.0), 0);
}

TEST_F(TF, FunctionalizeRunsNoInPlaceOpAndWithViewsRemovedNoView) {
  // The log is taken inside f, so it holds exactly what f's ops became.
  auto logged = [](std::vector<LoggedOp>& into) {
    return [&into](Tensor x) {
      OpLog log;
      Tensor r = mutating(x);
      into = log.ops;
      return r;
    };
  };
  auto names = [](const std::vector<LoggedOp>& ops, bool mut, bool alias) {
    std::string s;
    for (const auto& e : ops)
      if ((mut && e.mutates) || (alias && e.aliases)) s += e.name + " ";
    return s;
  };
  std::vector<LoggedOp> eager, mutations, views;
  logged(eager)(torch::randn({3, 4}));
  // The log sees in-place ops and views when nothing removes them: it can fail.
  EXPECT_NE(names(eager, true, false).find("add_"), std::string::npos) << names(eager, true, false);
  EXPECT_NE(names(eager, false, true), "");
  func::functionalize(logged(mutations))(torch::randn({3, 4}));
  EXPECT_GT(mutations.size(), 5u);
  EXPECT_EQ(names(mutations, true, false), "") << "in-place ops reached libtorch under functionalize";
  EXPECT_NE(names(mutations, false, true), "") << "Remove::Mutations keeps views";
  func::functionalize(logged(views), func::FunctionalizeOptions().remove(func::Remove::MutationsAndViews))(
      torch::randn({3, 4}));
  EXPECT_EQ(names(views, true, true), "") << "mutations or views reached libtorch under MutationsAndViews";
}

TEST_F(TF, FunctionalizeComposesWithVmapGradJvp) {
  Tensor xs = torch::randn({5, 3, 4}, torch::kDouble);
  // vmap(functionalize(f)): per sample, including the copy back into xs.
  {
    Tensor x = xs.clone(), loop = xs.clone();
    Tensor y = func::vmap(func::functionalize(mutating))(x);
    for (int64_t i = 0; i < 5; ++i) {
      Tensor xi = loop[i];
      expect_close(y[i], mutating(xi), 1e-12);
    }
    expect_close(x, loop, 1e-12);
  }
  // functionalize(vmap(f)) (f must not mutate a batched input in place
  // with an unbatched value; mutating does not).
  {
    Tensor x = xs.clone(), ref = xs.clone();
    Tensor y = func::functionalize(func::vmap(mutating))(x);
    Tensor ye = func::vmap(mutating)(ref);
    expect_close(y, ye, 1e-12);
    expect_close(x, ref, 1e-12);
  }
  // grad(functionalize(f)) against torch::autograd on the eager f.
  auto loss = [](const Tensor& x) { return mutating_ref(x).pow(2).sum(); };
  Tensor x = xs[0].clone();
  Tensor gref = autograd_grad(loss, x);
  expect_close(func::grad(func::functionalize(loss))(x), gref, 1e-12);
  expect_close(func::functionalize(func::grad(loss))(x), gref, 1e-12);
  // Hessian through functionalize, against finite differences of the gradient.
  auto g = [&](const Tensor& t) {
    torch::AutoGradMode on(true);  // fd_jacobian turns it off
    return autograd_grad(loss, t);
  };
  expect_close(func::hessian(func::functionalize(loss))(x), fd_jacobian(g, x), 1e-6);
  // jvp(functionalize(f)) against finite differences.
  Tensor t = torch::randn_like(x);
  auto [out, tan] = func::jvp(func::functionalize(mutating_ref), std::tuple{x}, std::tuple{t});
  expect_close(out, mutating_ref(x), 1e-12);
  const double eps = 1e-6;
  expect_close(tan, (mutating_ref(x + eps * t) - mutating_ref(x - eps * t)) / (2 * eps), 1e-6);
  // Nested: functionalize(functionalize(f)) (torch.func 2.13 fails an
  // internal assert here).
  Tensor a = xs[1].clone(), b = xs[1].clone();
  expect_close(func::functionalize(func::functionalize(mutating))(a), mutating(b), 1e-12);
  expect_close(a, b, 1e-12);
}

TEST_F(TF, FunctionalizeErrorLeavesInputsAndStateAlone) {
  Tensor x = torch::randn({4}), x0 = x.clone();
  auto bad = [](Tensor t) {
    t.add_(1);  // not yet copied back when f fails
    TORCH_CHECK(false, "user error inside f");
    return t;
  };
  EXPECT_ERROR(func::functionalize(bad)(x), "user error inside f");
  expect_close(x, x0, 0);
  EXPECT_ERROR(func::vmap(func::functionalize(bad))(torch::randn({3, 4})), "user error inside f");
}

// ---------------------------------------------------------------- linear_transpose

TEST_F(TF, LinearTransposeMatchesClosedForms) {
  Tensor A = torch::randn({5, 3}, torch::kDouble), B = torch::randn({5, 2}, torch::kDouble);
  Tensor x = torch::randn({3}, torch::kDouble), y = torch::randn({2}, torch::kDouble);
  Tensor c = torch::randn({5}, torch::kDouble);
  auto t1 = func::linear_transpose([&](const Tensor& v) { return A.mv(v); }, x);
  auto [g] = t1(c);
  expect_close(g, A.t().mv(c), 1e-12);
  // Two primals, two outputs in a tuple.
  auto f2 = [&](const Tensor& u, const Tensor& v) { return std::make_tuple(A.mv(u) + B.mv(v), u.sum() * 2); };
  auto t2 = func::linear_transpose(f2, x, y);
  Tensor s = torch::randn({}, torch::kDouble);
  auto [gu, gv] = t2(std::make_tuple(c, s));
  expect_close(gu, A.t().mv(c) + 2 * s, 1e-12);
  expect_close(gv, B.t().mv(c), 1e-12);
  // A convolution: <f(x), c> == <x, f^T(c)> for random x and c.
  Tensor w = torch::randn({4, 2, 3, 3});
  Tensor img = torch::randn({1, 2, 8, 8});
  auto conv = [&](const Tensor& t) { return torch::conv2d(t, w, {}, 1, 1); };
  auto tc = func::linear_transpose(conv, img);
  Tensor ct = torch::randn({1, 4, 8, 8});
  auto [gi] = tc(ct);
  EXPECT_NEAR((conv(img) * ct).sum().item<double>(), (img * gi).sum().item<double>(), 1e-3);
  // Callable again, and under vmap (a batch of cotangents) against a loop.
  Tensor cs = torch::randn({6, 5}, torch::kDouble);
  auto batched = func::vmap([&](const Tensor& ci) { return std::get<0>(t1(ci)); })(cs);
  for (int64_t i = 0; i < 6; ++i) expect_close(batched[i], A.t().mv(cs[i]), 1e-12);
  // The transpose of the transpose is f.
  auto tt = func::linear_transpose([&](const Tensor& ci) { return std::get<0>(t1(ci)); }, c);
  expect_close(std::get<0>(tt(x)), A.mv(x), 1e-12);
  // float32 and a large matmul pass the linearity check (no false alarm).
  Tensor M = torch::randn({512, 512});
  auto tm = func::linear_transpose([&](const Tensor& v) { return M.matmul(v); }, torch::randn({512, 8}));
  Tensor cm = torch::randn({512, 8});
  expect_close(std::get<0>(tm(cm)), M.t().matmul(cm), 1e-3);
  // Inside grad: d/dA of <A^T c, x> = outer(c, x).
  auto through = [&](const Tensor& Aw) {
    auto t = func::linear_transpose([&](const Tensor& v) { return Aw.mv(v); }, x);
    return (std::get<0>(t(c)) * x).sum();
  };
  expect_close(func::grad(through)(A), torch::outer(c, x), 1e-12);
}

TEST_F(TF, LinearTransposeRejectsNonlinearAndAffineFunctions) {
  Tensor x = torch::randn({3});
  Tensor A = torch::randn({4, 3}), b = torch::randn({4});
  EXPECT_ERROR(func::linear_transpose([&](const Tensor& v) { return A.mv(v) + b; }, x),
               "linear_transpose(f, *primals): f is not linear in its inputs: f(0) is not zero at output 0");
  EXPECT_ERROR(func::linear_transpose([](const Tensor& v) { return v * v; }, x),
               "linear_transpose(f, *primals): f is not linear in its inputs: at output 0, f(a*x + y) differs");
  EXPECT_ERROR(func::linear_transpose([](const Tensor& v) { return v.relu(); }, x), "is not linear");
  // Skipping the check: the vjp at zero (here of a nonlinear f: its
  // derivative at 0, documented behaviour).
  auto t = func::linear_transpose([](const Tensor& v) { return torch::sin(v); },
                                  func::LinearTransposeOptions().check_linear(false), x);
  expect_close(std::get<0>(t(torch::ones({3}))), torch::ones({3}), 1e-6);
  // A cotangent of the wrong shape names transpose_fn.
  auto t2 = func::linear_transpose([&](const Tensor& v) { return A.mv(v); }, x);
  EXPECT_ERROR(t2(torch::ones({5})), "linear_transpose(f, *primals): transpose_fn(cotangents): Expected");
  // The user's random stream is untouched by the check.
  torch::manual_seed(3);
  Tensor r1 = torch::randn({4});
  torch::manual_seed(3);
  func::linear_transpose([&](const Tensor& v) { return A.mv(v); }, x);
  expect_close(torch::randn({4}), r1, 0);
}

// ---------------------------------------------------------------- jacobian

TEST_F(TF, JacobianPicksTheModeByTheRuleAndMatchesClosedForms) {
  EXPECT_EQ(func::jacobian_mode(10, 3), func::JacobianMode::Reverse);
  EXPECT_EQ(func::jacobian_mode(3, 100), func::JacobianMode::Forward);
  EXPECT_EQ(func::jacobian_mode(10, 15), func::JacobianMode::Reverse);
  EXPECT_EQ(func::jacobian_mode(10, 16), func::JacobianMode::Forward);
  // f(x) = tanh(W x): J = diag(1 - tanh(Wx)^2) W. Calls of f show the mode:
  // reverse mode runs f once (its vjp), forward mode once more (under vmap).
  for (auto [in, out] : {std::pair<int64_t, int64_t>{8, 2}, {2, 8}}) {
    Tensor W = torch::randn({out, in}, torch::kDouble), x = torch::randn({in}, torch::kDouble);
    int calls = 0;
    auto f = [&](const Tensor& v) {
      ++calls;
      return torch::tanh(W.mv(v));
    };
    Tensor J = func::jacobian(f)(x);
    Tensor ref = (1 - torch::tanh(W.mv(x)).pow(2)).unsqueeze(1) * W;
    expect_close(J, ref, 1e-12);
    const bool reverse = func::jacobian_mode(in, out) == func::JacobianMode::Reverse;
    EXPECT_EQ(calls, reverse ? 1 : 2) << in << " -> " << out;
    for (auto mode : {func::JacobianMode::Forward, func::JacobianMode::Reverse}) {
      calls = 0;
      expect_close(func::jacobian(f, func::JacobianOptions().mode(mode).chunk_size(3))(x), ref, 1e-12);
    }
  }
  // argnums, has_aux and pytrees, as jacrev.
  Tensor a = torch::randn({3}, torch::kDouble), b = torch::randn({3}, torch::kDouble);
  auto g = [](const Tensor& u, const Tensor& v) { return std::make_pair(u * v, u.sum()); };
  auto [jab, aux] = func::jacobian(g, func::argnums<0, 1>, func::has_aux)(a, b);
  expect_close(std::get<0>(jab), torch::diag(b), 1e-12);
  expect_close(std::get<1>(jab), torch::diag(a), 1e-12);
  expect_close(aux, a.sum(), 1e-12);
  EXPECT_ERROR(func::jacobian(g, func::JacobianOptions().chunk_size(0)), "torchfunc::jacobian: Expected chunk_size");
  EXPECT_ERROR(func::jacobian([](const Tensor& v) { return v.sin(); })(torch::randn({2}, torch::kComplexFloat)),
               "jacobian(f, ...)(*args): Expected all inputs to be real");
}

// ---------------------------------------------------------------- sequential_fallback

func::VmapOptions seq() { return func::VmapOptions().sequential_fallback(true); }

TEST_F(TF, SequentialFallbackRunsDataDependentFunctionsPerSample) {
  func::reset_fallback_report();
  Tensor xs = torch::randn({6, 4}, torch::kDouble);
  auto item = [](const Tensor& x) { return x * x.sum().item<double>(); };
  auto branch = [](const Tensor& x) { return x.sum().item<double>() > 0 ? x.sin() : x.cos() * 2; };
  auto count = [](const Tensor& x) { return x * (x > 0).nonzero().size(0); };
  auto equal = [](const Tensor& x, const Tensor& y) { return torch::equal(x, y) ? x : x - y; };
  EXPECT_ERROR(func::vmap(item)(xs), "calling .item() on a Tensor");
  EXPECT_ERROR(func::vmap(count)(xs), "dynamic shape");
  for (auto cs : {c10::optional<int64_t>{}, c10::optional<int64_t>{4}}) {
    auto o = seq().chunk_size(cs);
    Tensor a = func::vmap(item, o)(xs), b = func::vmap(branch, o)(xs), c = func::vmap(count, o)(xs);
    Tensor ys = xs.clone();
    ys[2] = xs[2];
    ys[3] += 1;
    Tensor d = func::vmap(equal, o)(xs, ys);
    for (int64_t i = 0; i < 6; ++i) {
      expect_close(a[i], item(xs[i]), 0);
      expect_close(b[i], branch(xs[i]), 0);
      expect_close(c[i], count(xs[i]), 0);
      expect_close(d[i], equal(xs[i], ys[i]), 0);
    }
    // out_dims and in_dims other than 0.
    Tensor e = func::vmap(item, func::in_dims(1), 1, o)(xs.t());
    for (int64_t i = 0; i < 6; ++i) expect_close(e.select(1, i), item(xs[i]), 0);
  }
  bool found = false;
  for (const auto& e : func::fallback_report()) found = found || e.op == "vmap sequential fallback: .item()";
  EXPECT_TRUE(found);
  // A function that batches is not looped over.
  func::reset_fallback_report();
  expect_close(func::vmap([](const Tensor& x) { return x.sin(); }, seq())(xs), xs.sin(), 0);
  EXPECT_TRUE(func::fallback_report().empty());
}

TEST_F(TF, SequentialFallbackComposesWithGradAndRandomness) {
  // Per-sample gradients of a loss with data-dependent control flow.
  Tensor w = torch::randn({4}, torch::kDouble), xs = torch::randn({5, 4}, torch::kDouble);
  auto loss = [](const Tensor& w, const Tensor& x) {
    Tensor z = (w * x).sum();
    return z.item<double>() > 0 ? z.pow(2) : z.sin();
  };
  Tensor g = func::vmap(func::grad(loss), func::in_dims(func::none, 0), seq())(w, xs);
  for (int64_t i = 0; i < 5; ++i)
    expect_close(g[i], autograd_grad([&](const Tensor& t) { return loss(t, xs[i]); }, w), 1e-12);
  // grad of a vmap that loops.
  auto total = [&](const Tensor& w) {
    return func::vmap(loss, func::in_dims(func::none, 0), seq())(w, xs).sum();
  };
  Tensor ref = torch::zeros_like(w);
  for (int64_t i = 0; i < 5; ++i) ref += autograd_grad([&](const Tensor& t) { return loss(t, xs[i]); }, w);
  expect_close(func::grad(total)(w), ref, 1e-12);
  // Randomness: different draws per sample, or the same for every sample.
  auto noisy = [](const Tensor& x) { return x * x.sum().item<double>() + torch::randn({4}, x.options()); };
  Tensor diff = func::vmap(noisy, seq().randomness(func::Randomness::Different))(xs);
  Tensor same = func::vmap(noisy, seq().randomness(func::Randomness::Same))(xs);
  for (int64_t i = 1; i < 5; ++i) {
    Tensor noise_i = same[i] - xs[i] * xs[i].sum().item<double>();
    Tensor noise_0 = same[0] - xs[0] * xs[0].sum().item<double>();
    expect_close(noise_i, noise_0, 1e-12);
    Tensor dn_i = diff[i] - xs[i] * xs[i].sum().item<double>();
    Tensor dn_0 = diff[0] - xs[0] * xs[0].sum().item<double>();
    EXPECT_GT((dn_i - dn_0).abs().max().item<double>(), 1e-3);
  }
  EXPECT_ERROR(func::vmap(noisy, seq())(xs), "randomness");  // error mode: not a data-dependent failure
}

TEST_F(TF, SequentialFallbackErrors) {
  Tensor xs = torch::randn({3, 4});
  // Errors that are not about data dependence still raise.
  EXPECT_ERROR(func::vmap([](const Tensor& x) { return x.matmul(torch::ones({5})); }, seq())(xs), "");
  // Per-sample shapes that differ cannot be stacked.
  Tensor ys = torch::tensor({{1.0, 0.0}, {1.0, 1.0}, {0.0, 0.0}});
  EXPECT_ERROR(func::vmap([](const Tensor& y) { return y.nonzero(); }, seq())(ys),
               "vmap(f, in_dims=0, out_dims=0, sequential_fallback=true): with sequential_fallback, output 0 of f has "
               "shape");
  // FallbackMode::Error forbids the loop.
  auto prev = func::set_fallback_mode(func::FallbackMode::Error);
  EXPECT_ERROR(func::vmap([](const Tensor& x) { return x * x.sum().item<float>(); }, seq())(xs),
               "vmap sequential fallback: .item(): f ran once per sample; this is an error because "
               "set_fallback_mode(FallbackMode::Error)");
  func::set_fallback_mode(prev);
}

}  // namespace
