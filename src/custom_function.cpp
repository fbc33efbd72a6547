// src/custom_function.cpp: a custom function's call at each kind of functorch
// layer (Note [how custom functions meet the transforms] in
// include/torchfunc/custom_function.h), its autograd node, the generated vmap
// rule and checkpoint's recomputing rules.
#include <torchfunc/custom_function.h>

#include <ATen/FunctionalTensorWrapper.h>
#include <ATen/functorch/ADInterpreters.h>
#include <ATen/functorch/VmapInterpreter.h>
#include <c10/core/GradMode.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>

#include "levels.h"

namespace torchfunc {
namespace detail {
namespace {

[[noreturn]] void custom_fail(const CustomRules& r, const std::string& msg) {
  fail("custom_function '" + r.name + "': " + msg);
}

/// Pops the top functorch layer for its scope and puts the stack back as it
/// was on every exit path (torch.func's interpreter.lower()).
class Lowered {
 public:
  Lowered() : saved_(ft::getDynamicLayerStack()) {
    auto lower = saved_;
    lower.pop_back();
    ft::setDynamicLayerStack(lower);
    if (lower.empty()) ft::setDynamicLayerFrontBackKeysIncluded(false);
    ++lowered_depth();
  }
  ~Lowered() {
    --lowered_depth();
    ft::setDynamicLayerStack(saved_);
    ft::setDynamicLayerFrontBackKeysIncluded(true);
  }
  Lowered(const Lowered&) = delete;
  Lowered& operator=(const Lowered&) = delete;

