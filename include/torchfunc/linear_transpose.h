// torchfunc/linear_transpose.h: the transpose of a linear function. Mirrors
// JAX's jax.linear_transpose (torch.func has none).
#pragma once

#include <torchfunc/vjp.h>

namespace torchfunc {

/// Options of linear_transpose.
struct LinearTransposeOptions {
  /// Check, when the transpose is built, that f is linear: f(0) == 0 and
  /// f(a x + y) == a f(x) + f(y) at seeded random x, y (three more
  /// evaluations of f, without autograd). JAX sees linearity in its trace;
  /// libtorch runs ops eagerly, so torchfunc tests it numerically.
  TORCH_ARG(bool, check_linear) = true;
};

namespace detail {
inline constexpr const char* kLinearTransposeApi = "linear_transpose(f, *primals)";
inline constexpr const char* kTransposeFnApi = "linear_transpose(f, *primals): transpose_fn(cotangents)";
}  // namespace detail

/// linear_transpose(f, [LinearTransposeOptions], primals...) -> transpose_fn
///
/// For f linear in its inputs, transpose_fn(ct) is the transpose of f
/// applied to ct: a std::tuple with one entry per primal, each of its
/// primal's type, exactly like vjp_fn (it is a VjpFn, with VjpFnOptions,
/// callable many times and under vmap). The primals give only shapes,
/// dtypes and devices, as in JAX: a linear map's pullback is the same at
/// every point, and torchfunc takes it at zero. A function that fails the
/// linearity check (see LinearTransposeOptions) is an error naming
/// linear_transpose and the output.
///   auto t = linear_transpose([&](const Tensor& x) { return A.matmul(x); }, x);
///   auto [y] = t(ct);  // A^T ct
template <class F, class... Primals>
auto linear_transpose(F f, const LinearTransposeOptions& options, const Primals&... primals) {
  static_assert(sizeof...(Primals) > 0, "torchfunc::linear_transpose: pass at least one primal: "
                                        "linear_transpose(f, x).");
  using R = detail::result_t<F, Primals...>;
  static_assert(detail::only_tensor_leaves<R>(),
                "torchfunc::linear_transpose: f must return a Tensor or a container of Tensors.");
  const std::tuple<Primals...> like(primals...);
  const auto fa = detail::flatten_args(like);
  detail::Tensors zeros;
  for (const auto& t : fa.leaves) zeros.push_back(t.defined() ? at::zeros_like(t) : t);
  auto [out, fn] = detail::call_rebuilt(
      [&](const Primals&... z) {
        return detail::VjpBuilder<F, Primals...>::template run<false>(f, detail::kLinearTransposeApi,
                                                                       detail::kTransposeFnApi, z...);
      },
      like, zeros);
  if (options.check_linear()) {
    auto eval = [&](const detail::Tensors& in) { return tree_flatten(detail::call_rebuilt(f, like, in)); };
    detail::check_linear(fa.leaves, tree_flatten(out), eval, detail::kLinearTransposeApi);
  }
  return fn;
}

template <class F, class... Primals>
auto linear_transpose(F f, const Primals&... primals) {
  return linear_transpose(std::move(f), LinearTransposeOptions(), primals...);
}

}  // namespace torchfunc
