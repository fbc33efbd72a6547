// Batching rules for ops that libtorch 1.13's functorch core runs through its
// fallback, or cannot run at all under vmap. Registered once, on the first
// vmap (see ensure_batch_rules), and only where compat says they are missing.
//
// aten::unsafe_split.Tensor: returns a list of tensors, which the 1.13
// fallback rejects ("Batching rule not implemented"). nn::LSTM and nn::GRU
// reach it through unsafe_chunk on their gates, so without this rule they
// cannot run under vmap at all.
#include "compat.h"

#include <ATen/ops/unsafe_split.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/WrapDimMinimal.h>
#include <torch/library.h>

#include <memory>

namespace torchfunc {
namespace detail {
namespace {

namespace ft = at::functorch;

std::vector<at::Tensor> unsafe_split_batched(const at::Tensor& self, int64_t split_size, int64_t dim) {
  c10::impl::ExcludeDispatchKeyGuard guard(c10::DispatchKey::FuncTorchBatched);
  auto layer = ft::maybeCurrentDynamicLayer();
  TORCH_INTERNAL_ASSERT(layer.has_value(), "torchfunc: unsafe_split batching rule called outside vmap");
  const int64_t level = layer->layerId();
  // (Debian's 1.13 does not export functorch's PlumbingHelper; unwrap by hand.)
  ft::BatchedTensorImpl* batched = ft::maybeGetBatchedImpl(self);
  if (!batched || batched->level() != level) return at::unsafe_split(self, split_size, dim);
  // Batch dim first; the user's dim counts in the per-sample (logical) rank.
  at::Tensor physical = batched->value().movedim(batched->bdim(), 0);
  const int64_t logical_dim = c10::maybe_wrap_dim(dim, physical.dim() - 1);
  std::vector<at::Tensor> parts = at::unsafe_split(physical, split_size, logical_dim + 1);
  for (at::Tensor& p : parts) p = ft::makeBatched(p, 0, level);
  return parts;
}

}  // namespace

void ensure_batch_rules() {
  if constexpr (compat::kRegisterOwnBatchRules) {
    static const auto library = [] {
      auto lib = std::make_unique<torch::Library>(torch::Library::IMPL, "aten",
                                                  c10::DispatchKey::FuncTorchBatched, __FILE__, __LINE__);
      lib->impl("unsafe_split.Tensor", TORCH_FN(unsafe_split_batched));
      return lib;
    }();
    (void)library;
  }
}

}  // namespace detail
}  // namespace torchfunc