 private:
  std::vector<ft::DynamicLayer> saved_;
};

bool float_leaf(const at::Tensor& t) { return t.defined() && is_differentiable_dtype(t); }

/// values[i]: in[i] without its wrapper of grad / jvp level `lvl` (in[i]
/// itself if it has none); at[i]: whether it had one. Returns whether any had.
bool unwrap_level(const Tensors& in, int64_t lvl, Tensors& values, std::vector<char>& at);

/// t's TensorWrapper if it is one of grad / jvp level `lvl`.
ft::TensorWrapper* wrapper_at(const at::Tensor& t, int64_t lvl) {
  auto* w = t.defined() ? compat::wrapper_of(t) : nullptr;
  return (w && w->level().has_value() && *w->level() == lvl) ? w : nullptr;
}

void check_outputs(const CustomRules& r, const Tensors& out) {
  TORCH_CHECK(!out.empty(), "torchfunc::custom_function '", r.name, "': the forward returned no Tensors.");
  for (size_t k = 0; k < out.size(); ++k)
    TORCH_CHECK(out[k].defined(), "torchfunc::custom_function '", r.name, "': output ", k,
                " of the forward is an undefined Tensor.");
}

/// A rule's result for `like` (the inputs for vjp, the outputs for jvp):
/// one tensor per leaf, undefined -> zeros, shapes checked.
Tensors check_rule_result(const CustomRules& r, const char* rule, const char* what, Tensors got, const Tensors& like) {
  TORCH_CHECK(got.size() == like.size(), "torchfunc::custom_function '", r.name, "': the ", rule, " rule returned ",
              got.size(), " Tensors, but the function has ", like.size(), " tensor ", what,
              " (return one per tensor leaf, in flatten order; an undefined Tensor means zero).");
  for (size_t i = 0; i < got.size(); ++i) {
    if (!float_leaf(like[i])) {
      got[i] = at::Tensor();
      continue;
    }
    if (!got[i].defined()) {
      got[i] = at::zeros_like(like[i]);
      continue;
    }
    TORCH_CHECK(got[i].sizes().equals(like[i].sizes()), "torchfunc::custom_function '", r.name, "': the ", rule,
                " rule returned a Tensor of shape ", shape_str(got[i].sizes()), " for ", what, " ", i,
                ", which has shape ", shape_str(like[i].sizes()), ".");
  }
  return got;
}

// ---- rules that differentiate the forward (checkpoint) --------------------------

Tensors recompute_vjp(const CustomRules& r, const Tensors& in, const Tensors& out, const Tensors& ct) {
  // Note [checkpoint recomputes below its own level]
  //   This runs inside the backward pass of the grad level L the call was made
  //   at (the top layer). Recomputing from the inputs as level-L tensors would
  //   record the recomputation, and its backward (create_graph), in level L's
  //   graph, which keeps every segment alive until L's grad returns: no memory
  //   saved. In a transform's own backward of level L (OwnBackward) nothing
  //   differentiates level L's backward again, so we recompute from the
  //   values one level down (inputs and cotangents), under a new grad level,
  //   and take the gradients while that level lives; lower levels still
  //   record everything, so grad(grad(checkpoint(f))) is exact. In a user's
  //   autograd::grad inside f (a gradient penalty) level L must record, and
  //   does.
  const char* api = "checkpoint(f): recomputing f for the backward pass";
  const auto top = ft::maybeCurrentDynamicLayer();
  const int64_t top_grad = top.has_value() && top->key() == ft::TransformType::Grad ? top->layerId() : -1;
  const int64_t outer = top_grad > 0 && OwnBackward::level() == top_grad ? top_grad : -1;
  Tensors base(in.size());
  std::vector<char> rewrap(in.size(), 0);
  for (size_t i = 0; i < in.size(); ++i) {
    base[i] = in[i].defined() ? compat::unwrap_dead(in[i]) : in[i];
    if (auto* w = wrapper_at(base[i], outer)) {
      base[i] = w->value();
      rewrap[i] = 1;
    }
  }
  AutodiffScope autodiff;
  const bool create_graph = c10::GradMode::is_enabled();
  LayerGuard layer(api, [&] { return compat::push_grad_layer(create_graph); });
  const int64_t lvl = layer.level();
  c10::AutoGradMode enable_grad(true);
  std::vector<char> diff(in.size());
  for (size_t i = 0; i < in.size(); ++i) diff[i] = float_leaf(in[i]);
  Tensors diff_wrapped;
  auto name = [](size_t i) { return "args leaf " + std::to_string(i); };
  Tensors wrapped = wrap_for_grad(base, diff, lvl, api, name, diff_wrapped);
  Tensors o = r.forward(wrapped);
  TORCH_CHECK(o.size() == out.size(), "torchfunc::checkpoint: f returned ", o.size(),
              " Tensors when recomputed, but ", out.size(), " the first time.");
  Tensors outs, cts;
  for (size_t k = 0; k < out.size(); ++k) {
    if (!float_leaf(out[k])) continue;
    outs.push_back(o[k]);
    cts.push_back(outer > 0 ? compat::unwrap_grad(ct[k], outer) : ct[k]);
  }
  Tensors g = autograd_grad(outs, diff_wrapped, cts, /*retain_graph=*/false, create_graph);
  Tensors result(in.size());
  for (size_t i = 0, j = 0; i < in.size(); ++i) {
    if (!diff[i]) continue;
    result[i] = compat::unwrap_grad(g[j++], lvl);  // Note [unwrap before pop]
    // (Already one where the cotangent, a level-L tensor, entered the result.)
    if (rewrap[i] && !wrapper_at(result[i], outer)) result[i] = ft::makeTensorWrapper(result[i], outer);
  }
  return result;
}

Tensors recompute_jvp(const CustomRules& r, const Tensors& in, const Tensors& tan) {
  if (compat::kLibtorch113) {
    // libtorch 1.13 only: forward mode at the current jvp level, without a new
    // level (1.13 cannot push one while a lowered level holds its id).
    Tensors duals(in);
    for (size_t i = 0; i < in.size(); ++i)
      if (float_leaf(in[i]) && tan[i].defined()) duals[i] = at::_make_dual(in[i], tan[i], 0);
    Tensors t;
    for (const auto& o : r.forward(duals)) t.push_back(float_leaf(o) ? std::get<1>(at::_unpack_dual(o, 0)) : at::Tensor());
    return t;
  }
  std::vector<char> diff(in.size());
  for (size_t i = 0; i < in.size(); ++i) diff[i] = float_leaf(in[i]);
  auto fn = [&](Tensors& wrapped, FlatResult& res) {
    res.leaves = r.forward(wrapped);
    res.num_primary = res.leaves.size();
  };
  auto name = [](size_t i) { return "args leaf " + std::to_string(i); };
  return jvp_flat(in, diff, tan, fn, "checkpoint(f) under jvp", name).tangents;
}

Tensors run_vjp(const CustomRules& r, const Tensors& in, const Tensors& out, const Tensors& ct) {
  return r.recompute ? recompute_vjp(r, in, out, ct) : r.vjp(in, out, ct);
}
Tensors run_jvp(const CustomRules& r, const Tensors& in, const Tensors& out, const Tensors& tan) {
  return r.recompute ? recompute_jvp(r, in, tan) : r.jvp(in, out, tan);
}
bool has_vjp(const CustomRules& r) { return r.recompute || static_cast<bool>(r.vjp); }
bool has_jvp(const CustomRules& r) { return r.recompute || static_cast<bool>(r.jvp); }

// ---- the autograd node ---------------------------------------------------------------

/// The backward of one call at one grad level (or of plain autograd below
/// every layer): the vjp rule at the saved inputs and outputs.
struct CustomBackward : torch::autograd::Node {
  CustomRulesPtr rules;
  std::vector<torch::autograd::SavedVariable> inputs, outputs;
  std::vector<size_t> diff;  // inputs with an edge, in edge order
  size_t num_outputs = 0;

