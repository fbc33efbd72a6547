// torchfunc/jvp.h: Jacobian-vector products (forward mode) and linearize.
// Mirrors torch.func.jvp and torch.func.linearize.
#pragma once

#include <torchfunc/detail/meta.h>

namespace torchfunc {
namespace detail {

template <class Tuple>
struct is_std_tuple : std::false_type {};
template <class... T>
struct is_std_tuple<std::tuple<T...>> : std::true_type {};

template <bool Aux, class F, class... P>
auto jvp_impl(const F& f, const std::tuple<P...>& primals, const std::tuple<P...>& tangents,
              const JvpOptions& options) {
  static_assert(sizeof...(P) > 0, "torchfunc::jvp: primals must hold at least one Tensor.");
  using R = result_t<F, P...>;
  using Out = std::conditional_t<Aux, typename aux_split<R>::out, R>;
  if constexpr (Aux) {
    static_assert(aux_split<R>::ok,
                  "torchfunc::jvp: with has_aux, f must return std::pair<Out, Aux> (or a 2-tuple).");
    static_assert(only_tensor_leaves<typename aux_split<R>::aux>(),
                  "torchfunc::jvp: aux may only contain Tensors.");
  }
  static_assert(only_tensor_leaves<Out>(),
                "torchfunc::jvp: f must return a Tensor or a container of Tensors.");
  constexpr const char* api = "jvp(f, primals, tangents)";
  if (auto err = structure_mismatch(primals, tangents, Path{nullptr, "", "tangents"}); !err.empty()) {
    fail(std::string(api) + ": Expected primals and tangents to have the same structure, but they differ " +
         err + ".");
  }
  const auto fa = flatten_args(primals);
  const Tensors tans = tree_flatten(tangents);
  TORCH_CHECK(!fa.leaves.empty(), "torchfunc::", api, ": Expected primals to contain at least one Tensor.");
  std::vector<char> mask(fa.leaves.size(), 1);
  std::optional<R> out;
  auto flat_fn = [&](Tensors& in, FlatResult& res) {
    out.emplace(call_rebuilt(f, primals, in));
    flatten_result<Aux>(*out, res);
  };
  auto name = [&](size_t i) { return leaf_path(primals, i, "primals"); };
  JvpOut j = jvp_flat(fa.leaves, mask, tans, flat_fn, api, name, options.strict());
  const Out& out_like = primary_part<Aux>(*out);
  const at::Tensor* it = j.outputs.data();
  Out primal_out = unflatten(out_like, it);
  it = j.tangents.data();
  Out tangent_out = unflatten(out_like, it);
  if constexpr (Aux) {
    it = j.aux.data();
    auto aux = unflatten(aux_of(*out), it);
    out.reset();
    return std::make_tuple(std::move(primal_out), std::move(tangent_out), std::move(aux));
  } else {
    out.reset();
    return std::make_pair(std::move(primal_out), std::move(tangent_out));
  }
}

}  // namespace detail

/// jvp(f, primals, tangents) -> std::pair{output, tangent_output}
/// jvp(f, has_aux, primals, tangents) -> std::tuple{output, tangent_output, aux}
///
/// Mirrors torch.func.jvp. `primals` and `tangents` are std::tuples with one
/// entry per argument of f and the same structure (tangent shapes equal the
/// primal shapes). Forward-mode AD: one evaluation of f. JvpOptions last:
/// JvpOptions().strict(true) makes an output that does not depend on the
/// primals an error.
///   auto [y, dy] = jvp(f, std::tuple{x}, std::tuple{v});     // dy = J v
///   auto hvp = jvp(grad(f), std::tuple{x}, std::tuple{v}).second;
template <class F, class... P, class... T>
auto jvp(F f, const std::tuple<P...>& primals, const std::tuple<T...>& tangents, const JvpOptions& options = {}) {
  static_assert(std::is_same_v<std::tuple<P...>, std::tuple<T...>>,
                "torchfunc::jvp: primals and tangents must have the same type, e.g. "
                "jvp(f, std::tuple{x, y}, std::tuple{tx, ty}).");
  return detail::jvp_impl<false>(f, primals, tangents, options);
}
template <class F, class... P, class... T>
auto jvp(F f, has_aux_t, const std::tuple<P...>& primals, const std::tuple<T...>& tangents,
         const JvpOptions& options = {}) {
  static_assert(std::is_same_v<std::tuple<P...>, std::tuple<T...>>,
                "torchfunc::jvp: primals and tangents must have the same type, e.g. "
                "jvp(f, has_aux, std::tuple{x}, std::tuple{tx}).");
  return detail::jvp_impl<true>(f, primals, tangents, options);
}

/// The linear map returned by linearize: jvp_fn(tangents...) -> J(primals)·t,
/// with f's output type. Tangents have the primals' types. Does not run f
/// again: it differentiates f's recorded backward graph (a "double vjp"), so
/// it needs ops with double-backward support. Copyable, callable many times
/// and under vmap.
template <class Out, class... Primals>
class LinearizeFn {
 public:
  LinearizeFn(std::shared_ptr<const Out> out_like, std::shared_ptr<const std::tuple<Primals...>> primals,
              std::shared_ptr<detail::LinearizeState> state)
      : out_like_(std::move(out_like)), primals_(std::move(primals)), state_(std::move(state)) {}

