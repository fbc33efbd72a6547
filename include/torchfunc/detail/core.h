// torchfunc/detail/core.h: the compiled core every transform funnels into.
//
// Header templates deduce types and flatten arguments into a flat list of
// Tensor leaves; these non-template functions (src/grad_vjp.cpp,
// jvp_linearize.cpp, vmap.cpp, jacobians.cpp, on the guards of src/levels.h)
// push the functorch level, wrap the leaves, call back into the template
// through a c10::function_ref, unwrap the results and pop the level. Nothing
// here is public API.
#pragma once

#include <ATen/Tensor.h>
#include <c10/util/FunctionRef.h>
#include <c10/util/Optional.h>
#include <torchfunc/options.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace torchfunc {
namespace detail {

using Tensors = std::vector<at::Tensor>;
using OptDim = c10::optional<int64_t>;

/// What the template side hands back after calling the user's function:
/// the flat output leaves, how many of them are the primary output (the rest
/// is aux), and for vmap one out_dim per leaf.
struct FlatResult {
  Tensors leaves;
  size_t num_primary = 0;
  std::vector<OptDim> out_dims;
};

/// f(inputs, result): rebuild the arguments from `inputs` (already wrapped
/// for the current level), call the user's function, fill `result`.
using FlatFn = c10::function_ref<void(Tensors&, FlatResult&)>;

/// Names a leaf for error messages ("args[1]['w']"), computed only on error.
using LeafName = c10::function_ref<std::string(size_t)>;

// ---- grad ----------------------------------------------------------------
struct GradOut {
  Tensors grads;    // aligned with inputs; undefined where !diff[i]
  Tensors outputs;  // [value, aux leaves...], unwrapped
};
GradOut grad_flat(const Tensors& inputs, const std::vector<char>& diff, FlatFn f,
                  const char* api, LeafName name);

// ---- vjp -----------------------------------------------------------------
struct VjpState;  // the recorded graph; shared by copies of vjp_fn
struct VjpOut {
  Tensors outputs;  // primary outputs, unwrapped
  Tensors aux;      // aux leaves, unwrapped
  std::shared_ptr<VjpState> state;
};
/// fn_api: what vjp_apply's errors call the pullback.
VjpOut vjp_flat(const Tensors& inputs, const std::vector<char>& diff, FlatFn f,
                const char* api, LeafName name, const char* fn_api = "vjp(f, *primals): vjp_fn(cotangents)");
/// Gradients aligned with the vjp's inputs (undefined where not diff).
/// create_graph unset: whether grad mode is on.
Tensors vjp_apply(VjpState& state, const Tensors& cotangents, LeafName ct_name, bool retain_graph = true,
                  c10::optional<bool> create_graph = c10::nullopt);

// ---- linear_transpose ----------------------------------------------------
/// Raises unless f looks linear: f(0) (zero_out, from the vjp at zero) is
/// zero and f(a x + y) = a f(x) + f(y) at random x, y (seeded, the user's
/// generator untouched). eval(in) -> f's output leaves.
void check_linear(const Tensors& primals, const Tensors& zero_out,
                  c10::function_ref<Tensors(const Tensors&)> eval, const char* api);

// ---- jvp -----------------------------------------------------------------
struct JvpOut {
  Tensors outputs;   // primary outputs
  Tensors tangents;  // their tangents
  Tensors aux;
};
/// tangents is aligned with primals; only entries with diff[i] are used.
/// strict: an output that does not depend on the primals is an error.
JvpOut jvp_flat(const Tensors& primals, const std::vector<char>& diff, const Tensors& tangents,
                FlatFn f, const char* api, LeafName name, bool strict = false);

// ---- linearize ------------------------------------------------------------
struct LinearizeState;
struct LinearizeOut {
  Tensors outputs;
  Tensors aux;  // f's aux leaves (has_aux), unwrapped
  std::shared_ptr<LinearizeState> state;
};
LinearizeOut linearize_flat(const Tensors& primals, FlatFn f, LeafName name);
Tensors linearize_apply(const LinearizeState& state, const Tensors& tangents, LeafName name);

// ---- vmap ----------------------------------------------------------------
struct VmapConfig {
  const char* api = "vmap";
  c10::optional<int64_t> chunk_size;
  Randomness randomness = Randomness::Error;
  c10::optional<int64_t> axis_size;  // the batch size when nothing is mapped
  bool sequential_fallback = false;  // a data-dependent f runs once per sample
  // Renders "vmap(f, in_dims=(none, 0), ...)" for messages; may be empty.
  std::string (*describe)(const void*) = nullptr;
  const void* describe_arg = nullptr;
};
Tensors vmap_flat(const Tensors& inputs, const std::vector<OptDim>& in_dims,
                  const VmapConfig& cfg, FlatFn f, LeafName name);

// ---- functionalize -------------------------------------------------------
/// One functionalization level: f sees functional wrappers of `inputs`;
/// returns f's output leaves unwrapped, after copying any mutation of an
/// input back into it. reapply_views: Remove::Mutations.
Tensors functionalize_flat(const Tensors& inputs, bool reapply_views, FlatFn f, const char* api, LeafName name);

// ---- jacobians -----------------------------------------------------------
struct JacOut {
  // jac[i][j]: d output-leaf i / d input-leaf j, shaped out_i.shape + in_j.shape;
  // j runs over all inputs (undefined where !diff[j]).
  std::vector<Tensors> jac;
  Tensors outputs;  // jacrev only (jacfwd does not evaluate f separately)
  Tensors aux;
};
JacOut jacrev_flat(const Tensors& inputs, const std::vector<char>& diff, FlatFn f,
                   c10::optional<int64_t> chunk_size, const char* api, LeafName name);
JacOut jacfwd_flat(const Tensors& inputs, const std::vector<char>& diff, FlatFn f,
                   Randomness randomness, c10::optional<int64_t> chunk_size, const char* api, LeafName name);

/// Forward or reverse mode by jacobian_mode(); options.mode() overrides.
JacOut jacobian_flat(const Tensors& inputs, const std::vector<char>& diff, FlatFn f, const JacobianOptions& options,
                     const char* api, LeafName name);

/// Depth of this thread's functorch layer stack (tests check it is restored).
size_t layer_depth();

/// The batching rules torchfunc registered because this libtorch has none
/// (src/batch_rules/), e.g. "aten::mse_loss_backward". Registers them on
/// first use; the first transform does so too.
const std::vector<std::string>& own_batch_rules();
/// Ops whose forward-mode derivative torchfunc supplies (a TorchScript
/// decomposition libtorch runs under forward AD; src/jvp_decompositions.cpp).
const std::vector<std::string>& own_jvp_decompositions();

// ---- errors ------------------------------------------------------------------
/// Throws c10::Error with "torchfunc::" + msg.
[[noreturn]] void fail(const std::string& msg);

struct DimsCtx {
  const char* api;    // "vmap"
  const char* what;   // "in_dims" or "out_dims"
  const Dims* whole;  // the user's spec, quoted in the message
};
[[noreturn]] void dims_fail(const DimsCtx& ctx, const std::string& problem);

}  // namespace detail
}  // namespace torchfunc