  std::string name() const override { return "torchfunc::custom_function '" + rules->name + "' backward"; }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    TORCH_CHECK(!inputs.empty() || num_outputs == 0, "torchfunc::custom_function '", rules->name,
                "': its backward ran twice on a graph that was freed; pass retain_graph to run it again.");
    Tensors in, out;
    for (auto& s : inputs) in.push_back(s.unpack());
    auto self = compat::node_ptr(this);
    for (auto& s : outputs) out.push_back(s.unpack(self));
    Tensors ct(out.size());
    for (size_t k = 0; k < out.size(); ++k) {
      if (!float_leaf(out[k])) continue;
      ct[k] = grads[k].defined() ? grads[k] : at::zeros_like(out[k]);
    }
    Tensors g = check_rule_result(*rules, "vjp", "inputs", run_vjp(*rules, in, out, ct), in);
    torch::autograd::variable_list result;
    result.reserve(diff.size());
    for (size_t i : diff) result.push_back(g[i]);
    return result;
  }

  void release_variables() override {
    inputs.clear();
    outputs.clear();
  }
};

/// Attaches a CustomBackward to `out` (fresh tensors) for the inputs that
/// `is_diff` selects; saves inputs and outputs for the rule.
void attach_backward(const CustomRulesPtr& r, const Tensors& in, Tensors& out, const std::vector<char>& is_diff,
                     const char* where) {
  if (!has_vjp(*r))
    custom_fail(*r, std::string("no vjp rule, but ") + where + " differentiates it (reverse mode: grad, vjp, "
                "jacrev, hessian, backward()). Give one with .vjp(rule).");
  auto node = compat::make_node<CustomBackward>();
  node->rules = r;
  Tensors diff_inputs;
  for (size_t i = 0; i < in.size(); ++i) {
    if (!is_diff[i]) continue;
    node->diff.push_back(i);
    diff_inputs.push_back(in[i]);
  }
  node->set_next_edges(torch::autograd::collect_next_edges(diff_inputs));
  for (auto& o : out) {
    if (float_leaf(o)) {
      torch::autograd::set_history(o, node);
    } else {
      node->add_input_metadata(torch::autograd::Node::undefined_input());
    }
  }
  for (const auto& t : in) node->inputs.emplace_back(t, /*is_output=*/false);
  for (const auto& o : out) node->outputs.emplace_back(o, /*is_output=*/float_leaf(o));
  node->num_outputs = out.size();
}

/// Forward-mode: the jvp rule's tangents on `out` (at the current level),
/// for inputs `in` whose tangents are `tan` (undefined: zero).
void attach_tangents(const CustomRules& r, const Tensors& in, Tensors& out, Tensors tan, const char* where) {
  if (!has_jvp(r))
    custom_fail(r, std::string("no jvp rule, but ") + where + " differentiates it in forward mode (jvp, jacfwd, "
                "hessian). Give one with .jvp(rule).");
  for (size_t i = 0; i < in.size(); ++i) {
    if (!float_leaf(in[i]))
      tan[i] = at::Tensor();
    else if (!tan[i].defined())
      tan[i] = at::zeros_like(in[i]);
  }
  Tensors to = check_rule_result(r, "jvp", "outputs", run_jvp(r, in, out, tan), out);
  for (size_t k = 0; k < out.size(); ++k)
    if (float_leaf(out[k])) out[k] = at::_make_dual(out[k], to[k], 0);
}

// ---- one call per kind of layer ---------------------------------------------------------

/// Below every layer: the forward with autograd off; plain autograd and
/// forward AD (dual tensors) see the rules.
Tensors call_plain(const CustomRulesPtr& r, const Tensors& in) {
  std::vector<char> diff(in.size(), 0);
  bool any_diff = false, any_tangent = false;
  Tensors primals = in, tangents(in.size());
  for (size_t i = 0; i < in.size(); ++i) {
    if (!float_leaf(in[i])) continue;
    diff[i] = c10::GradMode::is_enabled() && in[i].requires_grad();
    any_diff = any_diff || diff[i];
    if (in[i]._fw_grad(0).defined()) {
      auto pt = at::_unpack_dual(in[i], 0);
      primals[i] = std::get<0>(pt);
      tangents[i] = std::get<1>(pt);
      any_tangent = true;
    }
  }
  Tensors out;
  {
    c10::AutoGradMode no_grad(false);
    FwGradModeGuard no_fw(false);
    out = r->forward(primals);
  }
  check_outputs(*r, out);
  if (any_diff) {
    // Outputs are fresh tensors: an output that is an input (or a view of one)
    // would get the node as its history.
    for (auto& o : out)
      for (const auto& t : in)
        if (t.defined() && o.is_alias_of(t)) o = o.clone();
    attach_backward(r, in, out, diff, "autograd");
  }
  if (any_tangent) attach_tangents(*r, primals, out, tangents, "forward-mode AD");
  return out;
}

bool unwrap_level(const Tensors& in, int64_t lvl, Tensors& values, std::vector<char>& at) {
  values = in;
  at.assign(in.size(), 0);
  bool any = false;
  for (size_t i = 0; i < in.size(); ++i) {
    if (auto* w = wrapper_at(in[i], lvl)) {
      values[i] = w->value();
      at[i] = 1;
      any = true;
    }
  }
  return any;
}

Tensors call_at_grad(const CustomRulesPtr& r, const Tensors& in, const ft::DynamicLayer& layer) {
  const int64_t lvl = layer.layerId();
  Tensors values;
  std::vector<char> diff;
  const bool any_at_level = unwrap_level(in, lvl, values, diff);
  for (size_t i = 0; i < in.size(); ++i) diff[i] = diff[i] && float_leaf(in[i]) && in[i].requires_grad();
  Tensors out;
  {
    c10::AutoGradMode mode(ft::GradInterpreterPtr(&layer.interpreter()).prevGradMode());
    Lowered lowered;
    out = custom_call_flat(r, values);
  }
  if (!any_at_level) return out;  // nothing of this level flows in: constants for it
  for (auto& o : out) o = ft::makeTensorWrapper(o, lvl);
  bool any_diff = false;
  for (char d : diff) any_diff = any_diff || d;
  if (any_diff && c10::GradMode::is_enabled()) attach_backward(r, in, out, diff, "a grad-family transform");
  return out;
}

Tensors call_at_jvp(const CustomRulesPtr& r, const Tensors& in, const ft::DynamicLayer& layer) {
  const int64_t lvl = layer.layerId();
  Tensors values, primals = in, tangents(in.size());
  std::vector<char> mine;
  const bool any_at_level = unwrap_level(in, lvl, values, mine);
  bool any_tangent = false;
  for (size_t i = 0; i < in.size(); ++i) {
    if (mine[i] && float_leaf(in[i]) && in[i]._fw_grad(0).defined()) {
      auto pt = at::_unpack_dual(in[i], 0);  // the primal without its tangent, for the rule
      primals[i] = std::get<0>(pt);
      tangents[i] = std::get<1>(pt);
      any_tangent = true;
    }
  }
  Tensors out;
  {
    FwGradModeGuard mode(ft::JvpInterpreterPtr(&layer.interpreter()).prevFwdGradMode());
    Lowered lowered;
    out = custom_call_flat(r, values);
  }
  if (!any_at_level) return out;
  for (auto& o : out) o = ft::makeTensorWrapper(o, lvl);
  if (any_tangent && c10::AutogradState::get_tls_state().get_fw_grad_mode())
    attach_tangents(*r, primals, out, tangents, "a jvp-family transform");
  return out;
}

/// libtorch 1.13 only: f once per sample, stacked at dim 0. 1.13 keeps each
/// level's metadata in a global map keyed by level id, so a new vmap level
/// cannot be pushed while a popped one (Lowered) still holds that id.
Tensors loop_over_batch(const Tensors& leaves, const std::vector<OptDim>& dims, int64_t batch,
                        const std::function<Tensors(const Tensors&)>& f) {
  std::vector<Tensors> per_out;
  for (int64_t b = 0; b < batch; ++b) {
    Tensors sample(leaves);
    for (size_t i = 0; i < leaves.size(); ++i)
      if (dims[i]) sample[i] = leaves[i].select(*dims[i], b);
    Tensors o = f(sample);
    if (per_out.empty()) per_out.resize(o.size());
    for (size_t k = 0; k < o.size(); ++k) per_out[k].push_back(o[k]);
  }
  Tensors out;
  for (auto& parts : per_out) out.push_back(at::stack(parts, 0));
  return out;
}

/// The generated vmap rule: the same function over the physical tensors,
/// whose forward and rules run under a vmap of size `batch` with `dims`;
/// every output is batched at 0.
CustomRulesPtr vmapped(const CustomRulesPtr& r, const std::vector<OptDim>& dims, int64_t batch,
                       Randomness randomness) {
  auto v = std::make_shared<CustomRules>();
  v->name = r->name;
  v->generate_vmap_rule = true;  // nested vmaps generate again
  auto cfg = std::make_shared<VmapConfig>();
  cfg->api = "custom_function: generated vmap rule";
  cfg->randomness = randomness;
  cfg->axis_size = batch;
  auto name = [](size_t i) { return "leaf " + std::to_string(i); };
  // f over (groups of leaves with their dims) -> outputs at dim 0.
  auto under_vmap = [cfg, name](const Tensors& leaves, const std::vector<OptDim>& leaf_dims,
                                const std::function<Tensors(const Tensors&)>& f) {
    std::vector<OptDim> d(leaf_dims);
    for (size_t i = 0; i < leaves.size(); ++i)
      if (!leaves[i].defined()) d[i] = c10::nullopt;
    if (compat::kLibtorch113) return loop_over_batch(leaves, d, *cfg->axis_size, f);
    return vmap_flat(leaves, d, *cfg, [&](Tensors& batched, FlatResult& res) {
      res.leaves = f(batched);
      res.num_primary = res.leaves.size();
      res.out_dims.assign(res.leaves.size(), 0);
    }, name);
  };
  v->forward = [r, dims, under_vmap](const Tensors& in) { return under_vmap(in, dims, r->forward); };
  v->recompute = r->recompute;
  // A rule over (inputs at dims, outputs at 0, cotangents at 0 / tangents at dims).
  auto rule_under_vmap = [dims, under_vmap](const Tensors& in, const Tensors& out, const Tensors& third,
                                            bool third_like_inputs, const auto& rule) {
    const size_t n = in.size(), m = out.size();
    Tensors all(in);
    all.insert(all.end(), out.begin(), out.end());
    all.insert(all.end(), third.begin(), third.end());
    std::vector<OptDim> d(dims);
    d.resize(n + m, 0);
    if (third_like_inputs) d.insert(d.end(), dims.begin(), dims.end());
    else d.resize(n + 2 * m, 0);
    return under_vmap(all, d, [&](const Tensors& b) {
      return rule(Tensors(b.begin(), b.begin() + n), Tensors(b.begin() + n, b.begin() + n + m),
                  Tensors(b.begin() + n + m, b.end()));
    });
  };
  if (!r->recompute && r->vjp) {
    v->vjp = [r, dims, rule_under_vmap](const Tensors& in, const Tensors& out, const Tensors& ct) {
      Tensors g = rule_under_vmap(in, out, ct, false, [&](const Tensors& bi, const Tensors& bo, const Tensors& bc) {
        Tensors gi = check_rule_result(*r, "vjp", "inputs", r->vjp(bi, bo, bc), bi);
        for (size_t i = 0; i < gi.size(); ++i)
          if (!gi[i].defined()) gi[i] = at::zeros_like(bi[i]);
        return gi;
      });
      // Per-sample gradients of a shared (unbatched) input add up.
      for (size_t i = 0; i < g.size(); ++i) g[i] = dims[i] ? g[i].movedim(0, *dims[i]) : g[i].sum(0);
      return g;
    };
  }
  if (!r->recompute && r->jvp) {
    v->jvp = [r, rule_under_vmap](const Tensors& in, const Tensors& out, const Tensors& tan) {
      return rule_under_vmap(in, out, tan, true, [&](const Tensors& bi, const Tensors& bo, const Tensors& bt) {
        return check_rule_result(*r, "jvp", "outputs", r->jvp(bi, bo, bt), bo);
      });
    };
  }
  return v;
}

Tensors call_at_vmap(const CustomRulesPtr& r, const Tensors& in, const ft::DynamicLayer& layer) {
  const int64_t lvl = layer.layerId();
  ft::VmapInterpreterPtr vi(&layer.interpreter());
  VmapInfo info;
  info.batch_size = compat::vmap_batch_size(vi);
  switch (vi.randomness()) {
    case ft::RandomnessType::Same:
      info.randomness = Randomness::Same;
      break;
    case ft::RandomnessType::Different:
      info.randomness = Randomness::Different;
      break;
    default:
      info.randomness = Randomness::Error;
  }
  Tensors values(in.size());
  std::vector<OptDim> dims(in.size());
  bool any = false;
  for (size_t i = 0; i < in.size(); ++i) {
    values[i] = in[i];
    if (auto* b = in[i].defined() ? compat::batched_at(in[i], lvl) : nullptr) {
      values[i] = b->value();
      dims[i] = b->bdim();
      any = true;
    }
  }
  if (!any) {
    Lowered lowered;
    return custom_call_flat(r, values);
  }
  Tensors out;
  std::vector<OptDim> out_dims;
  if (r->vmap) {
    Lowered lowered;
    std::tie(out, out_dims) = r->vmap(info, dims, values);
    TORCH_CHECK(out_dims.size() == out.size(), "torchfunc::custom_function '", r->name, "': the vmap rule returned ",
                out.size(), " Tensors but ", out_dims.size(), " out_dims (give one per tensor leaf).");
  } else if (r->generate_vmap_rule) {
    auto v = vmapped(r, dims, info.batch_size, info.randomness);
    Lowered lowered;
    out = custom_call_flat(v, values);
    out_dims.assign(out.size(), 0);
  } else {
    custom_fail(*r, "no vmap rule, but vmap maps over it. Give one with .vmap(rule), or .generate_vmap_rule() "
                "to run the forward and the rules under vmap.");
  }
  check_outputs(*r, out);
  for (size_t k = 0; k < out.size(); ++k) {
    if (!out_dims[k]) continue;
    int64_t d = *out_dims[k];
    const int64_t rank = out[k].dim();
    TORCH_CHECK(d >= -rank && d < rank, "torchfunc::custom_function '", r->name, "': the vmap rule's out_dim ", d,
                " for output ", k, " is out of range for a Tensor of ", rank, " dims.");
    if (d < 0) d += rank;
    TORCH_CHECK(out[k].size(d) == info.batch_size, "torchfunc::custom_function '", r->name, "': output ", k,
                " of the vmap rule has size ", out[k].size(d), " at its out_dim ", d, ", but the batch size is ",
                info.batch_size, ".");
    out[k] = ft::makeBatched(out[k], d, lvl);
  }
  return out;
}

Tensors call_at_functionalize(const CustomRulesPtr& r, const Tensors& in) {
  namespace fz = at::functionalization::impl;
  Tensors values(in.size());
  for (size_t i = 0; i < in.size(); ++i) {
    values[i] = in[i];
    if (in[i].defined() && fz::isFunctionalTensor(in[i])) {
      fz::sync(in[i]);
      values[i] = fz::from_functional_tensor(in[i]);
    }
  }
  Tensors out;
  {
    Lowered lowered;
    out = custom_call_flat(r, values);
  }
  for (auto& o : out) o = fz::to_functional_tensor(o);
  return out;
}

}  // namespace

Tensors custom_call_flat(const CustomRulesPtr& r, const Tensors& inputs) {
  TORCH_INTERNAL_ASSERT(r && r->forward);
  const auto layer = ft::maybeCurrentDynamicLayer();
  if (!layer.has_value()) return call_plain(r, inputs);
  switch (layer->key()) {
    case ft::TransformType::Grad:
      return call_at_grad(r, inputs, *layer);
    case ft::TransformType::Jvp:
      return call_at_jvp(r, inputs, *layer);
    case ft::TransformType::Vmap:
      return call_at_vmap(r, inputs, *layer);
    case ft::TransformType::Functionalize:
      return call_at_functionalize(r, inputs);
    default: {
      Lowered lowered;
      return custom_call_flat(r, inputs);
    }
  }
}

}  // namespace detail
}  // namespace torchfunc
