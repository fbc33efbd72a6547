// torchfunc/jacobian.h: jacrev, jacfwd and hessian. Mirror torch.func.jacrev,
// torch.func.jacfwd and torch.func.hessian.
//
// Result shape rule (as torch.func): the output tree of f with every Tensor
// leaf `out` replaced by the Jacobian w.r.t. the selected argument(s); each
// block has shape out.shape + in.shape. One argnum gives that argument's own
// type per output leaf; argnums<I...> gives a std::tuple per output leaf.
#pragma once

#include <torchfunc/detail/meta.h>

namespace torchfunc {
namespace detail {

enum class JacMode { Rev, Fwd, Auto };

template <JacMode Mode, class F, class Sel, bool Aux, class Options>
class JacTransform {
 public:
  JacTransform(F f, Options o, const char* api = nullptr) : f_(std::move(f)), options_(o), api_(api) {}

  template <class... Args>
  auto operator()(const Args&... args) const {
    constexpr size_t N = sizeof...(Args);
    static_assert(N > 0, "torchfunc::jacrev/jacfwd: f must take at least one argument.");
    using R = result_t<F, Args...>;
    using Out = std::conditional_t<Aux, typename aux_split<R>::out, R>;
    if constexpr (Aux) {
      static_assert(aux_split<R>::ok,
                    "torchfunc::jacrev/jacfwd: with has_aux, f must return std::pair<Out, Aux>.");
      static_assert(only_tensor_leaves<typename aux_split<R>::aux>(),
                    "torchfunc::jacrev/jacfwd: aux may only contain Tensors.");
    }
    static_assert(only_tensor_leaves<Out>(),
                  "torchfunc::jacrev/jacfwd: f must return a Tensor or a container of Tensors.");
    const char* api = api_                     ? api_
                      : Mode == JacMode::Rev   ? "jacrev(f, ...)(*args)"
                      : Mode == JacMode::Fwd   ? "jacfwd(f, ...)(*args)"
                                               : "jacobian(f, ...)(*args)";

    const auto like = std::forward_as_tuple(args...);
    const auto fa = flatten_args(like);
    const auto mask = select_mask(Sel{}, fa);
    std::optional<R> out;
    auto flat_fn = [&](Tensors& in, FlatResult& res) {
      out.emplace(call_rebuilt(f_, like, in));
      flatten_result<Aux>(*out, res);
    };
    auto name = [&](size_t i) { return leaf_path(like, i, "args"); };
    JacOut j = [&] {
      if constexpr (Mode == JacMode::Rev) {
        return jacrev_flat(fa.leaves, mask, flat_fn, options_.chunk_size(), api, name);
      } else if constexpr (Mode == JacMode::Fwd) {
        return jacfwd_flat(fa.leaves, mask, flat_fn, options_.randomness(), options_.chunk_size(), api, name);
      } else {
        return jacobian_flat(fa.leaves, mask, flat_fn, options_, api, name);
      }
    }();
    // One block per output leaf, shaped like the selected arguments.
    using Block = decltype(select_args(Sel{}, like, fa, j.jac[0]));
    std::vector<Block> blocks;
    blocks.reserve(j.jac.size());
    for (const auto& row : j.jac) blocks.push_back(select_args(Sel{}, like, fa, row));
    const Out& out_like = primary_part<Aux>(*out);
    const Block* bit = blocks.data();
    auto result = map_leaves<Block>(out_like, bit);
    if constexpr (Aux) {
      const at::Tensor* ait = j.aux.data();
      auto aux = unflatten(aux_of(*out), ait);
      out.reset();
      return std::make_pair(std::move(result), std::move(aux));
    } else {
      out.reset();
      return result;
    }
  }

