// torchfunc/tree.h: pytrees in C++.
//
// Every transform flattens its arguments into a flat list of Tensor leaves,
// runs a function over that list, and rebuilds results of the same shape. The
// C++ type of a tree is known at compile time, so a "tree definition" is the
// type itself plus a "like" object that supplies the runtime parts (vector
// lengths, map keys, optional presence, non-tensor leaf values).
//
// Supported nodes: at::Tensor (leaf), std::vector, std::array, std::tuple,
// std::pair, std::map / std::unordered_map with std::string keys,
// torch::OrderedDict<std::string, T>, std::optional, and user aggregates
// registered with TORCHFUNC_REGISTER_STRUCT. Any other type is an opaque
// non-tensor leaf: it is passed through untouched (like Python's pytree).
//
// Flatten order: sequences in order; std::map and std::unordered_map in sorted
// key order (so two maps with the same keys always line up); OrderedDict in
// insertion order; registered structs in field order.
#pragma once

#include <ATen/Tensor.h>
#include <c10/util/Exception.h>
#include <torch/ordered_dict.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <map>
#include <optional>
#include <string>
#include <tuple>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

namespace torchfunc {

enum class NodeKind { Opaque, Tensor, Sequence, Dict, Optional };

/// Describes how a type is a pytree node. Specialise it (or use
/// TORCHFUNC_REGISTER_STRUCT) to make your own type a node.
template <class T, class Enable = void>
struct tree_node {
  static constexpr NodeKind kind = NodeKind::Opaque;
};

template <>
struct tree_node<at::Tensor> {
  static constexpr NodeKind kind = NodeKind::Tensor;
};

// ---- sequences ---------------------------------------------------------------

namespace detail {
// "[i]", by appends: GCC 12 warns falsely (-Wstringop-overflow, its bug 105651)
// on the inlined "[" + std::to_string(i).
inline std::string index_key(size_t i) {
  std::string s = "[";
  s += std::to_string(i);
  s += ']';
  return s;
}
}  // namespace detail

template <class T, class A>
struct tree_node<std::vector<T, A>> {
  static constexpr NodeKind kind = NodeKind::Sequence;
  using children = std::tuple<T>;
  static size_t size(const std::vector<T, A>& v) { return v.size(); }
  static std::string key(const std::vector<T, A>&, size_t i) {
    return detail::index_key(i);
  }
  template <class Fn>
  static void for_each(const std::vector<T, A>& v, Fn&& fn) {
    for (size_t i = 0; i < v.size(); ++i) fn(i, v[i]);
  }
  template <class Fn>
  static auto map(const std::vector<T, A>& v, Fn&& fn) {
    std::vector<std::decay_t<decltype(fn(std::declval<const T&>()))>> out;
    out.reserve(v.size());
    for (const auto& c : v) out.push_back(fn(c));
    return out;
  }
};

template <class T, size_t N>
struct tree_node<std::array<T, N>> {
  static constexpr NodeKind kind = NodeKind::Sequence;
  using children = std::tuple<T>;
  static size_t size(const std::array<T, N>&) { return N; }
  static std::string key(const std::array<T, N>&, size_t i) {
    return detail::index_key(i);
  }
  template <class Fn>
  static void for_each(const std::array<T, N>& v, Fn&& fn) {
    for (size_t i = 0; i < N; ++i) fn(i, v[i]);
  }
  template <class Fn>
  static auto map(const std::array<T, N>& v, Fn&& fn) {
    return map_impl(v, fn, std::make_index_sequence<N>{});
  }

 private:
  template <class Fn, size_t... I>
  static auto map_impl(const std::array<T, N>& v, Fn& fn, std::index_sequence<I...>) {
    using R = std::decay_t<decltype(fn(std::declval<const T&>()))>;
    return std::array<R, N>{{fn(v[I])...}};  // braced init: left to right
  }
};

namespace detail {
template <class Tuple, class Fn, size_t... I>
void tuple_for_each(const Tuple& t, Fn& fn, std::index_sequence<I...>) {
  (fn(I, std::get<I>(t)), ...);
}
}  // namespace detail

template <class... Ts>
struct tree_node<std::tuple<Ts...>> {
  static constexpr NodeKind kind = NodeKind::Sequence;
  using children = std::tuple<Ts...>;
  static size_t size(const std::tuple<Ts...>&) { return sizeof...(Ts); }
  static std::string key(const std::tuple<Ts...>&, size_t i) {
    return detail::index_key(i);
  }
  template <class Fn>
  static void for_each(const std::tuple<Ts...>& v, Fn&& fn) {
    detail::tuple_for_each(v, fn, std::index_sequence_for<Ts...>{});
  }
  template <class Fn>
  static auto map(const std::tuple<Ts...>& v, Fn&& fn) {
    return map_impl(v, fn, std::index_sequence_for<Ts...>{});
  }

