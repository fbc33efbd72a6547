// src/dp.cpp: the clipped per-sample gradient sum (include/torchfunc/dp.h).
// One forward pass keeps each parametrised child's input a; one backward
// pass gives the gradient g at each such child's output (the loss is a sum
// of per-sample losses, so row i of g belongs to example i alone). Each child
// then gives its per-sample squared norms from (a, g), and, once the clip
// factors are known, its clipped gradient sum, by the rule for its type.
#include <ATen/Dispatch.h>
#include <torch/nn.h>
#include <torch/autograd.h>
#include <torchfunc/dp.h>
#include <torchfunc/vjp.h>

#include <memory>
#include <numeric>

#include "compat.h"
#include "conv_grad_kernel.h"
#include "graph.h"  // detail::is_plain
#include "parallel.h"

namespace torchfunc {
namespace dp {
namespace {

using at::Tensor;
namespace nn = torch::nn;
namespace F = torch::nn::functional;

// ||t_i||^2 per sample (dim 0): one reduction pass, nothing materialised
// (three times faster than t.pow(2).sum(...) for a [256, 784] input).
Tensor squared_norms(const Tensor& t) {
  if (t.dim() == 1) return t.square();
  std::vector<int64_t> dims(size_t(t.dim() - 1));
  std::iota(dims.begin(), dims.end(), int64_t(1));
  return at::linalg_vector_norm(t, 2, dims).square();
}

// sum over t, t' of (a_t . a_t')(g_t . g_t') per sample, or the same as the
// squared norm of the materialised g^T a. a [B, T, d], g [B, T, p].
Tensor outer_norm2(const Tensor& a, const Tensor& g, NormMode mode) {
  const int64_t T = a.size(1), d = a.size(2), p = g.size(2);
  if (T == 1) return squared_norms(a) * squared_norms(g);
  const bool ghost = mode == NormMode::Ghost || (mode == NormMode::Auto && 2 * T * T <= p * d);
  if (ghost) return (at::bmm(a, a.transpose(1, 2)) * at::bmm(g, g.transpose(1, 2))).sum({1, 2});
  return squared_norms(at::bmm(g.transpose(1, 2), a));
}

// sum_i c_i g_i^T a_i: [p, d].
Tensor outer_sum(const Tensor& a, const Tensor& g, const Tensor& c) {
  Tensor gc = g * c.view({-1, 1, 1});
  return gc.reshape({-1, g.size(2)}).t().matmul(a.reshape({-1, a.size(2)}));
}

// Augmentation multiplicity, K rows per example. [B, T, ...] -> [B / K, K T, ...]:
// the rows of one example become its positions.
Tensor regroup(const Tensor& t, int64_t K) {
  if (K == 1) return t;
  std::vector<int64_t> shape = t.sizes().vec();
  shape[0] /= K;
  shape[1] *= K;
  return t.reshape(shape);
}

// [B, ...] -> [B / K, ...], summed over each example's rows.
Tensor group_sum(const Tensor& t, int64_t K) {
  if (K == 1) return t;
  std::vector<int64_t> shape = t.sizes().vec();
  shape[0] /= K;
  shape.insert(shape.begin() + 1, K);
  return t.reshape(shape).sum(1);
}

Tensor per_sample(const Tensor& c, const Tensor& like) {
  std::vector<int64_t> shape(like.dim(), 1);
  shape[0] = -1;
  return c.view(shape);
}

/// What one child contributes: its per-sample squared norms, then its
/// clipped sums (written under the child's parameter names). a and g have
/// one row per batch row; with group_ rows per example, the rules treat an
/// example's rows as its positions (g already carries the 1 / group_).
class Rule {
 public:
  virtual ~Rule() = default;
  void set_group(int64_t k) { group_ = k; }
  virtual Tensor norm2(const Tensor& a, const Tensor& g, NormMode mode) = 0;
  virtual void clipped_sum(const Tensor& a, const Tensor& g, const Tensor& c, const std::string& prefix,
                           TensorDict& out) = 0;

