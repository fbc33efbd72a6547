// Custom functions and checkpointing inside per-sample gradients.
//
// 1. A binarised network trains with the straight-through estimator: the
//    forward uses sign(x), the backward pretends it was the identity. With
//    torchfunc::custom_function the rule is written once and holds under
//    vmap(grad(...)): per-sample gradients of the binarised model, checked
//    against a loop of single-sample backward passes that use the classic
//    detach trick c + (sign(x) - c).detach(), c = clamp(x, -1, 1), instead.
// 2. A numerically stable log-sum-exp with its own derivative rules and its
//    own vmap rule: per-sample Hessians, checked against torch::logsumexp.
// 3. checkpoint: per-sample gradients of a deep per-position MLP, with the
//    activations recomputed in the backward pass instead of stored. Same
//    results; with --memory plain|checkpoint one variant runs alone and
//    prints its peak RSS (run both to compare).
#include <torch/torch.h>
#include <torchfunc/torchfunc.h>

#include <sys/resource.h>

#include "example_util.h"

namespace func = torchfunc;
using torch::Tensor;

namespace {

double peak_rss_mib() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return u.ru_maxrss / 1024.0;
}

// ---- 1. straight-through sign ----------------------------------------------------
auto st_sign = func::custom_function("st_sign", [](const Tensor& x) { return x.sign(); })
                   .vjp([](const Tensor& g, const Tensor&, const Tensor& x) { return g * (x.abs() <= 1); })
                   .jvp([](const Tensor& t, const Tensor&, const Tensor& x) { return t * (x.abs() <= 1); })
                   .generate_vmap_rule();

// The same estimator with plain autograd (the reference; no custom rule).
Tensor st_sign_reference(const Tensor& x) {
  Tensor clipped = x.clamp(-1, 1);  // gradient 1 inside [-1, 1], 0 outside, like the rule
  return clipped + (x.sign() - clipped).detach();
}

// ---- 2. stable log-sum-exp with its own vmap rule ---------------------------------
Tensor lse_forward(const Tensor& x) {
  Tensor m = std::get<0>(x.max(-1, true)).detach();
  return (m + (x - m).exp().sum(-1, true).log()).squeeze(-1);
}
const auto lse_rules = func::custom_function("logsumexp", lse_forward)
                           .vjp([](const Tensor& g, const Tensor& y, const Tensor& x) {
                             return g.unsqueeze(-1) * (x - y.unsqueeze(-1)).exp();
                           })
                           .jvp([](const Tensor& t, const Tensor& y, const Tensor& x) {
                             return (t * (x - y.unsqueeze(-1)).exp()).sum(-1);
                           });
// Reduces over the last dim, so any batch dim can be moved to the front and
// the function called on the whole batch at once.
const auto logsumexp = lse_rules.vmap([](const func::VmapInfo&, const std::vector<func::OptDim>& dims, const Tensor& x) {
  return std::make_pair(lse_rules(x.movedim(*dims[0], 0)), std::vector<func::OptDim>{0});
});

}  // namespace

