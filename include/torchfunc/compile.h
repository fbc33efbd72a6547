// torchfunc/compile.h: capture a function once as a graph of ATen ops, replay
// it fast. Mirrors functorch.compile's make_fx / aot_function capture (and
// jax.make_jaxpr / jax.jit) for C++: the transforms inside the function run
// once, at capture, and leave behind only the plain ATen ops they lowered to.
//
//   auto step = torchfunc::compile([&](const TensorDict& p, const Tensor& x, const Tensor& y) {
//     return vmap(grad(loss), in_dims(none, 0, 0))(p, x, y);
//   });
//   auto g = step(params, xs, ys);   // first call per signature: runs f and captures it
//   g = step(params, xs, ys);        // later calls: replay, no transform runs
//   std::cout << torchfunc::make_graph(f, params, xs, ys).str();   // the captured ops
//
// Note [how capture works]
//   While f runs, a thread-local RecordFunction observer sees every call the
//   dispatcher makes, at every level. The transforms call the dispatcher again
//   for each level they peel off (vmap on BatchedTensors, grad on
//   TensorWrappers, the autograd engine's backward formulas), so an op whose
//   tensor arguments are all plain tensors is one the kernels run. That op is
//   recorded, with its arguments as values of the graph, and the calls it
//   makes itself are not. Replay calls the recorded ops in order on plain
//   tensors below autograd, so none of the layers above the kernels run again.
//   Tensors that no recorded op produced and no argument is are constants of
//   the graph, held by reference (a module's weights that f closes over are
//   read again at every replay, so in-place updates are seen).
//
// What a graph cannot replay is refused when it is captured, with an error that
// names the op: reading tensor data on the host (.item(), data-dependent
// control flow), ops whose output shape depends on data (nonzero, boolean-mask
// indexing), and random ops that draw from the global generator (pass a
// torch::Generator to the op, or the random tensor as an argument). Anything
// else f reads that is not an argument or a tensor (a captured int, a member
// flag) is frozen at capture, as with jax.jit.
//
// compile(f) caches one graph per signature of its arguments: tensor shapes,
// strides, dtypes, devices, requires_grad, which arguments share storage, the
// values of number and string leaves, the tree structure, and the grad mode.
// A new signature captures again (at most CompileOptions::max_signatures).
// Arguments that require grad (with grad mode on) are refused: the replay is
// not recorded by autograd; differentiate inside f (grad, vjp) instead.
#pragma once

#include <torchfunc/tree.h>

#include <ATen/Tensor.h>

#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <optional>
#include <string>
#include <type_traits>
#include <typeinfo>
#include <unordered_map>
#include <utility>
#include <vector>

namespace torchfunc {

/// The passes compile runs on a captured graph, and its cache size.
struct CompileOptions {
  bool eliminate_dead_code = true;           // ops whose results nothing uses (and that write nothing)
  bool eliminate_common_subexpressions = true;  // the same op on the same values, computed once
  bool free_after_last_use = true;           // each value released after its last reader
  size_t max_signatures = 8;                 // graphs kept per compiled function; one more is an error
  bool simplify_views = true;                // a chain of views becomes one as_strided of its base, or the
                                             // base itself where the layouts agree
  bool forward_identities = true;            // x * 1, x / 1, x ** 1 are x
  bool small_tensor_kernels = true;          // a graph of small float32 CPU tensors (<= 65536 elements each,
                                             // mm / bmm <= 2^18 multiply-adds) of the common elementwise ops,
                                             // sums, means, mm and bmm replays on torchfunc's own loops over
                                             // one reused buffer, not ATen's kernels (about 1.5 us per op)
};

namespace detail {
struct GraphImpl;
}

/// A captured program: ATen ops over flat tensor inputs (the tensor leaves of
/// the example arguments, in order) with flat tensor outputs (the result's).
class Graph {
 public:
  Graph() = default;
  explicit Graph(std::shared_ptr<const detail::GraphImpl> impl) : impl_(std::move(impl)) {}

  size_t num_inputs() const;
  size_t num_outputs() const;
  size_t num_nodes() const;      // recorded ops
  size_t num_constants() const;  // tensors held by the graph
  /// How many nodes call `op` ("aten::mm", or with its overload "aten::add.Tensor").
  size_t count(const std::string& op) const;
  /// One line per op: "%5 = aten::mm(%3, %4)"; inputs, constants, outputs, and
  /// which replay runs (small-tensor loops or ATen's kernels, and why).
  std::string str() const;
  /// Replays the graph on new inputs (same signature as at capture).
  std::vector<at::Tensor> run(const std::vector<at::Tensor>& inputs) const;
  /// The graph after the passes of `options` (capture returns it unoptimised).
  Graph optimized(const CompileOptions& options) const;
  /// Whether run() uses torchfunc's loops (CompileOptions::small_tensor_kernels).
  bool uses_small_tensor_kernels() const;

  const detail::GraphImpl& impl() const;

