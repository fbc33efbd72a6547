// The torch.func "whirlwind tour", snippet by snippet, in C++.
// Every snippet checks the assertion the tutorial makes; the program exits
// non-zero if any fails.
#include <torch/torch.h>
#include <torchfunc/torchfunc.h>

#include <cstdio>

namespace func = torchfunc;
using torch::Tensor;

static int failures = 0;
static void check(bool ok, const char* what) {
  std::printf("  [%s] %s\n", ok ? "ok" : "FAILED", what);
  if (!ok) ++failures;
}

int main() {
  torch::manual_seed(0);

  std::puts("grad: gradient of sin is cos");
  Tensor x = torch::randn({});
  Tensor cos_x = func::grad([](const Tensor& t) { return torch::sin(t); })(x);
  check(torch::allclose(cos_x, x.cos()), "grad(sin)(x) == cos(x)");

  std::puts("grad of grad: second derivative");
  Tensor neg_sin_x = func::grad(func::grad([](const Tensor& t) { return torch::sin(t); }))(x);
  check(torch::allclose(neg_sin_x, -x.sin()), "grad(grad(sin))(x) == -sin(x)");

  std::puts("vmap of a model over a batch");
  const int64_t batch_size = 3, feature_size = 5;
  Tensor weights = torch::randn({feature_size}, torch::requires_grad());
  auto model = [&](const Tensor& feature_vec) {
    TORCH_CHECK(feature_vec.dim() == 1, "model sees one sample at a time");
    return feature_vec.dot(weights).relu();
  };
  Tensor examples = torch::randn({batch_size, feature_size});
  Tensor result = func::vmap(model)(examples);
  bool same = result.size(0) == batch_size;
  for (int64_t i = 0; i < batch_size; ++i) same = same && torch::allclose(result[i], model(examples[i]));
  check(same, "vmap(model)(examples) == [model(e) for e in examples]");

  std::puts("per-sample gradients: vmap(grad(loss), in_dims=(none, 0, 0))");
  auto compute_loss = [](const Tensor& w, const Tensor& example, const Tensor& target) {
    Tensor y = example.dot(w).relu();
    return (y - target).pow(2).mean();
  };
  Tensor targets = torch::randn({batch_size});
  Tensor w0 = weights.detach();
  Tensor per_example = func::vmap(func::grad(compute_loss), func::in_dims(func::none, 0, 0))(w0, examples, targets);
  bool psg = per_example.sizes() == torch::IntArrayRef({batch_size, feature_size});
  for (int64_t i = 0; i < batch_size; ++i) {
    Tensor wr = w0.clone().requires_grad_(true);
    Tensor g = torch::autograd::grad({compute_loss(wr, examples[i], targets[i])}, {wr})[0];
    psg = psg && torch::allclose(per_example[i], g);
  }
  check(psg, "per-sample gradients equal single-sample backward passes");

  std::puts("vjp");
  Tensor x5 = torch::randn({5});
  auto f = [](const Tensor& t) { return t.sin().sum(); };
  auto [out, vjp_fn] = func::vjp(f, x5);
  Tensor g_vjp = std::get<0>(vjp_fn(torch::tensor(1.f)));
  check(torch::allclose(g_vjp, func::grad(f)(x5)), "vjp_fn(1)[0] == grad(f)(x)");

  std::puts("jvp");
  Tensor scale = torch::tensor({1.f, 2.f, 3.f, 4.f, 5.f});
  auto [y, jvp_out] = func::jvp([&](const Tensor& t) { return t * scale; }, std::tuple{x5}, std::tuple{torch::ones({5})});
  check(torch::allclose(jvp_out, scale), "jvp(f, (x,), (ones,)) == [1, 2, 3, 4, 5]");

  std::puts("jacrev");
  auto sin = [](const Tensor& t) { return torch::sin(t); };
  Tensor J = func::jacrev(sin)(x5);
  check(torch::allclose(J, torch::diag(torch::cos(x5))), "jacrev(sin)(x) == diag(cos(x))");

  std::puts("vmap(jacrev)");
  Tensor xb = torch::randn({64, 5});
  Tensor Jb = func::vmap(func::jacrev(sin))(xb);
  check(Jb.sizes() == torch::IntArrayRef({64, 5, 5}), "vmap(jacrev(sin))(x).shape == [64, 5, 5]");

  std::puts("jacfwd");
  Tensor Jf = func::jacfwd(sin)(x5);
  check(torch::allclose(Jf, torch::diag(torch::cos(x5))), "jacfwd(sin)(x) == diag(cos(x))");

  std::puts("hessian");
  Tensor h0 = func::jacrev(func::jacrev(f))(x5);
  Tensor h1 = func::hessian(f)(x5);
  Tensor h2 = func::jacfwd(func::jacrev(f))(x5);
  check(torch::allclose(h0, h1), "jacrev(jacrev(f))(x) == hessian(f)(x)");
  check(torch::allclose(h2, h1), "jacfwd(jacrev(f))(x) == hessian(f)(x)");
  check(torch::allclose(h1, torch::diag(-x5.sin())), "hessian(sum(sin))(x) == diag(-sin(x))");

  std::puts("beyond torch.func: has_aux for hessian and linearize (as in JAX)");
  auto f_aux = [](const Tensor& t) { return std::make_pair(t.sin().sum(), t.cos()); };
  auto [h3, aux] = func::hessian(f_aux, func::has_aux)(x5);
  check(torch::allclose(h3, h1) && torch::allclose(aux, x5.cos()), "hessian(f, has_aux)(x) == {H, aux}");
  Tensor v5 = torch::randn({5});
  auto [lin_out, jvp_fn, lin_aux] = func::linearize(f_aux, func::has_aux, x5);
  check(torch::allclose(jvp_fn(v5), (x5.cos() * v5).sum()) && torch::allclose(lin_aux, x5.cos()),
        "linearize(f, has_aux, x) gives jvp_fn(v) == <cos x, v> and the aux");

  std::puts("vmap with nothing mapped: axis_size (as in JAX)");
  Tensor draws = func::vmap([](const Tensor& w) { return w + torch::randn_like(w); }, func::none, 0,
                            func::VmapOptions().axis_size(4).randomness(func::Randomness::Different))(x5);
  check(draws.sizes() == torch::IntArrayRef({4, 5}) && !torch::equal(draws[0], draws[1]),
        "vmap(noisy, none, axis_size=4)(w): 4 different draws");

  std::puts("debug_unwrap: what a transform sees");
  func::vmap([&](const Tensor& t) {
    check(func::debug_unwrap(t).sizes() == xb.sizes(), "inside vmap, debug_unwrap(x) is the whole batch");
    return t;
  })(xb);

  std::puts("rearrange (einops patterns, as torch.func's functorch.einops)");
  Tensor img = torch::randn({2, 3, 4, 4});
  check(torch::equal(func::rearrange(img, "b c h w -> b (c h w)"), img.reshape({2, 48})),
        "rearrange(x, \"b c h w -> b (c h w)\") == x.reshape(b, -1)");
  Tensor per_image = func::vmap([](const Tensor& one) { return func::rearrange(one, "c (h1 h) w -> h (w h1) c", {{"h1", 2}}); })(img);
  check(torch::equal(per_image, func::rearrange(img, "b c (h1 h) w -> b h (w h1) c", {{"h1", 2}})),
        "vmap(rearrange) == rearrange of the batch");

  std::puts("jvp strict and vjp_fn options (as in torch.func)");
  bool refused = false;
  try {
    func::jvp([](const Tensor&) { return torch::ones({2}); }, std::tuple{x5}, std::tuple{v5},
              func::JvpOptions().strict(true));
  } catch (const c10::Error&) {
    refused = true;
  }
  check(refused, "jvp(strict=true) refuses an output that does not depend on the primals");
  auto [y5, vjp_fn5] = func::vjp(sin, x5);
  auto [g5] = vjp_fn5(torch::ones({5}), func::VjpFnOptions().retain_graph(false));
  check(torch::allclose(g5, x5.cos()), "vjp_fn(ct, retain_graph=false) == cos(x), then the graph is freed");

  std::puts("functionalize: in-place ops removed, argument mutations copied back (as torch.func)");
  Tensor buf = torch::zeros({5});
  auto step = [](Tensor b, const Tensor& t) {
    b.mul_(0.5).add_(t);  // runs as mul + add; b is updated at the end
    return b.sum();
  };
  Tensor total = func::functionalize(step)(buf, x5);
  check(torch::allclose(buf, x5) && torch::allclose(total, x5.sum()), "functionalize(step)(buf, x) updates buf");
  Tensor gs = func::vmap(func::grad(func::functionalize([](const Tensor& t) {
    Tensor u = t.clone();
    u.mul_(u);
    return u.sum();
  })))(xb);
  check(torch::allclose(gs, 2 * xb), "vmap(grad(functionalize(x -> sum(x *= x)))) == 2x");

  std::puts("beyond torch.func: linear_transpose (as in JAX)");
  Tensor A = torch::randn({3, 5});
  auto At = func::linear_transpose([&](const Tensor& t) { return A.mv(t); }, x5);
  Tensor c3 = torch::randn({3});
  check(torch::allclose(std::get<0>(At(c3)), A.t().mv(c3)), "linear_transpose(x -> A x)(c) == A^T c");

  std::puts("beyond torch.func: jacobian picks forward or reverse mode by size");
  Tensor Jw = func::jacobian([&](const Tensor& t) { return A.mv(t).tanh(); })(x5);
  check(torch::allclose(Jw, func::jacrev([&](const Tensor& t) { return A.mv(t).tanh(); })(x5)) &&
            func::jacobian_mode(5, 3) == func::JacobianMode::Reverse,
        "jacobian(f)(x) == jacrev(f)(x), by reverse mode for 5 inputs and 3 outputs");

  std::puts("beyond torch.func: vmap's sequential fallback for data-dependent code");
  auto branchy = [](const Tensor& t) { return t.sum().item<double>() > 0 ? t.sin() : t.cos(); };
  Tensor ys = func::vmap(branchy, func::VmapOptions().sequential_fallback(true))(xb);
  check(torch::allclose(ys[3], branchy(xb[3])), "vmap(f with .item() and a branch, sequential_fallback)(x)[i] == f(x[i])");

  std::printf("%s\n", failures ? "SOME CHECKS FAILED" : "all checks passed");
  return failures ? 1 : 0;
}
