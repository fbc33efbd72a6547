// src/compile.cpp: a captured Graph (printing, replay) and compile's cache of
// graphs per input signature. Capture: src/capture.cpp; passes: src/graph_passes.cpp.
#include <torchfunc/compile.h>
#include <torchfunc/debug_unwrap.h>

#include <ATen/ATen.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/enum_tag.h>
#include <ATen/FunctionalTensorWrapper.h>
#include <ATen/record_function.h>

#include <algorithm>
#include <cstring>
#include <map>
#include <numeric>
#include <set>
#include <iostream>
#include <sstream>
#include <unordered_set>

#include "compat.h"
#include "graph.h"
#include "levels.h"

namespace torchfunc {

// ---- Graph ------------------------------------------------------------------------

const detail::GraphImpl& Graph::impl() const {
  TORCH_CHECK(impl_, "torchfunc::Graph: empty graph (default-constructed)");
  return *impl_;
}
size_t Graph::num_inputs() const { return impl().inputs.size(); }
size_t Graph::num_outputs() const { return impl().outputs.size(); }
size_t Graph::num_nodes() const { return impl().nodes.size(); }
bool Graph::uses_small_tensor_kernels() const { return impl().small != nullptr; }
size_t Graph::num_constants() const { return impl().constants.size(); }

size_t Graph::count(const std::string& op) const {
  size_t n = 0;
  for (const auto& node : impl().nodes) {
    const auto& on = node.op.schema().operator_name();
    if (on.name == op || (on.name + "." + on.overload_name) == op) ++n;
  }
  return n;
}

std::string Graph::str() const {
  using detail::Arg;
  const auto& g = impl();
  std::ostringstream s;
  auto v = [&](int id) {
    if (id == detail::kNone) return std::string("None");
    std::string s(1, '%');  // appends: GCC 12 warns falsely on "%" + to_string
    s += std::to_string(id);
    return s;
  };
  s << "graph(";
  for (size_t i = 0; i < g.inputs.size(); ++i) {
    s << (i ? ", " : "") << v(g.inputs[i]) << ": " << g.type_of[g.inputs[i]];
  }
  s << "):\n";
  for (const auto& c : g.constants) s << "  " << v(c.first) << " = constant " << g.type_of[c.first] << "\n";
  for (const auto& n : g.nodes) {
    s << "  ";
    bool first = true;
    for (const auto& r : n.rets) {
      for (int id : r.ids) {
        s << (first ? "" : ", ") << v(id);
        first = false;
      }
    }
    if (!first) s << " = ";
    const auto& on = n.op.schema().operator_name();
    s << on.name << (on.overload_name.empty() ? "" : "." + on.overload_name) << "(";
    for (size_t i = 0; i < n.args.size(); ++i) {
      const Arg& a = n.args[i];
      s << (i ? ", " : "");
      if (a.kind == Arg::Kind::Value) {
        s << v(a.value);
      } else if (a.kind == Arg::Kind::Constant) {
        s << a.constant;
      } else {
        s << "[";
        for (size_t k = 0; k < a.items.size(); ++k) s << (k ? ", " : "") << v(a.items[k]);
        s << "]";
      }
    }
    s << ")";
    bool typed = false;
    for (const auto& r : n.rets) {
      for (int id : r.ids) {
        if (id == detail::kNone) continue;
        s << (typed ? ", " : "  # ") << g.type_of[id];
        typed = true;
      }
    }
    s << "\n";
  }
  s << "  return (";
  for (size_t i = 0; i < g.outputs.size(); ++i) s << (i ? ", " : "") << v(g.outputs[i]);
  s << ")\n";
  if (g.small) s << "  # replayed on torchfunc's loops for small tensors (CompileOptions::small_tensor_kernels)\n";
  if (!g.small_why.empty()) s << "  # replayed on ATen's kernels, not torchfunc's small-tensor loops: " << g.small_why << "\n";
  return s.str();
}

std::vector<at::Tensor> Graph::run(const std::vector<at::Tensor>& inputs) const {
  using detail::Arg;
  using detail::kNone;
  const auto& g = impl();
  TORCH_CHECK(inputs.size() == g.inputs.size(), "torchfunc::Graph::run: expected ", g.inputs.size(),
              " inputs, got ", inputs.size());
  if (g.small) {
    if (auto outs = detail::run_small_replay(*g.small, g, inputs)) return std::move(*outs);
  }
  std::vector<c10::IValue> slots(g.num_values);
  for (const auto& c : g.constants) slots[c.first] = c.second;
  for (size_t i = 0; i < inputs.size(); ++i) slots[g.inputs[i]] = inputs[i];
  // Plain tensors only: nothing for autograd or ADInplaceOrView to do.
  at::AutoDispatchBelowADInplaceOrView below;
  torch::jit::Stack stack;
  stack.reserve(16);
  for (const auto& n : g.nodes) {
    stack.clear();
    for (const Arg& a : n.args) {
      switch (a.kind) {
        case Arg::Kind::Constant:
          stack.push_back(a.constant);
          break;
        case Arg::Kind::Value:
          stack.push_back(slots[a.value]);
          break;
        case Arg::Kind::List: {
          c10::List<at::Tensor> l;
          l.reserve(a.items.size());
          for (int id : a.items) l.push_back(slots[id].toTensor());
          stack.emplace_back(std::move(l));
          break;
        }
        case Arg::Kind::OptionalList: {
          c10::List<c10::optional<at::Tensor>> l;
          l.reserve(a.items.size());
          for (int id : a.items) {
            l.push_back(id == kNone ? c10::optional<at::Tensor>() : c10::optional<at::Tensor>(slots[id].toTensor()));
          }
          stack.emplace_back(std::move(l));
          break;
        }
      }
    }
    if (n.direct) {
      n.op.redispatchBoxed(n.keys, &stack);
    } else {
      n.op.callBoxed(&stack);
    }
    for (size_t j = 0; j < n.rets.size() && j < stack.size(); ++j) {
      const auto& r = n.rets[j];
      if (!r.list) {
        if (!r.ids.empty() && r.ids[0] != kNone) slots[r.ids[0]] = std::move(stack[j]);
      } else {
        auto l = stack[j].toTensorList();
        for (size_t k = 0; k < r.ids.size() && k < l.size(); ++k) {
          if (r.ids[k] != kNone) slots[r.ids[k]] = l.get(k);
        }
      }
    }
    for (int id : n.release) slots[id] = c10::IValue();
  }
  std::vector<at::Tensor> outs;
  outs.reserve(g.outputs.size());
  for (int id : g.outputs) outs.push_back(id == kNone ? at::Tensor() : slots[id].toTensor());
  return outs;
}

Graph Graph::optimized(const CompileOptions& options) const {
  auto g = std::make_shared<detail::GraphImpl>(impl());
  detail::optimize_graph(*g, options);
  return Graph(std::move(g));
}

// ---- signatures and the cache -------------------------------------------------------

namespace detail {

void Signature::tensor(const at::Tensor& t) {
  key.push_back(t.defined() ? 1 : 0);
  if (t.defined()) {
    const bool wrapped = !is_plain(t);
    key.push_back(wrapped ? 1 : 0);
    if (!wrapped) {
      key.push_back(static_cast<int64_t>(t.scalar_type()));
      key.push_back(static_cast<int64_t>(t.layout()));
      key.push_back(static_cast<int64_t>(t.device().type()) * 1024 + t.device().index());
      key.push_back(t.requires_grad() ? 1 : 0);
      key.push_back(t.dim());
      if (t.layout() == c10::kStrided) {
        for (int64_t d = 0; d < t.dim(); ++d) {
          key.push_back(t.size(d));
          key.push_back(t.stride(d));
        }
        key.push_back(t.storage_offset());
        // Which earlier argument shares its memory (in-place ops must alias as at capture).
        int64_t shares = -1;
        if (t.has_storage()) {
          for (size_t i = 0; i < tensors.size(); ++i) {
            if (tensors[i].defined() && tensors[i].has_storage() && tensors[i].is_alias_of(t)) {
              shares = static_cast<int64_t>(i);
              break;
            }
          }
        }
        key.push_back(shares);
      }
    }
  }
  tensors.push_back(t);
}

void Signature::finish() {
  key.push_back(c10::GradMode::is_enabled() ? 1 : 0);
  key.push_back(static_cast<int64_t>(layer_depth()));
}

const CompileCache::Entry* CompileCache::find(const std::vector<int64_t>& key) const {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = map_.find(key);
  return it == map_.end() ? nullptr : it->second.get();
}

void CompileCache::insert(std::vector<int64_t> key, Entry e) {
  std::lock_guard<std::mutex> lock(mu_);
  map_.emplace(std::move(key), std::make_shared<Entry>(std::move(e)));
}

void CompileCache::check_room() const {
  std::lock_guard<std::mutex> lock(mu_);
  TORCH_CHECK(map_.size() < options.max_signatures, "torchfunc::compile: the function was ",
              "captured for ", map_.size(), " signatures already (CompileOptions::max_signatures); its ",
              "arguments' shapes, dtypes or number leaves keep changing. Pad to fixed shapes, pass changing ",
              "numbers as tensors, or raise max_signatures");
}

size_t CompileCache::size() const {
  std::lock_guard<std::mutex> lock(mu_);
  return map_.size();
}

std::vector<std::shared_ptr<const void>> CompileCache::likes() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<std::shared_ptr<const void>> out;
  for (const auto& kv : map_) out.push_back(kv.second->like);
  return out;
}

std::vector<Graph> CompileCache::graphs() const {
  std::lock_guard<std::mutex> lock(mu_);
  std::vector<Graph> out;
  for (const auto& kv : map_) out.push_back(kv.second->graph);
  return out;
}

}  // namespace detail
}  // namespace torchfunc
