// torchfunc/custom_function.h: functions with their own derivative and
// batching rules that compose with every transform. Mirrors torch.func's
// support for torch.autograd.Function (vjp via backward, jvp, vmap or
// generate_vmap_rule=True) and JAX's custom_vjp / custom_jvp / custom_vmap.
//
//   auto my_exp = torchfunc::custom_function("my_exp", [](const Tensor& x) { return x.exp(); })
//       .vjp([](const Tensor& g, const Tensor& y, const Tensor& x) { return g * y; })
//       .jvp([](const Tensor& t, const Tensor& y, const Tensor& x) { return t * y; })
//       .generate_vmap_rule();
//   auto d2 = grad(grad([&](const Tensor& x) { return my_exp(x).sum(); }))(x);
//
// The rules see the cotangent / tangents, the outputs and the inputs, in the
// user's types (pytrees):
//   vjp(cotangent_out, out, args...)   -> gradients: a tree whose tensor leaves
//                                         line up with those of (args...)
//   jvp(tangents_in, out, args...)     -> tangent_out: a tree shaped like out;
//                                         tangents_in has the type of the single
//                                         argument, or std::tuple<Args...>
//   vmap(info, in_dims, args...)       -> std::pair{out, out_dims}; in_dims and
//                                         out_dims hold one optional dim per
//                                         tensor leaf (nullopt: not batched)
// The rules are ordinary code: they are themselves differentiated and batched
// by the transforms around them (grad(grad(f)) differentiates the vjp rule;
// vmap(grad(f)) batches it). Undefined gradients / tangents mean zero; the rules
// always receive defined cotangents and tangents for floating-point leaves.
//
// Note [how custom functions meet the transforms]
//   A custom function is not an operator: a call walks the thread's functorch
//   layer stack itself, top down, as torch.func's custom_function_call does.
//   At the top layer it unwraps the inputs of that layer, pops the layer for
//   the recursive call (the rest of the stack sees plain values), and wraps
//   the results again: at a grad layer the wrapped outputs get an autograd
//   node whose backward is the vjp rule; at a jvp layer the outputs get the
//   jvp rule's tangents; at a vmap layer the vmap rule (or the generated one:
//   the function's forward and rules run under a new vmap over the physical
//   tensors) maps the batched values. Below the last layer the forward runs
//   with autograd off, and an ordinary autograd node is attached when inputs
//   require grad, so loss.backward() uses the vjp rule too.
//   We did not register a torch::Library operator per function (the route
//   libtorch offers for C++ kernels): libtorch has no forward-AD registration
//   for custom operators, an operator per function would be global and
//   permanent, and its batching kernel would see only flat Tensor lists.
#pragma once

#include <torchfunc/detail/meta.h>

#include <functional>
#include <memory>
#include <string>
#include <utility>

