// src/aot.cpp: aot_function (include/torchfunc/aot.h): the joint capture,
// the default and min-cut partitions, and the autograd node that replays the
// backward graph.
#include <torchfunc/aot.h>

#include <ATen/ATen.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>

#include <algorithm>
#include <limits>
#include <numeric>
#include <unordered_set>

#include "compat.h"
#include "graph.h"
#include "levels.h"

namespace torchfunc {
namespace detail {

namespace {

int64_t bytes_of(const GraphImpl::Meta& m) {
  if (m.dtype == c10::ScalarType::Undefined) return 0;
  int64_t n = 1;
  for (int64_t s : m.sizes) n *= s;
  return n * static_cast<int64_t>(c10::elementSize(m.dtype));
}

// Ops the min-cut partition may run again in the backward: cheap per element
// (or no work at all: views). Matrix products, convolutions, reductions and
// random ops are saved instead.
bool recomputable(const Node& n) {
  if (has_side_effects(n)) return false;
  if (is_pure_view(n)) return true;
  if (compat::is_pointwise(n.op)) return true;
  static const std::unordered_set<std::string> cheap = {
      "aten::add", "aten::sub", "aten::mul", "aten::div", "aten::neg", "aten::cos", "aten::sin", "aten::exp",
      "aten::log", "aten::tanh", "aten::sigmoid", "aten::relu", "aten::threshold_backward", "aten::pow",
      "aten::sqrt", "aten::rsqrt", "aten::abs", "aten::where", "aten::clamp", "aten::gelu", "aten::silu",
      "aten::ones_like", "aten::zeros_like", "aten::full_like", "aten::clone", "aten::_to_copy", "aten::to",
      "aten::reciprocal", "aten::sign", "aten::sgn", "aten::square", "aten::tanh_backward",
      "aten::sigmoid_backward", "aten::expand", "aten::as_strided", "aten::view", "aten::t", "aten::transpose"};
  return cheap.count(n.op.schema().operator_name().name) > 0;
}

// Dinic's maximum flow; after run(), reachable() is the source side of a minimum cut.
class MaxFlow {
 public:
  static constexpr int64_t kInf = std::numeric_limits<int64_t>::max() / 4;
  explicit MaxFlow(int n) : adj_(n), level_(n), it_(n) {}
  void edge(int a, int b, int64_t cap) {
    adj_[a].push_back(static_cast<int>(e_.size()));
    e_.push_back({b, cap});
    adj_[b].push_back(static_cast<int>(e_.size()));
    e_.push_back({a, 0});
  }
  void run(int s, int t) {
    while (bfs(s, t)) {
      std::fill(it_.begin(), it_.end(), 0);
      while (dfs(s, t, kInf) > 0) {
      }
    }
  }
  std::vector<char> reachable(int s) {
    std::vector<char> seen(adj_.size(), 0);
    std::vector<int> stack{s};
    seen[s] = 1;
    while (!stack.empty()) {
      int v = stack.back();
      stack.pop_back();
      for (int id : adj_[v]) {
        if (e_[id].cap > 0 && !seen[e_[id].to]) {
          seen[e_[id].to] = 1;
          stack.push_back(e_[id].to);
        }
      }
    }
    return seen;
  }

