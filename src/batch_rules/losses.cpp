// src/batch_rules/losses.cpp: batching rules for loss ops. Pointwise losses
// (mse, smooth_l1, huber, soft_margin and their backwards; the templates are
// in util.h): the backwards are missing in 1.13 and, for a C++-only program,
// may be missing on 2.x too (libtorch registers them from Python), and the
// forwards of mse / smooth_l1 / huber replace libtorch's, which fail for a
// broadcasting target. The margin losses (missing everywhere). nll_loss(2d)
// forward / backward (replaced: targets equal to ignore_index, the usual
// padding label, fail under libtorch's rules) and cross_entropy_loss (a
// decomposition inside every transform). Not here: how rules register
// (registry.cpp, util.h).
#include "util.h"

#include <ATen/ExpandUtils.h>
#include <ATen/Functions.h>
#include <ATen/core/Reduction.h>
#include <c10/core/WrapDimMinimal.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <limits>
#include <optional>

namespace torchfunc {
namespace detail {
namespace batch_rules {
namespace {

// ---- margin losses (multi_margin_loss, multilabel_margin_loss) ---------------
// Per sample the input is one row [C] or N rows [N, C] and the loss is a sum
// over rows. Batched, the B samples' rows fold into B*N rows of one call with
// reduction none, and the reduction is applied per sample.

// Rows of x [B, C] or [B, N, C] as [B*N, C]; N is returned through `rows`.
at::Tensor fold_rows(const at::Tensor& x, int64_t& rows) {
  if (x.dim() == 1) {  // a 0-dim sample: one row of one class, as ATen treats it
    rows = 1;
    return x.reshape({-1, 1});
  }
  TORCH_CHECK(x.dim() == 2 || x.dim() == 3, "Expected non-empty vector or matrix with optional 0-dim batch size, but got: ",
              x.sizes().slice(1));
  rows = x.dim() == 3 ? x.size(1) : 1;
  return x.reshape({-1, x.size(-1)});
}

// The per-sample loss from per-row losses [B*N]: reduction none keeps the
// per-sample output shape (`keep_rows`: [N], else a scalar per sample).
at::Tensor reduce_rows(const at::Tensor& row_loss, int64_t batch, int64_t rows, int64_t reduction, bool keep_rows) {
  at::Tensor per_row = row_loss.view({batch, rows});
  if (reduction == at::Reduction::None) return keep_rows ? per_row : per_row.view({batch});
  return reduction == at::Reduction::Mean ? per_row.mean(1) : per_row.sum(1);
}

// grad_output of a per-sample loss as one factor per row [B*N].
at::Tensor grad_rows(const at::Tensor& grad_output, int64_t batch, int64_t rows, int64_t reduction) {
  if (reduction == at::Reduction::None) return grad_output.reshape({batch * rows});
  at::Tensor g = grad_output.reshape({batch, 1}).expand({batch, rows});
  if (reduction == at::Reduction::Mean) g = g / static_cast<double>(rows);
  return g.reshape({batch * rows});
}

// multi_margin_loss multiplies row n's loss by weight[target[n]]: the rule
// computes unweighted rows and applies that factor itself, so a per-sample
// (batched) weight works too.
at::Tensor margin_row_weights(const c10::optional<at::Tensor>& weight, const at::Tensor& target_rows, int64_t level,
                              int64_t batch) {
  if (!weight.has_value() || !weight->defined()) return {};
  at::Tensor w = batch_first(*weight, level, batch);
  TORCH_CHECK(w.dim() == 2, "multi_margin_loss: expected weight to be a 1D tensor");
  return w.gather(1, target_rows.view({batch, -1})).reshape({-1});
}

at::Tensor multi_margin_loss_batched(const at::Tensor& self, const at::Tensor& target, const at::Scalar& p,
                                     const at::Scalar& margin, const c10::optional<at::Tensor>& weight,
                                     int64_t reduction) {
  c10::impl::ExcludeDispatchKeyGuard guard(c10::DispatchKey::FuncTorchBatched);
  const int64_t level = current_vmap_level("multi_margin_loss");
  const at::Tensor* w = weight.has_value() ? &*weight : nullptr;
  const int64_t batch = batch_size_at({&self, &target, w}, level);
  if (batch < 0) return at::multi_margin_loss(self, target, p, margin, weight, reduction);
  int64_t rows = 0;
  at::Tensor x = fold_rows(batch_first(self, level, batch), rows);
  at::Tensor t = batch_first(target, level, batch);
  const bool keep_rows = t.dim() > 1;  // per-sample target of rank 1: an [N] output for reduction none
  t = t.reshape({-1});
  at::Tensor loss = at::multi_margin_loss(x, t, p, margin, c10::nullopt, at::Reduction::None);
  if (at::Tensor wy = margin_row_weights(weight, t, level, batch); wy.defined()) loss = loss * wy;
  return ft::makeBatched(reduce_rows(loss, batch, rows, reduction, keep_rows), 0, level);
}

at::Tensor multi_margin_loss_backward_batched(const at::Tensor& grad_output, const at::Tensor& self,
                                              const at::Tensor& target, const at::Scalar& p, const at::Scalar& margin,
                                              const c10::optional<at::Tensor>& weight, int64_t reduction) {
  c10::impl::ExcludeDispatchKeyGuard guard(c10::DispatchKey::FuncTorchBatched);
  const int64_t level = current_vmap_level("multi_margin_loss_backward");
  const at::Tensor* w = weight.has_value() ? &*weight : nullptr;
  const int64_t batch = batch_size_at({&grad_output, &self, &target, w}, level);
  if (batch < 0) return at::multi_margin_loss_backward(grad_output, self, target, p, margin, weight, reduction);
  int64_t rows = 0;
  at::Tensor x_phys = batch_first(self, level, batch);
  at::Tensor x = fold_rows(x_phys, rows);
  at::Tensor t = batch_first(target, level, batch).reshape({-1});
  at::Tensor g = grad_rows(batch_first(grad_output, level, batch), batch, rows, reduction);
  if (at::Tensor wy = margin_row_weights(weight, t, level, batch); wy.defined()) g = g * wy;
  at::Tensor grad = at::multi_margin_loss_backward(g, x, t, p, margin, c10::nullopt, at::Reduction::None);
  return ft::makeBatched(grad.view(x_phys.sizes()), 0, level);
}

std::tuple<at::Tensor, at::Tensor> multilabel_margin_loss_forward_batched(const at::Tensor& self,
                                                                          const at::Tensor& target,
                                                                          int64_t reduction) {
  c10::impl::ExcludeDispatchKeyGuard guard(c10::DispatchKey::FuncTorchBatched);
  const int64_t level = current_vmap_level("multilabel_margin_loss_forward");
  const int64_t batch = batch_size_at({&self, &target}, level);
  if (batch < 0) return at::multilabel_margin_loss_forward(self, target, reduction);
  int64_t rows = 0;
  at::Tensor x = fold_rows(batch_first(self, level, batch), rows);
  at::Tensor t_phys = batch_first(target, level, batch);
  TORCH_CHECK(t_phys.numel() == x.numel() && (t_phys.dim() == 1 || t_phys.size(-1) == x.size(-1)),
              "multilabel_margin_loss: inconsistent target size: ", t_phys.sizes().slice(1), " for input of size: ",
              self.sizes());
  auto [loss, is_target] = at::multilabel_margin_loss_forward(x, t_phys.reshape(x.sizes()), at::Reduction::None);
  const bool keep_rows = t_phys.dim() > 2;  // per-sample [N, C]: an [N] output for reduction none
  return {ft::makeBatched(reduce_rows(loss, batch, rows, reduction, keep_rows), 0, level),
          ft::makeBatched(is_target.view(t_phys.sizes()), 0, level)};
}

at::Tensor multilabel_margin_loss_batched(const at::Tensor& self, const at::Tensor& target, int64_t reduction) {
  return std::get<0>(multilabel_margin_loss_forward_batched(self, target, reduction));
}

at::Tensor multilabel_margin_loss_backward_batched(const at::Tensor& grad_output, const at::Tensor& self,
                                                   const at::Tensor& target, int64_t reduction,
                                                   const at::Tensor& is_target) {
  c10::impl::ExcludeDispatchKeyGuard guard(c10::DispatchKey::FuncTorchBatched);
  const int64_t level = current_vmap_level("multilabel_margin_loss_backward");
  const int64_t batch = batch_size_at({&grad_output, &self, &target, &is_target}, level);
  if (batch < 0) return at::multilabel_margin_loss_backward(grad_output, self, target, reduction, is_target);
  int64_t rows = 0;
  at::Tensor x_phys = batch_first(self, level, batch);
  at::Tensor x = fold_rows(x_phys, rows);
  at::Tensor g = grad_rows(batch_first(grad_output, level, batch), batch, rows, reduction);
  at::Tensor grad = at::multilabel_margin_loss_backward(g, x, batch_first(target, level, batch).reshape(x.sizes()),
                                                        at::Reduction::None,
                                                        batch_first(is_target, level, batch).reshape(x.sizes()));
  return ft::makeBatched(grad.view(x_phys.sizes()), 0, level);
}

// ---- nll_loss_forward / nll_loss2d_forward and their backwards -----------------
// libtorch's own rules (1.13, and 2.x as far as we have read them) take a
// negative ignore_index to mean "nothing ignored" and gather at the target,
// so the default ignore_index -100 fails ("index -100 is out of bounds") as
// soon as a target is -100, the usual padding label; torchfunc replaces them.
// Per sample the input is [C] (one frame), [N, C] or, for nll_loss2d,
// [N, C, H, W]: the B samples' frames fold into one call with reduction none
// and no weight; class weights (shared or per sample) and the per-sample
// reduction are applied here (mean = sum / total weight, as ATen divides).

struct NllFrames {
  at::Tensor x;       // folded input [B*N, C, ...] ([B, C] for one-frame samples)
  at::Tensor target;  // folded target [B*N, ...] ([B])
  at::Tensor weight;  // like target: each element's class weight, 0 where ignored
                      // (undefined without class weights: ATen zeroes ignored ones)
  std::vector<int64_t> input_shape;   // physical input [B, ...]
  std::vector<int64_t> target_shape;  // physical target [B, ...]
  bool one_frame = false;             // per-sample input [C]
};

NllFrames nll_frames(const at::Tensor& self, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
                     int64_t ignore_index, int64_t level, int64_t batch, bool spatial) {
  NllFrames f;
  at::Tensor x = batch_first(self, level, batch), t = batch_first(target, level, batch);
  if (spatial) {
    TORCH_CHECK(x.dim() == 5, "nll_loss2d: only batches of spatial inputs supported (4D tensors), but got input of "
                "size: ", x.sizes().slice(1));
  } else {
    TORCH_CHECK(x.dim() == 2 || x.dim() == 3, "nll_loss: input tensor should be 1D or 2D, but got ", x.dim() - 1,
                "D per sample");
  }
  f.one_frame = x.dim() == 2;
  f.input_shape = x.sizes().vec();
  f.target_shape = t.sizes().vec();
  f.x = f.one_frame ? x : x.flatten(0, 1);
  f.target = f.one_frame ? t.reshape({-1}) : t.flatten(0, 1);
  TORCH_CHECK(f.target.size(0) == f.x.size(0) && f.target.numel() * f.x.size(1) == f.x.numel(),
              "nll_loss: Expected input of size ", x.sizes().slice(1), " to match target of size ",
              t.sizes().slice(1), " (one class index per frame).");
  if (weight.has_value() && weight->defined()) {
    at::Tensor w = batch_first(*weight, level, batch);
    TORCH_CHECK(w.dim() == 2 && w.size(1) == f.x.size(1), "nll_loss: weight tensor should be defined either for all ",
                f.x.size(1), " classes or no classes but got weight tensor of shape: ", weight->sizes());
    at::Tensor kept = f.target != ignore_index;
    at::Tensor safe = at::where(kept, f.target, at::zeros_like(f.target));
    f.weight = w.gather(1, safe.reshape({batch, -1})).view(f.target.sizes()) * kept;
  }
  return f;
}

// Per sample: the sum of the class weights of its non-ignored elements (the
// count of them without class weights), as ATen's total_weight.
at::Tensor nll_total_weight(const NllFrames& f, int64_t ignore_index, int64_t batch) {
  if (f.weight.defined()) return f.weight.reshape({batch, -1}).sum(1);
  return (f.target != ignore_index).reshape({batch, -1}).sum(1).to(f.x.scalar_type());
}

template <auto Forward, bool Spatial>
std::tuple<at::Tensor, at::Tensor> nll_forward_rule(const at::Tensor& self, const at::Tensor& target,
                                                    const c10::optional<at::Tensor>& weight, int64_t reduction,
                                                    int64_t ignore_index) {
  c10::impl::ExcludeDispatchKeyGuard guard(c10::DispatchKey::FuncTorchBatched);
  const int64_t level = current_vmap_level("nll_loss_forward");
  const at::Tensor* w = weight.has_value() ? &*weight : nullptr;
  const int64_t batch = batch_size_at({&self, &target, w}, level);
  if (batch < 0) return Forward(self, target, weight, reduction, ignore_index);
  NllFrames f = nll_frames(self, target, weight, ignore_index, level, batch, Spatial);
  // Unweighted, unreduced: -x[t] per element, 0 where ignored (ATen checks
  // the targets' range here).
  at::Tensor per_elem = std::get<0>(Forward(f.x, f.target, c10::nullopt, at::Reduction::None, ignore_index));
  if (f.weight.defined()) per_elem = per_elem * f.weight;
  at::Tensor out, total;
  if (reduction == at::Reduction::None) {
    out = per_elem.view(f.target_shape);
    // ATen reports a total weight for unreduced losses only for one frame.
    total = f.one_frame ? nll_total_weight(f, ignore_index, batch) : at::zeros({batch}, f.x.options());
  } else {
    out = f.one_frame ? per_elem : per_elem.reshape({batch, -1}).sum(1);
    total = nll_total_weight(f, ignore_index, batch);
    if (reduction == at::Reduction::Mean) out = out / total;
  }
  return {ft::makeBatched(out, 0, level), ft::makeBatched(total, 0, level)};
}

template <auto Backward, bool Spatial>
at::Tensor nll_backward_rule(const at::Tensor& grad_output, const at::Tensor& self, const at::Tensor& target,
                             const c10::optional<at::Tensor>& weight, int64_t reduction, int64_t ignore_index,
                             const at::Tensor& total_weight) {
  c10::impl::ExcludeDispatchKeyGuard guard(c10::DispatchKey::FuncTorchBatched);
  const int64_t level = current_vmap_level("nll_loss_backward");
  const at::Tensor* w = weight.has_value() ? &*weight : nullptr;
  const int64_t batch = batch_size_at({&grad_output, &self, &target, w, &total_weight}, level);
  if (batch < 0) return Backward(grad_output, self, target, weight, reduction, ignore_index, total_weight);
  NllFrames f = nll_frames(self, target, weight, ignore_index, level, batch, Spatial);
  at::Tensor g = batch_first(grad_output, level, batch);
  if (reduction == at::Reduction::None) {
    g = g.reshape(f.target.sizes());
  } else {
    if (reduction == at::Reduction::Mean) g = g / batch_first(total_weight, level, batch);
    if (!f.one_frame) {  // one factor per sample -> one per element
      std::vector<int64_t> one_per_sample(f.target_shape.size(), 1);
      one_per_sample[0] = batch;
      g = g.reshape(one_per_sample).expand(f.target_shape).reshape(f.target.sizes());
    }
  }
  if (f.weight.defined()) g = g * f.weight;
  at::Tensor grad = Backward(g, f.x, f.target, c10::nullopt, at::Reduction::None, ignore_index,
                             at::ones({}, f.x.options()));
  return ft::makeBatched(grad.view(f.input_shape), 0, level);
}

// ---- cross_entropy_loss (a decomposition inside every transform) ----------------
// ATen's label-smoothing path zeroes the ignored targets' smoothing term with
// a boolean-mask index_put_, which vmap cannot batch (a data-dependent shape):
// cross entropy with label_smoothing and any target equal to ignore_index
// failed under vmap, and under vmap(grad) too (grad decomposes the op before
// vmap sees it). This decomposition computes the same with torch::where. It is
// registered at the key every op passes first inside a transform
// (FuncTorchDynamicLayerFrontMode), so each of its ops then goes through every
// active transform; outside transforms ATen's own kernel runs.
at::Tensor cross_entropy_decomposed(const at::Tensor& self, const at::Tensor& target,
                                    const c10::optional<at::Tensor>& weight_opt, int64_t reduction, int64_t ignore_index,
                                    double label_smoothing) {
  const int64_t class_dim = self.dim() == 1 ? 0 : 1;
  const int64_t classes = self.size(class_dim);
  at::Tensor input = at::log_softmax(self, class_dim, self.scalar_type());
  const bool weighted = weight_opt.has_value() && weight_opt->defined();
  at::Tensor weight_view;  // weight broadcast against input
  if (weighted) {
    TORCH_CHECK(weight_opt->dim() == 1 && weight_opt->numel() == classes, "cross_entropy: weight tensor should be "
                "defined either for all ", classes, " classes or no classes but got weight tensor of shape: ",
                weight_opt->sizes());
    std::vector<int64_t> shape(static_cast<size_t>(input.dim()), 1);
    shape[static_cast<size_t>(class_dim)] = classes;
    weight_view = weight_opt->view(shape);
  }
  if (at::isFloatingType(target.scalar_type())) {  // class probabilities
    TORCH_CHECK(ignore_index < 0, "ignore_index is not supported for floating point target");
    TORCH_CHECK(self.sizes() == target.sizes(), "cross_entropy: expected input and target of the same shape for "
                "class-probability targets, got ", self.sizes(), " and ", target.sizes());
    at::Tensor t = label_smoothing > 0 ? target * (1 - label_smoothing) + label_smoothing / classes : target;
    at::Tensor terms = weighted ? input * t * weight_view : input * t;
    if (reduction == at::Reduction::None) return -terms.sum(class_dim);
    if (reduction == at::Reduction::Sum) return -terms.sum();
    if (input.numel() == 0) return -terms.sum() * std::numeric_limits<double>::quiet_NaN();
    return -terms.sum() / static_cast<double>(input.numel() / classes);
  }
  at::Tensor nll = at::nll_loss_nd(input, target, weight_opt, reduction, ignore_index);
  if (label_smoothing <= 0) return nll;
  at::Tensor kept = target != ignore_index;
  at::Tensor smooth = -(weighted ? input * weight_view : input).sum(class_dim);
  smooth = at::where(kept, smooth, at::zeros_like(smooth));
  if (reduction == at::Reduction::Sum) {
    smooth = smooth.sum();
  } else if (reduction == at::Reduction::Mean) {
    at::Tensor denominator;
    if (weighted) {
      at::Tensor safe = at::where(kept, target, at::zeros_like(target));
      at::Tensor w = weight_opt->gather(0, safe.flatten()).view(target.sizes());
      denominator = at::where(kept, w, at::zeros_like(w)).sum();
    } else {
      denominator = kept.sum();
    }
    smooth = smooth.sum() / denominator;
  }
  return (1 - label_smoothing) * nll + smooth * (label_smoothing / classes);
}

}  // namespace

void register_loss_rules(BatchRuleRegistrar& r) {
  r.add("mse_loss_backward", "", TORCH_FN(loss_backward_rule<&at::mse_loss_backward>));
  r.add("smooth_l1_loss_backward", "", TORCH_FN((loss_backward_rule<&at::smooth_l1_loss_backward, double>)));
  r.add("huber_loss_backward", "", TORCH_FN((loss_backward_rule<&at::huber_loss_backward, double>)));
  r.add("soft_margin_loss", "", TORCH_FN(loss_rule<&at::soft_margin_loss>));
  r.add("soft_margin_loss_backward", "", TORCH_FN(loss_backward_rule<&at::soft_margin_loss_backward>));
  r.add("multi_margin_loss", "", TORCH_FN(multi_margin_loss_batched));
  r.add("multi_margin_loss_backward", "", TORCH_FN(multi_margin_loss_backward_batched));
  r.add("multilabel_margin_loss", "", TORCH_FN(multilabel_margin_loss_batched));
  r.add("multilabel_margin_loss_forward", "", TORCH_FN(multilabel_margin_loss_forward_batched));
  r.add("multilabel_margin_loss_backward", "", TORCH_FN(multilabel_margin_loss_backward_batched));
  // libtorch's own rules for the pointwise-loss forwards fail when the
  // target broadcasts against the input (mse_loss on 1.13 and 2.13,
  // smooth_l1_loss on 2.13): ours replace them on every version.
  r.replace(BatchRuleRegistrar::batched(), "mse_loss", TORCH_FN(loss_rule<&at::mse_loss>));
  r.replace(BatchRuleRegistrar::batched(), "smooth_l1_loss", TORCH_FN((loss_rule<&at::smooth_l1_loss, double>)));
  r.replace(BatchRuleRegistrar::batched(), "huber_loss", TORCH_FN((loss_rule<&at::huber_loss, double>)));
  if constexpr (compat::kReplaceNllLossBatchRules) {
    auto& b = BatchRuleRegistrar::batched();
    r.replace(b, "nll_loss_forward", TORCH_FN((nll_forward_rule<&at::nll_loss_forward, false>)));
    r.replace(b, "nll_loss_backward", TORCH_FN((nll_backward_rule<&at::nll_loss_backward, false>)));
    r.replace(b, "nll_loss2d_forward", TORCH_FN((nll_forward_rule<&at::nll_loss2d_forward, true>)));
    r.replace(b, "nll_loss2d_backward", TORCH_FN((nll_backward_rule<&at::nll_loss2d_backward, true>)));
    r.replace(BatchRuleRegistrar::front_mode(), "cross_entropy_loss", TORCH_FN(cross_entropy_decomposed));
  }
}

}  // namespace batch_rules
}  // namespace detail
}  // namespace torchfunc