int main(int argc, char** argv) {
  example::Common common;
  std::string memory;
  int64_t batch = 32, depth = 32, width = 64, positions = 256, segment = 4;
  CLI::App app{"custom_function and checkpoint under per-sample gradients, checked against references"};
  common.add_to(app);
  app.add_option("--batch", batch, "samples")->capture_default_str();
  app.add_option("--depth", depth, "layers of the deep MLP (part 3)")->capture_default_str();
  app.add_option("--positions", positions, "positions per sample the MLP is applied to")->capture_default_str();
  app.add_option("--segment", segment, "layers per checkpointed segment")->capture_default_str();
  app.add_option("--memory", memory, "run only part 3 in one variant and print its peak RSS")
      ->check(CLI::IsMember({"plain", "checkpoint"}));
  CLI11_PARSE(app, argc, argv);
  if (common.quick) {
    batch = 4;
    depth = 8;
    positions = 16;
  }
  common.apply("custom_functions");

  // ---- 3's model, built first so --memory can skip the rest.
  std::vector<Tensor> weights;
  for (int64_t l = 0; l < depth; ++l) weights.push_back(torch::randn({width, width}) / std::sqrt(double(width)));
  Tensor tokens = torch::randn({batch, positions, width});
  auto segment_fn = [](const Tensor& h, const std::vector<Tensor>& ws) {
    Tensor x = h;
    for (const auto& w : ws) x = torch::tanh(torch::matmul(x, w));
    return x;
  };
  auto ck_segment = func::checkpoint(segment_fn);
  auto deep_loss = [&](bool use_checkpoint) {
    return [&, use_checkpoint](const std::vector<Tensor>& ws, const Tensor& sample) {
      Tensor h = sample;
      for (int64_t l = 0; l < depth; l += segment) {
        std::vector<Tensor> part(ws.begin() + l, ws.begin() + std::min(depth, l + segment));
        h = use_checkpoint ? ck_segment(h, part) : segment_fn(h, part);
      }
      return h.pow(2).mean();
    };
  };
  auto per_sample = [&](bool use_checkpoint) {
    return func::vmap(func::grad(deep_loss(use_checkpoint)), func::in_dims(func::none, 0))(weights, tokens);
  };
  if (!memory.empty()) {
    const double before = peak_rss_mib();
    auto start = std::chrono::steady_clock::now();
    auto g = per_sample(memory == "checkpoint");
    const double secs = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::printf("deep MLP per-sample gradients (%s): batch %lld, %lld layers of %lld, %lld positions, %lld layers per "
                "segment: peak RSS %.0f MiB (%.0f MiB before), %.2f s, gradient norm %.6f\n",
                memory.c_str(), (long long)batch, (long long)depth, (long long)width, (long long)positions,
                (long long)segment, peak_rss_mib(), before, secs, torch::stack(g).norm().item<double>());
    return 0;
  }

  // ---- 1. straight-through estimator under vmap(grad) ---------------------------------
  std::printf("1. binarised MLP, straight-through sign, per-sample gradients\n");
  {
    torch::nn::Sequential net(torch::nn::Linear(16, 32), torch::nn::Linear(32, 4));
    auto params = func::named_parameters(*net);
    Tensor xs = torch::randn({batch, 16});
    Tensor ys = torch::randint(4, {batch});
    auto layer = [](const func::TensorDict& p, const std::string& name, const Tensor& x) {
      return torch::addmm(p[name + ".bias"], x, p[name + ".weight"].t());
    };
    auto loss = [&](const func::TensorDict& p, const Tensor& x, const Tensor& y) {
      Tensor h = st_sign(layer(p, "0", x.unsqueeze(0)));
      return torch::nn::functional::cross_entropy(layer(p, "1", h), y.unsqueeze(0));
    };
    func::TensorDict psg = func::vmap(func::grad(loss), func::in_dims(func::none, 0, 0))(params, xs, ys);
    for (const auto& item : psg) {
      std::vector<Tensor> rows;
      for (int64_t i = 0; i < batch; ++i) {
        std::vector<Tensor> leaves;
        for (const auto& kv : params) leaves.push_back(kv.value().detach().requires_grad_(true));
        func::TensorDict p;
        size_t k = 0;
        for (const auto& kv : params) p.insert(kv.key(), leaves[k++]);
        Tensor h = st_sign_reference(layer(p, "0", xs[i].unsqueeze(0)));
        torch::nn::functional::cross_entropy(layer(p, "1", h), ys[i].unsqueeze(0)).backward();
        rows.push_back(p[item.key()].grad());
      }
      example::check_close(item.value(), torch::stack(rows), 1e-5, item.key() + " equals a loop using c + (sign(x) - c).detach(), c = clamp(x, -1, 1)");
    }
  }

  // ---- 2. stable log-sum-exp: per-sample Hessians -------------------------------------
  std::printf("2. stable log-sum-exp with its own vjp, jvp and vmap rules\n");
  {
    Tensor big = torch::tensor({1000.0f, 1001.0f, 999.0f});
    example::check(std::isfinite(logsumexp(big).item<float>()) && !std::isfinite(big.exp().sum().log().item<float>()),
                   "finite where log(sum(exp(x))) overflows");
    Tensor xs = torch::randn({batch, 5}, torch::kDouble) * 4;
    Tensor h = func::vmap(func::hessian(logsumexp))(xs);
    std::vector<Tensor> ref;
    for (int64_t i = 0; i < batch; ++i) {
      Tensor x = xs[i].detach().requires_grad_(true);
      ref.push_back(example::autograd_jacobian(
          torch::autograd::grad({torch::logsumexp(x, -1)}, {x}, {}, true, true)[0], {x}));
    }
    example::check_close(h, torch::stack(ref), 1e-10, "per-sample Hessians equal torch::logsumexp's (autograd)");
  }

  // ---- 3. checkpoint ----------------------------------------------------------------
  std::printf("3. checkpointed deep MLP (%lld layers, %lld per segment), per-sample gradients\n", (long long)depth,
              (long long)segment);
  {
    auto plain = per_sample(false);
    auto ck = per_sample(true);
    example::check_close(torch::stack(ck), torch::stack(plain), 1e-6, "checkpointed gradients equal the plain ones");
    const int reps = common.quick ? 1 : 3;
    double t_plain = example::median_ms(reps, [&] { per_sample(false); });
    double t_ck = example::median_ms(reps, [&] { per_sample(true); });
    std::printf("  timings (median of %d): plain %.1f ms, checkpoint %.1f ms (%.2fx: one more forward)\n", reps,
                t_plain, t_ck, t_ck / t_plain);
  }
  return example::finish("custom_functions");
}
