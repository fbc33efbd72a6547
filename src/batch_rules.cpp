// Batching rules for ops that libtorch's functorch core runs through its slow
// per-sample fallback, or cannot run at all under vmap. Registered once, by
// the first transform (see ensure_batch_rules), and only for ops that have no
// FuncTorchBatched kernel yet, so a libtorch that ships a rule keeps its own.
//
// aten::unsafe_split.Tensor (missing in 1.13): returns a list of tensors,
// which the 1.13 fallback rejects ("Batching rule not implemented"). nn::LSTM
// and nn::GRU reach it through unsafe_chunk on their gates, so without this
// rule they cannot run under vmap at all.
//
// aten::equal (missing; nn::MultiheadAttention and nn::Transformer* branch on
// it, so without a rule they cannot run under vmap at all) and the upsample
// backward ops and max_pool3d_with_indices (+ backward) (missing in 1.13:
// per-sample loops for every Upsample / MaxPool3d layer).
//
// aten::rrelu_with_noise (+ backward): nn::RReLU in eval mode (refused under
// vmap as a random op). aten::mse_loss: replaced (libtorch's rule fails for a
// broadcasting target), and smooth_l1_loss / huber_loss with it. aten::hardsigmoid:
// decomposed inside transforms (no forward-mode formula for its backward, on
// 1.13 nor on 2.13).
//
// Rules only libtorch 1.13 needs (prelu, prelu_backward) live in
// src/batch_rules_1_13.cpp.
//
// aten::nll_loss_forward / nll_loss2d_forward (+ backwards) and aten::
// cross_entropy_loss (replaced on every version: targets equal to
// ignore_index, the usual padding label, fail under libtorch's rules), the
// margin losses, masked_scatter, nansum and nanmean (missing in 1.13).
//
// Pointwise losses and their backward ops (mse_loss_backward, smooth_l1_loss,
// huber_loss, soft_margin_loss and their backwards): missing in 1.13 (a loop
// over samples and a warning); torch 2.x covers the mse/smooth_l1/huber
// backwards with decompositions registered from Python only, so a C++-only
// program may lack them there too (the run-time check decides). Every
// per-sample grad of an MSE or Huber loss goes through them.
#include "batch_rule_util.h"

#include <ATen/ExpandUtils.h>
#include <ATen/Functions.h>
#include <ATen/core/Reduction.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/WrapDimMinimal.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <array>
#include <map>
#include <mutex>
#include <limits>
#include <memory>
#include <optional>

