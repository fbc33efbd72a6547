// src/graph_passes.cpp: the passes of CompileOptions on a captured graph
// (dead code, common subexpressions, view chains, identities) and the replay
// plan (direct dispatch, releases after last use).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <algorithm>
#include <cstring>
#include <numeric>
#include <sstream>
#include <string>
#include <unordered_map>

#include "graph.h"

namespace torchfunc {
namespace detail {

namespace {

void eliminate_dead_code(GraphImpl& g) {
  std::vector<char> live(g.num_values, 0);
  for (int id : g.outputs) {
    if (id != kNone) live[id] = 1;
  }
  std::vector<char> keep(g.nodes.size(), 0);
  for (size_t i = g.nodes.size(); i-- > 0;) {
    const Node& n = g.nodes[i];
    bool needed = has_side_effects(n);
    for_each_ret_value(n, [&](int id) { needed = needed || live[id]; });
    if (!needed) continue;
    keep[i] = 1;
    for_each_arg_value(n, [&](int id) { live[id] = 1; });
  }
  std::vector<Node> nodes;
  for (size_t i = 0; i < g.nodes.size(); ++i) {
    if (keep[i]) nodes.push_back(std::move(g.nodes[i]));
  }
  g.nodes = std::move(nodes);
  auto& cs = g.constants;
  cs.erase(std::remove_if(cs.begin(), cs.end(), [&](const auto& c) { return !live[c.first]; }), cs.end());
}

// A key for a constant argument, or false when two equal-looking values could
// differ (then the node is not merged).
bool constant_key(const c10::IValue& v, std::string& out) {
  std::ostringstream s;
  if (v.isNone()) {
    s << "N";
  } else if (v.isBool()) {
    s << "b" << v.toBool();
  } else if (v.isInt()) {
    s << "i" << v.toInt();
  } else if (v.isDouble()) {
    double d = v.toDouble();
    uint64_t bits;
    std::memcpy(&bits, &d, sizeof bits);
    s << "d" << bits;
  } else if (v.isString()) {
    s << "s" << v.toStringRef();
  } else if (v.isIntList()) {
    s << "I";
    for (int64_t x : v.toIntList()) s << x << ",";
  } else if (v.isBoolList()) {
    s << "B";
    for (bool x : v.toBoolList()) s << x << ",";
  } else if (v.isDevice()) {
    s << "D" << v.toDevice();
  } else {
    return false;
  }
  out += s.str();
  out += ';';
  return true;
}


// Two values with the same dtype, device and strided layout read the same
// elements wherever they share a storage.
bool same_layout(const GraphImpl::Meta& a, const GraphImpl::Meta& b) {
  return a.dtype == b.dtype && a.device == b.device && a.sizes == b.sizes && a.strides == b.strides &&
         a.offset == b.offset;
}

// Storages some op writes (in place, out=): values living in them change
// between two reads, so they are never merged or forwarded.
class WrittenStorages {
 public:
  explicit WrittenStorages(const GraphImpl& g) : g_(g) {
    int n = 0;
    for (const auto& m : g.meta) n = std::max(n, m.storage + 1);
    written_.assign(n, 0);
    for (const Node& node : g.nodes) {
      const auto& s = node.op.schema();
      for (size_t i = 0; i < node.args.size() && i < s.arguments().size(); ++i) {
        if (!writes(s.arguments()[i])) continue;
        const Arg& a = node.args[i];
        if (a.kind == Arg::Kind::Value) mark(a.value);
        for (int id : a.items) mark(id);
      }
    }
  }
  // Nothing in the graph writes the value's storage.
  bool clean(int id) const { return g_.meta[id].storage == kNone || !written_[g_.meta[id].storage]; }

 private:
  void mark(int id) {
    if (id != kNone && g_.meta[id].storage != kNone) written_[g_.meta[id].storage] = 1;
  }
  const GraphImpl& g_;
  std::vector<char> written_;
};

// Values replaced by earlier equal ones while a pass walks the nodes in order.
class Renamer {
 public:
  explicit Renamer(int num_values) : to_(num_values) { std::iota(to_.begin(), to_.end(), 0); }
  void replace(int value, int by) { to_[value] = by; }
  void apply_to_args(Node& n) const {
    for (Arg& a : n.args) {
      if (a.kind == Arg::Kind::Value) a.value = to_[a.value];
      for (int& id : a.items) {
        if (id != kNone) id = to_[id];
      }
    }
  }
  void apply_to_outputs(GraphImpl& g) const {
    for (int& id : g.outputs) {
      if (id != kNone) id = to_[id];
    }
  }