 private:
  template <class Fn, size_t... I>
  static auto map_impl(const std::tuple<Ts...>& v, Fn& fn, std::index_sequence<I...>) {
    return std::tuple<std::decay_t<decltype(fn(std::get<I>(v)))>...>{fn(std::get<I>(v))...};
  }
};

template <class A, class B>
struct tree_node<std::pair<A, B>> {
  static constexpr NodeKind kind = NodeKind::Sequence;
  using children = std::tuple<A, B>;
  static size_t size(const std::pair<A, B>&) { return 2; }
  static std::string key(const std::pair<A, B>&, size_t i) {
    return i == 0 ? ".first" : ".second";
  }
  template <class Fn>
  static void for_each(const std::pair<A, B>& v, Fn&& fn) {
    fn(size_t{0}, v.first);
    fn(size_t{1}, v.second);
  }
  template <class Fn>
  static auto map(const std::pair<A, B>& v, Fn&& fn) {
    using RA = std::decay_t<decltype(fn(v.first))>;
    using RB = std::decay_t<decltype(fn(v.second))>;
    RA a = fn(v.first);  // sequenced: first before second
    RB b = fn(v.second);
    return std::pair<RA, RB>(std::move(a), std::move(b));
  }
};

// ---- string-keyed dictionaries -----------------------------------------------

template <class V, class C, class A>
struct tree_node<std::map<std::string, V, C, A>> {
  using Map = std::map<std::string, V, C, A>;
  static constexpr NodeKind kind = NodeKind::Dict;
  using children = std::tuple<V>;
  static std::vector<std::string> keys(const Map& m) {
    std::vector<std::string> k;
    k.reserve(m.size());
    for (const auto& kv : m) k.push_back(kv.first);
    return k;
  }
  static const V* find(const Map& m, const std::string& k) {
    auto it = m.find(k);
    return it == m.end() ? nullptr : &it->second;
  }
  template <class Fn>
  static void for_each(const Map& m, Fn&& fn) {
    for (const auto& kv : m) fn(kv.first, kv.second);
  }
  template <class Fn>
  static auto map(const Map& m, Fn&& fn) {
    std::map<std::string, std::decay_t<decltype(fn(std::declval<const V&>()))>> out;
    for (const auto& kv : m) out.emplace_hint(out.end(), kv.first, fn(kv.second));
    return out;
  }
};

template <class V, class H, class E, class A>
struct tree_node<std::unordered_map<std::string, V, H, E, A>> {
  using Map = std::unordered_map<std::string, V, H, E, A>;
  static constexpr NodeKind kind = NodeKind::Dict;
  using children = std::tuple<V>;
  // Sorted, so that two maps with equal keys flatten in the same order.
  static std::vector<std::string> keys(const Map& m) {
    std::vector<std::string> k;
    k.reserve(m.size());
    for (const auto& kv : m) k.push_back(kv.first);
    std::sort(k.begin(), k.end());
    return k;
  }
  static const V* find(const Map& m, const std::string& k) {
    auto it = m.find(k);
    return it == m.end() ? nullptr : &it->second;
  }
  template <class Fn>
  static void for_each(const Map& m, Fn&& fn) {
    for (const auto& k : keys(m)) fn(k, m.at(k));
  }
  template <class Fn>
  static auto map(const Map& m, Fn&& fn) {
    std::unordered_map<std::string, std::decay_t<decltype(fn(std::declval<const V&>()))>> out;
    out.reserve(m.size());
    for (const auto& k : keys(m)) out.emplace(k, fn(m.at(k)));
    return out;
  }
};

template <class V>
struct tree_node<torch::OrderedDict<std::string, V>> {
  using Map = torch::OrderedDict<std::string, V>;
  static constexpr NodeKind kind = NodeKind::Dict;
  using children = std::tuple<V>;
  static std::vector<std::string> keys(const Map& m) { return m.keys(); }
  static const V* find(const Map& m, const std::string& k) { return m.find(k); }
  template <class Fn>
  static void for_each(const Map& m, Fn&& fn) {
    for (const auto& item : m) fn(item.key(), item.value());
  }
  template <class Fn>
  static auto map(const Map& m, Fn&& fn) {
    torch::OrderedDict<std::string, std::decay_t<decltype(fn(std::declval<const V&>()))>> out;
    out.reserve(m.size());
    for (const auto& item : m) out.insert(item.key(), fn(item.value()));
    return out;
  }
};

// ---- optional ----------------------------------------------------------------

template <class T>
struct tree_node<std::optional<T>> {
  static constexpr NodeKind kind = NodeKind::Optional;
  using children = std::tuple<T>;
  template <class Fn>
  static auto map(const std::optional<T>& v, Fn&& fn) {
    using R = std::decay_t<decltype(fn(std::declval<const T&>()))>;
    return v ? std::optional<R>(fn(*v)) : std::optional<R>();
  }
};

// ---- user structs ------------------------------------------------------------

namespace detail {
std::vector<std::string> split_field_names(const char* names);

template <class T, class Tie>
struct struct_node {
  static constexpr NodeKind kind = NodeKind::Sequence;
  using refs = decltype(Tie{}(std::declval<T&>()));
  template <class R>
  struct decay_all;
  template <class... R>
  struct decay_all<std::tuple<R...>> {
    using type = std::tuple<std::decay_t<R>...>;
  };
  using children = typename decay_all<refs>::type;