 private:
  F f_;
  Options options_;
  const char* api_;  // what errors call this transform (hessian names itself); null: jacrev / jacfwd
};

}  // namespace detail

/// jacrev(f, [argnum<I> | argnums<I...>], [has_aux], [JacrevOptions])(args...)
///
/// Mirrors torch.func.jacrev: one vjp of f, then vmap of its pullback over
/// the rows of the identity (chunk_size rows at a time; 1 means a loop).
///   auto J = jacrev(f)(x);                    // [out..., in...]
///   auto [Jw, Jb] = jacrev(f, argnums<0, 1>)(w, b);
template <class F, class... Tags>
auto jacrev(F f, const Tags&... tags) {
  using P = detail::parse_tags<Tags...>;
  auto o = detail::find_option<JacrevOptions>(tags...);
  TORCH_CHECK(!o.chunk_size().has_value() || *o.chunk_size() > 0,
              "torchfunc::jacrev: Expected chunk_size to be a positive integer, but got ",
              *o.chunk_size(), ".");
  return detail::JacTransform<detail::JacMode::Rev, F, typename P::sel, P::aux, JacrevOptions>(std::move(f), o);
}

/// jacfwd(f, [argnum<I> | argnums<I...>], [has_aux], [JacfwdOptions])(args...)
///
/// Mirrors torch.func.jacfwd: vmap of jvp over the columns of the identity.
/// Better than jacrev when there are fewer inputs than outputs.
/// JacfwdOptions().chunk_size(n): n columns per vmap call (torch.func has no
/// such option for jacfwd).
template <class F, class... Tags>
auto jacfwd(F f, const Tags&... tags) {
  using P = detail::parse_tags<Tags...>;
  auto o = detail::find_option<JacfwdOptions>(tags...);
  TORCH_CHECK(!o.chunk_size().has_value() || *o.chunk_size() > 0,
              "torchfunc::jacfwd: Expected chunk_size to be a positive integer, but got ", *o.chunk_size(), ".");
  return detail::JacTransform<detail::JacMode::Fwd, F, typename P::sel, P::aux, JacfwdOptions>(std::move(f), o);
}

/// jacobian(f, [argnum<I> | argnums<I...>], [has_aux], [JacobianOptions])(args...)
///
/// jacrev or jacfwd, whichever jacobian_mode() picks for the sizes at hand;
/// same result shapes. Auto mode runs f once (as reverse mode's vjp) to learn
/// the output size, so a call that picks forward mode evaluates f once more
/// than jacfwd would. JacobianOptions().mode(JacobianMode::Forward | Reverse)
/// forces a mode. torch.func has no such transform.
///   auto J = jacobian(f)(x);
template <class F, class... Tags>
auto jacobian(F f, const Tags&... tags) {
  using P = detail::parse_tags<Tags...>;
  auto o = detail::find_option<JacobianOptions>(tags...);
  TORCH_CHECK(!o.chunk_size().has_value() || *o.chunk_size() > 0,
              "torchfunc::jacobian: Expected chunk_size to be a positive integer, but got ", *o.chunk_size(), ".");
  return detail::JacTransform<detail::JacMode::Auto, F, typename P::sel, P::aux, JacobianOptions>(std::move(f), o);
}

/// hessian(f, [argnum<I> | argnums<I...>], [has_aux])(args...) = jacfwd(jacrev(f, a), a).
/// Mirrors torch.func.hessian. For scalar f of x: shape x.shape + x.shape.
/// With has_aux (JAX's hessian(has_aux=True); torch.func has none), f returns
/// {output, aux} and hessian returns std::pair{H, aux}.
/// HessianOptions().chunk_size(n) chunks both levels (n rows of the inner
/// jacrev and n columns of the outer jacfwd per vmap call): peak memory falls
/// with n (torch.func chunks neither).
template <class F, class... Tags>
auto hessian(F f, const Tags&... tags) {
  using P = detail::parse_tags<Tags...>;
  constexpr const char* api = "hessian(f, ...)(*args)";  // errors name hessian, not its parts
  const auto h = detail::find_option<HessianOptions>(tags...);
  TORCH_CHECK(!h.chunk_size().has_value() || *h.chunk_size() > 0,
              "torchfunc::hessian: Expected chunk_size to be a positive integer, but got ", *h.chunk_size(), ".");
  auto ro = detail::find_option<JacrevOptions>(tags...);
  auto fo = detail::find_option<JacfwdOptions>(tags...);
  if (h.chunk_size()) {
    ro.chunk_size(h.chunk_size());
    fo.chunk_size(h.chunk_size());
  }
  using Rev = detail::JacTransform<detail::JacMode::Rev, F, typename P::sel, P::aux, JacrevOptions>;
  Rev rev(std::move(f), ro, api);
  return detail::JacTransform<detail::JacMode::Fwd, Rev, typename P::sel, P::aux, JacfwdOptions>(std::move(rev), fo,
                                                                                                 api);
}

}  // namespace torchfunc
