// tests/test_fuzz.cpp: random stacks of up to three transforms over random
// functions, each compared with the same stack built from loops and
// torch::autograd only.
//
// A case is a function f: Tensor -> Tensor (a chain of 1-3 ops from a pool of
// about 40, each adapting its dims to its input's rank, so it runs at any
// level of vmap) and a stack of transforms, each mapping a function to a
// function with a single Tensor in and out:
//   vmap (random in_dim, out_dim 0 or -1, chunk size none / 1 / 2)
//   grad of x -> sum(sin(f(x)))         vjp_fn(cos(f(x)))
//   jvp with tangent sin(x)             jacrev (random chunk size), jacfwd
//   hessian of x -> sum(sin(f(x)))
// The reference stack replaces each transform by a loop over slices (vmap) or
// by torch::autograd::grad with create_graph (everything else: J^T u directly,
// J v as the derivative of <J^T u, v> in u), so it composes to any depth
// without torchfunc. A failure prints the seed and the case to rerun it.
//
// Fixed seed, 1000 cases by default (ctest); more with
//   TORCHFUNC_FUZZ_CASES=N TORCHFUNC_FUZZ_SEED=S torchfunc_tests --gtest_filter='Fuzz.*'
#include <cstdlib>
#include <iostream>
#include <functional>
#include <random>
#include <sstream>

#include "common.h"

