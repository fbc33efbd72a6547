// torchfunc/options.h: the tags and options that every transform accepts.
//
// What changes a result's type is a compile-time tag (argnums, has_aux);
// what does not (in_dims, out_dims, chunk_size, randomness) is a runtime value.
#pragma once

#include <c10/util/Optional.h>
#include <torch/arg.h>

#include <cstdint>
#include <initializer_list>
#include <string>
#include <utility>
#include <vector>

namespace torchfunc {

/// Python's None where a dimension is expected: "do not map over this".
struct none_t {
  constexpr bool operator==(none_t) const { return true; }
};
inline constexpr none_t none{};

/// f returns {output, aux}; aux is passed through the transform untouched
/// (unwrapped) and returned next to the result. Mirrors has_aux=True.
struct has_aux_t {};
inline constexpr has_aux_t has_aux{};

/// Python's argnums=I: differentiate w.r.t. argument I, result is a bare value.
template <int I>
struct argnum_t {};
template <int I>
inline constexpr argnum_t<I> argnum{};

/// Python's argnums=(I, J, ...): differentiate w.r.t. several arguments,
/// result is a std::tuple with one entry per index (argnums<0> is a 1-tuple).
template <int... I>
struct argnums_t {};
template <int... I>
inline constexpr argnums_t<I...> argnums{};

/// How random operations behave under vmap. Mirrors randomness="error" |
/// "same" | "different".
enum class Randomness { Error, Same, Different };

/// A (possibly nested) in_dims / out_dims value: an int, `none`, a sequence
/// (`Dims{0, none}`, matched element-wise against a tuple/vector/array/pair/
/// struct) or a string-keyed dict (`Dims::dict({{"w", 0}, {"b", none}})`).
/// An int or `none` broadcasts over a whole subtree.
class Dims {
 public:
  enum class Kind { Int, None, Seq, Dict };

  Dims(int d) : kind_(Kind::Int), value_(d) {}  // NOLINT: implicit on purpose
  Dims(int64_t d) : kind_(Kind::Int), value_(d) {}  // NOLINT
  Dims(none_t) : kind_(Kind::None) {}  // NOLINT
  Dims(std::initializer_list<Dims> seq) : kind_(Kind::Seq), children_(seq) {}
  explicit Dims(std::vector<Dims> seq) : kind_(Kind::Seq), children_(std::move(seq)) {}

  static Dims dict(std::vector<std::pair<std::string, Dims>> items) {
    Dims d(none);
    d.kind_ = Kind::Dict;
    for (auto& kv : items) {
      d.keys_.push_back(std::move(kv.first));
      d.children_.push_back(std::move(kv.second));
    }
    return d;
  }

  Kind kind() const { return kind_; }
  bool is_leaf() const { return kind_ == Kind::Int || kind_ == Kind::None; }
  bool is_none() const { return kind_ == Kind::None; }
  c10::optional<int64_t> value() const {
    return kind_ == Kind::Int ? c10::optional<int64_t>(value_) : c10::nullopt;
  }
  const std::vector<Dims>& children() const { return children_; }
  const std::vector<std::string>& keys() const { return keys_; }
  const Dims* find(const std::string& key) const {
    for (size_t i = 0; i < keys_.size(); ++i)
      if (keys_[i] == key) return &children_[i];
    return nullptr;
  }
  /// Python-like rendering: 0, none, (none, 0), {'w': 0}.
  std::string str() const;