 protected:
  int64_t group_ = 1;
};

class LinearRule : public Rule {
 public:
  explicit LinearRule(nn::LinearImpl& m) : m_(m) {}
  Tensor norm2(const Tensor& a, const Tensor& g, NormMode mode) override {
    auto [a3, g3] = flat(a, g);
    const bool w = m_.weight.requires_grad(), b = m_.bias.defined() && m_.bias.requires_grad();
    if (a3.size(1) == 1) {  // one position: weight |a|^2 |g|^2, bias |g|^2
      Tensor g2 = squared_norms(g3);
      if (!w) return g2;
      Tensor a2 = squared_norms(a3);
      return b ? g2 * (a2 + 1) : g2 * a2;
    }
    Tensor n = at::zeros({a3.size(0)}, g.options());
    if (w) n = n + outer_norm2(a3, g3, mode);
    if (b) n = n + squared_norms(g3.sum(1));
    return n;
  }
  void clipped_sum(const Tensor& a, const Tensor& g, const Tensor& c, const std::string& prefix,
                   TensorDict& out) override {
    auto [a3, g3] = flat(a, g);
    if (m_.weight.requires_grad()) out.insert(prefix + "weight", outer_sum(a3, g3, c));
    // sum_i c_i sum_t g_it: one matrix-vector product
    if (m_.bias.defined() && m_.bias.requires_grad()) out.insert(prefix + "bias", (g3.size(1) == 1 ? g3.select(1, 0) : g3.sum(1)).t().mv(c));
  }

 private:
  std::pair<Tensor, Tensor> flat(const Tensor& a, const Tensor& g) const {
    const int64_t B = a.size(0);
    return {regroup(a.reshape({B, -1, a.size(-1)}), group_), regroup(g.reshape({B, -1, g.size(-1)}), group_)};
  }
  nn::LinearImpl& m_;
};

/// Conv1d / Conv2d with zero padding given as numbers (Conv1d as a 1 x k
/// Conv2d). Ghost: the input unfolded into patches is a Linear's input with
/// T = output positions, per group. Materialised: every example's weight
/// gradient at once as one convolution backward with the batch folded into
/// the groups (as functorch's batching rule for convolution_backward does),
/// far cheaper than the unfolded product.
class ConvRule : public Rule {
 public:
  ConvRule(Tensor weight, Tensor bias, std::vector<int64_t> kernel, std::vector<int64_t> stride,
           std::vector<int64_t> padding, std::vector<int64_t> dilation, int64_t groups, bool one_d)
      : weight_(std::move(weight)),
        bias_(std::move(bias)),
        kernel_(std::move(kernel)),
        stride_(std::move(stride)),
        padding_(std::move(padding)),
        dilation_(std::move(dilation)),
        groups_(groups),
        one_d_(one_d) {}
  Tensor norm2(const Tensor& a, const Tensor& g, NormMode mode) override {
    Tensor a4 = one_d_ ? a.unsqueeze(2) : a, g4 = one_d_ ? g.unsqueeze(2) : g;
    Tensor n = at::zeros({a.size(0) / group_}, g.options());
    if (weight_.requires_grad()) {
      const int64_t T = group_ * g4.size(2) * g4.size(3), d = weight_[0].numel(), p = weight_.size(0) / groups_;
      // Auto: FastDP's flop rule (2 T^2 <= p d), and ghost only when the
      // unfolded patches it must build (T d per group and sample) are under a
      // quarter of the per-sample gradient (p d): unfolding is memory-bound,
      // the folded convolution backward is not (W10's CNN at batch 2048, 2
      // threads: its second conv, T = 25, p = 32, d = 256, takes 53 ms ghost
      // and 19 ms materialised).
      ghost_ = mode == NormMode::Ghost || (mode == NormMode::Auto && 2 * T * T <= p * d && p > 4 * T);
      if (ghost_) {
        patches_ = regroup(unfold(a4), group_);
        out_grads_ = regroup(g4.flatten(2).transpose(1, 2), group_);
        for (int64_t k = 0; k < groups_; ++k)
          n = n + outer_norm2(group_in(patches_, k), group_out(out_grads_, k), NormMode::Ghost);
      } else {
        auto [grads, norm2] = per_sample_weight_grads(a4, g4);
        if (group_ == 1 && norm2.defined()) {  // the kernel's norms: the gradients are not read again
          per_sample_ = grads;
          n = n + norm2;
        } else {
          per_sample_ = group_sum(grads, group_);
          n = n + squared_norms(per_sample_);
        }
      }
    }
    if (bias_.defined() && bias_.requires_grad()) {
      bias_sums_ = group_sum(g4.flatten(2).sum(2), group_);
      n = n + squared_norms(bias_sums_);
    }
    return n;
  }
  // Uses what norm2 kept of the same call (patches and output gradients, or
  // the per-sample gradients; the bias's per-example sums), then drops it.
  void clipped_sum(const Tensor&, const Tensor&, const Tensor& c, const std::string& prefix,
                   TensorDict& out) override {
    if (weight_.requires_grad()) {
      if (ghost_) {
        std::vector<Tensor> rows;
        for (int64_t k = 0; k < groups_; ++k)
          rows.push_back(outer_sum(group_in(patches_, k), group_out(out_grads_, k), c));
        out.insert(prefix + "weight", at::cat(rows, 0).view(weight_.sizes()));
      } else {
        out.insert(prefix + "weight", c.matmul(per_sample_.flatten(1)).view(weight_.sizes()));
      }
    }
    if (bias_.defined() && bias_.requires_grad()) out.insert(prefix + "bias", c.matmul(bias_sums_));
    patches_ = out_grads_ = per_sample_ = bias_sums_ = Tensor();
  }