  Out operator()(const Primals&... tangents) const {
    auto tan = std::forward_as_tuple(tangents...);
    if (auto err = detail::structure_mismatch(*primals_, std::tuple<Primals...>(tangents...),
                                              detail::Path{nullptr, "", "tangents"});
        !err.empty()) {
      detail::fail("linearize: jvp_fn(*tangents): Expected tangents to have the same structure as the "
                   "primals, but they differ " + err + ".");
    }
    detail::Tensors flat = tree_flatten(tan);
    auto name = [&](size_t i) { return detail::leaf_path(tan, i, "tangents"); };
    detail::Tensors outs = detail::linearize_apply(*state_, flat, name);
    const at::Tensor* it = outs.data();
    return detail::unflatten(*out_like_, it);
  }

 private:
  std::shared_ptr<const Out> out_like_;
  std::shared_ptr<const std::tuple<Primals...>> primals_;
  std::shared_ptr<detail::LinearizeState> state_;
};

namespace detail {
template <bool Aux, class F, class... Primals>
auto linearize_impl(const F& f, const Primals&... primals) {
  static_assert(sizeof...(Primals) > 0, "torchfunc::linearize: pass at least one primal.");
  using R = result_t<F, Primals...>;
  using Out = std::conditional_t<Aux, typename aux_split<R>::out, R>;
  if constexpr (Aux) {
    static_assert(aux_split<R>::ok,
                  "torchfunc::linearize: with has_aux, f must return std::pair<Out, Aux> (or a 2-tuple).");
    static_assert(only_tensor_leaves<typename aux_split<R>::aux>(),
                  "torchfunc::linearize: aux may only contain Tensors.");
  }
  static_assert(only_tensor_leaves<Out>(),
                "torchfunc::linearize: f must return a Tensor or a container of Tensors.");
  auto primals_copy = std::make_shared<const std::tuple<Primals...>>(primals...);
  const auto& like = *primals_copy;
  const auto fa = flatten_args(like);
  std::optional<R> out;
  auto flat_fn = [&](Tensors& in, FlatResult& res) {
    out.emplace(call_rebuilt(f, like, in));
    flatten_result<Aux>(*out, res);
  };
  auto name = [&](size_t i) { return leaf_path(like, i, "primals"); };
  LinearizeOut l = linearize_flat(fa.leaves, flat_fn, name);
  const at::Tensor* it = l.outputs.data();
  const Out& out_struct = primary_part<Aux>(*out);
  Out output = unflatten(out_struct, it);
  auto out_like = std::make_shared<const Out>(output);
  LinearizeFn<Out, Primals...> fn(out_like, primals_copy, l.state);
  if constexpr (Aux) {
    const at::Tensor* ait = l.aux.data();
    auto aux = unflatten(aux_of(*out), ait);
    out.reset();
    return std::make_tuple(std::move(output), std::move(fn), std::move(aux));
  } else {
    out.reset();
    return std::make_pair(std::move(output), std::move(fn));
  }
}
}  // namespace detail

/// linearize(f, primals...) -> std::pair{output, jvp_fn}. Mirrors
/// torch.func.linearize: jvp_fn(t...) equals jvp(f, {primals}, {t}).second.
/// linearize(f, has_aux, primals...) -> std::tuple{output, jvp_fn, aux}
/// (as JAX's linearize(has_aux=True); torch.func has no has_aux here).
template <class F, class... Primals>
auto linearize(F f, const Primals&... primals) {
  return detail::linearize_impl<false>(f, primals...);
}
template <class F, class... Primals>
auto linearize(F f, has_aux_t, const Primals&... primals) {
  return detail::linearize_impl<true>(f, primals...);
}

}  // namespace torchfunc
