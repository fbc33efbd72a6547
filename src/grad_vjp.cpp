// src/grad_vjp.cpp: the flat cores of grad / grad_and_value and of vjp and
// its vjp_fn (reverse mode at one functorch grad level). Not here: jvp and
// linearize (jvp_linearize.cpp), jacrev (jacobians.cpp).
#include "levels.h"

namespace torchfunc {
namespace detail {

// ---- grad ----------------------------------------------------------------------

GradOut grad_flat(const Tensors& inputs, const std::vector<char>& diff, FlatFn f, const char* api,
                  LeafName name) {
  AutodiffScope autodiff;
  const bool prev_grad_mode = c10::GradMode::is_enabled();
  LayerGuard layer(api, [&] { return compat::push_grad_layer(prev_grad_mode); });
  const int64_t lvl = layer.level();
  c10::AutoGradMode enable_grad(true);  // Note [grad and vjp interaction with no_grad]

  Tensors diff_wrapped;
  Tensors wrapped = wrap_for_grad(inputs, diff, lvl, api, name, diff_wrapped);
  TORCH_CHECK(!diff_wrapped.empty(), "torchfunc::", api,
              ": the arguments selected by argnums contain no Tensors to differentiate.");
  FlatResult res;
  f(wrapped, res);
  TORCH_CHECK(res.leaves[0].defined(), "torchfunc::", api,
              ": Expected f(*args) to return a Tensor, got an undefined Tensor.");
  const at::Tensor& out = res.leaves[0];
  TORCH_CHECK(out.dim() == 0, "torchfunc::", api,
              ": Expected f(*args) to return a scalar Tensor, got tensor with ", out.dim(), " dims (shape ",
              shape_str(out.sizes()), "). Maybe you wanted to use the vjp or jacrev APIs instead?");
  TORCH_CHECK(is_differentiable_dtype(out), "torchfunc::", api,
              ": Expected f(*args) to return a floating-point or complex Tensor, got dtype ",
              out.scalar_type(), ".");
  Tensors g = autograd_grad({out}, diff_wrapped, {}, /*retain_graph=*/false, /*create_graph=*/true);

  GradOut result;
  result.grads.resize(inputs.size());
  for (size_t i = 0, j = 0; i < inputs.size(); ++i)
    if (diff[i]) result.grads[i] = compat::unwrap_grad(g[j++], lvl);
  result.outputs = std::move(res.leaves);
  unwrap_all(result.outputs, lvl);  // Note [unwrap before pop]
  return result;
}

// ---- vjp -----------------------------------------------------------------------


VjpOut vjp_flat(const Tensors& inputs, const std::vector<char>& diff, FlatFn f, const char* api,
                LeafName name, const char* fn_api) {
  AutodiffScope autodiff;
  const bool prev_grad_mode = c10::GradMode::is_enabled();
  LayerGuard layer(api, [&] { return compat::push_grad_layer(prev_grad_mode); });
  const int64_t lvl = layer.level();
  c10::AutoGradMode enable_grad(true);  // Note [grad and vjp interaction with no_grad]

  auto state = std::make_shared<VjpState>();
  state->api = fn_api;
  state->num_inputs = inputs.size();
  Tensors wrapped = wrap_for_grad(inputs, diff, lvl, api, name, state->inputs);
  for (size_t i = 0; i < inputs.size(); ++i)
    if (diff[i] && inputs[i].defined()) state->where.push_back(i);
  FlatResult res;
  f(wrapped, res);
  TORCH_CHECK(res.num_primary > 0, "torchfunc::", api,
              ": Expected f to return at least one Tensor, got none.");
  check_tensor_outputs(res, api);
  VjpOut out;
  for (size_t k = 0; k < res.num_primary; ++k) {
    const at::Tensor& o = res.leaves[k];
    TORCH_CHECK(is_differentiable_dtype(o), "torchfunc::", api,
                ": All outputs of f must be floating-point or complex Tensors, got Tensor with dtype ",
                o.scalar_type(), " at output ", k, ".");
    state->outputs.push_back(o);
    state->out_sizes.push_back(o.sizes().vec());
    out.outputs.push_back(compat::unwrap_grad(o, lvl));
  }
  for (size_t k = res.num_primary; k < res.leaves.size(); ++k)
    out.aux.push_back(res.leaves[k].defined() ? compat::unwrap_grad(res.leaves[k], lvl) : res.leaves[k]);
  out.state = std::move(state);
  return out;
}

Tensors vjp_apply(VjpState& s, const Tensors& cts, LeafName ct_name, bool retain_graph,
                  c10::optional<bool> create_graph) {
  TORCH_CHECK(!s.freed, "torchfunc::", s.api, ": this vjp_fn's graph was freed by an "
              "earlier call with VjpFnOptions().retain_graph(false); call vjp again, or keep retain_graph "
              "true for every call but the last.");
  TORCH_CHECK(cts.size() == s.outputs.size(), "torchfunc::", s.api, ": Expected ",
              s.outputs.size(), " cotangent Tensors (one per output of f), got ", cts.size(), ".");
  for (size_t k = 0; k < cts.size(); ++k) {
    TORCH_CHECK(cts[k].defined(), "torchfunc::", s.api, ": ", ct_name(k), " is an undefined Tensor.");
    TORCH_CHECK(cts[k].sizes().vec() == s.out_sizes[k], "torchfunc::", s.api, ": Expected ",
                ct_name(k), " to have the shape of the corresponding output of f, ",
                shape_str(s.out_sizes[k]), ", but got ", shape_str(cts[k].sizes()), ".");
  }
  Tensors g = autograd_grad(s.outputs, s.inputs, cts, retain_graph,
                            create_graph.value_or(c10::GradMode::is_enabled()));
  s.freed = !retain_graph;
  Tensors result(s.num_inputs);
  for (size_t j = 0; j < g.size(); ++j) result[s.where[j]] = compat::unwrap_dead(g[j]);
  return result;
}


}  // namespace detail
}  // namespace torchfunc