 private:
  std::vector<int> to_;
};

// 1 for the values the graph returns. A pass must not make two results one
// tensor, or a result the input itself, where eagerly they were distinct:
// the caller could write one and see the other change.
std::vector<char> output_flags(const GraphImpl& g) {
  std::vector<char> is_output(g.num_values, 0);
  for (int id : g.outputs) {
    if (id != kNone) is_output[id] = 1;
  }
  return is_output;
}

// Merging n into the earlier equal node first would make two of the graph's
// results one tensor.
bool merges_two_results(const Node& n, const Node& first, const std::vector<char>& is_output) {
  for (size_t j = 0; j < n.rets.size(); ++j) {
    for (size_t k = 0; k < n.rets[j].ids.size(); ++k) {
      int id = n.rets[j].ids[k];
      if (id != kNone && is_output[id] && is_output[first.rets[j].ids[k]]) return true;
    }
  }
  return false;
}

void eliminate_common_subexpressions(GraphImpl& g) {
  const WrittenStorages written(g);
  auto clean = [&](int id) { return written.clean(id); };
  Renamer rename(g.num_values);
  std::vector<char> is_output = output_flags(g);
  std::unordered_map<std::string, size_t> seen;
  std::vector<Node> nodes;
  for (Node& n : g.nodes) {
    rename.apply_to_args(n);
    bool mergeable = !has_side_effects(n) && !is_empty_op(n.op.schema().operator_name().name);
    std::string key;
    if (mergeable) {
      const auto& on = n.op.schema().operator_name();
      key = on.name + "." + on.overload_name + "(";
      for (const Arg& a : n.args) {
        if (!mergeable) break;
        switch (a.kind) {
          case Arg::Kind::Value:
            mergeable = clean(a.value);
            key += '%';  // appends: GCC 12 warns falsely on "%" + to_string
            key += std::to_string(a.value);
            key += ';';
            break;
          case Arg::Kind::List:
          case Arg::Kind::OptionalList:
            key += "[";
            for (int id : a.items) {
              mergeable = mergeable && (id == kNone || clean(id));
              key += std::to_string(id) + ",";
            }
            key += "];";
            break;
          case Arg::Kind::Constant:
            mergeable = constant_key(a.constant, key);
            break;
        }
      }
      for_each_ret_value(n, [&](int id) { mergeable = mergeable && clean(id); });
    }
    if (mergeable) {
      auto it = seen.find(key);
      if (it == seen.end()) {
        seen.emplace(std::move(key), nodes.size());
      } else if (!merges_two_results(n, nodes[it->second], is_output)) {
        const Node& first = nodes[it->second];
        for (size_t j = 0; j < n.rets.size(); ++j) {
          for (size_t k = 0; k < n.rets[j].ids.size(); ++k) {
            int id = n.rets[j].ids[k];
            if (id == kNone) continue;
            rename.replace(id, first.rets[j].ids[k]);
            if (is_output[id]) is_output[first.rets[j].ids[k]] = 1;
          }
        }
        continue;
      }  // else kept apart: computed again
    }
    nodes.push_back(std::move(n));
  }
  g.nodes = std::move(nodes);
  rename.apply_to_outputs(g);
}

}  // namespace

// A pure view: one tensor return aliasing its first argument, nothing written.
bool is_pure_view(const Node& n) {
  const auto& s = n.op.schema();
  if (s.returns().size() != 1 || n.rets.size() != 1 || n.rets[0].list || n.rets[0].ids.size() != 1) return false;
  const auto* ra = s.returns()[0].alias_info();
  if (!ra || ra->isWrite()) return false;
  if (n.args.empty() || n.args[0].kind != Arg::Kind::Value || !s.arguments()[0].alias_info()) return false;
  for (const auto& a : s.arguments()) {
    if (writes(a)) return false;
  }
  return true;
}

namespace {

// A pure view, or _unsafe_view: a view without its schema saying so (the
// captured storage identity, checked by the caller, shows it).
bool is_view(const Node& n) {
  if (is_pure_view(n)) return true;
  return n.op.schema().operator_name().name == "aten::_unsafe_view" && n.rets.size() == 1 &&
         n.rets[0].ids.size() == 1 && !n.args.empty() && n.args[0].kind == Arg::Kind::Value;
}

// A chain of views (view(transpose(t(w)))) is one as_strided of its root: the
// layouts are fixed by the signature, so the result's sizes, strides and
// offset are known. The views in between then die (dead code). A view with
// its root's very layout is the root itself (vmap's batching rules make many:
// W8's meta-step had 106 views among 232 ops) and is forwarded, unless some
// op writes the storage (an in-place op on one of them may change its
// metadata: t_, squeeze_) or the view is a result of the graph (the caller
// gets a tensor of its own, as eagerly).
void collapse_views(GraphImpl& g) {
  static const auto as_strided = c10::Dispatcher::singleton().findSchemaOrThrow("aten::as_strided", "");
  const WrittenStorages written(g);
  const std::vector<char> is_output = output_flags(g);
  Renamer rename(g.num_values);
  std::vector<int> root(g.num_values);
  std::iota(root.begin(), root.end(), 0);
  for (Node& n : g.nodes) {
    rename.apply_to_args(n);
    if (!is_view(n)) continue;
    const int in = n.args[0].value, out = n.rets[0].ids[0];
    if (out == kNone) continue;
    const int r = root[in];
    const auto& mo = g.meta[out];
    const auto& mr = g.meta[r];
    if (mo.storage == kNone || mo.storage != mr.storage || mo.dtype != mr.dtype || mo.device != mr.device) continue;
    root[out] = r;
    if (same_layout(mo, mr) && written.clean(out) && !is_output[out]) {
      rename.replace(out, r);  // the node is dead now
      continue;
    }
    if (n.op.schema().operator_name().name == "aten::as_strided" && n.args[0].value == r) continue;
    Node v(as_strided);
    Arg base;
    base.kind = Arg::Kind::Value;
    base.value = r;
    v.args.push_back(base);
    for (c10::IValue c : {c10::IValue(mo.sizes), c10::IValue(mo.strides), c10::IValue(c10::optional<int64_t>(mo.offset))}) {
      Arg a;
      a.constant = std::move(c);
      v.args.push_back(std::move(a));
    }
    v.rets = n.rets;
    n = std::move(v);
  }
}

// x * 1, x / 1, x ** 1 give x itself where the layouts agree, nothing writes
// either storage and the result is not one of the graph's (eagerly a new
// tensor, which the caller may write).
void forward_identities(GraphImpl& g) {
  const WrittenStorages written(g);
  const std::vector<char> is_output = output_flags(g);
  Renamer rename(g.num_values);
  std::vector<Node> nodes;
  for (Node& n : g.nodes) {
    rename.apply_to_args(n);
    const auto& on = n.op.schema().operator_name();
    const std::string name = on.name + "." + on.overload_name;
    bool identity = false;
    if (n.args.size() >= 2 && n.args[0].kind == Arg::Kind::Value && n.args[1].kind == Arg::Kind::Constant &&
        n.rets.size() == 1 && n.rets[0].ids.size() == 1 && n.rets[0].ids[0] != kNone) {
      const c10::IValue& k = n.args[1].constant;
      const bool one = (k.isDouble() && k.toDouble() == 1.0) || (k.isInt() && k.toInt() == 1);
      identity = one && (name == "aten::mul.Scalar" || name == "aten::div.Scalar" || name == "aten::pow.Tensor_Scalar");
    }
    if (identity) {
      const int in = n.args[0].value, out = n.rets[0].ids[0];
      const auto& a = g.meta[in];
      const auto& b = g.meta[out];
      if (written.clean(in) && written.clean(out) && same_layout(a, b) && !is_output[out]) {
        rename.replace(out, in);
        continue;
      }
    }
    nodes.push_back(std::move(n));
  }
  g.nodes = std::move(nodes);
  rename.apply_to_outputs(g);
}

void plan_dispatch(GraphImpl& g) {
  for (Node& n : g.nodes) {
    int first = kNone;
    bool backend_only = true;
    for_each_arg_value(n, [&](int id) {
      if (first == kNone) first = id;
      backend_only = backend_only && g.meta[id].backend_only;
    });
    n.direct = false;
    // Factories get their backend from their arguments (BackendSelect);
    // ZeroTensors and lazy conjugate / negative views need their fallbacks.
    if (first == kNone || !backend_only) continue;
    const auto& m = g.meta[first];
    n.keys = c10::DispatchKeySet(c10::computeDispatchKey(m.dtype, c10::kStrided, m.device));
    n.direct = true;
  }
}

void plan_releases(GraphImpl& g) {
  std::vector<int> last(g.num_values, kNone);
  for (size_t i = 0; i < g.nodes.size(); ++i) {
    g.nodes[i].release.clear();
    for_each_arg_value(g.nodes[i], [&](int id) { last[id] = static_cast<int>(i); });
    for_each_ret_value(g.nodes[i], [&](int id) {
      if (last[id] == kNone) last[id] = static_cast<int>(i);  // results nobody reads go at once
    });
  }
  std::vector<char> out(g.num_values, 0);
  for (int id : g.outputs) {
    if (id != kNone) out[id] = 1;
  }
  for (int id = 0; id < g.num_values; ++id) {
    if (last[id] != kNone && !out[id]) g.nodes[last[id]].release.push_back(id);
  }
}

}  // namespace

void optimize_graph(GraphImpl& g, const CompileOptions& options) {
  g.small.reset();  // planned for the nodes as they were
  g.small_why.clear();
  if (options.simplify_views) collapse_views(g);
  if (options.forward_identities) forward_identities(g);
  if (options.eliminate_common_subexpressions) eliminate_common_subexpressions(g);
  if (options.eliminate_dead_code) eliminate_dead_code(g);
  if (options.free_after_last_use) plan_releases(g);
  plan_dispatch(g);
  if (options.small_tensor_kernels) g.small = plan_small_replay(g, g.small_why);
}

}  // namespace detail
}  // namespace torchfunc