namespace {

using Fn = std::function<Tensor(const Tensor&)>;

// Fixed matrices for the matmul op, one per last-dim size (created outside
// every transform: random draws inside vmap are an error by design).
const Tensor& weight_for(int64_t n) {
  static std::vector<Tensor> ws = [] {
    std::vector<Tensor> w;
    torch::Generator g = at::detail::createCPUGenerator(7);
    for (int64_t k = 0; k <= 16; ++k) w.push_back(at::randn({std::max<int64_t>(k, 1), 3}, g, torch::kDouble) * 0.5);
    return w;
  }();
  return ws.at(static_cast<size_t>(std::min<int64_t>(n, 16)));
}

int64_t pick_dim(const Tensor& x, int64_t k) { return x.dim() == 0 ? 0 : k % x.dim(); }

struct Op {
  const char* name;
  std::function<Tensor(const Tensor&, int64_t)> fn;  // k: a random int for dims
};

const std::vector<Op>& op_pool() {
  static const std::vector<Op> ops = {
      {"sin", [](const Tensor& x, int64_t) { return x.sin(); }},
      {"cos", [](const Tensor& x, int64_t) { return x.cos(); }},
      {"tanh", [](const Tensor& x, int64_t) { return x.tanh(); }},
      {"sigmoid", [](const Tensor& x, int64_t) { return x.sigmoid(); }},
      {"softplus", [](const Tensor& x, int64_t) { return torch::softplus(x); }},
      {"exp_small", [](const Tensor& x, int64_t) { return (x * 0.3).exp(); }},
      {"square", [](const Tensor& x, int64_t) { return x * x; }},
      {"cube", [](const Tensor& x, int64_t) { return x.pow(3); }},
      {"atan", [](const Tensor& x, int64_t) { return x.atan(); }},
      {"log1p_sq", [](const Tensor& x, int64_t) { return (x * x).log1p(); }},
      {"sqrt_1p", [](const Tensor& x, int64_t) { return (x * x + 1).sqrt(); }},
      {"erf", [](const Tensor& x, int64_t) { return x.erf(); }},
      {"gelu", [](const Tensor& x, int64_t) { return torch::gelu(x); }},
      {"silu", [](const Tensor& x, int64_t) { return torch::silu(x); }},
      {"recip", [](const Tensor& x, int64_t) { return (x * x + 1).reciprocal(); }},
      {"mul_const", [](const Tensor& x, int64_t) { return x * 1.7 - 0.2; }},
      {"sin_times", [](const Tensor& x, int64_t) { return x.sin() * x; }},
      {"add_self_t", [](const Tensor& x, int64_t) { return x.dim() >= 2 && x.size(0) == x.size(1) ? x + x.t() : x + 1; }},
      {"sum_dim", [](const Tensor& x, int64_t k) { return x.dim() == 0 ? x : x.sum(pick_dim(x, k), true); }},
      {"mean_dim", [](const Tensor& x, int64_t k) { return x.dim() == 0 ? x : x.mean(pick_dim(x, k)); }},
      {"logsumexp", [](const Tensor& x, int64_t k) { return x.dim() == 0 ? x : x.logsumexp(pick_dim(x, k), true); }},
      {"softmax", [](const Tensor& x, int64_t k) { return x.dim() == 0 ? x : x.softmax(pick_dim(x, k)); }},
      {"log_softmax", [](const Tensor& x, int64_t k) { return x.dim() == 0 ? x : x.log_softmax(pick_dim(x, k)); }},
      {"cumsum", [](const Tensor& x, int64_t k) { return x.dim() == 0 ? x : x.cumsum(pick_dim(x, k)); }},
      {"cumprod", [](const Tensor& x, int64_t k) { return x.dim() == 0 ? x : (x * 0.5).cumprod(pick_dim(x, k)); }},
      {"norm_dim", [](const Tensor& x, int64_t k) { return x.dim() == 0 ? x : (x * x + 0.1).sum(pick_dim(x, k)).sqrt(); }},
      {"amax", [](const Tensor& x, int64_t k) { return x.dim() == 0 ? x : x.amax(pick_dim(x, k)); }},
      {"transpose", [](const Tensor& x, int64_t) { return x.dim() < 2 ? x : x.transpose(0, -1); }},
      {"flip", [](const Tensor& x, int64_t k) { return x.dim() == 0 ? x : x.flip({pick_dim(x, k)}); }},
      {"roll", [](const Tensor& x, int64_t k) { return x.dim() == 0 ? x : x.roll({1}, {pick_dim(x, k)}); }},
      {"narrow", [](const Tensor& x, int64_t k) {
         const int64_t d = pick_dim(x, k);
         return x.dim() == 0 || x.size(d) < 2 ? x : x.narrow(d, 1, x.size(d) - 1);
       }},
      {"unsqueeze_mul", [](const Tensor& x, int64_t) { return x.dim() == 1 ? (x.unsqueeze(0) * x.unsqueeze(-1)).sum(0) : x * x; }},
      {"flatten", [](const Tensor& x, int64_t) { return x.reshape({-1}); }},
      {"matmul", [](const Tensor& x, int64_t) {
         return x.dim() == 0 ? x * 2 : torch::matmul(x, weight_for(x.size(-1)).narrow(0, 0, x.size(-1)));
       }},
      {"outer_self", [](const Tensor& x, int64_t) { return x.dim() == 1 ? torch::outer(x, x.sin()) : x.cos() * 2; }},
      {"cat_self", [](const Tensor& x, int64_t k) { return x.dim() == 0 ? x : torch::cat({x, x.sin()}, pick_dim(x, k)); }},
      {"stack_self", [](const Tensor& x, int64_t) { return torch::stack({x, x * x}); }},
      {"where_pos", [](const Tensor& x, int64_t) { return torch::where(x > 0.1, x.sin(), x.cos()); }},
      {"clamp", [](const Tensor& x, int64_t) { return x.clamp(-2.5, 2.5); }},
      {"dot_self", [](const Tensor& x, int64_t) { return (x * x.cos()).sum(); }},
  };
  return ops;
}

// ---- one transform, torchfunc's and the reference ---------------------------

enum class T { Vmap, Grad, Vjp, Jvp, Jacrev, Jacfwd, Hessian };
const char* t_name(T t) {
  switch (t) {
    case T::Vmap: return "vmap";
    case T::Grad: return "grad";
    case T::Vjp: return "vjp";
    case T::Jvp: return "jvp";
    case T::Jacrev: return "jacrev";
    case T::Jacfwd: return "jacfwd";
    case T::Hessian: return "hessian";
  }
  return "?";
}

struct Layer {
  T kind;
  int64_t in_k = 0;     // vmap: in_dim = in_k % rank
  bool out_last = false;  // vmap: out_dim -1 (else 0)
  int64_t chunk = 0;    // vmap / jacrev: 0 = none
  std::string str() const {
    std::ostringstream o;
    o << t_name(kind);
    if (kind == T::Vmap) o << "(in_k=" << in_k << ", out_dim=" << (out_last ? -1 : 0) << ", chunk=" << chunk << ")";
    if (kind == T::Jacrev && chunk) o << "(chunk=" << chunk << ")";
    return o.str();
  }
};

Tensor scalar_of(const Tensor& y) { return y.sin().sum(); }

// A tensor to differentiate at: x itself inside an outer reference (so the
// outer one sees the dependence), or a fresh leaf.
Tensor diff_input(const Tensor& x) { return x.requires_grad() ? x : x.detach().requires_grad_(true); }

Tensor grad_or_zeros(const Tensor& out, const Tensor& in, const Tensor& go = Tensor()) {
  if (!out.requires_grad()) return torch::zeros_like(in);
  auto g = torch::autograd::grad({out}, {in}, {go}, /*retain_graph=*/true, /*create_graph=*/true, /*allow_unused=*/true);
  return g[0].defined() ? g[0] : torch::zeros_like(in);
}

Fn apply_real(const Layer& l, Fn f) {
  switch (l.kind) {
    case T::Vmap:
      return [l, f](const Tensor& x) {
        func::VmapOptions o;
        if (l.chunk) o.chunk_size(l.chunk);
        const int64_t d = l.in_k % std::max<int64_t>(x.dim(), 1);
        return func::vmap(f, func::in_dims(d), func::out_dims(l.out_last ? -1 : 0), o)(x);
      };
    case T::Grad:
      return [f](const Tensor& x) { return func::grad([f](const Tensor& t) { return scalar_of(f(t)); })(x); };
    case T::Vjp:
      return [f](const Tensor& x) {
        auto [y, vjp_fn] = func::vjp(f, x);
        return std::get<0>(vjp_fn(y.cos()));
      };
    case T::Jvp:
      return [f](const Tensor& x) { return std::get<1>(func::jvp(f, std::tuple{x}, std::tuple{x.sin()})); };
    case T::Jacrev:
      return [l, f](const Tensor& x) {
        func::JacrevOptions o;
        if (l.chunk) o.chunk_size(l.chunk);
        return func::jacrev(f, o)(x);
      };
    case T::Jacfwd:
      return [f](const Tensor& x) { return func::jacfwd(f)(x); };
    case T::Hessian:
      return [f](const Tensor& x) { return func::hessian([f](const Tensor& t) { return scalar_of(f(t)); })(x); };
  }
  return f;
}

// Row k of the Jacobian of y w.r.t. xi through autograd (create_graph).
Tensor ref_jacobian(const Fn& f, const Tensor& x) {
  Tensor xi = diff_input(x);
  Tensor y = f(xi);
  Tensor flat = y.reshape({-1});
  std::vector<Tensor> rows;
  for (int64_t k = 0; k < flat.numel(); ++k) rows.push_back(grad_or_zeros(flat[k], xi));
  std::vector<int64_t> shape = y.sizes().vec();
  shape.insert(shape.end(), x.sizes().begin(), x.sizes().end());
  if (rows.empty()) return torch::zeros(shape, x.options());
  return torch::stack(rows).reshape(shape);
}

Fn apply_ref(const Layer& l, Fn f) {
  switch (l.kind) {
    case T::Vmap:
      return [l, f](const Tensor& x) {
        const int64_t d = l.in_k % std::max<int64_t>(x.dim(), 1);
        std::vector<Tensor> outs;
        for (int64_t b = 0; b < x.size(d); ++b) outs.push_back(f(x.select(d, b)));
        return torch::stack(outs, l.out_last ? -1 : 0);
      };
    case T::Grad:
      return [f](const Tensor& x) {
        Tensor xi = diff_input(x);
        return grad_or_zeros(scalar_of(f(xi)), xi);
      };
    case T::Vjp:
      return [f](const Tensor& x) {
        Tensor xi = diff_input(x);
        Tensor y = f(xi);
        return grad_or_zeros(y, xi, y.cos());
      };
    case T::Jvp:
      return [f](const Tensor& x) {
        // J v = d/du <J^T u, v>, with u a dummy cotangent.
        Tensor xi = diff_input(x);
        Tensor y = f(xi);
        Tensor u = torch::zeros_like(y).requires_grad_(true);
        Tensor jtu = grad_or_zeros(y, xi, u);
        return grad_or_zeros((jtu * x.sin()).sum(), u);
      };
    case T::Jacrev:
    case T::Jacfwd:
      return [f](const Tensor& x) { return ref_jacobian(f, x); };
    case T::Hessian:
      return [f](const Tensor& x) {
        Fn g = [f](const Tensor& t) {
          Tensor ti = diff_input(t);
          return grad_or_zeros(scalar_of(f(ti)), ti);
        };
        return ref_jacobian(g, x);
      };
  }
  return f;
}

struct FuzzCase {
  std::vector<std::pair<size_t, int64_t>> ops;  // (pool index, k)
  std::vector<Layer> layers;                    // innermost first
  std::vector<int64_t> shape;
  std::string str() const {
    std::ostringstream o;
    o << "x" << torch::IntArrayRef(shape) << ", f = ";
    for (size_t i = 0; i < ops.size(); ++i) o << (i ? " . " : "") << op_pool()[ops[i].first].name << "[k=" << ops[i].second << "]";
    o << ", stack (outermost first) = ";
    for (size_t i = layers.size(); i-- > 0;) o << layers[i].str() << (i ? " o " : "");
    return o.str();
  }
};

FuzzCase make_case(std::mt19937_64& rng) {
  auto uni = [&](int64_t lo, int64_t hi) { return std::uniform_int_distribution<int64_t>(lo, hi)(rng); };
  FuzzCase c;
  const int64_t nops = uni(1, 3);
  for (int64_t i = 0; i < nops; ++i) c.ops.push_back({static_cast<size_t>(uni(0, op_pool().size() - 1)), uni(0, 5)});
  const int64_t depth = uni(1, 3);
  int64_t vmaps = 0, jacs = 0;
  for (int64_t i = 0; i < depth; ++i) {
    Layer l;
    l.kind = static_cast<T>(uni(0, 6));
    // Jacobians and Hessians multiply sizes; keep at most two of them.
    if ((l.kind == T::Jacrev || l.kind == T::Jacfwd || l.kind == T::Hessian) && ++jacs > 2) l.kind = T::Vmap;
    if (l.kind == T::Vmap) {
      ++vmaps;
      l.in_k = uni(0, 3);
      l.out_last = uni(0, 1) == 1;
      l.chunk = uni(0, 2);
    }
    if (l.kind == T::Jacrev) l.chunk = uni(0, 1) ? uni(1, 3) : 0;
    c.layers.push_back(l);
  }
  // One input dim per vmap (plus up to two for the function itself); small
  // where Jacobians multiply the sizes.
  const int64_t rank = vmaps + uni(0, jacs ? 1 : 2);
  for (int64_t i = 0; i < std::max<int64_t>(rank, 1); ++i) c.shape.push_back(jacs ? 2 : uni(2, 3));
  return c;
}

Fn build(const FuzzCase& c, bool reference) {
  std::vector<std::pair<size_t, int64_t>> ops = c.ops;
  Fn f = [ops](const Tensor& x) {
    Tensor y = x;
    for (const auto& [i, k] : ops) y = op_pool()[i].fn(y, k);
    return y;
  };
  for (const Layer& l : c.layers) f = reference ? apply_ref(l, f) : apply_real(l, f);
  return f;
}

int64_t env_int(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  return v && *v ? std::atoll(v) : fallback;
}

}  // namespace

