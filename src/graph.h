// src/graph.h: the captured graph's data (capture.cpp builds it, graph_passes.cpp
// optimises it, compile.cpp replays it; aot.cpp splits it into a forward and a backward graph).
#pragma once

#include <torchfunc/compile.h>

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/enum_tag.h>
#include <ATen/core/ivalue.h>

#include <memory>
#include <optional>
#include <string>
#include <vector>

namespace torchfunc {
namespace detail {

constexpr int kNone = -1;

// One argument of a recorded op: a value of the graph, a list of values
// (Tensor[], Tensor?[]) or a constant IValue (numbers, shapes, dtypes, ...).
struct Arg {
  enum class Kind : uint8_t { Constant, Value, List, OptionalList };
  Kind kind = Kind::Constant;
  c10::IValue constant;
  int value = kNone;
  std::vector<int> items;  // List / OptionalList (kNone: None)
};

// One return: a tensor (one id, kNone if undefined) or a Tensor[] (one id each).
struct Ret {
  bool list = false;
  std::vector<int> ids;
};

struct Node {
  explicit Node(c10::OperatorHandle o) : op(std::move(o)) {}
  c10::OperatorHandle op;
  std::vector<Arg> args;
  std::vector<Ret> rets;
  std::vector<int> release;  // values dropped after this node (free_after_last_use)
  // Set by plan_dispatch: the backend kernel is called directly (its key set
  // is fixed by the signature), skipping key extraction and observers.
  bool direct = false;
  c10::DispatchKeySet keys;
  bool failed = false;       // the op threw while capturing: not part of the graph
};

struct SmallPlan;  // src/small_replay.cpp

struct GraphImpl {
  int num_values = 0;
  std::vector<int> inputs;
  std::vector<std::pair<int, at::Tensor>> constants;
  std::vector<Node> nodes;
  std::vector<int> outputs;
  std::vector<std::string> type_of;  // per value, for str(): "f32[4, 3]"
  // Per value, as captured (fixed by the signature): layout and which storage
  // it lives in (values that share one alias each other).
  struct Meta {
    std::vector<int64_t> sizes, strides;
    int64_t offset = 0;
    int storage = kNone;
    c10::ScalarType dtype = c10::ScalarType::Undefined;
    c10::Device device = c10::Device(c10::kCPU);
    bool backend_only = false;  // dispatch keys: its backend's (+ autograd), no ZeroTensor / Conjugate / Negative
    bool plain = false;         // the same, autocast's keys allowed (every plain tensor has them on libtorch 2.x)
  };
  std::vector<Meta> meta;
  size_t boundary = 0;  // aot_function's joint graph: nodes before it ran in the forward pass
  // Set by optimize_graph (CompileOptions::small_tensor_kernels): the replay on
  // torchfunc's loops for small float32 CPU graphs.
  std::shared_ptr<const SmallPlan> small;
  std::string small_why;  // why not (for str())
};

// empty(...) and its variants: values whose contents no op has written yet.
inline bool is_empty_op(const std::string& name) {
  return name == "aten::empty" || name == "aten::empty_like" || name == "aten::empty_strided" ||
         name == "aten::new_empty" || name == "aten::new_empty_strided";
}

inline bool writes(const c10::Argument& a) { return a.alias_info() && a.alias_info()->isWrite(); }

template <class Fn>
void for_each_arg_value(const Node& n, Fn&& fn) {
  for (const Arg& a : n.args) {
    if (a.kind == Arg::Kind::Value) {
      fn(a.value);
    } else {
      for (int id : a.items) {
        if (id != kNone) fn(id);
      }
    }
  }
}

template <class Fn>
void for_each_ret_value(const Node& n, Fn&& fn) {
  for (const Ret& r : n.rets) {
    for (int id : r.ids) {
      if (id != kNone) fn(id);
    }
  }
}

inline bool has_side_effects(const Node& n) {
  for (const auto& a : n.op.schema().arguments()) {
    if (writes(a)) return true;
  }
  if (n.op.hasTag(at::Tag::nondeterministic_seeded)) return true;
  bool any = false;
  for_each_ret_value(n, [&](int) { any = true; });
  return !any;
}

/// Not a transform's tensor (BatchedTensor, TensorWrapper, FunctionalTensorWrapper).
bool is_plain(const at::Tensor& t);

/// A capture (compile, make_graph, aot_function) runs on this thread: code
/// that writes through data pointers must refuse, a replay would not repeat it.
bool capturing();

/// One tensor return aliasing the first argument, nothing written.
bool is_pure_view(const Node& n);

/// The passes of CompileOptions on g (in place), and the replay plan.
void optimize_graph(GraphImpl& g, const CompileOptions& options);

/// A plan for replaying g on small_kernels.h's loops, or null (and why) where
/// g has an op, dtype, device or size they do not cover.
std::shared_ptr<const SmallPlan> plan_small_replay(const GraphImpl& g, std::string& why);
/// The replay by plan p; nothing where an input or constant does not have
/// its captured layout (then the ATen replay runs).
std::optional<std::vector<at::Tensor>> run_small_replay(const SmallPlan& p, const GraphImpl& g,
                                                        const std::vector<at::Tensor>& inputs);

}  // namespace detail
}  // namespace torchfunc