 private:
  struct E {
    int to;
    int64_t cap;
  };
  bool bfs(int s, int t) {
    std::fill(level_.begin(), level_.end(), -1);
    std::vector<int> q{s};
    level_[s] = 0;
    for (size_t i = 0; i < q.size(); ++i) {
      for (int id : adj_[q[i]]) {
        if (e_[id].cap > 0 && level_[e_[id].to] < 0) {
          level_[e_[id].to] = level_[q[i]] + 1;
          q.push_back(e_[id].to);
        }
      }
    }
    return level_[t] >= 0;
  }
  int64_t dfs(int v, int t, int64_t f) {
    if (v == t) return f;
    for (size_t& i = it_[v]; i < adj_[v].size(); ++i) {
      int id = adj_[v][i];
      E& e = e_[id];
      if (e.cap <= 0 || level_[e.to] != level_[v] + 1) continue;
      int64_t d = dfs(e.to, t, std::min(f, e.cap));
      if (d > 0) {
        e.cap -= d;
        e_[id ^ 1].cap += d;
        return d;
      }
    }
    return 0;
  }
  std::vector<std::vector<int>> adj_;
  std::vector<E> e_;
  std::vector<int> level_;
  std::vector<size_t> it_;
};

struct Split {
  std::vector<int> saved;          // values the backward reads from the forward
  std::vector<size_t> recompute;   // forward nodes the backward runs again (min cut)
};

// What the backward reads that the forward made (or that is an argument).
Split default_split(const GraphImpl& j, size_t n_primals, size_t n_out, const std::vector<char>& fwd) {
  Split s;
  std::vector<char> seen(j.num_values, 0);
  auto need = [&](int id) {
    if (id != kNone && fwd[id] && !seen[id]) {
      seen[id] = 1;
      s.saved.push_back(id);
    }
  };
  for (size_t i = j.boundary; i < j.nodes.size(); ++i) for_each_arg_value(j.nodes[i], need);
  for (size_t i = n_out; i < j.outputs.size(); ++i) need(j.outputs[i]);
  (void)n_primals;
  return s;
}

Split min_cut_split(const GraphImpl& j, size_t n_primals, size_t n_out, const std::vector<char>& fwd) {
  const Split needed = default_split(j, n_primals, n_out, fwd);
  const int n = j.num_values, S = 2 * n, T = 2 * n + 1;
  std::vector<int> producer(n, kNone);
  for (size_t i = 0; i < j.boundary; ++i) for_each_ret_value(j.nodes[i], [&](int id) { producer[id] = static_cast<int>(i); });
  MaxFlow flow(2 * n + 2);
  for (size_t i = 0; i < n_primals; ++i) {
    const int v = j.inputs[i];
    flow.edge(S, 2 * v, MaxFlow::kInf);
    flow.edge(2 * v, 2 * v + 1, 0);  // arguments are alive anyway: saving them is free
  }
  for (size_t i = 0; i < j.boundary; ++i) {
    const Node& node = j.nodes[i];
    const bool again = recomputable(node);
    for_each_ret_value(node, [&](int v) {
      flow.edge(2 * v, 2 * v + 1, std::max<int64_t>(1, bytes_of(j.meta[v])));
      if (!again) {
        flow.edge(S, 2 * v, MaxFlow::kInf);
        return;
      }
      for_each_arg_value(node, [&](int u) {
        if (fwd[u]) flow.edge(2 * u + 1, 2 * v, MaxFlow::kInf);
      });
    });
  }
  for (int v : needed.saved) flow.edge(2 * v + 1, T, MaxFlow::kInf);
  flow.run(S, T);
  const std::vector<char> side = flow.reachable(S);
  std::vector<char> cut(n, 0);
  for (int v = 0; v < n; ++v) cut[v] = side[2 * v] && !side[2 * v + 1];
  // Walk back from what the backward reads to the cut: those nodes run again.
  Split s;
  std::vector<char> saved(n, 0), visited(n, 0), again(j.nodes.size(), 0);
  std::vector<int> stack(needed.saved.begin(), needed.saved.end());
  while (!stack.empty()) {
    int v = stack.back();
    stack.pop_back();
    if (visited[v]) continue;
    visited[v] = 1;
    const int p = producer[v];
    if (cut[v] || p == kNone || !recomputable(j.nodes[p])) {
      saved[v] = 1;
      continue;
    }
    again[p] = 1;
    for_each_arg_value(j.nodes[p], [&](int u) {
      if (fwd[u]) stack.push_back(u);
    });
  }
  for (int v = 0; v < n; ++v) {
    if (saved[v]) s.saved.push_back(v);
  }
  for (size_t i = 0; i < j.boundary; ++i) {
    if (again[i]) s.recompute.push_back(i);
  }
  return s;
}

bool is_float(const at::Tensor& t) { return t.defined() && (t.is_floating_point() || t.is_complex()); }

}  // namespace

std::shared_ptr<const AotGraphs> aot_capture(const std::vector<at::Tensor>& inputs, const AotFlatFn& f,
                                             const AotOptions& options) {
  auto out = std::make_shared<AotGraphs>();
  const bool grad_on = c10::GradMode::is_enabled();
  std::vector<at::Tensor> detached;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const at::Tensor& t = inputs[i];
    TORCH_CHECK(t.defined(), "torchfunc::aot_function: input ", i, " is an undefined tensor");
    if (grad_on && t.requires_grad()) {
      TORCH_CHECK(is_float(t), "torchfunc::aot_function: input ", i, " requires grad but is not floating point");
      out->diff.push_back(i);
    }
    detached.push_back(t.detach());
  }
  if (out->diff.empty()) {
    Graph g = capture_graph("aot_function", detached, [&](std::vector<at::Tensor>& outs) { outs = f(detached); });
    out->num_outputs = g.num_outputs();
    out->plain = g.optimized(options.compile);
    return out;
  }
  size_t n_out = 0;
  Graph joint;
  try {
  joint = capture_graph("aot_function", detached, [&](std::vector<at::Tensor>& outs) {
    std::vector<at::Tensor> d;
    for (size_t k : out->diff) d.push_back(detached[k]);
    auto fn = [&](const std::vector<at::Tensor>& dv) {
      std::vector<at::Tensor> all = detached;
      for (size_t k = 0; k < out->diff.size(); ++k) all[out->diff[k]] = dv[k];
      return f(all);
    };
    auto [y, vjp_fn] = torchfunc::vjp(fn, d);
    capture_mark();
    std::vector<at::Tensor> cts;
    for (size_t k = 0; k < y.size(); ++k) {
      TORCH_CHECK(is_float(y[k]), "torchfunc::aot_function: result ", k,
                  " is not a floating-point tensor; only floating-point results can be differentiated");
      cts.push_back(capture_new_input(y[k]));
    }
    auto grads = std::get<0>(vjp_fn(cts));
    n_out = y.size();
    outs = y;
    outs.insert(outs.end(), grads.begin(), grads.end());
  });
  } catch (const c10::Error& e) {
    const std::string msg = e.what_without_backtrace();
    if (msg.rfind("torchfunc::aot_function", 0) == 0) throw;
    TORCH_CHECK(false, "torchfunc::aot_function: capturing the forward and backward: ", msg);
  }
  const GraphImpl& j = joint.impl();
  const size_t n_primals = inputs.size();
  std::vector<char> fwd(j.num_values, 0);
  for (size_t i = 0; i < n_primals; ++i) fwd[j.inputs[i]] = 1;
  for (size_t i = 0; i < j.boundary; ++i) for_each_ret_value(j.nodes[i], [&](int id) { fwd[id] = 1; });
  // Forward writes make recomputation unsafe: those graphs use the default split.
  bool fwd_writes = false;
  for (size_t i = 0; i < j.boundary; ++i) {
    for (const auto& a : j.nodes[i].op.schema().arguments()) fwd_writes = fwd_writes || writes(a);
  }
  const Split split = options.partition == Partition::MinCut && !fwd_writes
                          ? min_cut_split(j, n_primals, n_out, fwd)
                          : default_split(j, n_primals, n_out, fwd);

