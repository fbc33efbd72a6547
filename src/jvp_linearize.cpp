// src/jvp_linearize.cpp: the flat cores of jvp (forward mode at one functorch
// jvp level) and of linearize and its jvp_fn (J t through the double-backward
// of a recorded graph). Not here: jacfwd (jacobians.cpp).
#include "levels.h"

#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/forward_grad.h>

#include "variable_hooks.h"

namespace torchfunc {
namespace detail {

void ensure_jvp_decompositions();  // jvp_decompositions.cpp: forward mode through softmax, nll, ...

// ---- jvp -----------------------------------------------------------------------

JvpOut jvp_flat(const Tensors& primals, const std::vector<char>& diff, const Tensors& tangents, FlatFn f,
                const char* api, LeafName name, bool strict) {
  AutodiffScope autodiff;
  const bool prev_fwd = c10::AutogradState::get_tls_state().get_fw_grad_mode();
  ensure_jvp_decompositions();
  LayerGuard layer(api, [&] { return compat::push_jvp_layer(prev_fwd); });
  const int64_t lvl = layer.level();
  DualLevelGuard dual;  // Note [one forward-AD level]
  FwGradModeGuard fw(true);

  Tensors in;
  in.reserve(primals.size());
  for (size_t i = 0; i < primals.size(); ++i) {
    if (!diff[i]) {
      // Wrapped at this level too (as torch.func does), so f may write into
      // them in place (e.g. y.copy_(x) under jacfwd); their tangent is zero.
      in.push_back(primals[i].defined() ? ft::makeTensorWrapper(primals[i], lvl) : primals[i]);
      continue;
    }
    const at::Tensor& p = primals[i];
    const at::Tensor& t = tangents[i];
    TORCH_CHECK(p.defined(), "torchfunc::", api, ": primal ", name(i), " is an undefined Tensor.");
    TORCH_CHECK(t.defined(), "torchfunc::", api, ": the tangent for ", name(i), " is an undefined Tensor.");
    TORCH_CHECK(is_differentiable_dtype(p), "torchfunc::", api,
                ": only floating-point or complex primals can have tangents, but ", name(i), " has dtype ",
                p.scalar_type(), ".");
    TORCH_CHECK(p.sizes().equals(t.sizes()), "torchfunc::", api,
                ": Expected each tangent to have the shape of its primal, but ", name(i), " has shape ",
                shape_str(p.sizes()), " and its tangent has shape ", shape_str(t.sizes()), ".");
    TORCH_CHECK(p.scalar_type() == t.scalar_type(), "torchfunc::", api,
                ": Expected each tangent to have the dtype of its primal, but ", name(i), " has dtype ",
                p.scalar_type(), " and its tangent has dtype ", t.scalar_type(), ".");
    in.push_back(at::_make_dual(ft::makeTensorWrapper(p, lvl), ft::makeTensorWrapper(t, lvl), 0));
  }
  FlatResult res;
  f(in, res);
  TORCH_CHECK(res.num_primary > 0, "torchfunc::", api, ": Expected f to return at least one Tensor, got none.");
  check_tensor_outputs(res, api);
  JvpOut out;
  for (size_t k = 0; k < res.num_primary; ++k) {
    auto unpacked = at::_unpack_dual(res.leaves[k], 0);
    at::Tensor primal = std::get<0>(unpacked);
    at::Tensor tangent = std::get<1>(unpacked);
    if (!tangent.defined()) {
      TORCH_CHECK(!strict, "torchfunc::", api, ": output ", k, " of f is independent of the inputs (it has no "
                  "tangent). This is not allowed with JvpOptions().strict(true).");
      tangent = at::zeros_like(primal);
    }
    out.outputs.push_back(compat::unwrap_grad(primal, lvl));
    out.tangents.push_back(compat::unwrap_grad(tangent, lvl));
  }
  for (size_t k = res.num_primary; k < res.leaves.size(); ++k) {
    const at::Tensor& a = res.leaves[k];
    out.aux.push_back(a.defined() ? compat::unwrap_grad(std::get<0>(at::_unpack_dual(a, 0)), lvl) : a);
  }
  return out;
}

// ---- linearize -------------------------------------------------------------------
//
// J·t without re-running f: g(u) = J^T u is linear in u, so d<g(u), t>/du = J t.
// We record g(u) for a dummy cotangent u with create_graph, then each call
// differentiates g w.r.t. u with grad_outputs t.

struct LinearizeState {
  Tensors u;        // dummy cotangents (wrapped), one per output
  Tensors g;        // J^T u (wrapped), one per input
  Tensors outputs;  // unwrapped, for zeros
  std::vector<std::vector<int64_t>> in_sizes;
  std::vector<at::ScalarType> in_dtypes;
};

LinearizeOut linearize_flat(const Tensors& primals, FlatFn f, LeafName name) {
  const char* api = "linearize(f, *primals)";
  AutodiffScope autodiff;
  const bool prev_grad_mode = c10::GradMode::is_enabled();
  LayerGuard layer(api, [&] { return compat::push_grad_layer(prev_grad_mode); });
  const int64_t lvl = layer.level();
  c10::AutoGradMode enable_grad(true);

  std::vector<char> diff(primals.size(), 1);
  Tensors ins;
  Tensors wrapped = wrap_for_grad(primals, diff, lvl, api, name, ins);
  FlatResult res;
  f(wrapped, res);
  TORCH_CHECK(res.num_primary > 0, "torchfunc::", api, ": Expected f to return at least one Tensor.");
  check_tensor_outputs(res, api);
  auto state = std::make_shared<LinearizeState>();
  Tensors outs(res.leaves.begin(), res.leaves.begin() + res.num_primary);
  for (const auto& o : outs) {
    TORCH_CHECK(is_differentiable_dtype(o), "torchfunc::", api,
                ": All outputs of f must be floating-point or complex Tensors, got dtype ", o.scalar_type(), ".");
    InternalRequiresGrad internal;
    state->u.push_back(at::zeros_like(o).requires_grad_(true));
  }
  for (const auto& p : primals) {
    state->in_sizes.push_back(p.sizes().vec());
    state->in_dtypes.push_back(p.scalar_type());
  }
  state->g = autograd_grad(outs, ins, state->u, /*retain_graph=*/true, /*create_graph=*/true);
  LinearizeOut out;
  for (const auto& o : outs) out.outputs.push_back(compat::unwrap_grad(o, lvl));
  for (size_t k = res.num_primary; k < res.leaves.size(); ++k) {
    const at::Tensor& a = res.leaves[k];
    out.aux.push_back(a.defined() ? compat::unwrap_grad(a, lvl) : a);
  }
  state->outputs = out.outputs;
  out.state = std::move(state);
  return out;
}

Tensors linearize_apply(const LinearizeState& s, const Tensors& tangents, LeafName name) {
  const char* api = "linearize: jvp_fn(*tangents)";
  TORCH_CHECK(tangents.size() == s.g.size(), "torchfunc::", api, ": Expected ", s.g.size(),
              " tangent Tensors, got ", tangents.size(), ".");
  Tensors gs, ts;
  for (size_t j = 0; j < tangents.size(); ++j) {
    TORCH_CHECK(tangents[j].defined(), "torchfunc::", api, ": ", name(j), " is an undefined Tensor.");
    TORCH_CHECK(tangents[j].sizes().vec() == s.in_sizes[j], "torchfunc::", api, ": Expected ", name(j),
                " to have the shape of its primal, ", shape_str(s.in_sizes[j]), ", but got ",
                shape_str(tangents[j].sizes()), ".");
    TORCH_CHECK(tangents[j].scalar_type() == s.in_dtypes[j], "torchfunc::", api, ": Expected ", name(j),
                " to have the dtype of its primal, ", s.in_dtypes[j], ", but got ", tangents[j].scalar_type(),
                ".");
    if (s.g[j].requires_grad()) {
      gs.push_back(s.g[j]);
      ts.push_back(tangents[j]);
    }
  }
  Tensors r;
  if (gs.empty()) {
    for (const auto& o : s.outputs) r.push_back(at::zeros_like(o));
    return r;
  }
  r = torch::autograd::grad(gs, s.u, ts, /*retain_graph=*/true, c10::GradMode::is_enabled(),
                            /*allow_unused=*/true);
  for (size_t k = 0; k < r.size(); ++k)
    r[k] = r[k].defined() ? compat::unwrap_dead(r[k]) : at::zeros_like(s.outputs[k]);
  return r;
}


}  // namespace detail
}  // namespace torchfunc
