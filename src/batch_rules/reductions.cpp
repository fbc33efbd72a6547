// src/batch_rules/reductions.cpp: nansum / nanmean (missing in 1.13) and
// aten::equal (missing everywhere; nn::MultiheadAttention and nn::Transformer*
// branch on it, so without a rule they cannot run under vmap at all).
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

}  // namespace

void register_reduction_rules(BatchRuleRegistrar& r) {
  r.add("nansum", "", TORCH_FN(nan_reduction_batched<&at::nansum>));
  r.add("nanmean", "", TORCH_FN(nan_reduction_batched<&at::nanmean>));
  r.add("equal", "", TORCH_FN(equal_batched));
}

}  // namespace batch_rules
}  // namespace detail
}  // namespace torchfunc
