// torchfunc/vjp.h: vector-Jacobian products. Mirrors torch.func.vjp.
#pragma once

#include <torchfunc/detail/meta.h>

namespace torchfunc {
namespace detail {
template <class F, class... Primals>
struct VjpBuilder;
inline constexpr const char* kVjpApi = "vjp(f, *primals)";
inline constexpr const char* kVjpFnApi = "vjp(f, *primals): vjp_fn(cotangents)";
}  // namespace detail

/// The pullback returned by vjp: vjp_fn(cotangents) -> std::tuple of one
/// gradient per primal, each with its primal's type. `cotangents` has the
/// type and structure of f's output. Copyable; may be called many times,
/// and under vmap (that is how jacrev works). VjpFnOptions last:
///   vjp_fn(ct, VjpFnOptions().retain_graph(false).create_graph(false))
template <class Out, class... Primals>
class VjpFn {
 public:
  using result_type = std::tuple<Primals...>;

  std::tuple<Primals...> operator()(const Out& cotangents, const VjpFnOptions& options = {}) const {
    if (auto err = detail::structure_mismatch(*out_like_, cotangents, detail::Path{nullptr, "", "cotangents"});
        !err.empty()) {
      detail::fail(std::string(api_) + ": Expected the cotangents to have the same structure as the "
                   "outputs of f, but they differ " + err + ".");
    }
    detail::Tensors cts = tree_flatten(cotangents);
    auto name = [&](size_t i) { return detail::leaf_path(cotangents, i, "cotangents"); };
    detail::Tensors grads = detail::vjp_apply(*state_, cts, name, options.retain_graph(), options.create_graph());
    return rebuild(grads, std::index_sequence_for<Primals...>{});
  }

 private:
  template <class, class...>
  friend struct detail::VjpBuilder;
  VjpFn(std::shared_ptr<const Out> out_like, std::shared_ptr<const std::tuple<Primals...>> primals,
        std::vector<size_t> offsets, std::shared_ptr<detail::VjpState> state, const char* api)
      : out_like_(std::move(out_like)),
        primals_(std::move(primals)),
        offsets_(std::move(offsets)),
        state_(std::move(state)),
        api_(api) {}

  template <size_t... I>
  std::tuple<Primals...> rebuild(const detail::Tensors& grads, std::index_sequence<I...>) const {
    return std::tuple<Primals...>{rebuild_one<I>(grads)...};
  }
  template <size_t I>
  auto rebuild_one(const detail::Tensors& grads) const {
    const at::Tensor* it = grads.data() + offsets_[I];
    return detail::unflatten(std::get<I>(*primals_), it);
  }

  std::shared_ptr<const Out> out_like_;  // structure of f's output
  std::shared_ptr<const std::tuple<Primals...>> primals_;  // structure of the primals
  std::vector<size_t> offsets_;
  std::shared_ptr<detail::VjpState> state_;
  const char* api_;  // what errors call this function
};

namespace detail {
template <class F, class... Primals>
struct VjpBuilder {
  /// api: what errors call the transform; fn_api: what they call vjp_fn.
  template <bool Aux>
  static auto run(const F& f, const char* api, const char* fn_api, const Primals&... primals) {
    static_assert(sizeof...(Primals) > 0, "torchfunc::vjp: pass at least one primal: vjp(f, x).");
    using R = result_t<F, Primals...>;
    using Out = std::conditional_t<Aux, typename aux_split<R>::out, R>;
    if constexpr (Aux) {
      static_assert(aux_split<R>::ok,
                    "torchfunc::vjp: with has_aux, f must return std::pair<Out, Aux> (or a 2-tuple).");
      static_assert(only_tensor_leaves<typename aux_split<R>::aux>(),
                    "torchfunc::vjp: aux may only contain Tensors.");
    }
    static_assert(only_tensor_leaves<Out>(),
                  "torchfunc::vjp: f must return a Tensor or a container of Tensors (no non-tensor "
                  "leaves).");
    auto primals_copy = std::make_shared<const std::tuple<Primals...>>(primals...);
    const auto& like = *primals_copy;
    const auto fa = flatten_args(like);
    std::vector<char> mask(fa.leaves.size(), 1);
    std::optional<R> out;
    auto flat_fn = [&](Tensors& in, FlatResult& res) {
      out.emplace(call_rebuilt(f, like, in));
      flatten_result<Aux>(*out, res);
    };
    auto name = [&](size_t i) { return leaf_path(like, i, "primals"); };
    VjpOut v = vjp_flat(fa.leaves, mask, flat_fn, api, name, fn_api);
    const at::Tensor* it = v.outputs.data();
    Out outputs = unflatten(primary_part<Aux>(*out), it);
    // The pullback keeps the output's structure, not its (wrapped) values.
    auto out_like = std::make_shared<const Out>(outputs);
    VjpFn<Out, Primals...> fn(out_like, primals_copy,
                              std::vector<size_t>(fa.offsets.begin(), fa.offsets.end()), v.state, fn_api);
    if constexpr (Aux) {
      const at::Tensor* ait = v.aux.data();
      auto aux = unflatten(aux_of(*out), ait);
      out.reset();
      return std::make_tuple(std::move(outputs), std::move(fn), std::move(aux));
    } else {
      out.reset();
      return std::make_pair(std::move(outputs), std::move(fn));
    }
  }
};
}  // namespace detail

/// vjp(f, primals...) -> std::pair{output, vjp_fn}
/// vjp(f, has_aux, primals...) -> std::tuple{output, vjp_fn, aux}
///
/// Mirrors torch.func.vjp: evaluates f once, recording its graph; vjp_fn(ct)
/// returns the gradient of <output, ct> w.r.t. every primal.
///   auto [y, vjp_fn] = vjp(f, x);
///   auto [gx] = vjp_fn(torch::ones_like(y));
template <class F, class... Primals>
auto vjp(F f, const Primals&... primals) {
  return detail::VjpBuilder<F, Primals...>::template run<false>(f, detail::kVjpApi, detail::kVjpFnApi, primals...);
}
template <class F, class... Primals>
auto vjp(F f, has_aux_t, const Primals&... primals) {
  return detail::VjpBuilder<F, Primals...>::template run<true>(f, detail::kVjpApi, detail::kVjpFnApi, primals...);
}

}  // namespace torchfunc
