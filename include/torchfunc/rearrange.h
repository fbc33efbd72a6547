// torchfunc/rearrange.h: einops-style rearrangement. Mirrors
// torch.func's functorch.einops.rearrange (and einops.rearrange).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

namespace torchfunc {

/// rearrange(t, "left -> right", {{"axis", size}, ...}) -> a permuted and
/// reshaped view (or copy) of t.
///
/// Each side names t's dimensions: an identifier is one axis, `(a b)` a
/// dimension made of several axes (a outer, b inner), `1` or `()` a
/// dimension of size 1, `...` any number of dimensions (once per side; on
/// the right also inside parentheses). Every named axis appears once on each
/// side. In a composed dimension on the left at most one axis may have no
/// given size; it is inferred. Works inside every transform (it is reshape
/// and permute of the logical shape).
///   rearrange(x, "b c h w -> b (c h w)");              // flatten
///   rearrange(x, "b (h1 h) w -> b h (w h1)", {{"h1", 2}});
///   rearrange(x, "... c -> c ...");
/// A bad pattern is a c10::Error naming the part that is wrong.
at::Tensor rearrange(const at::Tensor& t, const std::string& pattern,
                     const std::vector<std::pair<std::string, int64_t>>& axes_lengths = {});

}  // namespace torchfunc
