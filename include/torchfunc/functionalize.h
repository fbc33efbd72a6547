// torchfunc/functionalize.h: f with its mutations (and optionally its views)
// removed. Mirrors torch.func.functionalize.
#pragma once

#include <torchfunc/detail/meta.h>

namespace torchfunc {
namespace detail {

template <class F>
class FunctionalizeTransform {
 public:
  FunctionalizeTransform(F f, FunctionalizeOptions o) : f_(std::move(f)), options_(o) {}

  template <class... Args>
  auto operator()(const Args&... args) const {
    using R = result_t<F, Args...>;
    const auto like = std::forward_as_tuple(args...);
    const auto fa = flatten_args(like);
    std::optional<R> out;
    auto flat_fn = [&](Tensors& in, FlatResult& res) {
      out.emplace(call_rebuilt(f_, like, in));
      flatten_into(*out, res.leaves);
      res.num_primary = res.leaves.size();
    };
    auto name = [&](size_t i) { return leaf_path(like, i, "args"); };
    Tensors res = functionalize_flat(fa.leaves, options_.remove() == Remove::Mutations, flat_fn,
                                     "functionalize(f)(*args)", name);
    const at::Tensor* it = res.data();
    R result = unflatten(*out, it);
    return result;
  }

 private:
  F f_;
  FunctionalizeOptions options_;
};

}  // namespace detail

/// functionalize(f, [FunctionalizeOptions])(args...)
///
/// Mirrors torch.func.functionalize: runs f on functional wrappers of its
/// Tensor arguments, so that every in-place op f calls runs as its
/// out-of-place form (and, with Remove::MutationsAndViews, every view as a
/// *_copy op); the ops libtorch finally executes mutate nothing. A mutation
/// f makes to an argument is copied back into it at the end, as in
/// torch.func. Composes with every transform, in either order:
/// vmap(functionalize(f)), grad(functionalize(f)), functionalize(vmap(f)).
///   auto g = functionalize([](Tensor x) { x.add_(1); return x.mul_(2); });
///   auto y = g(x);  // y == (x0 + 1) * 2, and x was updated to the same
template <class F>
auto functionalize(F f, FunctionalizeOptions options = {}) {
  return detail::FunctionalizeTransform<F>(std::move(f), options);
}

}  // namespace torchfunc