  auto f_impl = std::make_shared<GraphImpl>(j);
  f_impl->inputs.assign(j.inputs.begin(), j.inputs.begin() + static_cast<std::ptrdiff_t>(n_primals));
  f_impl->nodes.assign(j.nodes.begin(), j.nodes.begin() + static_cast<std::ptrdiff_t>(j.boundary));
  f_impl->outputs.assign(j.outputs.begin(), j.outputs.begin() + static_cast<std::ptrdiff_t>(n_out));
  f_impl->outputs.insert(f_impl->outputs.end(), split.saved.begin(), split.saved.end());
  optimize_graph(*f_impl, options.compile);

  auto b_impl = std::make_shared<GraphImpl>(j);
  b_impl->inputs = split.saved;
  b_impl->inputs.insert(b_impl->inputs.end(), j.inputs.begin() + static_cast<std::ptrdiff_t>(n_primals), j.inputs.end());
  b_impl->nodes.clear();
  for (size_t i : split.recompute) b_impl->nodes.push_back(j.nodes[i]);
  b_impl->nodes.insert(b_impl->nodes.end(), j.nodes.begin() + static_cast<std::ptrdiff_t>(j.boundary), j.nodes.end());
  b_impl->outputs.assign(j.outputs.begin() + static_cast<std::ptrdiff_t>(n_out), j.outputs.end());
  optimize_graph(*b_impl, options.compile);