 private:
  // patches [B, T, C_in k...]
  Tensor unfold(const Tensor& a4) const {
    auto ea = [](const std::vector<int64_t>& v) { return torch::ExpandingArray<2>(at::IntArrayRef(v)); };
    return F::unfold(a4, F::UnfoldFuncOptions(ea(kernel_)).dilation(ea(dilation_)).padding(ea(padding_)).stride(ea(stride_)))
        .transpose(1, 2);
  }
  // [B, C_out * C_in / groups * k...] and, from the CPU kernel, their squared
  // norms [B]. On the CPU (float, double) by our direct kernel over the batch;
  // elsewhere as one convolution backward with the batch folded into the
  // groups (sample b's channels form groups b*groups .. b*groups + groups - 1),
  // as functorch's batching rule does (norms undefined); the folded way under
  // a capture too, which records ops and would not replay host writes.
  std::pair<Tensor, Tensor> per_sample_weight_grads(const Tensor& a4, const Tensor& g4) const {
    const int64_t B = a4.size(0);
    std::vector<int64_t> w_shape = weight_.sizes().vec();
    if (one_d_) w_shape.insert(w_shape.begin() + 2, 1);
    if (a4.is_cpu() && (a4.scalar_type() == at::kFloat || a4.scalar_type() == at::kDouble) &&
        g4.scalar_type() == a4.scalar_type() && !torchfunc::detail::capturing()) {
      Tensor a = a4.contiguous(), g = g4.contiguous();
      Tensor out = at::empty({B, weight_.numel()}, a.options()), norm2 = at::empty({B}, a.options());
      const detail::ConvGradShape s{a.size(1), a.size(2), a.size(3), g.size(1), g.size(2), g.size(3),
                                    w_shape[2], w_shape[3], stride_[0], stride_[1], padding_[0], padding_[1],
                                    dilation_[0], dilation_[1], groups_};
      AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "torchfunc::dp per-sample convolution gradients", [&] {
        const scalar_t *x = a.data_ptr<scalar_t>(), *gp = g.data_ptr<scalar_t>();
        scalar_t *o = out.data_ptr<scalar_t>(), *n2 = norm2.data_ptr<scalar_t>();
        torchfunc::detail::parallel_ranges(B, 1, [&](int64_t n0, int64_t n1) {
          detail::per_sample_conv_weight_grad(s, x, gp, o, n2, n0, n1);
        });
      });
      return {out, norm2};
    }
    std::vector<int64_t> folded = w_shape;
    folded[0] *= B;
    Tensor gw = std::get<1>(at::convolution_backward(
        g4.reshape({1, -1, g4.size(2), g4.size(3)}), a4.reshape({1, -1, a4.size(2), a4.size(3)}),
        at::empty(folded, a4.options()), c10::nullopt, stride_, padding_, dilation_, /*transposed=*/false, {0, 0},
        B * groups_, {false, true, false}));
    return {gw.view({B, -1}), Tensor()};
  }
  Tensor group_in(const Tensor& patches, int64_t k) const {
    const int64_t d = patches.size(2) / groups_;
    return patches.narrow(2, k * d, d);
  }
  Tensor group_out(const Tensor& gg, int64_t k) const {
    const int64_t p = gg.size(2) / groups_;
    return gg.narrow(2, k * p, p);
  }
  Tensor weight_, bias_;
  std::vector<int64_t> kernel_, stride_, padding_, dilation_;
  int64_t groups_;
  bool one_d_;
  bool ghost_ = false;
  Tensor patches_, out_grads_, per_sample_, bias_sums_;  // from norm2, for clipped_sum
};

/// Embedding: the gradient of row v is the sum of g_t over the positions
/// with index v, so ||G_i||^2 = sum_{t,t'} [idx_t == idx_t'] (g_t . g_t').
class EmbeddingRule : public Rule {
 public:
  explicit EmbeddingRule(nn::EmbeddingImpl& m) : m_(m) {}
  Tensor norm2(const Tensor& a, const Tensor& g, NormMode) override {
    auto [idx, g3] = flat(a, g);
    Tensor same = (idx.unsqueeze(2) == idx.unsqueeze(1)).to(g3.scalar_type());
    return (same * at::bmm(g3, g3.transpose(1, 2))).sum({1, 2});
  }
  void clipped_sum(const Tensor& a, const Tensor& g, const Tensor& c, const std::string& prefix,
                   TensorDict& out) override {
    auto [idx, g3] = flat(a, g);
    Tensor sum = at::zeros_like(m_.weight);
    sum.index_add_(0, idx.reshape(-1), (g3 * c.view({-1, 1, 1})).reshape({-1, g3.size(2)}));
    out.insert(prefix + "weight", sum);
  }

