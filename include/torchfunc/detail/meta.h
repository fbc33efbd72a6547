// torchfunc/detail/meta.h: compile-time helpers shared by the transforms:
// tag parsing (argnums, has_aux, options), flattening argument packs, calling
// the user's function on rebuilt arguments, and matching in_dims/out_dims.
#pragma once

#include <torchfunc/detail/core.h>
#include <torchfunc/options.h>
#include <torchfunc/tree.h>

#include <array>
#include <functional>
#include <tuple>
#include <type_traits>
#include <utility>

namespace torchfunc {
namespace detail {

// ---- argnums ---------------------------------------------------------------

/// Which arguments a transform differentiates. Tuple=false: one index, bare
/// result; Tuple=true: a std::tuple of results.
template <bool Tuple, int... I>
struct ArgSel {};

template <class T>
struct is_option : std::false_type {};
template <>
struct is_option<JacrevOptions> : std::true_type {};
template <>
struct is_option<JacfwdOptions> : std::true_type {};
template <>
struct is_option<VmapOptions> : std::true_type {};
template <>
struct is_option<HessianOptions> : std::true_type {};
template <>
struct is_option<JacobianOptions> : std::true_type {};

template <class T>
struct dependent_false : std::false_type {};

template <class Sel, bool Aux, class... Tags>
struct TagParser {
  using sel = Sel;
  static constexpr bool aux = Aux;
};
template <class Sel, bool Aux, int I, class... R>
struct TagParser<Sel, Aux, argnum_t<I>, R...> : TagParser<ArgSel<false, I>, Aux, R...> {};
template <class Sel, bool Aux, int... I, class... R>
struct TagParser<Sel, Aux, argnums_t<I...>, R...> : TagParser<ArgSel<true, I...>, Aux, R...> {
  static_assert(sizeof...(I) > 0,
                "torchfunc: argnums<> needs at least one index, e.g. argnums<0, 1>.");
};
template <class Sel, bool Aux, class... R>
struct TagParser<Sel, Aux, has_aux_t, R...> : TagParser<Sel, true, R...> {};
template <class Sel, bool Aux, class T, class... R>
struct TagParser<Sel, Aux, T, R...> : TagParser<Sel, Aux, R...> {
  static_assert(is_option<T>::value,
                "torchfunc: unknown tag. Expected argnum<I>, argnums<I...>, has_aux or an options "
                "struct (e.g. JacrevOptions().chunk_size(4)).");
};

template <class... Tags>
using parse_tags = TagParser<ArgSel<false, 0>, false, std::decay_t<Tags>...>;

/// The options struct O among tags, or a default one.
template <class O, class... Tags>
O find_option(const Tags&... tags) {
  O out{};
  auto pick = [&](const auto& t) {
    if constexpr (std::is_same_v<std::decay_t<decltype(t)>, O>) out = t;
  };
  (pick(tags), ...);
  return out;
}

template <int I, size_t N>
constexpr size_t norm_argnum() {
  static_assert(I < static_cast<int>(N) && I >= -static_cast<int>(N),
                "torchfunc: argnums index out of range for the number of arguments passed. "
                "Use an index in [-N, N) for a call with N arguments.");
  return I < 0 ? static_cast<size_t>(I + static_cast<int>(N)) : static_cast<size_t>(I);
}

template <size_t... K>
constexpr bool all_unique() {
  constexpr size_t n = sizeof...(K);
  if constexpr (n == 0) {
    return true;
  } else {
    constexpr size_t v[n] = {K...};
    for (size_t a = 0; a < n; ++a)
      for (size_t b = a + 1; b < n; ++b)
        if (v[a] == v[b]) return false;
    return true;
  }
}

// ---- argument packs ----------------------------------------------------------

template <size_t N>
struct FlatArgs {
  Tensors leaves;
  std::array<size_t, N + 1> offsets{};
};

template <class Tuple, size_t... I>
FlatArgs<sizeof...(I)> flatten_args(const Tuple& args, std::index_sequence<I...>) {
  FlatArgs<sizeof...(I)> fa;
  auto one = [&](size_t k, const auto& a) {
    fa.offsets[k] = fa.leaves.size();
    flatten_into(a, fa.leaves);
  };
  (one(I, std::get<I>(args)), ...);
  fa.offsets[sizeof...(I)] = fa.leaves.size();
  return fa;
}

template <class Tuple>
auto flatten_args(const Tuple& args) {
  return flatten_args(args, std::make_index_sequence<std::tuple_size<Tuple>::value>{});
}

template <size_t N>
std::vector<char> diff_mask(const FlatArgs<N>& fa, std::initializer_list<size_t> which) {
  std::vector<char> m(fa.leaves.size(), 0);
  for (size_t k : which)
    for (size_t i = fa.offsets[k]; i < fa.offsets[k + 1]; ++i) m[i] = 1;
  return m;
}

template <class F, class... Args>
using result_t = std::decay_t<std::invoke_result_t<const F&, std::decay_t<Args>&...>>;

/// Rebuilds every argument from `it` (like the originals) and calls f.
template <class F, class Tuple, size_t... I>
auto call_rebuilt(const F& f, const Tuple& like, const at::Tensor* it, std::index_sequence<I...>) {
  // Braced initialisation evaluates left to right, matching flatten order.
  std::tuple<std::decay_t<std::tuple_element_t<I, Tuple>>...> rebuilt{
      unflatten(std::get<I>(like), it)...};
  return std::invoke(f, std::get<I>(rebuilt)...);
}

template <class F, class Tuple>
auto call_rebuilt(const F& f, const Tuple& like, const Tensors& leaves) {
  return call_rebuilt(f, like, leaves.data(),
                      std::make_index_sequence<std::tuple_size<Tuple>::value>{});
}

/// Result for the selected arguments, rebuilt from leaves aligned with the
/// flattened arguments (grads, or one row of a Jacobian).
template <class Tuple, size_t N, int... I, bool T>
auto select_args(ArgSel<T, I...>, const Tuple& args, const FlatArgs<N>& fa, const Tensors& aligned) {
  auto one = [&](auto k_const) {
    constexpr size_t k = decltype(k_const)::value;
    const at::Tensor* it = aligned.data() + fa.offsets[k];
    return unflatten(std::get<k>(args), it);
  };
  if constexpr (T) {
    return std::make_tuple(one(std::integral_constant<size_t, norm_argnum<I, N>()>{})...);
  } else {
    return one(std::integral_constant<size_t, norm_argnum<I, N>()>{}...);
  }
}

template <size_t N, int... I, bool T>
std::vector<char> select_mask(ArgSel<T, I...>, const FlatArgs<N>& fa) {
  static_assert(all_unique<norm_argnum<I, N>()...>(),
                "torchfunc: argnums must be unique, e.g. argnums<0, 1> rather than argnums<0, 0>.");
  return diff_mask(fa, {norm_argnum<I, N>()...});
}

/// Type-level check that f's output has the {Tensor, aux} shape has_aux needs.
template <class R>
struct aux_split {
  static constexpr bool ok = false;
  using out = R;
  using aux = std::tuple<>;
};
template <class A, class B>
struct aux_split<std::pair<A, B>> {
  static constexpr bool ok = true;
  using out = A;
  using aux = B;
};
template <class A, class B>
struct aux_split<std::tuple<A, B>> {
  static constexpr bool ok = true;
  using out = A;
  using aux = B;
};

template <class R>
const auto& primary_of(const R& r) {
  return std::get<0>(r);
}
template <class R>
const auto& aux_of(const R& r) {
  return std::get<1>(r);
}

/// f's primary output: the whole result, or its first part with has_aux.
template <bool Aux, class R>
const auto& primary_part(const R& r) {
  if constexpr (Aux) {
    return primary_of(r);
  } else {
    return r;
  }
}

/// Flattens f's result into res: the primary leaves, then (has_aux) the aux leaves.
template <bool Aux, class R>
void flatten_result(const R& r, FlatResult& res) {
  flatten_into(primary_part<Aux>(r), res.leaves);
  res.num_primary = res.leaves.size();
  if constexpr (Aux) flatten_into(aux_of(r), res.leaves);
}

// ---- in_dims / out_dims ---------------------------------------------------


/// Appends one optional dim per tensor leaf of v, matching the (possibly
/// nested, possibly broadcasting) dims spec d.
template <class T>
void match_dims(const T& v, const Dims& d, std::vector<OptDim>& out, const Path& path,
                const DimsCtx& ctx) {
  constexpr NodeKind k = kind_of<T>;
  if constexpr (k == NodeKind::Tensor) {
    if (!d.is_leaf()) {
      dims_fail(ctx, std::string(ctx.what) + " has a nested entry " + d.str() + " at " + path.str() +
                         ", but that is a single Tensor. Use an int or none there.");
    }
    out.push_back(d.value());
  } else if constexpr (k == NodeKind::Opaque) {
    if (!d.is_none()) {
      dims_fail(ctx, "Got " + std::string(ctx.what == std::string("in_dims") ? "in_dim" : "out_dim") +
                         "=" + d.str() + " for " + path.str() +
                         ", which is not a Tensor. We cannot vmap over non-Tensor arguments; use "
                         "none as its entry.");
    }
  } else if constexpr (k == NodeKind::Optional) {
    if (v) match_dims(*v, d, out, path, ctx);
  } else if constexpr (k == NodeKind::Sequence) {
    if (d.is_leaf()) {  // an int or none broadcasts over the subtree (messages name the leaf)
      node_t<T>::for_each(v, [&](size_t i, const auto& c) {
        Path sub{&path, node_t<T>::key(v, i), ""};
        match_dims(c, d, out, sub, ctx);
      });
      return;
    }
    const size_t n = node_t<T>::size(v);
    if (d.kind() != Dims::Kind::Seq || d.children().size() != n) {
      dims_fail(ctx, std::string(ctx.what) + " is not compatible with the structure of " + path.str() +
                         ": it has " + std::to_string(n) + " elements but the " + ctx.what +
                         " entry for it is " + d.str() + ".");
    }
    node_t<T>::for_each(v, [&](size_t i, const auto& c) {
      Path sub{&path, node_t<T>::key(v, i), ""};
      match_dims(c, d.children()[i], out, sub, ctx);
    });
  } else {  // Dict
    if (d.is_leaf()) {
      node_t<T>::for_each(v, [&](const std::string& key, const auto& c) {
        Path sub{&path, dict_key(key), ""};
        match_dims(c, d, out, sub, ctx);
      });
      return;
    }
    auto keys = node_t<T>::keys(v);
    bool ok = d.kind() == Dims::Kind::Dict && d.keys().size() == keys.size();
    for (size_t i = 0; ok && i < keys.size(); ++i) ok = d.find(keys[i]) != nullptr;
    if (!ok) {
      dims_fail(ctx, std::string(ctx.what) + " is not compatible with the structure of " + path.str() +
                         ": it has keys " + join_keys(keys) + " but the " + ctx.what +
                         " entry for it is " + d.str() + ".");
    }
    node_t<T>::for_each(v, [&](const std::string& key, const auto& c) {
      Path sub{&path, dict_key(key), ""};
      match_dims(c, *d.find(key), out, sub, ctx);
    });
  }
}

}  // namespace detail
}  // namespace torchfunc
