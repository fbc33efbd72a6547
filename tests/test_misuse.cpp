// The bad-input catalogue: every misuse of every transform, the error it
// gets, one row each. Each row runs here and must raise a c10::Error whose
// message contains the catalogued text (and names the transform), leaving the
// thread's transform state and the module as they were. docs/ERRORS.md is
// this table (plus the compile-time rows of tests/compile_fail): a test
// checks that the two agree, and regenerates it on request:
//   TORCHFUNC_WRITE_ERRORS_DOC=docs/ERRORS.md build/tests/torchfunc_tests --gtest_filter='Misuse.*'
#include <cstdlib>
#include <fstream>
#include <map>
#include <regex>
#include <sstream>

#include "common.h"

namespace nn = torch::nn;
using func::TensorDict;

namespace {

struct Misuse {
  std::string transform;  // the API, as the table's first column
  std::string misuse;     // what the user did
  std::string message;    // what the error says (a part of it)
  std::function<void()> call;
  std::string message_1_13 = "";  // where libtorch 1.13 words it differently (not naming the transform)
};

/// A module for the functional_call rows: a submodule, a buffer, tied weights.
struct TiedImpl : nn::Module {
  TiedImpl() {
    lin = register_module("lin", nn::Linear(3, 3));
    w_tied = register_parameter("w_tied", lin->weight);
    register_buffer("steps", torch::zeros({1}));
    static const bool registered = (func::register_module_members<TiedImpl>(&TiedImpl::w_tied), true);
    (void)registered;
  }
  Tensor forward(const Tensor& x) { return lin(x) + torch::mv(w_tied, x); }
  nn::Linear lin{nullptr};
  Tensor w_tied;
};
TORCH_MODULE(Tied);

Tied& shared_module() {
  static Tied m;
  return m;
}

std::vector<Misuse> catalogue() {
  const Tensor x = torch::randn({3}), xs = torch::randn({4, 3}), ys = torch::randn({5, 3});
  auto id = [](const Tensor& t) { return t; };
  auto add = [](const Tensor& a, const Tensor& b) { return a + b; };
  auto sum = [](const Tensor& t) { return t.sin().sum(); };
  Tied m = shared_module();
  TensorDict params = func::named_parameters(m);
  std::vector<Misuse> r;
  auto row = [&](std::string t, std::string what, std::string msg, std::function<void()> call) {
    r.push_back({std::move(t), std::move(what), std::move(msg), std::move(call)});
  };

  // ---- vmap: in_dims
  row("vmap", "in_dims has more entries than f has arguments", "in_dims is not compatible with the structure of args: it has 2 elements but the in_dims entry for it is (0, 0, 0)",
      [=] { func::vmap(add, func::in_dims(0, 0, 0))(xs, xs); });
  row("vmap", "in_dim out of range for an argument", "Got in_dim=2 for args[1], but that input is a Tensor of dimensionality 2 so expected in_dim to satisfy -2 <= in_dim < 2",
      [=] { func::vmap(add, func::in_dims(0, 2))(xs, xs); });
  row("vmap", "negative in_dim out of range", "Got in_dim=-3 for args[0], but that input is a Tensor of dimensionality 2",
      [=] { func::vmap(id, -3)(xs); });
  row("vmap", "in_dims sequence against a container of another length",
      "it has 2 elements but the in_dims entry for it is (0,)",
      [=] { func::vmap([](const std::vector<Tensor>& v) { return v[0]; }, func::in_dims(func::Dims{0}))(std::vector<Tensor>{xs, xs}); });
  row("vmap", "nested in_dims entry for a Tensor argument", "nested entry",
      [=] { func::vmap(id, func::in_dims(func::Dims::dict({{"w", 0}})))(xs); });
  row("vmap", "in_dims dict key the argument does not have", "in_dims is not compatible with the structure of args[0]: it has keys ['a'] but the in_dims entry for it is {'a': 0, 'b': 0}",
      [=] {
        func::vmap([](const TensorDict& d) { return d["a"]; }, func::in_dims(func::Dims::dict({{"a", 0}, {"b", 0}})))(
            TensorDict{{"a", xs}});
      });
  row("vmap", "an int in_dim for a non-Tensor argument", "Got in_dim=0 for args[1], which is not a Tensor",
      [=] { func::vmap([](const Tensor& a, int) { return a; })(xs, 3); });
  row("vmap", "every in_dim is none", "Expected at least one Tensor to vmap over",
      [=] { func::vmap(add, func::in_dims(func::none, func::none))(xs, xs); });
  row("vmap", "in_dims given twice", "in_dims given twice",
      [=] { func::vmap(id, func::in_dims(0), func::in_dims(0))(xs); });
  row("vmap", "an undefined Tensor with an int in_dim", "undefined",
      [=] { func::vmap(add)(xs, Tensor()); });
  // ---- vmap: sizes
  row("vmap", "mapped dimensions of different sizes",
      "Expected all tensors to have the same size in the mapped dimension, got:\n  args[0] (in_dim=0): 4\n  args[1] (in_dim=0): 5", [=] {
        func::vmap(add)(xs, ys);
      });
  row("vmap", "chunk_size 0", "chunk_size should be none or greater than 0, got 0",
      [=] { func::vmap(id, func::VmapOptions().chunk_size(0)); });
  row("vmap", "negative chunk_size", "chunk_size should be none or greater than 0, got -2",
      [=] { func::vmap(id, func::VmapOptions().chunk_size(-2)); });
  row("vmap", "axis_size different from the mapped inputs' size", "axis_size=3 but the mapped inputs have size 4",
      [=] { func::vmap(id, 0, 0, func::VmapOptions().axis_size(3))(xs); });
  row("vmap", "negative axis_size", "axis_size should be none or at least 0, got -1",
      [=] { func::vmap(id, func::VmapOptions().axis_size(-1)); });
  // ---- vmap: out_dims
  row("vmap", "out_dim out of range", "out_dim=5",
      [=] { func::vmap(id, 0, 5)(xs); });
  row("vmap", "out_dim none for an output that varies over the batch", "out_dim=none",
      [=] { func::vmap(id, 0, func::none)(xs); });
  row("vmap", "out_dims with more entries than outputs", "out_dims is not compatible with the structure of output: it has 2 elements but the out_dims entry for it is (0, 0, 0)",
      [=] { func::vmap([](const Tensor& t) { return std::make_tuple(t, t); }, 0, func::out_dims(0, 0, 0))(xs); });
  row("vmap", "an undefined Tensor output", "undefined",
      [=] { func::vmap([](const Tensor&) { return Tensor(); })(xs); });
  // ---- vmap: what f does
  row("vmap", "a random op with the default randomness='error'",
      "pass VmapOptions().randomness(Randomness::Same) or (Randomness::Different)",
      [=] { func::vmap([](const Tensor& t) { return t + torch::rand_like(t); })(xs); });
  row("vmap", ".item() on a batched Tensor", "vmap: It looks like you're calling .item() on a Tensor",
      [=] { func::vmap([](const Tensor& t) { return t * t.sum().item<float>(); })(xs); });
  row("vmap", "a data-dependent output shape (nonzero)", "vmap: We do not support batching operators that can output dynamic shape",
      [=] { func::vmap([](const Tensor& t) { return torch::nonzero(t); })(xs); });
  row("vmap", "an in-place op into an unbatched Tensor", "use the out-of-place op instead",
      [=] {
        Tensor acc = torch::zeros({3});
        func::vmap([&](const Tensor& t) { return acc.add_(t); })(xs);
      });
  row("vmap", "an op without a batching rule while set_fallback_mode(FallbackMode::Error)",
      "aten::take has no batching rule, so libtorch would run it once per sample", [=] {
        struct Restore {
          func::FallbackMode prev = func::set_fallback_mode(func::FallbackMode::Error);
          ~Restore() { func::set_fallback_mode(prev); }
        } restore;
        func::vmap([](const Tensor& t) { return torch::take(t, torch::tensor({0, 2})); })(xs);
      });
  row("vmap", "requires_grad_() inside f", "torchfunc::vmap: Tensor.requires_grad_() was called inside",
      [=] { func::vmap([](const Tensor& t) { return (t * 2).requires_grad_(); })(xs); });
  row("vmap", "sequential_fallback, and per-sample outputs of different shapes",
      "with sequential_fallback, output 0 of f has shape",
      [=] {
        func::vmap([](const Tensor& t) { return torch::nonzero(t > 0); }, func::VmapOptions().sequential_fallback(true))(
            torch::tensor({{1.0, -1.0}, {1.0, 1.0}}));
      });
  row("vmap", "sequential_fallback while set_fallback_mode(FallbackMode::Error)",
      "vmap sequential fallback: .item(): f ran once per sample; this is an error", [=] {
        struct Restore {
          func::FallbackMode prev = func::set_fallback_mode(func::FallbackMode::Error);
          ~Restore() { func::set_fallback_mode(prev); }
        } restore;
        func::vmap([](const Tensor& t) { return t * t.sum().item<float>(); },
                   func::VmapOptions().sequential_fallback(true))(xs);
      });
  row("vmap", "a batched Tensor used after vmap returned", "escaped",
      [=] {
        Tensor escaped;
        func::vmap([&](const Tensor& t) { return escaped = t * 2; })(xs);
        (escaped + 1).sum().item<float>();
      });
  r.back().message_1_13 = "maybe_layer.has_value() INTERNAL ASSERT FAILED";  // libtorch 1.13's own check
  row("vmap", "a throwing user function (c10::Error)", "user says no",
      [=] { func::vmap([](const Tensor& t) -> Tensor { TORCH_CHECK(false, "user says no"); })(xs); });

  // ---- grad, grad_and_value
  row("grad", "f returns a non-scalar Tensor",
      "grad(f)(*args): Expected f(*args) to return a scalar Tensor, got tensor with 1 dims",
      [=] { func::grad(id)(x); });
  row("grad", "f returns a 1-element Tensor of 1 dim", "to return a scalar Tensor, got tensor with 1 dims",
      [=] { func::grad([](const Tensor& t) { return t.sum().reshape({1}); })(x); });
  row("grad", "an integer input", "only floating-point or complex Tensors can be differentiated, but args[0] has dtype Long",
      [=] { func::grad(sum)(torch::arange(3)); });
  row("grad", "an undefined input", "cannot differentiate with respect to args[0], which is an undefined Tensor",
      [=] { func::grad([](const Tensor& t) { return t.defined() ? t.sum() : torch::zeros({}); })(Tensor()); });
  row("grad", "f returns an undefined Tensor", "undefined Tensor",
      [=] { func::grad([](const Tensor&) { return Tensor(); })(x); });
  row("grad", "f returns an integer scalar", "to return a floating-point",
      [=] { func::grad([](const Tensor& t) { return (t > 0).sum(); })(x); });
  row("grad", "a grad-level Tensor used after grad returned", "escaped a grad-family transform",
      [=] {
        Tensor leaked;
        func::grad([&](const Tensor& t) { return (leaked = t * 2).sum(); })(x);
        (void)(leaked + 1);
      });
  row("grad", "requires_grad_() inside f", "torchfunc::grad(f)(*args): Tensor.requires_grad_() was called inside",
      [=] { func::grad([](const Tensor& t) { return (t * 2).requires_grad_().sum(); })(x); });
  row("grad", "retain_grad() inside f", "retain_grad() was called inside",
      [=] {
        func::grad([](const Tensor& t) {
          Tensor u = t * 2;
          u.retain_grad();
          return u.sum();
        })(x);
      });
  row("grad", "a throwing user function (c10::Error)", "user says no",
      [=] { func::grad([](const Tensor&) -> Tensor { TORCH_CHECK(false, "user says no"); })(x); });
  row("grad_and_value", "f returns a non-scalar Tensor", "grad_and_value(f)(*args): Expected f(*args) to return a scalar Tensor",
      [=] { func::grad_and_value(id)(x); });

  // ---- vjp
  row("vjp", "f returns an integer Tensor", "All outputs of f must be floating-point or complex",
      [=] { func::vjp([](const Tensor& t) { return (t > 0).to(torch::kLong); }, x); });
  row("vjp", "a cotangent of the wrong shape", "Expected cotangents to have the shape",
      [=] {
        auto [out, fn] = func::vjp(id, x);
        fn(torch::ones({4}));
      });
  row("vjp", "cotangents of another structure than the outputs", "same structure as the outputs",
      [=] {
        auto [out, fn] = func::vjp([](const Tensor& t) { return std::vector<Tensor>{t, t * 2}; }, x);
        fn(std::vector<Tensor>{x});
      });
  row("vjp", "vjp_fn called after a call with retain_graph(false)", "this vjp_fn's graph was freed by an earlier call",
      [=] {
        auto [out, fn] = func::vjp([](const Tensor& t) { return t.sin(); }, x);
        fn(torch::ones({3}), func::VjpFnOptions().retain_graph(false));
        fn(torch::ones({3}));
      });
  row("vjp", "an integer primal", "only floating-point or complex Tensors can be differentiated, but primals[0] has dtype Long",
      [=] { func::vjp(id, torch::arange(3)); });

  // ---- jvp, linearize
  row("jvp", "a tangent of the wrong shape", "Expected each tangent to have the shape of its primal",
      [=] { func::jvp(id, std::tuple{x}, std::tuple{torch::randn({4})}); });
  row("jvp", "a tangent of the wrong dtype", "dtype",
      [=] { func::jvp(id, std::tuple{x}, std::tuple{torch::randn({3}, torch::kDouble)}); });
  row("jvp", "tangents of another structure than the primals", "Expected primals and tangents to have the same structure",
      [=] {
        func::jvp([](const std::vector<Tensor>& v) { return v[0]; }, std::tuple{std::vector<Tensor>{x, x}},
                  std::tuple{std::vector<Tensor>{x}});
      });
  row("jvp", "an integer primal", "dtype Long",
      [=] { func::jvp(id, std::tuple{torch::arange(3)}, std::tuple{torch::arange(3)}); });
  row("jvp", "strict(true) and an output that does not depend on the primals",
      "output 0 of f is independent of the inputs (it has no tangent). This is not allowed with JvpOptions().strict(true)",
      [=] { func::jvp([](const Tensor&) { return torch::ones({2}); }, std::tuple{x}, std::tuple{x}, func::JvpOptions().strict(true)); });
  row("jvp", "requires_grad_() inside f", "torchfunc::jvp(f, primals, tangents): Tensor.requires_grad_() was called inside",
      [=] { func::jvp([](const Tensor& t) { return (t * 2).requires_grad_(); }, std::tuple{x}, std::tuple{x}); });
  row("linearize", "a tangent of the wrong shape for jvp_fn", "to have the shape of its primal",
      [=] {
        auto [out, fn] = func::linearize([](const Tensor& t) { return t.sin(); }, x);
        fn(torch::randn({5}));
      });
  row("linearize", "a tangent of the wrong dtype for jvp_fn", "to have the dtype of its primal",
      [=] {
        auto [out, fn] = func::linearize([](const Tensor& t) { return t.sin(); }, x);
        fn(torch::randn({3}, torch::kDouble));
      });

  // ---- jacrev, jacfwd, hessian
  row("jacrev", "chunk_size 0", "Expected chunk_size to be a positive integer, but got 0",
      [=] { func::jacrev(id, func::JacrevOptions().chunk_size(0)); });
  row("jacrev", "a complex input", "Expected all inputs to be real but received complex tensor at args[0]",
      [=] { func::jacrev(id)(torch::randn({3}, torch::kComplexFloat)); });
  row("jacrev", "a complex output", "Expected all outputs to be real but received complex tensor at output 0",
      [=] { func::jacrev([](const Tensor& t) { return torch::polar(t.abs() + 1, t); })(x); });
  row("jacrev", "an integer input", "dtype Long",
      [=] { func::jacrev(id)(torch::arange(3)); });
  row("jacfwd", "chunk_size 0", "torchfunc::jacfwd: Expected chunk_size to be a positive integer, but got 0",
      [=] { func::jacfwd(id, func::JacfwdOptions().chunk_size(0)); });
  row("hessian", "chunk_size 0", "torchfunc::hessian: Expected chunk_size to be a positive integer, but got 0",
      [=] { func::hessian(sum, func::HessianOptions().chunk_size(0)); });
  row("jacfwd", "a complex input", "Expected all inputs to be real",
      [=] { func::jacfwd(id)(torch::randn({3}, torch::kComplexFloat)); });
  row("jacfwd", "a random op with the default randomness='error'",
      "pass JacfwdOptions().randomness(Randomness::Same) or (Randomness::Different)",
      [=] { func::jacfwd([](const Tensor& t) { return t * torch::rand_like(t); })(x); });
  row("hessian", "a complex input", "hessian(f, ...)(*args): Expected all inputs to be real",
      [=] { func::hessian([](const Tensor& t) { return (t * t).sum().abs(); })(torch::randn({3}, torch::kComplexFloat)); });

  row("jacobian", "chunk_size 0", "torchfunc::jacobian: Expected chunk_size to be a positive integer",
      [=] { func::jacobian(id, func::JacobianOptions().chunk_size(0)); });
  row("jacobian", "a complex input", "jacobian(f, ...)(*args): Expected all inputs to be real",
      [=] { func::jacobian(id)(torch::randn({3}, torch::kComplexFloat)); });

  // ---- functionalize
  row("functionalize", "f mutates the argument an enclosing grad differentiates",
      "torchfunc::functionalize(f)(*args): f mutated args[0], a leaf Tensor that requires grad",
      [=] { func::grad(func::functionalize([](Tensor t) { t.mul_(2); return t.sum(); }))(x); });

  // ---- dp
  {
    auto ce = [](const Tensor& o, const Tensor& t) {
      return torch::nn::functional::cross_entropy(o, t, torch::nn::functional::CrossEntropyFuncOptions().reduction(torch::kNone));
    };
    auto mean_ce = [](const Tensor& o, const Tensor& t) { return torch::nn::functional::cross_entropy(o, t); };
    Tensor dx = torch::randn({4, 3}), dy = torch::randint(2, {4});
    row("dp::clipped_grad_sum", "a loss that averages over the batch", "the loss must return one value per sample",
        [=] {
          nn::Sequential mlp(nn::Linear(3, 2));
          func::dp::clipped_grad_sum(mlp, mean_ce, dx, dy);
        });
    row("dp::clipped_grad_sum", "inputs and targets of different batch sizes", "must have the batch in dim 0 with the same size",
        [=] {
          nn::Sequential mlp(nn::Linear(3, 2));
          func::dp::clipped_grad_sum(mlp, ce, dx, dy.narrow(0, 0, 3));
        });
    row("dp::clipped_grad_sum", "max_norm 0", "max_norm must be positive", [=] {
      nn::Sequential mlp(nn::Linear(3, 2));
      func::dp::clipped_grad_sum(mlp, ce, dx, dy, func::dp::ClipOptions().max_norm(0));
    });
    row("dp::clipped_grad_sum", "a batch that is not whole groups of group_size rows",
        "is not a whole number of groups of group_size 3", [=] {
          nn::Sequential mlp(nn::Linear(3, 2));
          func::dp::clipped_grad_sum(mlp, ce, dx, dy, func::dp::ClipOptions().group_size(3));
        });
    row("dp::NoiseGenerator", "noise for an integer tensor", "needs a floating-point tensor, got Long",
        [=] { func::dp::NoiseGenerator(1).add_noise_(dy.clone(), 1.0); });
    row("dp::NoiseGenerator", "a negative std", "std must be finite and non-negative, got -1",
        [=] { func::dp::NoiseGenerator(1).add_noise_(dx.clone(), -1.0); });
    row("dp::NoiseGenerator", "noise for a parameter autograd records", "the tensor requires grad and grad mode is on",
        [=] { func::dp::NoiseGenerator(1).add_noise_(torch::zeros({3}, torch::requires_grad()), 1.0); });
    row("dp::NoiseGenerator", "noise inside vmap", "add the noise outside vmap / grad / functionalize", [=] {
      func::vmap([](const Tensor& t) {
        Tensor u = t.clone();
        func::dp::NoiseGenerator(1).add_noise_(u, 1.0);
        return u;
      })(dx);
    });
    row("dp::NoiseGenerator", "noise inside a compiled function", "the noise is written on the host and a replay would not add it", [=] {
      func::compile([](const Tensor& t) {
        Tensor u = t.clone();
        func::dp::NoiseGenerator(1).add_noise_(u, 1.0);
        return u;
      })(dx);
    });
    row("dp::NoiseGenerator", "an offset that no generator returned", "offset must be a multiple of 64 counters",
        [] { func::dp::NoiseGenerator(1, 10); });
  }

  // ---- linear_transpose
  row("linear_transpose", "an affine f (a constant term)", "torchfunc::linear_transpose(f, *primals): f is not linear in its inputs: f(0) is not zero at output 0",
      [=] { func::linear_transpose([](const Tensor& t) { return t * 2 + 1; }, x); });
  row("linear_transpose", "a nonlinear f", "torchfunc::linear_transpose(f, *primals): f is not linear in its inputs: at output 0, f(a*x + y) differs from a*f(x) + f(y)",
      [=] { func::linear_transpose([](const Tensor& t) { return t * t; }, x); });
  row("linear_transpose", "a cotangent of the wrong shape", "torchfunc::linear_transpose(f, *primals): transpose_fn(cotangents): Expected cotangents to have the shape",
      [=] {
        auto t = func::linear_transpose([](const Tensor& v) { return v * 2; }, x);
        t(torch::ones({7}));
      });

  // ---- rearrange
  row("rearrange", "an axis on one side only", "torchfunc::rearrange(\"b c -> b\"): axis 'c' is on the left side but not on the right",
      [=] { func::rearrange(xs, "b c -> b"); });
  row("rearrange", "a pattern for another number of dimensions", "the left side names 3 dimensions, but the tensor has 2",
      [=] { func::rearrange(xs, "b c d -> b (c d)"); });
  row("rearrange", "a composed dimension that does not divide", "the dimension (c1 c) has size 3, which is not a multiple of the product of its given sizes, 2",
      [=] { func::rearrange(xs, "b (c1 c) -> b c1 c", {{"c1", 2}}); });

  // ---- functional_call and the module utilities
  row("functional_call", "a key the module does not have", "Unexpected key(s): 'lin.wieght'",
      [=] {
        Tied mm = m;
        func::functional_call(mm, TensorDict{{"lin.wieght", torch::zeros({3, 3})}}, x);
      });
  row("functional_call", "strict and a missing key", "Missing key(s): 'steps'",
      [=] {
        Tied mm = m;
        func::functional_call(mm, params, x, func::FunctionalCallOptions().strict(true));
      });
  row("functional_call", "the same key in two dicts", "got multiple values for keys ['lin.bias']",
      [=] {
        Tied mm = m;
        TensorDict b{{"lin.bias", torch::zeros({3})}};
        func::functional_call(mm, std::make_tuple(b, b), x);
      });
  row("functional_call", "different values for tied names", "which are tied",
      [=] {
        Tied mm = m;
        TensorDict both{{"lin.weight", torch::zeros({3, 3})}, {"w_tied", torch::ones({3, 3})}};
        func::functional_call(mm, both, x);
      });
  row("stack_module_state", "no models", "Expected at least one model, got 0",
      [=] { func::stack_module_state(std::vector<nn::Linear>{}); });
  row("stack_module_state", "models with different parameters", "Expected all models to have the same parameters",
      [=] {
        func::stack_module_state(std::vector<nn::Sequential>{nn::Sequential(nn::Linear(2, 2)),
                                                             nn::Sequential(nn::Linear(2, 2), nn::Linear(2, 2))});
      });
  row("stack_module_state", "models with parameters of different shapes", "has shape",
      [=] { func::stack_module_state(std::vector<nn::Linear>{nn::Linear(2, 2), nn::Linear(2, 3)}); });
  row("set_grads", "a key that is not a parameter", "has no parameter 'nope'",
      [=] {
        nn::Linear a(2, 2);
        func::set_grads(a, TensorDict{{"nope", torch::zeros({2})}});
      });
  row("tree_unflatten", "fewer leaves than the tree has", "the tree has 3 tensor leaves",
      [=] {
        std::tuple<Tensor, std::vector<Tensor>> tree{x, {x, x}};
        func::tree_unflatten(std::vector<Tensor>{x}, tree);
      });
  row("compile", ".item() (data-dependent control flow) in the function", "aten::item reads tensor data on the host",
      [=] { func::compile([](const Tensor& v) { return v * v.sum().item<double>(); })(x); });
  row("compile", "a data-dependent output shape (nonzero)", "aten::nonzero has an output whose shape depends on tensor data",
      [=] { func::compile([](const Tensor& v) { return v.nonzero(); })(x); });
  row("compile", "a random op drawing from the global generator", "aten::randn_like draws random numbers from the global generator",
      [=] { func::compile([](const Tensor& v) { return v + torch::randn_like(v); })(x); });
  row("compile", "an argument that requires grad", "input 0 requires grad; a compiled function's replay is not recorded by autograd",
      [=] { func::compile([](const Tensor& v) { return v.sin(); })(torch::randn({3}, torch::requires_grad())); });
  row("compile", "a closed-over tensor that requires grad", "reads a tensor that requires grad and is not an argument",
      [=] {
        Tensor w = torch::randn({3}, torch::requires_grad());
        func::compile([w](const Tensor& v) { return v * w; })(x);
      });
  row("compile", "called inside a transform", "called inside a transform",
      [=] {
        auto c = func::compile([](const Tensor& v) { return v.sin(); });
        func::vmap([&](const Tensor& v) { return c(v); })(xs);
      });
  row("compile", "more signatures than max_signatures", "CompileOptions::max_signatures",
      [=] {
        func::CompileOptions o;
        o.max_signatures = 1;
        auto c = func::compile([](const Tensor& v) { return v * 2; }, o);
        c(x);
        c(xs);
      });
  row("make_graph", "a capture inside a capture", "called while another capture runs on this thread",
      [=] {
        auto inner = func::compile([](const Tensor& v) { return v.sin(); });
        func::make_graph([&](const Tensor& v) { return inner(v); }, x);
      });
  row("aot_function", "an integer result", "aot_function: capturing the forward and backward",
      [=] { func::aot_function([](const Tensor& v) { return v.argmax(); })(torch::randn({3}, torch::requires_grad())); });
  row("aot_function", "double backward (create_graph)", "its backward graph is not differentiable",
      [=] {
        Tensor w = torch::randn({3}, torch::requires_grad());
        Tensor y = func::aot_function([](const Tensor& v) { return (v * v).sum(); })(w);
        torch::autograd::grad({y}, {w}, {}, true, true);
      });
  return r;
}

/// What looks like a misuse but is not one (torch.func accepts it too), with
/// a check of what it gives.
struct Accepted {
  std::string transform, what, gives;
  std::function<bool()> check;
};
std::vector<Accepted> accepted() {
  const Tensor x = torch::randn({3});
  return {
      {"every transform", "f throws something that is not a c10::Error", "the same exception, unchanged (the state restored)",
       [x] {
         try {
           func::vmap(func::grad([](const Tensor&) -> Tensor { throw std::out_of_range("mine"); }))(x.unsqueeze(0));
         } catch (const std::out_of_range& e) {
           return std::string(e.what()) == "mine" && func::detail::layer_depth() == 0;
         }
         return false;
       }},
      {"vmap", "an empty batch (mapped dimension of size 0)", "an output with a batch dimension of size 0",
       [] { return func::vmap([](const Tensor& t) { return t * 2; })(torch::randn({0, 3})).sizes() == at::IntArrayRef{0, 3}; }},
      {"vjp", "a cotangent of another floating dtype", "the gradient in the primal's dtype",
       [x] {
         auto [out, fn] = func::vjp([](const Tensor& t) { return t * 3; }, x);
         Tensor g = std::get<0>(fn(torch::ones({3}, torch::kDouble)));
         return g.scalar_type() == torch::kFloat && g.allclose(torch::full({3}, 3.0));
       }},
      {"hessian", "a function with a non-scalar output", "the Jacobian of its Jacobian, shaped out + in + in",
       [x] { return func::hessian([](const Tensor& t) { return t * t; })(x).sizes() == at::IntArrayRef{3, 3, 3}; }},
      {"functional_call", "tie_weights(false) and a value for one of two tied names",
       "that name alone replaced; the other keeps the module's tensor",
       [x] {
         Tied m = shared_module();
         Tensor out = func::functional_call(m, TensorDict{{"lin.weight", torch::zeros({3, 3})}}, x,
                                            func::FunctionalCallOptions().tie_weights(false));
         return out.allclose(m->lin->bias + torch::mv(m->w_tied, x));
       }},
  };
}

TEST_F(TF, WhatLooksLikeAMisuseButIsNotGivesTorchFuncsResult) {
  for (const auto& a : accepted()) EXPECT_TRUE(a.check()) << a.transform << ": " << a.what;
}

/// The part of an error message without libtorch's "Exception raised from" tail.
std::string message_of(const c10::Error& e) {
  std::string s = e.what_without_backtrace();
  const auto at = s.find("\nException raised from");
  return at == std::string::npos ? s : s.substr(0, at);
}

TEST_F(TF, EveryMisuseInTheCatalogueRaisesItsError) {
  Tied m = shared_module();
  std::vector<std::pair<std::string, Tensor>> before;
  for (const auto& p : m->named_parameters()) before.emplace_back(p.key(), p.value().detach().clone());
  for (const auto& row : catalogue()) {
    SCOPED_TRACE(row.transform + ": " + row.misuse);
    const ThreadState state = ThreadState::now();
    std::string got;
    try {
      row.call();
      ADD_FAILURE() << "no error";
    } catch (const c10::Error& e) {
      got = message_of(e);
    }
    const bool old_wording = TORCH_VERSION_MAJOR < 2 && !row.message_1_13.empty();
    EXPECT_NE(got.find(old_wording ? row.message_1_13 : row.message), std::string::npos) << "message was: " << got;
    // Every message says which transform failed, torchfunc's or libtorch's own wording.
    const std::string api = row.transform;
    EXPECT_TRUE(got.find(api) != std::string::npos || row.message.find("user says no") != std::string::npos ||
                old_wording)
        << "message does not name " << api << ": " << got;
    EXPECT_EQ(func::detail::layer_depth(), 0u);
    EXPECT_TRUE(ThreadState::now() == state) << "after: " << ThreadState::now().str();
  }
  for (const auto& [key, value] : before) EXPECT_TRUE(m->named_parameters()[key].equal(value)) << key;
}

// ---- docs/ERRORS.md ---------------------------------------------------------------

std::string cell(std::string s) {
  for (auto& ch : s)
    if (ch == '\n') ch = ' ';
  for (size_t at = 0; (at = s.find('|', at)) != std::string::npos; at += 2) s.replace(at, 1, "\\|");
  return s;
}

/// The compile-time rows: tests/compile_fail/CMakeLists.txt's cases.
std::vector<std::pair<std::string, std::string>> compile_time_rows() {
  std::ifstream in(TORCHFUNC_SOURCE_DIR "/tests/compile_fail/CMakeLists.txt");
  std::stringstream text;
  text << in.rdbuf();
  std::vector<std::pair<std::string, std::string>> rows;
  const std::string s = text.str();
  const std::regex re("\"([A-Z0-9_]+)\\|([^\"]+)\"");
  for (auto it = std::sregex_iterator(s.begin(), s.end(), re); it != std::sregex_iterator(); ++it) {
    std::string name = (*it)[1];
    for (auto& ch : name) ch = ch == '_' ? ' ' : static_cast<char>(std::tolower(ch));
    rows.emplace_back(name, (*it)[2]);
  }
  return rows;
}

/// Runs a row; returns its message on one line ("" when nothing was thrown).
std::string run_row(const Misuse& row) {
  try {
    row.call();
  } catch (const c10::Error& e) {
    std::string m = message_of(e);
    for (auto& ch : m)
      if (ch == '\n') ch = ' ';
    return m;
  }
  return "";
}

std::string errors_doc() {
  std::ostringstream d;
  d << "# What each misuse gets\n\n"
       "Every row is a test: `tests/test_misuse.cpp` runs the runtime rows (each must raise a `c10::Error`\n"
       "containing the **bold** text and leave the thread's transform state and the module unchanged; the whole\n"
       "message is shown as libtorch " TORCH_VERSION " words it) and `tests/compile_fail` builds the compile-time\n"
       "rows (each must stop the build with the text shown). This file is generated from those tests and\n"
       "checked against them:\n\n"
       "    TORCHFUNC_WRITE_ERRORS_DOC=docs/ERRORS.md build/tests/torchfunc_tests --gtest_filter='*Misuse*'\n\n"
       "## At run time (`c10::Error`)\n\n"
       "| transform | misuse | the error says |\n|---|---|---|\n";
  for (const auto& r : catalogue()) {
    const std::string got = run_row(r);
    d << "| `" << r.transform << "` | " << cell(r.misuse) << " | **" << cell(r.message) << "**";
    if (got != r.message) d << "<br>`" << cell(got) << "`";
    d << " |\n";
  }
  d << "\n## Not errors (as in torch.func)\n\n| transform | input | gives |\n|---|---|---|\n";
  for (const auto& a : accepted()) d << "| `" << a.transform << "` | " << cell(a.what) << " | " << cell(a.gives) << " |\n";
  d << "\n## At compile time (`static_assert`)\n\n| case | the build stops with |\n|---|---|\n";
  for (const auto& [name, msg] : compile_time_rows()) d << "| " << name << " | `" << cell(msg) << "` |\n";
  return d.str();
}

TEST(Misuse, DocsErrorsMdIsTheCatalogue) {
  const std::string want = errors_doc();
  if (const char* out = std::getenv("TORCHFUNC_WRITE_ERRORS_DOC")) {
    std::ofstream(out) << want;
    std::printf("wrote %s\n", out);
  }
  std::ifstream in(TORCHFUNC_SOURCE_DIR "/docs/ERRORS.md");
  std::stringstream have;
  have << in.rdbuf();
  const char* regenerate = "docs/ERRORS.md is out of date; regenerate it with libtorch 2.x:\n"
                           "  TORCHFUNC_WRITE_ERRORS_DOC=docs/ERRORS.md build/tests/torchfunc_tests --gtest_filter='*Misuse*'";
#if TORCH_VERSION_MAJOR >= 2
  // The file shows the messages of the libtorch it was generated with; on
  // another 2.x only libtorch's own wording may differ, in the whole-message part.
  if (std::string(TORCH_VERSION) == "2.13.0") EXPECT_TRUE(have.str() == want) << regenerate;
#endif
  // Every libtorch: each row and each case is in the file, with its bold text.
  for (const auto& r : catalogue())
    EXPECT_NE(have.str().find("| `" + r.transform + "` | " + cell(r.misuse) + " | **" + cell(r.message) + "**"),
              std::string::npos)
        << regenerate << "\nmissing: " << r.transform << ": " << r.misuse;
  for (const auto& [name, msg] : compile_time_rows())
    EXPECT_NE(have.str().find("| " + name + " | `" + cell(msg) + "` |"), std::string::npos) << regenerate;
  EXPECT_GE(catalogue().size(), 60u);
  EXPECT_GE(compile_time_rows().size(), 12u);
}

}  // namespace