 private:
  std::pair<Tensor, Tensor> flat(const Tensor& a, const Tensor& g) const {
    const int64_t B = a.size(0);
    Tensor idx = a.reshape({B, -1}), g3 = g.reshape({B, -1, g.size(-1)});
    if (auto pad = m_.options.padding_idx()) {  // the padding row gets no gradient
      int64_t p = *pad < 0 ? *pad + m_.weight.size(0) : *pad;
      g3 = g3 * (idx != p).unsqueeze(2).to(g3.scalar_type());
    }
    return {regroup(idx, group_), regroup(g3, group_)};
  }
  nn::EmbeddingImpl& m_;
};

/// A rule that materialises the child's per-sample gradients in norm2 and
/// scales them in clipped_sum (cheap when they are small).
class MaterializedRule : public Rule {
 public:
  Tensor norm2(const Tensor& a, const Tensor& g, NormMode) override {
    grads_ = per_sample_grads(a, g);
    Tensor n = at::zeros({a.size(0) / group_}, g.options());
    for (auto& e : grads_) {
      e.value() = group_sum(e.value(), group_);
      n = n + squared_norms(e.value());
    }
    return n;
  }
  void clipped_sum(const Tensor&, const Tensor&, const Tensor& c, const std::string& prefix,
                   TensorDict& out) override {
    for (const auto& e : grads_.items()) out.insert(prefix + e.key(), (e.value() * per_sample(c, e.value())).sum(0));
  }