  static size_t size(const T&) { return std::tuple_size<children>::value; }
  template <class Fn>
  static void for_each(const T& v, Fn&& fn) {
    auto r = Tie{}(const_cast<T&>(v));
    tuple_for_each(r, fn, std::make_index_sequence<std::tuple_size<children>::value>{});
  }
  // Structs keep their own type: every field must map to its own type
  // (Tensor leaves to Tensors), which is what flatten/unflatten need.
  template <class Fn>
  static T map(const T& v, Fn&& fn) {
    T out = v;
    auto r = Tie{}(out);
    std::apply(
        [&](auto&... field) {
          static_assert(
              (std::is_same_v<std::decay_t<decltype(fn(field))>, std::decay_t<decltype(field)>> && ...),
              "torchfunc: a registered struct can only be rebuilt with leaves of its own field types. "
              "Return a std::tuple or std::map instead of a struct from functions whose results change "
              "leaf types (for example under jacrev).");
          ((field = fn(field)), ...);  // comma fold: left to right
        },
        r);
    return out;
  }
};
}  // namespace detail

namespace detail {
template <class T>
struct struct_tie;  // specialised by TORCHFUNC_REGISTER_STRUCT
}  // namespace detail

/// Registers an aggregate as a pytree node. Use it once, at global namespace
/// scope, with the fully qualified type name:
///   namespace app { struct Params { at::Tensor w, b; int steps; }; }
///   TORCHFUNC_REGISTER_STRUCT(app::Params, w, b, steps);
/// List every data member in declaration order (it uses structured bindings).
#define TORCHFUNC_REGISTER_STRUCT(Type, ...)                                                   \
  namespace torchfunc {                                                                        \
  namespace detail {                                                                           \
  template <>                                                                                  \
  struct struct_tie<Type> {                                                                    \
    auto operator()(Type& v) const {                                                           \
      auto& [__VA_ARGS__] = v;                                                                 \
      return std::tie(__VA_ARGS__);                                                            \
    }                                                                                          \
  };                                                                                           \
  }                                                                                            \
  template <>                                                                                  \
  struct tree_node<Type> : detail::struct_node<Type, detail::struct_tie<Type>> {               \
    static std::string key(const Type&, size_t i) {                                            \
      static const std::vector<std::string> names = detail::split_field_names(#__VA_ARGS__);   \
      return "." + names.at(i);                                                                \
    }                                                                                          \
  };                                                                                           \
  }                                                                                            \
  static_assert(true, "")

// ---- algorithms --------------------------------------------------------------

namespace detail {

template <class T>
using node_t = tree_node<std::decay_t<T>>;

template <class T>
constexpr NodeKind kind_of = node_t<T>::kind;

template <class T>
constexpr bool only_tensor_leaves();
template <class T>
constexpr bool any_tensor_leaves();

template <class Tuple>
struct children_all_tensor;
template <class... C>
struct children_all_tensor<std::tuple<C...>> {
  static constexpr bool value = (only_tensor_leaves<C>() && ...);
  static constexpr bool any = (any_tensor_leaves<C>() || ...);
};

/// True when every leaf of T is a Tensor (checked on the type).
template <class T>
constexpr bool only_tensor_leaves() {
  if constexpr (kind_of<T> == NodeKind::Tensor) {
    return true;
  } else if constexpr (kind_of<T> == NodeKind::Opaque) {
    return false;
  } else {
    return children_all_tensor<typename node_t<T>::children>::value;
  }
}

/// True when T can hold a Tensor leaf at all.
template <class T>
constexpr bool any_tensor_leaves() {
  if constexpr (kind_of<T> == NodeKind::Tensor) {
    return true;
  } else if constexpr (kind_of<T> == NodeKind::Opaque) {
    return false;
  } else {
    return children_all_tensor<typename node_t<T>::children>::any;
  }
}

/// Calls fn(const Tensor&) on each tensor leaf, in flatten order.
template <class T, class Fn>
void for_each_tensor(const T& v, Fn& fn) {
  constexpr NodeKind k = kind_of<T>;
  if constexpr (k == NodeKind::Tensor) {
    fn(v);
  } else if constexpr (k == NodeKind::Opaque) {
    (void)v;
  } else if constexpr (k == NodeKind::Optional) {
    if (v) for_each_tensor(*v, fn);
  } else {
    node_t<T>::for_each(v, [&](const auto&, const auto& c) { for_each_tensor(c, fn); });
  }
}

template <class T>
void flatten_into(const T& v, std::vector<at::Tensor>& out) {
  auto push = [&](const at::Tensor& t) { out.push_back(t); };
  for_each_tensor(v, push);
}

template <class T>
size_t count_tensors(const T& v) {
  size_t n = 0;
  auto inc = [&](const at::Tensor&) { ++n; };
  for_each_tensor(v, inc);
  return n;
}

/// Rebuilds a tree like `like`, replacing its tensor leaves, in order, with
/// values of type L read from `it`. With L = Tensor the result has T's type.
template <class L, class T>
auto map_leaves(const T& like, const L*& it) {
  constexpr NodeKind k = kind_of<T>;
  if constexpr (k == NodeKind::Tensor) {
    return L(*it++);
  } else if constexpr (k == NodeKind::Opaque) {
    return like;
  } else {
    return node_t<T>::map(like, [&](const auto& c) { return map_leaves<L>(c, it); });
  }
}

template <class T>
std::decay_t<T> unflatten(const T& like, const at::Tensor*& it) {
  return map_leaves<at::Tensor>(like, it);
}

// A path from the root to a node, built on the stack as we recurse and
// rendered only when an error needs it ("args[1]['weight']").
struct Path {
  const Path* parent = nullptr;
  std::string piece;  // empty for the root or transparent nodes
  std::string root;   // only for the root
  std::string str() const {
    std::vector<const Path*> chain;
    for (const Path* p = this; p; p = p->parent) chain.push_back(p);
    std::string s;
    for (auto it = chain.rbegin(); it != chain.rend(); ++it) s += (*it)->parent ? (*it)->piece : (*it)->root;
    return s;
  }
};

inline std::string dict_key(const std::string& k) { return "['" + k + "']"; }

/// Key path of the tensor leaf number `index` of v ("" if none).
template <class T>
bool find_leaf_path(const T& v, size_t& index, std::string& out) {
  constexpr NodeKind k = kind_of<T>;
  if constexpr (k == NodeKind::Tensor) {
    if (index == 0) return true;
    --index;
    return false;
  } else if constexpr (k == NodeKind::Opaque) {
    (void)v;
    return false;
  } else if constexpr (k == NodeKind::Optional) {
    return v ? find_leaf_path(*v, index, out) : false;
  } else {
    bool found = false;
    node_t<T>::for_each(v, [&](const auto& key, const auto& c) {
      if (found) return;
      std::string sub;
      if (find_leaf_path(c, index, sub)) {
        found = true;
        if constexpr (std::is_same_v<std::decay_t<decltype(key)>, std::string>) {
          out = dict_key(key) + sub;
        } else {
          out = node_t<T>::key(v, key) + sub;
        }
      }
    });
    return found;
  }
}

template <class T>
std::string leaf_path(const T& v, size_t index, const std::string& root) {
  std::string p;
  return find_leaf_path(v, index, p) ? root + p : root + "<leaf " + std::to_string(index) + ">";
}

std::string join_keys(const std::vector<std::string>& keys);

/// Checks that a and b have the same structure (lengths, keys, optional
/// presence). Returns "" or a description of the first difference.
template <class T>
std::string structure_mismatch(const T& a, const T& b, const Path& path) {
  constexpr NodeKind k = kind_of<T>;
  if constexpr (k == NodeKind::Tensor || k == NodeKind::Opaque) {
    return "";
  } else if constexpr (k == NodeKind::Optional) {
    if (a.has_value() != b.has_value()) {
      return "at " + path.str() + ": one has a value and the other is empty";
    }
    return a ? structure_mismatch(*a, *b, path) : "";
  } else if constexpr (k == NodeKind::Sequence) {
    size_t na = node_t<T>::size(a), nb = node_t<T>::size(b);
    if (na != nb) {
      return "at " + path.str() + ": " + std::to_string(na) + " elements vs " + std::to_string(nb);
    }
    std::string err;
    // Walk both in lockstep: collect b's children by index.
    std::vector<const void*> bc;
    node_t<T>::for_each(b, [&](size_t, const auto& c) { bc.push_back(&c); });
    node_t<T>::for_each(a, [&](size_t i, const auto& c) {
      if (!err.empty()) return;
      using C = std::decay_t<decltype(c)>;
      Path sub{&path, node_t<T>::key(a, i), ""};
      err = structure_mismatch(c, *static_cast<const C*>(bc[i]), sub);
    });
    return err;
  } else {  // Dict
    auto ka = node_t<T>::keys(a), kb = node_t<T>::keys(b);
    auto sa = ka, sb = kb;
    std::sort(sa.begin(), sa.end());
    std::sort(sb.begin(), sb.end());
    if (sa != sb) {
      return "at " + path.str() + ": keys " + join_keys(ka) + " vs " + join_keys(kb);
    }
    std::string err;
    node_t<T>::for_each(a, [&](const std::string& key, const auto& c) {
      if (!err.empty()) return;
      Path sub{&path, dict_key(key), ""};
      err = structure_mismatch(c, *node_t<T>::find(b, key), sub);
    });
    return err;
  }
}

}  // namespace detail

// ---- public pytree API ---------------------------------------------------------

/// All tensor leaves of `tree`, in flatten order. Mirrors torch.utils._pytree.tree_flatten
/// (the tree definition is the type of `tree` plus `tree` itself).
template <class T>
std::vector<at::Tensor> tree_flatten(const T& tree) {
  std::vector<at::Tensor> out;
  detail::flatten_into(tree, out);
  return out;
}

/// Rebuilds a tree shaped like `like` from `leaves` (as returned by tree_flatten).
template <class T>
std::decay_t<T> tree_unflatten(const std::vector<at::Tensor>& leaves, const T& like) {
  const size_t n = detail::count_tensors(like);
  TORCH_CHECK(n == leaves.size(), "torchfunc::tree_unflatten: the tree has ", n,
              " tensor leaves but ", leaves.size(), " tensors were given");
  const at::Tensor* it = leaves.data();
  return detail::unflatten(like, it);
}

/// Applies fn to every tensor leaf: the result has the same structure; fn must
/// return a Tensor.
template <class Fn, class T>
std::decay_t<T> tree_map(Fn&& fn, const T& tree) {
  std::vector<at::Tensor> leaves = tree_flatten(tree);
  for (auto& t : leaves) t = fn(t);
  const at::Tensor* it = leaves.data();
  return detail::unflatten(tree, it);
}

}  // namespace torchfunc