TEST_F(TF, FuzzedCompositionsMatchLoopsAndAutograd) {
  const int64_t cases = env_int("TORCHFUNC_FUZZ_CASES", 1000);
  const uint64_t seed = static_cast<uint64_t>(env_int("TORCHFUNC_FUZZ_SEED", 20261201));
  std::mt19937_64 rng(seed);
  (void)weight_for(1);  // the table is made here, outside every transform
  int64_t failures = 0, invalid = 0, known_1_13 = 0;
  for (int64_t n = 0; n < cases; ++n) {
    FuzzCase c = make_case(rng);
    torch::Generator g = at::detail::createCPUGenerator(seed + static_cast<uint64_t>(n));
    Tensor x = at::randn(c.shape, g, torch::kDouble);
    std::string problem;
    Tensor want;
    try {
      want = build(c, true)(x).detach();
    } catch (const c10::Error&) {
      ++invalid;  // the function itself is ill-formed at this shape: no case
      continue;
    }
    try {
      Tensor got = build(c, false)(x);
      if (got.sizes() != want.sizes()) {
        std::ostringstream o;
        o << "shape " << got.sizes() << " vs reference " << want.sizes();
        problem = o.str();
      } else {
        const double err = (got - want).abs().max().item<double>();
        const double scale = 1 + want.abs().max().item<double>();
        if (!(err <= 1e-7 * scale)) problem = "max abs error " + std::to_string(err);
      }
    } catch (const c10::Error& e) {
      const std::string what = e.what_without_backtrace();
      // libtorch 1.13 only: its BatchedTensorImpl fails in sum's batching rule
      // for vmap over jacfwd / hessian of per-sample 0-dim inputs (2.x runs
      // them; README, known differences). Counted, not failed.
      if (TORCH_VERSION_MAJOR < 2 && what.find("change Tensor SizesAndStrides") != std::string::npos) {
        ++known_1_13;
        continue;
      }
      problem = std::string("c10::Error: ") + what;
    }
    EXPECT_EQ(func::detail::layer_depth(), 0u);
    if (!problem.empty()) {
      ++failures;
      ADD_FAILURE() << "fuzz case " << n << " (TORCHFUNC_FUZZ_SEED=" << seed << "): " << c.str() << ": "
                    << problem.substr(0, 400);
      if (failures >= 10) break;
    }
  }
  std::cout << "fuzz: " << cases << " cases from seed " << seed << ", " << invalid
            << " ill-formed (skipped), " << known_1_13 << " hit the known libtorch 1.13 limitation, " << failures
            << " failed\n";
  EXPECT_LT(invalid, cases / 10) << "too many ill-formed cases: the generator needs fixing";
  EXPECT_LT(known_1_13, cases / 10) << "the libtorch 1.13 limitation now covers too many cases";
}