 private:
  Kind kind_;
  int64_t value_ = 0;
  std::vector<Dims> children_;
  std::vector<std::string> keys_;
};

namespace detail {
struct InDimsTag {
  Dims dims;
};
struct OutDimsTag {
  Dims dims;
};
}  // namespace detail

/// Python's tuple form of in_dims: one entry per positional argument.
template <class... D>
detail::InDimsTag in_dims(D&&... d) {
  return {Dims(std::vector<Dims>{Dims(std::forward<D>(d))...})};
}

/// out_dims: one entry per output when f returns a tuple; a single entry is
/// the same as a bare value (it broadcasts over the whole output).
template <class... D>
detail::OutDimsTag out_dims(D&&... d) {
  if constexpr (sizeof...(D) == 1) {
    return {Dims(std::forward<D>(d)...)};
  } else {
    return {Dims(std::vector<Dims>{Dims(std::forward<D>(d))...})};
  }
}

/// Options of vmap. Mirrors vmap(..., randomness=, chunk_size=).
struct VmapOptions {
  /// Split the batch into chunks of this many samples (memory for speed).
  TORCH_ARG(c10::optional<int64_t>, chunk_size) = c10::nullopt;
  TORCH_ARG(Randomness, randomness) = Randomness::Error;
  /// The batch size when no input is mapped (every in_dim none, or no
  /// Tensor inputs): f runs once per "sample" of a batch of this size (JAX's
  /// axis_size; torch.func has none and errors). With mapped inputs it must
  /// equal their size.
  TORCH_ARG(c10::optional<int64_t>, axis_size) = c10::nullopt;
  /// When f cannot be batched because it depends on the data (.item(), a
  /// branch on a Tensor's value, an op with a data-dependent shape such as
  /// nonzero, or an op with neither batching rule nor fallback such as
  /// equal), run f once per sample and stack the results instead of
  /// raising libtorch's error (torch.func has none; JAX's is per function).
  /// Each chunk decides on its own. Counted in fallback_report() as
  /// "vmap sequential fallback: <reason>"; FallbackMode::Error makes it an
  /// error. out_dim none outputs are taken from the first sample.
  TORCH_ARG(bool, sequential_fallback) = false;
};

/// Options of a vjp_fn call. Mirrors vjp_fn(cotangents, retain_graph=True,
/// create_graph=None).
struct VjpFnOptions {
  /// Keep the recorded graph for later calls; false frees it (a later call
  /// is then an error), as torch.autograd.grad's retain_graph.
  TORCH_ARG(bool, retain_graph) = true;
  /// Record the gradient computation itself, so the result can be
  /// differentiated again by an enclosing transform; unset: whether grad mode
  /// is on, as in torch.func.
  TORCH_ARG(c10::optional<bool>, create_graph) = c10::nullopt;
};

/// Options of jvp. Mirrors jvp(..., strict=).
struct JvpOptions {
  /// An output of f that does not depend on the primals is an error (instead
  /// of a zero tangent).
  TORCH_ARG(bool, strict) = false;
};

/// Options of jacrev. Mirrors jacrev(..., chunk_size=).
struct JacrevOptions {
  /// Rows of the Jacobian computed per vmap call; 1 means a plain loop.
  TORCH_ARG(c10::optional<int64_t>, chunk_size) = c10::nullopt;
};

/// Options of jacfwd. Mirrors jacfwd(..., randomness=); chunk_size is
/// torchfunc's (torch.func's jacfwd has none).
struct JacfwdOptions {
  TORCH_ARG(Randomness, randomness) = Randomness::Error;
  /// Columns of the Jacobian computed per vmap call (memory for speed).
  TORCH_ARG(c10::optional<int64_t>, chunk_size) = c10::nullopt;
};

/// What functionalize removes. Mirrors functionalize(remove="mutations" |
/// "mutations_and_views").
enum class Remove {
  Mutations,          // in-place ops become out-of-place ones; views stay views
  MutationsAndViews,  // views become *_copy ops too: no output aliases anything
};

/// Options of functionalize.
struct FunctionalizeOptions {
  TORCH_ARG(Remove, remove) = Remove::Mutations;
};

/// Which mode jacobian() uses. Auto picks by the rule of jacobian_mode().
enum class JacobianMode { Auto, Forward, Reverse };

/// The mode jacobian() picks for a Jacobian with in_numel inputs (selected
/// arguments, all leaves) and out_numel outputs: Reverse when out_numel <=
/// kJacobianCrossover * in_numel, else Forward. Reverse mode costs one
/// pullback per output element, forward mode one tangent pass per input
/// element; the constant is where their measured costs cross
/// (bench/jacobian_crossover.py: between m/n = 1 and 2 for an MLP and an
/// elementwise map, n = 64 and 256, CPU).
inline constexpr double kJacobianCrossover = 1.5;
JacobianMode jacobian_mode(int64_t in_numel, int64_t out_numel);

/// Options of jacobian (torch.func has no such transform; JAX's jacobian
/// is jacrev). chunk_size: rows (reverse) or columns (forward) per vmap
/// call; randomness: as jacfwd's, used in forward mode only.
struct JacobianOptions {
  TORCH_ARG(JacobianMode, mode) = JacobianMode::Auto;
  TORCH_ARG(c10::optional<int64_t>, chunk_size) = c10::nullopt;
  TORCH_ARG(Randomness, randomness) = Randomness::Error;
};

/// Options of hessian (torch.func's hessian has none).
struct HessianOptions {
  /// Chunks both levels: the rows of jacrev and the columns of jacfwd.
  TORCH_ARG(c10::optional<int64_t>, chunk_size) = c10::nullopt;
};

}  // namespace torchfunc