namespace torchfunc {

/// One optional dim per tensor leaf in a vmap rule's in_dims / out_dims.
using OptDim = c10::optional<int64_t>;

/// What a vmap rule learns about the vmap it runs under (torch.func's info).
struct VmapInfo {
  int64_t batch_size = 0;
  Randomness randomness = Randomness::Error;
};

namespace detail {

/// A custom function's rules over flat tensor lists (what the typed rules
/// become for one call). Empty std::functions are missing rules.
struct CustomRules {
  std::string name;
  std::function<Tensors(const Tensors& in)> forward;
  std::function<Tensors(const Tensors& in, const Tensors& out, const Tensors& cotangents)> vjp;
  std::function<Tensors(const Tensors& in, const Tensors& out, const Tensors& tangents)> jvp;
  std::function<std::pair<Tensors, std::vector<OptDim>>(const VmapInfo&, const std::vector<OptDim>&, const Tensors&)>
      vmap;
  bool generate_vmap_rule = false;
  // checkpoint: vjp and jvp differentiate the forward itself, run again.
  bool recompute = false;
};
using CustomRulesPtr = std::shared_ptr<const CustomRules>;

/// Runs a custom function at the current transform stack (src/custom_function.cpp).
Tensors custom_call_flat(const CustomRulesPtr& rules, const Tensors& inputs);

struct NoRule {};
template <class R>
inline constexpr bool has_rule = !std::is_same_v<R, NoRule>;

/// `tree` with its tensors dropped: the structure a call needs to rebuild
/// values, without keeping the tensors alive.
template <class T>
T structure_of(const T& tree) {
  return tree_map([](const at::Tensor&) { return at::Tensor(); }, tree);
}

/// Typed forward and rules -> CustomRules for one call with arguments like
/// `args` (a structure-only tuple), then the call itself.
template <class Fwd, class Vjp, class Jvp, class Vmap, class... Args>
auto invoke_custom(std::shared_ptr<CustomRules> rules, const Fwd& fwd, const Vjp& vjp, const Jvp& jvp,
                   const Vmap& vmap, const Args&... args) {
  using Out = std::decay_t<std::invoke_result_t<const Fwd&, const Args&...>>;
  static_assert(any_tensor_leaves<Out>(), "torchfunc::custom_function: the forward must return Tensors.");
  auto like = std::make_shared<const std::tuple<Args...>>(structure_of(std::tuple<Args...>(args...)));
  auto out_like = std::make_shared<std::optional<Out>>();
  rules->forward = [fwd, like, out_like](const Tensors& in) {
    Out o = call_rebuilt(fwd, *like, in);
    if (!*out_like) out_like->emplace(structure_of(o));
    return tree_flatten(o);
  };
  auto with_args = [like](const Tensors& in, auto&& fn) {
    return std::apply([&](const auto&... a) { return fn(a...); }, tree_unflatten(in, *like));
  };
  if constexpr (has_rule<Vjp>) {
    rules->vjp = [vjp, with_args, out_like](const Tensors& in, const Tensors& out, const Tensors& ct) {
      const Out o = tree_unflatten(out, **out_like);
      const Out c = tree_unflatten(ct, **out_like);
      return tree_flatten(with_args(in, [&](const auto&... a) { return vjp(c, o, a...); }));
    };
  }
  if constexpr (has_rule<Jvp>) {
    rules->jvp = [jvp, with_args, like, out_like](const Tensors& in, const Tensors& out, const Tensors& tan) {
      const Out o = tree_unflatten(out, **out_like);
      auto t = tree_unflatten(tan, *like);
      return tree_flatten(with_args(in, [&](const auto&... a) {
        if constexpr (sizeof...(Args) == 1) {
          return jvp(std::get<0>(t), o, a...);
        } else {
          return jvp(t, o, a...);
        }
      }));
    };
  }
  if constexpr (has_rule<Vmap>) {
    rules->vmap = [vmap, with_args](const VmapInfo& info, const std::vector<OptDim>& dims, const Tensors& in) {
      auto r = with_args(in, [&](const auto&... a) { return vmap(info, dims, a...); });
      return std::make_pair(tree_flatten(r.first), std::vector<OptDim>(r.second.begin(), r.second.end()));
    };
  }
  Tensors flat_in;
  (flatten_into(args, flat_in), ...);
  Tensors flat_out = custom_call_flat(rules, flat_in);
  return tree_unflatten(flat_out, **out_like);
}

}  // namespace detail

/// A function with its own rules; build it with custom_function(name, forward)
/// and add rules with .vjp(rule), .jvp(rule), .vmap(rule) or
/// .generate_vmap_rule(). Copyable; each builder call returns a new object.
/// A transform that needs a missing rule raises a c10::Error naming the
/// function and the rule.
template <class Fwd, class Vjp = detail::NoRule, class Jvp = detail::NoRule, class Vmap = detail::NoRule>
class CustomFunction {
 public:
  CustomFunction(std::string name, Fwd fwd, Vjp vjp = {}, Jvp jvp = {}, Vmap vmap = {}, bool generate = false)
      : name_(std::move(name)), fwd_(std::move(fwd)), vjp_(std::move(vjp)), jvp_(std::move(jvp)),
        vmap_(std::move(vmap)), generate_(generate) {}

  /// rule(cotangent, out, args...) -> gradients aligned with args' tensors.
  template <class R>
  auto vjp(R rule) const {
    return CustomFunction<Fwd, R, Jvp, Vmap>(name_, fwd_, std::move(rule), jvp_, vmap_, generate_);
  }
  /// rule(tangents, out, args...) -> tangent of out.
  template <class R>
  auto jvp(R rule) const {
    return CustomFunction<Fwd, Vjp, R, Vmap>(name_, fwd_, vjp_, std::move(rule), vmap_, generate_);
  }
  /// rule(VmapInfo, in_dims, args...) -> std::pair{out, out_dims}. The args are
  /// the physical tensors (batch dim at in_dims[i]); the rule may call this
  /// custom function again on them.
  template <class R>
  auto vmap(R rule) const {
    return CustomFunction<Fwd, Vjp, Jvp, R>(name_, fwd_, vjp_, jvp_, std::move(rule), false);
  }
  /// Under vmap, run the forward and the rules under vmap themselves
  /// (torch.func's generate_vmap_rule=True); they must then be batchable.
  CustomFunction generate_vmap_rule() const {
    static_assert(!detail::has_rule<Vmap>, "torchfunc::custom_function: a vmap rule is already given.");
    return CustomFunction(name_, fwd_, vjp_, jvp_, vmap_, true);
  }

  template <class... Args>
  auto operator()(const Args&... args) const {
    auto rules = std::make_shared<detail::CustomRules>();
    rules->name = name_;
    rules->generate_vmap_rule = generate_;
    return detail::invoke_custom(std::move(rules), fwd_, vjp_, jvp_, vmap_, args...);
  }

  const std::string& name() const { return name_; }

 private:
  std::string name_;
  Fwd fwd_;
  Vjp vjp_;
  Jvp jvp_;
  Vmap vmap_;
  bool generate_;
};

/// custom_function(name, forward): the forward takes any pytree arguments and
/// returns a pytree of Tensors; name appears in every error about it.
template <class Fwd>
CustomFunction<Fwd> custom_function(std::string name, Fwd forward) {
  return CustomFunction<Fwd>(std::move(name), std::move(forward));
}

}  // namespace torchfunc
