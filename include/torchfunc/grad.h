// torchfunc/grad.h: grad and grad_and_value. Mirrors torch.func.grad /
// torch.func.grad_and_value.
#pragma once

#include <torchfunc/detail/meta.h>

namespace torchfunc {
namespace detail {

template <class F, class Sel, bool Aux, bool WithValue>
class GradTransform {
 public:
  explicit GradTransform(F f) : f_(std::move(f)) {}

  template <class... Args>
  auto operator()(const Args&... args) const {
    constexpr size_t N = sizeof...(Args);
    static_assert(N > 0, "torchfunc::grad: f must take at least one argument to differentiate.");
    using R = result_t<F, Args...>;
    constexpr const char* api = WithValue ? "grad_and_value(f)(*args)" : "grad(f)(*args)";
    if constexpr (Aux) {
      static_assert(aux_split<R>::ok,
                    "torchfunc::grad: with has_aux, f must return std::pair<Tensor, Aux> (or a "
                    "2-tuple): {scalar output, aux}.");
      static_assert(std::is_same_v<typename aux_split<R>::out, at::Tensor>,
                    "torchfunc::grad: with has_aux, the first element f returns must be a scalar "
                    "Tensor.");
      static_assert(only_tensor_leaves<typename aux_split<R>::aux>(),
                    "torchfunc::grad: aux may only contain Tensors (in any supported container).");
    } else {
      static_assert(std::is_same_v<R, at::Tensor>,
                    "torchfunc::grad: f must return a scalar Tensor. Use has_aux to return extra "
                    "values, or vjp/jacrev for non-scalar outputs.");
    }

    const auto like = std::forward_as_tuple(args...);
    const auto fa = flatten_args(like);
    const auto mask = select_mask(Sel{}, fa);
    std::optional<R> out;
    auto flat_fn = [&](Tensors& in, FlatResult& res) {
      out.emplace(call_rebuilt(f_, like, in));
      if constexpr (Aux) {
        res.leaves.push_back(primary_of(*out));
        flatten_into(aux_of(*out), res.leaves);
      } else {
        res.leaves.push_back(*out);
      }
      res.num_primary = 1;
    };
    auto name = [&](size_t i) { return leaf_path(like, i, "args"); };
    GradOut g = grad_flat(fa.leaves, mask, flat_fn, api, name);
    auto grads = select_args(Sel{}, like, fa, g.grads);
    at::Tensor value = g.outputs[0];
    if constexpr (Aux) {
      const at::Tensor* it = g.outputs.data() + 1;
      auto aux = unflatten(aux_of(*out), it);
      out.reset();
      if constexpr (WithValue) {
        return std::make_pair(std::move(grads), std::make_pair(std::move(value), std::move(aux)));
      } else {
        return std::make_pair(std::move(grads), std::move(aux));
      }
    } else {
      out.reset();
      if constexpr (WithValue) {
        return std::make_pair(std::move(grads), std::move(value));
      } else {
        return grads;
      }
    }
  }

 private:
  F f_;
};

}  // namespace detail

/// grad(f, [argnum<I> | argnums<I...>], [has_aux])(args...)
///
/// Mirrors torch.func.grad. f must return a scalar (0-dim) Tensor, or with
/// `has_aux` a pair {scalar Tensor, aux}. The result has the type of the
/// differentiated argument (argument 0 by default); `argnums<0, 2>` gives a
/// std::tuple; with has_aux the result is std::pair{grads, aux}. Inputs f
/// does not use get zero gradients. Composes with every transform:
///   auto d2 = grad(grad(f))(x);            // second derivative
///   auto psg = vmap(grad(loss), in_dims(none, 0, 0))(w, xs, ys);
template <class F, class... Tags>
auto grad(F f, Tags...) {
  using P = detail::parse_tags<Tags...>;
  return detail::GradTransform<F, typename P::sel, P::aux, false>(std::move(f));
}

/// grad_and_value(f, ...)(args...) -> std::pair{grads, value}; with has_aux
/// std::pair{grads, std::pair{value, aux}}. Mirrors torch.func.grad_and_value.
template <class F, class... Tags>
auto grad_and_value(F f, Tags...) {
  using P = detail::parse_tags<Tags...>;
  return detail::GradTransform<F, typename P::sel, P::aux, true>(std::move(f));
}

}  // namespace torchfunc
