// Batching rules for ops that libtorch's functorch core runs through its slow
// per-sample fallback, or cannot run at all under vmap. Registered once, on
// the first vmap (see ensure_batch_rules), and only for ops that have no
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
// aten::rrelu_with_noise (+ backward): nn::RReLU in eval mode (1.13 refuses
// it under vmap as a random op).
//
// aten::prelu / prelu_backward (replaced on 1.13, whose rules fail for the
// default one-element weight of nn::PReLU and for 1-D inputs) and aten::
// mse_loss (replaced on 1.13, whose rule fails when the target broadcasts).
//
// Pointwise losses and their backward ops (mse_loss_backward, smooth_l1_loss,
// huber_loss, soft_margin_loss and their backwards): missing in 1.13 (a loop
// over samples and a warning); torch 2.x covers the mse/smooth_l1/huber
// backwards with decompositions registered from Python only, so a C++-only
// program may lack them there too (the run-time check decides). Every
// per-sample grad of an MSE or Huber loss goes through them.
#include "compat.h"

#include <ATen/Functions.h>
#include <ATen/core/Reduction.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/WrapDimMinimal.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/library.h>

#include <array>
#include <memory>
#include <optional>

namespace torchfunc {
namespace detail {
namespace {

namespace ft = at::functorch;

int64_t current_vmap_level(const char* op) {
  auto layer = ft::maybeCurrentDynamicLayer();
  TORCH_INTERNAL_ASSERT(layer.has_value(), "torchfunc: ", op, " batching rule called outside vmap");
  return layer->layerId();
}

// The batch size of the first operand batched at `level` (null entries are
// skipped); -1 if none is.
int64_t batch_size_at(std::initializer_list<const at::Tensor*> ts, int64_t level) {
  for (const at::Tensor* t : ts)
    if (t)
      if (auto* b = compat::batched_at(*t, level)) return b->value().size(b->bdim());
  return -1;
}

// The [B, ...] layout the rules below work on: batch dim first; an operand
// not batched at `level` is expanded to B as a view.
at::Tensor batch_first(const at::Tensor& t, int64_t level, int64_t batch) {
  if (auto* b = compat::batched_at(t, level)) return b->value().movedim(b->bdim(), 0);
  std::vector<int64_t> shape{batch};
  shape.insert(shape.end(), t.sizes().begin(), t.sizes().end());
  return t.unsqueeze(0).expand(shape);
}

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

// ---- pointwise losses -------------------------------------------------------
// Each loss is elementwise before its reduction. The rule brings every operand
// to the physical layout [B, *logical] (batch dim first, unbatched operands
// expanded as views, lower logical ranks padded with size-1 dims so they
// broadcast as they would per sample), runs the op with reduction none, and
// applies the reduction per sample.

struct Aligned {
  std::array<at::Tensor, 3> t;  // physical [B, ...] operands, set only if batch >= 0
  int64_t batch = -1;            // -1: nothing is batched at this level
};

Aligned align(std::array<const at::Tensor*, 3> in, int64_t level) {
  Aligned out;
  out.batch = batch_size_at({in[0], in[1], in[2]}, level);
  if (out.batch < 0) return out;
  int64_t rank = 0;  // the largest per-sample rank
  for (size_t i = 0; i < in.size(); ++i) {
    if (!in[i]) continue;
    out.t[i] = batch_first(*in[i], level, out.batch);
    rank = std::max<int64_t>(rank, out.t[i].dim() - 1);
  }
  for (size_t i = 0; i < in.size(); ++i)
    while (in[i] && out.t[i].dim() < rank + 1) out.t[i] = out.t[i].unsqueeze(1);
  return out;
}

// Per-sample reduction of a [B, ...] elementwise loss.
at::Tensor reduce_per_sample(const at::Tensor& loss, int64_t reduction) {
  if (reduction == at::Reduction::None) return loss;
  at::Tensor flat = loss.reshape({loss.size(0), -1});
  return reduction == at::Reduction::Mean ? flat.mean(1) : flat.sum(1);
}

// Scale of a per-sample backward computed with reduction none: 1/numel of one
// sample for mean (what the op would use on the unbatched input).
at::Tensor scale_backward(const at::Tensor& grad, int64_t reduction) {
  if (reduction != at::Reduction::Mean) return grad;
  const int64_t per_sample = grad.numel() / std::max<int64_t>(grad.size(0), 1);
  return grad / static_cast<double>(std::max<int64_t>(per_sample, 1));
}

// Forward: Op(self, target, reduction, extra...) -> loss.
template <auto Op, class... Extra>
at::Tensor loss_rule(const at::Tensor& self, const at::Tensor& target, int64_t reduction, Extra... extra) {
  c10::impl::ExcludeDispatchKeyGuard guard(c10::DispatchKey::FuncTorchBatched);
  const int64_t level = current_vmap_level("loss");
  Aligned a = align({&self, &target, nullptr}, level);
  if (a.batch < 0) return Op(self, target, reduction, extra...);
  at::Tensor loss = reduce_per_sample(Op(a.t[0], a.t[1], at::Reduction::None, extra...), reduction);
  return ft::makeBatched(loss, 0, level);
}

// Backward: Op(grad_output, self, target, reduction, extra...) -> grad_self.
// With reduction mean/sum grad_output is one scalar per sample ([B] -> [B, 1, ...]).
template <auto Op, class... Extra>
at::Tensor loss_backward_rule(const at::Tensor& grad_output, const at::Tensor& self, const at::Tensor& target,
                              int64_t reduction, Extra... extra) {
  c10::impl::ExcludeDispatchKeyGuard guard(c10::DispatchKey::FuncTorchBatched);
  const int64_t level = current_vmap_level("loss backward");
  Aligned a = align({&grad_output, &self, &target}, level);
  if (a.batch < 0) return Op(grad_output, self, target, reduction, extra...);
  at::Tensor grad = Op(a.t[0], a.t[1].contiguous(), a.t[2], at::Reduction::None, extra...);
  return ft::makeBatched(scale_backward(grad, reduction), 0, level);
}

// ---- prelu (1.13's own rules are wrong; see compat::kReplaceBrokenBatchRules) --
// Per sample, prelu(x, w) = x > 0 ? x : w * x with w broadcast along x's
// channel dim (dim 1 when x has rank >= 2), and w has 1 element or one per
// channel.

// w [B, *w_shape] viewed to broadcast against x [B, *S].
at::Tensor prelu_weight_view(const at::Tensor& x, const at::Tensor& w) {
  const int64_t rank = x.dim() - 1, batch = x.size(0);
  const int64_t channels = rank >= 2 ? x.size(2) : 1;
  const int64_t params = w.numel() / std::max<int64_t>(batch, 1);
  TORCH_CHECK(w.dim() <= 2, "prelu: Expected `weight` to be a scalar or 1D tensor, but got ndim = ", w.dim() - 1);
  TORCH_CHECK(params == 1 || params == channels,
              "Mismatch of parameter numbers and input channel size. Found parameter numbers = ", params,
              " and channel size = ", channels, ".");
  std::vector<int64_t> shape(static_cast<size_t>(x.dim()), 1);
  shape[0] = batch;
  if (params > 1) shape[2] = params;
  return w.reshape(shape);
}

at::Tensor prelu_batched(const at::Tensor& self, const at::Tensor& weight) {
  c10::impl::ExcludeDispatchKeyGuard guard(c10::DispatchKey::FuncTorchBatched);
  const int64_t level = current_vmap_level("prelu");
  const int64_t batch = batch_size_at({&self, &weight}, level);
  if (batch < 0) return at::prelu(self, weight);
  at::Tensor x = batch_first(self, level, batch);
  at::Tensor w = prelu_weight_view(x, batch_first(weight, level, batch));
  return ft::makeBatched(at::where(x > 0, x, w * x), 0, level);
}

std::tuple<at::Tensor, at::Tensor> prelu_backward_batched(const at::Tensor& grad_output, const at::Tensor& self,
                                                          const at::Tensor& weight) {
  c10::impl::ExcludeDispatchKeyGuard guard(c10::DispatchKey::FuncTorchBatched);
  const int64_t level = current_vmap_level("prelu_backward");
  const int64_t batch = batch_size_at({&grad_output, &self, &weight}, level);
  if (batch < 0) return at::prelu_backward(grad_output, self, weight);
  at::Tensor x = batch_first(self, level, batch);
  at::Tensor g = batch_first(grad_output, level, batch);
  at::Tensor w_phys = batch_first(weight, level, batch);
  at::Tensor w = prelu_weight_view(x, w_phys);
  at::Tensor positive = x > 0;
  at::Tensor grad_self = at::where(positive, g, w * g);
  // d/dw: x * g where x <= 0, summed over everything but the channel dim.
  at::Tensor per_elem = at::where(positive, at::zeros_like(x), x * g);
  std::vector<int64_t> dims;
  for (int64_t d = 1; d < x.dim(); ++d)
    if (!(w.dim() > 2 && w.size(2) > 1 && d == 2)) dims.push_back(d);
  at::Tensor grad_weight = dims.empty() ? per_elem : per_elem.sum(dims);
  grad_weight = grad_weight.reshape(w_phys.sizes());
  return {ft::makeBatched(grad_self, 0, level), ft::makeBatched(grad_weight, 0, level)};
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

// ---- rrelu_with_noise (nn::RReLU; 1.13 rejects it under vmap) ---------------
// 1.13 lists it among the random ops vmap refuses (a FuncTorchVmapMode kernel),
// even in eval mode, where RReLU is deterministic: leaky_relu with the mean
// slope. Eval mode is decomposed so; training mode (a random slope per
// element) stays an error.
at::Tensor rrelu_with_noise_vmap_mode(const at::Tensor& self, const at::Tensor& noise, const at::Scalar& lower,
                                      const at::Scalar& upper, bool training, c10::optional<at::Generator> generator) {
  TORCH_CHECK(!training, "torchfunc::vmap: RReLU in training mode draws a random slope per element, which is not "
                         "supported under vmap; use eval mode (the mean slope) or LeakyReLU.");
  (void)noise;
  (void)generator;
  c10::impl::ExcludeDispatchKeyGuard guard(c10::DispatchKey::FuncTorchVmapMode);
  return at::leaky_relu(self, (lower.toDouble() + upper.toDouble()) / 2);
}

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

// True if `name` exists and has no batching rule of its own.
bool lacks_batch_rule(const char* name, const char* overload) {
  auto op = c10::Dispatcher::singleton().findSchema({name, overload});
  return op.has_value() && !op->hasKernelForDispatchKey(c10::DispatchKey::FuncTorchBatched);
}

}  // namespace

const std::vector<std::string>& own_batch_rules() {
  static const std::vector<std::string> registered = [] {
    std::vector<std::string> names;
    // Registrations live as long as this object: the whole process.
    static auto lib = std::make_unique<torch::Library>(torch::Library::IMPL, "aten",
                                                       c10::DispatchKey::FuncTorchBatched, __FILE__, __LINE__);
    auto add = [&](const char* op, const char* overload, auto kernel) {
      if (!lacks_batch_rule((std::string("aten::") + op).c_str(), overload)) return;
      const std::string full = *overload ? std::string(op) + "." + overload : std::string(op);
      try {
        lib->impl(full.c_str(), std::move(kernel));
        names.push_back("aten::" + full);
      } catch (const c10::Error&) {
        // A libtorch whose schema for this op differs from the signature
        // here: it keeps its fallback (slower, still correct). The tests
        // check that every rule registers on the libtorch we build against.
      }
    };
    add("unsafe_split", "Tensor", TORCH_FN(unsafe_split_batched));
    add("mse_loss_backward", "", TORCH_FN(loss_backward_rule<&at::mse_loss_backward>));
    add("smooth_l1_loss", "", TORCH_FN((loss_rule<&at::smooth_l1_loss, double>)));
    add("smooth_l1_loss_backward", "", TORCH_FN((loss_backward_rule<&at::smooth_l1_loss_backward, double>)));
    add("huber_loss", "", TORCH_FN((loss_rule<&at::huber_loss, double>)));
    add("huber_loss_backward", "", TORCH_FN((loss_backward_rule<&at::huber_loss_backward, double>)));
    add("soft_margin_loss", "", TORCH_FN(loss_rule<&at::soft_margin_loss>));
    add("soft_margin_loss_backward", "", TORCH_FN(loss_backward_rule<&at::soft_margin_loss_backward>));
    add("equal", "", TORCH_FN(equal_batched));
    add("rrelu_with_noise_backward", "", TORCH_FN(rrelu_with_noise_backward_batched));
    add("max_pool3d_with_indices", "", TORCH_FN(max_pool3d_batched));
    add("max_pool3d_with_indices_backward", "", TORCH_FN(max_pool3d_backward_batched));
    add("upsample_nearest1d_backward", "", TORCH_FN((UpsampleBackward<Scale>::rule<&at::upsample_nearest1d_backward>)));
    add("upsample_nearest2d_backward", "",
        TORCH_FN((UpsampleBackward<Scale, Scale>::rule<&at::upsample_nearest2d_backward>)));
    add("upsample_nearest3d_backward", "",
        TORCH_FN((UpsampleBackward<Scale, Scale, Scale>::rule<&at::upsample_nearest3d_backward>)));
    add("upsample_linear1d_backward", "",
        TORCH_FN((UpsampleBackward<bool, Scale>::rule<&at::upsample_linear1d_backward>)));
    add("upsample_bilinear2d_backward", "",
        TORCH_FN((UpsampleBackward<bool, Scale, Scale>::rule<&at::upsample_bilinear2d_backward>)));
    add("upsample_bicubic2d_backward", "",
        TORCH_FN((UpsampleBackward<bool, Scale, Scale>::rule<&at::upsample_bicubic2d_backward>)));
    add("upsample_trilinear3d_backward", "",
        TORCH_FN((UpsampleBackward<bool, Scale, Scale, Scale>::rule<&at::upsample_trilinear3d_backward>)));
    if constexpr (compat::kReplaceBrokenBatchRules) {
      compat::QuietWarnings quiet;  // "Overriding a previously registered kernel"
      lib->impl("prelu", TORCH_FN(prelu_batched));
      lib->impl("prelu_backward", TORCH_FN(prelu_backward_batched));
      lib->impl("mse_loss", TORCH_FN(loss_rule<&at::mse_loss>));
      names.insert(names.end(), {"aten::prelu", "aten::prelu_backward", "aten::mse_loss"});
      static auto vmap_mode = std::make_unique<torch::Library>(torch::Library::IMPL, "aten",
                                                               c10::DispatchKey::FuncTorchVmapMode, __FILE__, __LINE__);
      vmap_mode->impl("rrelu_with_noise", TORCH_FN(rrelu_with_noise_vmap_mode));
      names.push_back("aten::rrelu_with_noise");
    }
    return names;
  }();
  return registered;
}

void ensure_batch_rules() { (void)own_batch_rules(); }

}  // namespace detail
}  // namespace torchfunc