 private:
  std::shared_ptr<const detail::GraphImpl> impl_;
};

namespace detail {

/// Runs body (which calls f and flattens its result into outs) while recording
/// the ops it reaches the kernels with. who names the API in errors.
Graph capture_graph(const char* who, const std::vector<at::Tensor>& inputs,
                    const std::function<void(std::vector<at::Tensor>& outs)>& body);

/// Inside capture_graph's body: t becomes one more input of the graph (after
/// the given ones); capture_mark() records how many ops ran so far.
void capture_add_input(const at::Tensor& t);
/// Inside capture_graph's body: a new input shaped like `like` (ones at capture).
at::Tensor capture_new_input(const at::Tensor& like);
void capture_mark();

template <class>
inline constexpr bool always_false = false;

/// The cache key of one call: everything a captured graph depends on.
struct Signature {
  std::vector<int64_t> key;
  std::vector<at::Tensor> tensors;  // the flat inputs, in order
  void tensor(const at::Tensor& t);  // shape, strides, dtype, device, requires_grad, storage sharing
  void text(const std::string& s) { key.push_back(static_cast<int64_t>(std::hash<std::string>{}(s))); }
  void add(int64_t v) { key.push_back(v); }
  void finish();  // grad mode
};

template <class T>
void sign(const T& v, Signature& s) {
  constexpr NodeKind k = kind_of<T>;
  if constexpr (k == NodeKind::Tensor) {
    s.tensor(v);
  } else if constexpr (k == NodeKind::Optional) {
    s.add(v.has_value() ? 1 : 0);
    if (v) sign(*v, s);
  } else if constexpr (k == NodeKind::Opaque) {
    if constexpr (std::is_same_v<T, bool> || std::is_integral_v<T> || std::is_enum_v<T>) {
      s.add(static_cast<int64_t>(v));
    } else if constexpr (std::is_floating_point_v<T>) {
      double d = static_cast<double>(v);
      int64_t bits;
      std::memcpy(&bits, &d, sizeof bits);
      s.add(bits);
    } else if constexpr (std::is_convertible_v<const T&, std::string>) {
      s.text(std::string(v));
    } else {
      static_assert(always_false<T>,
                    "torchfunc::compile: an argument that is neither a tensor, a pytree of tensors, a number nor a "
                    "string would be frozen at capture; capture it in the function instead");
    }
  } else {
    size_t n = 0;
    node_t<T>::for_each(v, [&](const auto& key, const auto& c) {
      if constexpr (std::is_convertible_v<decltype(key), std::string>) s.text(key);
      sign(c, s);
      ++n;
    });
    s.add(static_cast<int64_t>(n));
  }
}

struct SignatureHash {
  size_t operator()(const std::vector<int64_t>& k) const {
    size_t h = 1469598103934665603ull;
    for (int64_t v : k) h = (h ^ static_cast<size_t>(v)) * 1099511628211ull;
    return h;
  }
};

/// The graphs of one compiled function, by signature (thread-safe).
class CompileCache {
 public:
  explicit CompileCache(CompileOptions o) : options(o) {}
  struct Entry {
    Graph graph;
    std::shared_ptr<const void> like;  // the result's tree, for unflatten
  };
  const Entry* find(const std::vector<int64_t>& key) const;
  void insert(std::vector<int64_t> key, Entry e);
  void check_room() const;  // before a capture: at most options.max_signatures graphs
  size_t size() const;
  std::vector<Graph> graphs() const;
  std::vector<std::shared_ptr<const void>> likes() const;
  const CompileOptions options;

 private:
  mutable std::mutex mu_;
  std::unordered_map<std::vector<int64_t>, std::shared_ptr<Entry>, SignatureHash> map_;
};

template <class... Args>
Signature signature_of(const Args&... args) {
  Signature s;
  s.text(typeid(std::tuple<Args...>).name());
  (sign(args, s), ...);
  s.finish();
  return s;
}

}  // namespace detail

/// make_graph(f, args...): f run once on args and captured; f's result is a
/// pytree of tensors. Graph::str() prints it.
template <class F, class... Args>
Graph make_graph(F&& f, const Args&... args) {
  std::vector<at::Tensor> inputs;
  (detail::flatten_into(args, inputs), ...);
  return detail::capture_graph("make_graph", inputs, [&](std::vector<at::Tensor>& outs) {
    detail::flatten_into(f(args...), outs);
  });
}

/// compile(f)(args...) == f(args...), replaying a captured graph after the
/// first call with each signature.
template <class F>
class Compiled {
 public:
  Compiled(F f, CompileOptions options)
      : f_(std::move(f)), cache_(std::make_shared<detail::CompileCache>(options)) {}

  template <class... Args>
  auto operator()(const Args&... args) const {
    using R = std::decay_t<std::invoke_result_t<const F&, const Args&...>>;
    static_assert(detail::any_tensor_leaves<R>() || std::is_same_v<R, at::Tensor>,
                  "torchfunc::compile: the function must return a tensor or a pytree of tensors");
    detail::Signature sig = detail::signature_of(args...);
    if (const auto* e = cache_->find(sig.key)) {
      std::vector<at::Tensor> outs = e->graph.run(sig.tensors);
      const at::Tensor* it = outs.data();
      return detail::unflatten(*static_cast<const R*>(e->like.get()), it);
    }
    cache_->check_room();
    std::optional<R> result;
    Graph g = detail::capture_graph("compile", sig.tensors, [&](std::vector<at::Tensor>& outs) {
      result.emplace(f_(args...));
      detail::flatten_into(*result, outs);
    });
    std::vector<at::Tensor> empties(detail::count_tensors(*result));
    const at::Tensor* it = empties.data();
    auto like = std::make_shared<const R>(detail::unflatten(*result, it));
    cache_->insert(std::move(sig.key), {g.optimized(cache_->options), std::move(like)});
    return std::move(*result);
  }

  /// The graphs captured so far (one per signature), optimised as replayed.
  std::vector<Graph> graphs() const { return cache_->graphs(); }
  size_t num_signatures() const { return cache_->size(); }

 private:
  F f_;
  std::shared_ptr<detail::CompileCache> cache_;
};

template <class F>
Compiled<std::decay_t<F>> compile(F&& f, CompileOptions options = {}) {
  return Compiled<std::decay_t<F>>(std::forward<F>(f), options);
}

}  // namespace torchfunc