 protected:
  virtual TensorDict per_sample_grads(const Tensor& a, const Tensor& g) = 0;

 private:
  TensorDict grads_;  // per sample, from norm2
};

/// LayerNorm / GroupNorm with affine parameters: with x^ the input
/// normalised without them, example i's weight gradient is the sum of g * x^
/// over its positions and its bias gradient the sum of g (one value per
/// normalised element or channel: small, so materialised).
class AffineNormRule : public MaterializedRule {
 public:
  // normalize(a) -> x^; fold(t) -> [B, positions, parameter elements].
  AffineNormRule(Tensor weight, Tensor bias, std::function<Tensor(const Tensor&)> normalize,
                 std::function<Tensor(const Tensor&)> fold)
      : weight_(std::move(weight)), bias_(std::move(bias)), normalize_(std::move(normalize)), fold_(std::move(fold)) {}

 protected:
  TensorDict per_sample_grads(const Tensor& a, const Tensor& g) override {
    const int64_t B = a.size(0);
    std::vector<int64_t> shape{B};
    TensorDict r;
    if (weight_.defined() && weight_.requires_grad()) {
      shape.insert(shape.end(), weight_.sizes().begin(), weight_.sizes().end());
      r.insert("weight", fold_(g * normalize_(a)).sum(1).view(shape));
    }
    if (bias_.defined() && bias_.requires_grad()) {
      shape.resize(1);
      shape.insert(shape.end(), bias_.sizes().begin(), bias_.sizes().end());
      r.insert("bias", fold_(g).sum(1).view(shape));
    }
    return r;
  }

 private:
  Tensor weight_, bias_;
  std::function<Tensor(const Tensor&)> normalize_, fold_;
};

std::unique_ptr<Rule> layer_norm_rule(nn::LayerNormImpl& m) {
  const std::vector<int64_t> shape = m.options.normalized_shape();
  const double eps = m.options.eps();
  int64_t numel = 1;
  for (int64_t s : shape) numel *= s;
  return std::make_unique<AffineNormRule>(
      m.weight, m.bias, [shape, eps](const Tensor& a) { return at::layer_norm(a, shape, {}, {}, eps); },
      [numel](const Tensor& t) { return t.reshape({t.size(0), -1, numel}); });
}

std::unique_ptr<Rule> group_norm_rule(nn::GroupNormImpl& m) {
  const int64_t groups = m.options.num_groups();
  const double eps = m.options.eps();
  return std::make_unique<AffineNormRule>(
      m.weight, m.bias, [groups, eps](const Tensor& a) { return at::group_norm(a, groups, {}, {}, eps); },
      [](const Tensor& t) { return t.reshape({t.size(0), t.size(1), -1}).transpose(1, 2); });
}

/// Any other child: per-sample gradients of its parameters by vmap over a
/// vjp of the child alone, at its input row a_i with cotangent g_i.
class GenericRule : public MaterializedRule {
 public:
  GenericRule(nn::AnyModule& any, TensorDict params) : any_(any), params_(std::move(params)) {}

 protected:
  TensorDict per_sample_grads(const Tensor& a, const Tensor& g) override {
    auto call = [&](const TensorDict& p, const Tensor& ai) {
      std::vector<std::pair<std::string, Tensor>> values;
      std::vector<size_t> dict_of;
      torchfunc::detail::collect_dicts(p, values, dict_of);
      torchfunc::detail::Reparametrize guard(*any_.ptr(), values, dict_of, FunctionalCallOptions());
      return any_.forward(ai.unsqueeze(0)).squeeze(0);
    };
    return vmap([&](const Tensor& ai, const Tensor& gi) {
      auto [out, fn] = vjp([&](const TensorDict& p) { return call(p, ai); }, params_);
      return std::get<0>(fn(gi));
    })(a, g);
  }

