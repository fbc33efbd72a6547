// src/batch_rules/indexing.cpp: unsafe_split.Tensor (missing in 1.13: it
// returns a list, which 1.13's fallback rejects; nn::LSTM and nn::GRU reach it
// through unsafe_chunk on their gates), masked_scatter / masked_scatter_
// (missing everywhere) and index_fill.int_Tensor (replaced: libtorch's is wrong
// for a batched value).
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

// ---- index_fill.int_Tensor -------------------------------------------------------
// libtorch's rule (2.13, and torch.func with it) gives every sample the last
// sample's value when `value` (a 0-dim tensor) is batched and `self` is not
// (found by the OpInfo sweep). Replaced on every version: with an unbatched
// index, a mask of the filled positions selects each sample's value; a batched
// index takes a loop over the samples.
at::Tensor index_fill_batched(const at::Tensor& self, int64_t dim, const at::Tensor& index, const at::Tensor& value) {
  c10::impl::ExcludeDispatchKeyGuard guard(c10::DispatchKey::FuncTorchBatched);
  const int64_t level = current_vmap_level("index_fill");
  const int64_t batch = batch_size_at({&self, &index, &value}, level);
  if (batch < 0) return at::index_fill(self, dim, index, value);
  at::Tensor x = batch_first(self, level, batch);
  at::Tensor v = batch_first(value, level, batch).to(x.scalar_type());  // [B]
  const bool scalar_sample = x.dim() == 1;  // per-sample 0-dim self: fill along a dim of size 1
  if (scalar_sample) x = x.unsqueeze(1);
  const int64_t d = c10::maybe_wrap_dim(dim, x.dim() - 1) + 1;
  at::Tensor out;
  if (!compat::batched_at(index, level)) {
    at::Tensor mask = at::index_fill(at::zeros_like(x, x.options().dtype(at::kBool)), d, index, true);
    std::vector<int64_t> shape(static_cast<size_t>(x.dim()), 1);
    shape[0] = batch;
    out = at::where(mask, v.view(shape), x);
  } else {
    at::Tensor idx = batch_first(index, level, batch);
    std::vector<at::Tensor> samples;
    for (int64_t b = 0; b < batch; ++b) samples.push_back(at::index_fill(x[b], d - 1, idx[b], v[b]));
    out = at::stack(samples);
  }
  if (scalar_sample) out = out.squeeze(1);
  return ft::makeBatched(out, 0, level);
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

}  // namespace

void register_indexing_rules(BatchRuleRegistrar& r) {
  r.replace(BatchRuleRegistrar::batched(), "index_fill.int_Tensor", TORCH_FN(index_fill_batched));
  r.add("unsafe_split", "Tensor", TORCH_FN(unsafe_split_batched));
  r.add("masked_scatter", "", TORCH_FN(masked_scatter_batched));
  r.add("masked_scatter_", "", TORCH_FN(masked_scatter_inplace_batched));
}

}  // namespace batch_rules
}  // namespace detail
}  // namespace torchfunc