namespace torchfunc {
namespace detail {
namespace batch_rules {
namespace {

std::vector<at::Tensor> unsafe_split_batched(const at::Tensor& self, int64_t split_size, int64_t dim) {
  c10::impl::ExcludeDispatchKeyGuard guard(c10::DispatchKey::FuncTorchBatched);
  const int64_t level = current_vmap_level("unsafe_split");
  // (Debian's 1.13 does not export functorch's PlumbingHelper; unwrap by hand.)
  ft::BatchedTensorImpl* batched = compat::batched_at(self, level);
  if (!batched) return at::unsafe_split(self, split_size, dim);
  // Batch dim first; the user's dim counts in the per-sample (logical) rank.
  at::Tensor physical = batched->value().movedim(batched->bdim(), 0);
  const int64_t logical_dim = c10::maybe_wrap_dim(dim, physical.dim() - 1);
  std::vector<at::Tensor> parts = at::unsafe_split(physical, split_size, logical_dim + 1);
  for (at::Tensor& p : parts) p = ft::makeBatched(p, 0, level);
  return parts;
}

// ---- pointwise losses: see loss_rule / loss_backward_rule in batch_rule_util.h

// ---- margin losses (multi_margin_loss, multilabel_margin_loss) ---------------
// Per sample the input is one row [C] or N rows [N, C] and the loss is a sum
// over rows. Batched, the B samples' rows fold into B*N rows of one call with
// reduction none, and the reduction is applied per sample.

// Rows of x [B, C] or [B, N, C] as [B*N, C]; N is returned through `rows`.
at::Tensor fold_rows(const at::Tensor& x, int64_t& rows) {
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
  TORCH_CHECK(t_phys.numel() == x.numel() && t_phys.size(-1) == x.size(-1),
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

// ---- hardsigmoid (a decomposition inside every transform) ------------------
// libtorch (1.13 and 2.13) has no forward-mode formula for
// hardsigmoid_backward (nor a decomposition it could run instead), so hessian / jvp(grad) through
// nn::Hardsigmoid failed. Inside transforms it is computed with where: the
// values of ATen's kernel ((x + 3) / 6 clamped to [0, 1]) and its derivative
// (1/6 strictly inside (-3, 3), 0 elsewhere).
at::Tensor hardsigmoid_decomposed(const at::Tensor& self) {
  at::Tensor inside = (self > -3) & (self < 3);
  return at::where(inside, (self + 3) / 6, (self >= 3).to(self.scalar_type()));
}

// ---- nansum / nanmean (missing in 1.13) -------------------------------------------
// Per-sample reductions over the given dims (none or empty: all of a sample's
// dims), shifted past the batch dim.
template <auto Op>
at::Tensor nan_reduction_batched(const at::Tensor& self, at::OptionalIntArrayRef dim, bool keepdim,
                                 c10::optional<at::ScalarType> dtype) {
  c10::impl::ExcludeDispatchKeyGuard guard(c10::DispatchKey::FuncTorchBatched);
  const int64_t level = current_vmap_level("nansum / nanmean");
  auto* b = compat::batched_at(self, level);
  if (!b) return Op(self, dim, keepdim, dtype);
  at::Tensor x = b->value().movedim(b->bdim(), 0);
  const int64_t rank = x.dim() - 1;  // per sample
  if (rank == 0) {  // one element per sample (dim may only name it as 0 / -1)
    if (dim.has_value())
      for (int64_t d : *dim) (void)c10::maybe_wrap_dim(d, 0);
    return ft::makeBatched(Op(x.unsqueeze(1), at::IntArrayRef{1}, false, dtype), 0, level);
  }
  std::vector<int64_t> dims;
  if (dim.has_value() && !dim->empty()) {
    for (int64_t d : *dim) dims.push_back(c10::maybe_wrap_dim(d, rank) + 1);
  } else {
    for (int64_t d = 1; d <= rank; ++d) dims.push_back(d);
  }
  return ft::makeBatched(Op(x, dims, keepdim, dtype), 0, level);
}

// ---- masked_scatter / masked_scatter_ ----------------------------------------
// Per sample, the positions where mask is true take source's elements in
// order. Batched: the k-th true position of sample b takes element k of
// sample b's flattened source (k from a cumulative sum of the mask).
// (masked_select's backward uses it: cross entropy with label smoothing.)
at::Tensor scatter_per_sample(const at::Tensor& x, const at::Tensor& mask, const at::Tensor& source) {
  TORCH_CHECK(mask.scalar_type() == at::kBool, "masked_scatter_ only supports boolean masks, but got mask with dtype ",
              mask.scalar_type());
  TORCH_CHECK(x.scalar_type() == source.scalar_type(),
              "masked_scatter: expected self and source to have same dtypes but got", x.scalar_type(), " and ",
              source.scalar_type());
  const int64_t batch = x.size(0);
  at::Tensor flat_x = x.reshape({batch, -1});
  at::Tensor flat_mask = mask.expand(x.sizes()).reshape({batch, -1});
  at::Tensor flat_src = source.reshape({batch, -1});
  if (flat_mask.size(1) == 0) return x.clone();
  at::Tensor position = flat_mask.cumsum(1) - 1;  // index into the sample's source
  if (flat_src.size(1) < flat_mask.size(1)) {
    TORCH_CHECK(position.select(1, -1).max().item<int64_t>() < flat_src.size(1),
                "masked_scatter: expected source to have at least as many elements as ones in mask");
    if (flat_src.size(1) == 0) return x.clone();
  }
  at::Tensor taken = flat_src.gather(1, position.clamp(0, flat_src.size(1) - 1));
  return at::where(flat_mask, taken, flat_x).view(x.sizes());
}

// Brings self and mask to one [B, *S] shape (self, mask broadcast as they
// would per sample).
std::pair<at::Tensor, at::Tensor> broadcast_self_mask(const at::Tensor& self, const at::Tensor& mask, int64_t level,
                                                      int64_t batch) {
  at::Tensor x = batch_first(self, level, batch), m = batch_first(mask, level, batch);
  while (x.dim() < m.dim()) x = x.unsqueeze(1);
  while (m.dim() < x.dim()) m = m.unsqueeze(1);
  auto shape = at::infer_size(x.sizes(), m.sizes());
  return {x.expand(shape), m.expand(shape)};
}

at::Tensor masked_scatter_batched(const at::Tensor& self, const at::Tensor& mask, const at::Tensor& source) {
  c10::impl::ExcludeDispatchKeyGuard guard(c10::DispatchKey::FuncTorchBatched);
  const int64_t level = current_vmap_level("masked_scatter");
  const int64_t batch = batch_size_at({&self, &mask, &source}, level);
  if (batch < 0) return at::masked_scatter(self, mask, source);
  auto [x, m] = broadcast_self_mask(self, mask, level, batch);
  return ft::makeBatched(scatter_per_sample(x, m, batch_first(source, level, batch)), 0, level);
}

at::Tensor& masked_scatter_inplace_batched(at::Tensor& self, const at::Tensor& mask, const at::Tensor& source) {
  c10::impl::ExcludeDispatchKeyGuard guard(c10::DispatchKey::FuncTorchBatched);
  const int64_t level = current_vmap_level("masked_scatter_");
  const int64_t batch = batch_size_at({&self, &mask, &source}, level);
  if (batch < 0) return self.masked_scatter_(mask, source);
  ft::BatchedTensorImpl* b = compat::batched_at(self, level);
  TORCH_CHECK(b, "vmap: masked_scatter_(self, mask, source): self is not batched but mask or source is; an in-place "
                 "operation cannot write one result per sample into self. Use the out-of-place masked_scatter.");
  at::Tensor x = b->value().movedim(b->bdim(), 0);  // a view of self's storage
  at::Tensor m = batch_first(mask, level, batch);
  while (m.dim() < x.dim()) m = m.unsqueeze(1);
  x.copy_(scatter_per_sample(x, m.expand(x.sizes()), batch_first(source, level, batch)));
  return self;
}

// ---- aten::equal ------------------------------------------------------------
// One bool for two whole tensors: data-dependent control flow (nn::
// MultiheadAttention's forward branches on it). Under vmap the answer must be
// the same for every sample; then it is returned, otherwise it is an error
// (the samples would take different branches). The whole-tensor question is
// asked first, so nested vmaps answer it level by level.
bool equal_batched(const at::Tensor& self, const at::Tensor& other) {
  c10::impl::ExcludeDispatchKeyGuard guard(c10::DispatchKey::FuncTorchBatched);
  const int64_t level = current_vmap_level("equal");
  const int64_t batch = batch_size_at({&self, &other}, level);
  if (batch < 0) return at::equal(self, other);
  at::Tensor a = batch_first(self, level, batch), b = batch_first(other, level, batch);
  if (a.sizes() != b.sizes()) return false;
  if (at::equal(a, b)) return true;
  int64_t equal_samples = 0;
  for (int64_t i = 0; i < batch; ++i) equal_samples += at::equal(a.select(0, i), b.select(0, i)) ? 1 : 0;
  TORCH_CHECK(equal_samples == 0, "torchfunc::vmap: torch::equal is true for ", equal_samples, " of ", batch,
              " samples and false for the others; code that branches on it would take different paths for "
              "different samples, which vmap cannot express. Make the condition the same for all samples, or "
              "compute both branches and select with torch::where.");
  return false;
}

// ---- upsample backward ops ----------------------------------------------------
// grad_output [B, N, C, *spatial] is folded into [B*N, C, *spatial] (the ops
// treat N as independent images) and the result unfolded again.
template <class... Rest>
struct UpsampleBackward {
  using Fn = at::Tensor (*)(const at::Tensor&, at::IntArrayRef, at::IntArrayRef, Rest...);
  template <Fn Op>
  static at::Tensor rule(const at::Tensor& grad_output, at::IntArrayRef output_size, at::IntArrayRef input_size,
                         Rest... rest) {
    c10::impl::ExcludeDispatchKeyGuard guard(c10::DispatchKey::FuncTorchBatched);
    const int64_t level = current_vmap_level("upsample backward");
    auto* b = compat::batched_at(grad_output, level);
    if (!b) return Op(grad_output, output_size, input_size, rest...);
    at::Tensor g = b->value().movedim(b->bdim(), 0);
    const int64_t batch = g.size(0);
    std::vector<int64_t> folded(input_size.begin(), input_size.end());
    folded[0] *= batch;
    at::Tensor grad = Op(g.flatten(0, 1), output_size, folded, rest...);
    std::vector<int64_t> shape{batch};
    shape.insert(shape.end(), input_size.begin(), input_size.end());
    return ft::makeBatched(grad.view(shape), 0, level);
  }
};
using Scale = c10::optional<double>;

// ---- max_pool3d_with_indices (+ backward) ----------------------------------
// Pooling treats images independently: [B, C, D, H, W] (per-sample input
// without N) is an ordinary batch, and [B, N, ...] folds into [B*N, ...].
// Indices are positions inside one image, so they survive the folding.
at::Tensor fold_images(const at::Tensor& t) { return t.dim() == 6 ? t.flatten(0, 1) : t; }
at::Tensor unfold_images(const at::Tensor& t, const at::Tensor& like) {
  if (like.dim() != 6) return t;
  std::vector<int64_t> shape{like.size(0), like.size(1)};
  shape.insert(shape.end(), t.sizes().begin() + 1, t.sizes().end());
  return t.view(shape);
}

std::tuple<at::Tensor, at::Tensor> max_pool3d_batched(const at::Tensor& self, at::IntArrayRef kernel,
                                                      at::IntArrayRef stride, at::IntArrayRef padding,
                                                      at::IntArrayRef dilation, bool ceil_mode) {
  c10::impl::ExcludeDispatchKeyGuard guard(c10::DispatchKey::FuncTorchBatched);
  const int64_t level = current_vmap_level("max_pool3d_with_indices");
  auto* b = compat::batched_at(self, level);
  if (!b) return at::max_pool3d_with_indices(self, kernel, stride, padding, dilation, ceil_mode);
  at::Tensor x = b->value().movedim(b->bdim(), 0);
  TORCH_CHECK(x.dim() == 5 || x.dim() == 6, "max_pool3d: Expected 4D or 5D tensor for input, but got a ",
              x.dim() - 1, "-D tensor per sample");
  auto [out, idx] = at::max_pool3d_with_indices(fold_images(x), kernel, stride, padding, dilation, ceil_mode);
  return {ft::makeBatched(unfold_images(out, x), 0, level), ft::makeBatched(unfold_images(idx, x), 0, level)};
}

at::Tensor max_pool3d_backward_batched(const at::Tensor& grad_output, const at::Tensor& self, at::IntArrayRef kernel,
                                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation,
                                       bool ceil_mode, const at::Tensor& indices) {
  c10::impl::ExcludeDispatchKeyGuard guard(c10::DispatchKey::FuncTorchBatched);
  const int64_t level = current_vmap_level("max_pool3d_with_indices_backward");
  const int64_t batch = batch_size_at({&grad_output, &self, &indices}, level);
  if (batch < 0) {
    return at::max_pool3d_with_indices_backward(grad_output, self, kernel, stride, padding, dilation, ceil_mode,
                                                indices);
  }
  at::Tensor x = batch_first(self, level, batch);
  at::Tensor g = batch_first(grad_output, level, batch), idx = batch_first(indices, level, batch);
  at::Tensor grad = at::max_pool3d_with_indices_backward(fold_images(g), fold_images(x).contiguous(), kernel, stride,
                                                         padding, dilation, ceil_mode, fold_images(idx));
  return ft::makeBatched(unfold_images(grad, x), 0, level);
}

// ---- rrelu_with_noise (nn::RReLU; rejected under vmap) -------------------------
// libtorch (1.13 and 2.13) lists it among the random ops vmap refuses (a FuncTorchVmapMode kernel),
// even in eval mode, where RReLU is deterministic: leaky_relu with the mean
// slope. Eval mode is decomposed so; training mode (a random slope per
// element) stays an error.
// `Noise` is at::Tensor& where the schema marks noise mutable (2.x:
// Tensor(b!) noise) and const at::Tensor& where it does not (1.13).
template <class Noise>
at::Tensor rrelu_with_noise_vmap_mode(const at::Tensor& self, Noise noise, const at::Scalar& lower,
                                      const at::Scalar& upper, bool training, c10::optional<at::Generator> generator) {
  TORCH_CHECK(!training, "torchfunc::vmap: RReLU in training mode draws a random slope per element, which is not "
                         "supported under vmap; use eval mode (the mean slope) or LeakyReLU.");
  (void)noise;
  (void)generator;
  c10::impl::ExcludeDispatchKeyGuard guard(c10::DispatchKey::FuncTorchVmapMode);
  return at::leaky_relu(self, (lower.toDouble() + upper.toDouble()) / 2);
}

// ---- rrelu_with_noise_backward (nn::RReLU in eval mode) -------------------------
// Its backward in eval mode is leaky_relu's (what ATen computes too).
at::Tensor rrelu_with_noise_backward_batched(const at::Tensor& grad_output, const at::Tensor& self,
                                             const at::Tensor& noise, const at::Scalar& lower,
                                             const at::Scalar& upper, bool training, bool self_is_result) {
  c10::impl::ExcludeDispatchKeyGuard guard(c10::DispatchKey::FuncTorchBatched);
  const int64_t level = current_vmap_level("rrelu_with_noise_backward");
  const int64_t batch = batch_size_at({&grad_output, &self}, level);
  if (batch < 0) return at::rrelu_with_noise_backward(grad_output, self, noise, lower, upper, training, self_is_result);
  TORCH_CHECK(!training, "torchfunc::vmap: RReLU in training mode is not supported under vmap.");
  at::Tensor grad = at::leaky_relu_backward(batch_first(grad_output, level, batch), batch_first(self, level, batch),
                                            (lower.toDouble() + upper.toDouble()) / 2, self_is_result);
  return ft::makeBatched(grad, 0, level);
}

}  // namespace
}  // namespace batch_rules

using namespace batch_rules;

const std::vector<std::string>& own_batch_rules() {
  static const std::vector<std::string> registered = [] {
    std::vector<std::string> names;
    BatchRuleRegistrar r(names);
    r.add("unsafe_split", "Tensor", TORCH_FN(unsafe_split_batched));
    r.add("mse_loss_backward", "", TORCH_FN(loss_backward_rule<&at::mse_loss_backward>));
    r.add("smooth_l1_loss_backward", "", TORCH_FN((loss_backward_rule<&at::smooth_l1_loss_backward, double>)));
    r.add("huber_loss_backward", "", TORCH_FN((loss_backward_rule<&at::huber_loss_backward, double>)));
    r.add("soft_margin_loss", "", TORCH_FN(loss_rule<&at::soft_margin_loss>));
    r.add("soft_margin_loss_backward", "", TORCH_FN(loss_backward_rule<&at::soft_margin_loss_backward>));
    r.add("equal", "", TORCH_FN(equal_batched));
    r.add("masked_scatter", "", TORCH_FN(masked_scatter_batched));
    r.add("nansum", "", TORCH_FN(nan_reduction_batched<&at::nansum>));
    r.add("nanmean", "", TORCH_FN(nan_reduction_batched<&at::nanmean>));
    r.add("masked_scatter_", "", TORCH_FN(masked_scatter_inplace_batched));
    r.add("multi_margin_loss", "", TORCH_FN(multi_margin_loss_batched));
    r.add("multi_margin_loss_backward", "", TORCH_FN(multi_margin_loss_backward_batched));
    r.add("multilabel_margin_loss", "", TORCH_FN(multilabel_margin_loss_batched));
    r.add("multilabel_margin_loss_forward", "", TORCH_FN(multilabel_margin_loss_forward_batched));
    r.add("multilabel_margin_loss_backward", "", TORCH_FN(multilabel_margin_loss_backward_batched));
    r.add("rrelu_with_noise_backward", "", TORCH_FN(rrelu_with_noise_backward_batched));
    r.add("max_pool3d_with_indices", "", TORCH_FN(max_pool3d_batched));
    r.add("max_pool3d_with_indices_backward", "", TORCH_FN(max_pool3d_backward_batched));
    r.add("upsample_nearest1d_backward", "", TORCH_FN((UpsampleBackward<Scale>::rule<&at::upsample_nearest1d_backward>)));
    r.add("upsample_nearest2d_backward", "",
        TORCH_FN((UpsampleBackward<Scale, Scale>::rule<&at::upsample_nearest2d_backward>)));
    r.add("upsample_nearest3d_backward", "",
        TORCH_FN((UpsampleBackward<Scale, Scale, Scale>::rule<&at::upsample_nearest3d_backward>)));
    r.add("upsample_linear1d_backward", "",
        TORCH_FN((UpsampleBackward<bool, Scale>::rule<&at::upsample_linear1d_backward>)));
    r.add("upsample_bilinear2d_backward", "",
        TORCH_FN((UpsampleBackward<bool, Scale, Scale>::rule<&at::upsample_bilinear2d_backward>)));
    r.add("upsample_bicubic2d_backward", "",
        TORCH_FN((UpsampleBackward<bool, Scale, Scale>::rule<&at::upsample_bicubic2d_backward>)));
    r.add("upsample_trilinear3d_backward", "",
        TORCH_FN((UpsampleBackward<bool, Scale, Scale, Scale>::rule<&at::upsample_trilinear3d_backward>)));
    // Decompositions inside every transform (see cross_entropy_decomposed,
    // hardsigmoid_decomposed); replaced nll rules (libtorch's fail on ignored
    // targets).
    r.replace(BatchRuleRegistrar::front_mode(), "hardsigmoid", TORCH_FN(hardsigmoid_decomposed));
    // libtorch's own rules for the pointwise-loss forwards fail when the
    // target broadcasts against the input (mse_loss on 1.13 and 2.13,
    // smooth_l1_loss on 2.13): ours replace them on every version.
    r.replace(BatchRuleRegistrar::batched(), "mse_loss", TORCH_FN(loss_rule<&at::mse_loss>));
    r.replace(BatchRuleRegistrar::batched(), "smooth_l1_loss", TORCH_FN((loss_rule<&at::smooth_l1_loss, double>)));
    r.replace(BatchRuleRegistrar::batched(), "huber_loss", TORCH_FN((loss_rule<&at::huber_loss, double>)));
    // rrelu_with_noise is refused under vmap as a random op even in eval mode,
    // where nn::RReLU is deterministic (1.13 and 2.13).
    if (!r.replace(BatchRuleRegistrar::vmap_mode(), "rrelu_with_noise",
                   TORCH_FN(rrelu_with_noise_vmap_mode<at::Tensor&>)))
      r.replace(BatchRuleRegistrar::vmap_mode(), "rrelu_with_noise",
                TORCH_FN(rrelu_with_noise_vmap_mode<const at::Tensor&>));
    if constexpr (compat::kReplaceNllLossBatchRules) {
      auto& b = BatchRuleRegistrar::batched();
      r.replace(b, "nll_loss_forward", TORCH_FN((nll_forward_rule<&at::nll_loss_forward, false>)));
      r.replace(b, "nll_loss_backward", TORCH_FN((nll_backward_rule<&at::nll_loss_backward, false>)));
      r.replace(b, "nll_loss2d_forward", TORCH_FN((nll_forward_rule<&at::nll_loss2d_forward, true>)));
      r.replace(b, "nll_loss2d_backward", TORCH_FN((nll_backward_rule<&at::nll_loss2d_backward, true>)));
      r.replace(BatchRuleRegistrar::front_mode(), "cross_entropy_loss", TORCH_FN(cross_entropy_decomposed));
    }
#if TORCHFUNC_LIBTORCH_1_13
    register_libtorch_1_13_rules(r);
#endif
    return names;
  }();
  return registered;
}

torch::Library& BatchRuleRegistrar::library(c10::DispatchKey key) {
  static std::mutex mu;
  static std::map<c10::DispatchKey, std::unique_ptr<torch::Library>> libs;
  std::lock_guard<std::mutex> lock(mu);
  auto& lib = libs[key];
  if (!lib) lib = std::make_unique<torch::Library>(torch::Library::IMPL, "aten", key, __FILE__, __LINE__);
  return *lib;
}

void ensure_batch_rules() { (void)own_batch_rules(); }

}  // namespace detail
}  // namespace torchfunc