 private:
  nn::AnyModule& any_;
  TensorDict params_;
};

template <size_t D>
std::vector<int64_t> ints(const torch::ExpandingArray<D>& e) {
  return std::vector<int64_t>(e->begin(), e->end());
}

/// The rule for a child, or null when it has no parameter to train.
template <size_t D, class Conv>
std::unique_ptr<Rule> conv_rule(Conv& m, nn::AnyModule& any, TensorDict params) {
  const auto& o = m.options;
  const auto* pad = compat::variant_get_if<torch::ExpandingArray<D>>(o.padding());
  if (!pad || !compat::variant_get_if<torch::enumtype::kZeros>(o.padding_mode()))
    return std::make_unique<GenericRule>(any, std::move(params));  // 'same' / 'valid' strings, non-zero padding
  auto pad2 = [&](std::vector<int64_t> v) { return D == 1 ? std::vector<int64_t>{0, v[0]} : v; };
  auto one2 = [&](std::vector<int64_t> v, int64_t fill) { return D == 1 ? std::vector<int64_t>{fill, v[0]} : v; };
  return std::make_unique<ConvRule>(m.weight, m.bias, one2(ints(o.kernel_size()), 1), one2(ints(o.stride()), 1),
                                    pad2(ints(*pad)), one2(ints(o.dilation()), 1), o.groups(), D == 1);
}

std::unique_ptr<Rule> rule_for(nn::AnyModule& any, const TensorDict& params) {
  if (params.is_empty()) return nullptr;
  nn::Module* m = any.ptr().get();
  if (auto* lin = dynamic_cast<nn::LinearImpl*>(m)) return std::make_unique<LinearRule>(*lin);
  if (auto* c2 = dynamic_cast<nn::Conv2dImpl*>(m)) return conv_rule<2>(*c2, any, params);
  if (auto* c1 = dynamic_cast<nn::Conv1dImpl*>(m)) return conv_rule<1>(*c1, any, params);
  if (auto* e = dynamic_cast<nn::EmbeddingImpl*>(m)) {
    const auto& o = e->options;
    if (!o.max_norm() && !o.scale_grad_by_freq() && !o.sparse()) return std::make_unique<EmbeddingRule>(*e);
  }
  if (auto* ln = dynamic_cast<nn::LayerNormImpl*>(m)) return layer_norm_rule(*ln);
  if (auto* gn = dynamic_cast<nn::GroupNormImpl*>(m)) return group_norm_rule(*gn);
  return std::make_unique<GenericRule>(any, params);
}

Tensor clip_factors(const Tensor& norms, const ClipOptions& o) {
  return (o.max_norm() / (norms + o.eps())).clamp_max(1.0);
}

}  // namespace

namespace detail {
void check_inputs(const Tensor& x, const Tensor& y, const ClipOptions& options) {
  TORCH_CHECK(options.max_norm() > 0, "torchfunc::dp::clipped_grad_sum: max_norm must be positive, got ",
              options.max_norm(), ".");
  TORCH_CHECK(x.dim() >= 1 && y.dim() >= 1 && x.size(0) == y.size(0), "torchfunc::dp::clipped_grad_sum: x and y must "
              "have the batch in dim 0 with the same size, got shapes ", x.sizes(), " and ", y.sizes(), ".");
  const int64_t K = options.group_size();
  TORCH_CHECK(K >= 1, "torchfunc::dp::clipped_grad_sum: group_size must be at least 1, got ", K, ".");
  TORCH_CHECK(x.size(0) % K == 0, "torchfunc::dp::clipped_grad_sum: the batch of ", x.size(0),
              " rows is not a whole number of groups of group_size ", K, " rows (one example's augmentations).");
}
}  // namespace detail

ClippedGradients clipped_grad_sum(nn::Sequential& model, const PerSampleLoss& loss, const Tensor& x, const Tensor& y,
                                  const ClipOptions& options) {
  detail::check_inputs(x, y, options);
  // Under vmap its autograd::grad would sum over the vmapped samples too.
  TORCH_CHECK(torchfunc::detail::is_plain(x) && torchfunc::detail::is_plain(y), "torchfunc::dp::clipped_grad_sum: got "
              "a transform's tensor (a BatchedTensor or a grad/functionalize wrapper); call it outside vmap / grad / "
              "functionalize, on plain tensors: its own backward pass does not compose with them.");
  const int64_t K = options.group_size();
  struct Step {
    std::string prefix;
    std::unique_ptr<Rule> rule;
    Tensor input, output;
  };
  std::vector<Step> steps;
  c10::AutoGradMode grad_on(true);
  Tensor h = x.detach();
  size_t index = 0;
  for (auto& any : *model) {
    const std::string prefix = std::to_string(index++) + ".";
    TensorDict params;
    for (const auto& p : any.ptr()->named_parameters())
      if (p.value().requires_grad()) params.insert(p.key(), p.value().detach());
    auto rule = rule_for(any, params);
    if (rule) rule->set_group(K);
    Tensor in = h;
    h = any.forward(h);
    if (rule && h.requires_grad()) steps.push_back({prefix, std::move(rule), in.detach(), h});
  }
  Tensor losses = loss(h, y);
  TORCH_CHECK(losses.dim() == 1 && losses.size(0) == x.size(0), "torchfunc::dp::clipped_grad_sum: the loss must "
              "return one value per sample (shape [", x.size(0), "], reduction none), got shape ", losses.sizes(), ".");
  std::vector<Tensor> outs;
  for (const auto& s : steps) outs.push_back(s.output);
  std::vector<Tensor> gs;
  // An example's gradient is the mean over its K rows: the 1 / K goes into g.
  if (!outs.empty()) gs = torch::autograd::grad({K == 1 ? losses.sum() : losses.sum() / double(K)}, outs, {},
                                                /*retain_graph=*/false, /*create_graph=*/false, /*allow_unused=*/true);
  at::NoGradGuard no_grad;
  Tensor norm2 = at::zeros({x.size(0) / K}, losses.options());
  for (size_t k = 0; k < steps.size(); ++k) {
    if (!gs[k].defined()) gs[k] = at::zeros_like(steps[k].output);
    norm2 = norm2 + steps[k].rule->norm2(steps[k].input, gs[k], options.mode());
  }
  ClippedGradients r;
  r.norms = norm2.sqrt();
  r.losses = losses.detach();
  const Tensor c = clip_factors(r.norms, options);
  TensorDict sums;
  for (size_t k = 0; k < steps.size(); ++k) steps[k].rule->clipped_sum(steps[k].input, gs[k], c, steps[k].prefix, sums);
  for (const auto& p : model->named_parameters())  // the model's order
    if (p.value().requires_grad()) r.grad_sum.insert(p.key(), sums.contains(p.key()) ? sums[p.key()] : at::zeros_like(p.value()));
  return r;
}

namespace detail {
ClippedGradients clip_materialized(TensorDict per_sample_grads, Tensor losses, const ClipOptions& options) {
  const int64_t K = options.group_size();
  Tensor norm2 = at::zeros({losses.size(0) / K}, losses.options());
  for (auto& e : per_sample_grads) {
    if (K > 1) e.value() = group_sum(e.value(), K).div_(double(K));  // an example's mean over its rows
    norm2 = norm2 + squared_norms(e.value());
  }
  ClippedGradients r;
  r.norms = norm2.sqrt();
  r.losses = losses;
  const Tensor c = clip_factors(r.norms, options);
  for (const auto& e : per_sample_grads.items()) r.grad_sum.insert(e.key(), (e.value() * per_sample(c, e.value())).sum(0));
  return r;
}
}  // namespace detail

}  // namespace dp
}  // namespace torchfunc
