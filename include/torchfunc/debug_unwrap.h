// torchfunc/debug_unwrap.h: the plain tensor under a transform's wrappers.
// Mirrors torch.func.debug_unwrap.
#pragma once

#include <ATen/core/Tensor.h>

namespace torchfunc {

/// debug_unwrap(t, [recurse]) -> the tensor under t's transform wrappers.
///
/// Inside vmap, the batched tensor's value (the batch dimension included);
/// inside grad / vjp / jvp / jacrev / jacfwd, the tensor the level wraps;
/// with recurse (the default) every level down to a plain tensor, otherwise
/// one level. A plain tensor is returned as it is. For debugging (printing
/// what a transform sees); the result is not tracked by any transform.
///   vmap([](const Tensor& x) { std::cout << debug_unwrap(x).sizes(); return x; })(xs);  // [B, ...]
at::Tensor debug_unwrap(const at::Tensor& t, bool recurse = true);

}  // namespace torchfunc