  std::vector<char> is_input(j.num_values, 0);
  for (size_t i = 0; i < n_primals; ++i) is_input[j.inputs[i]] = 1;
  for (int v : split.saved) {
    if (!is_input[v]) out->saved_bytes += bytes_of(j.meta[v]);
  }
  out->forward = Graph(f_impl);
  out->backward = Graph(b_impl);
  out->num_outputs = n_out;
  out->num_saved = split.saved.size();
  return out;
}

namespace {

struct AotBackward : torch::autograd::Node {
  std::shared_ptr<const AotGraphs> graphs;
  std::vector<torch::autograd::SavedVariable> saved;
  std::vector<std::vector<int64_t>> out_sizes;  // the results' shapes and options (zero cotangents)
  std::vector<at::TensorOptions> out_options;
  bool released = false;

  std::string name() const override { return "torchfunc::aot_function backward"; }

  torch::autograd::variable_list apply(torch::autograd::variable_list&& grads) override {
    TORCH_CHECK(!released, "torchfunc::aot_function: its backward ran twice on a graph that was freed; pass "
                "retain_graph to run it again.");
    TORCH_CHECK(!c10::GradMode::is_enabled(), "torchfunc::aot_function: its backward graph is not "
                "differentiable (create_graph / double backward); differentiate twice with grad(grad(f)) "
                "instead");
    std::vector<at::Tensor> in;
    in.reserve(saved.size() + grads.size());
    auto self = compat::node_ptr(this);
    for (auto& s : saved) in.push_back(s.unpack(self));
    for (size_t k = 0; k < out_sizes.size(); ++k) {
      in.push_back(k < grads.size() && grads[k].defined() ? grads[k] : at::zeros(out_sizes[k], out_options[k]));
    }
    return graphs->backward.run(in);
  }

  void release_variables() override {
    saved.clear();
    released = true;
  }
};

}  // namespace

std::vector<at::Tensor> aot_run(const std::shared_ptr<const AotGraphs>& graphs, const std::vector<at::Tensor>& inputs) {
  if (graphs->diff.empty()) return graphs->plain.run(inputs);
  std::vector<at::Tensor> res = graphs->forward.run(inputs);
  std::vector<at::Tensor> outs(res.begin(), res.begin() + static_cast<std::ptrdiff_t>(graphs->num_outputs));
  auto node = compat::make_node<AotBackward>();
  node->graphs = graphs;
  std::vector<at::Tensor> diff_inputs;
  for (size_t i : graphs->diff) diff_inputs.push_back(inputs[i]);
  node->set_next_edges(torch::autograd::collect_next_edges(diff_inputs));
  std::unordered_set<const c10::TensorImpl*> taken;
  for (const auto& t : inputs) taken.insert(t.unsafeGetTensorImpl());
  for (auto& o : outs) {
    // A result that is an argument (or appeared twice) gets its own tensor to carry the history.
    if (!taken.insert(o.unsafeGetTensorImpl()).second) o = o.detach();
    node->out_sizes.push_back(o.sizes().vec());
    node->out_options.push_back(o.options());
    torch::autograd::set_history(o, node);
  }
  for (size_t k = graphs->num_outputs; k < res.size(); ++k) {
    const at::Tensor& s = res[k];
    bool is_out = false;
    for (const auto& o : outs) is_out = is_out || o.unsafeGetTensorImpl() == s.unsafeGetTensorImpl();
    node->saved.emplace_back(s, /*is_output=*/is_out);
  }
  return outs;
}

}  // namespace detail
}  // namespace torchfunc
