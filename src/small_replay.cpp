// src/small_replay.cpp: compile's replay of graphs of small float32 CPU
// tensors on torchfunc's own loops (src/small_kernels.h) instead of ATen's
// kernels (CompileOptions::small_tensor_kernels).
//
// Why: a captured MAML meta-step (W8) is ~200 ops on tensors of a few
// thousand elements; ATen spends ~1.5 us on each (dispatch, TensorIterator,
// a TensorImpl and its storage), which is the whole replay. Here the layout
// of every value is fixed by the signature, so the plan resolves views,
// broadcasting and buffer offsets once; a replay runs the loops over one
// reused buffer and allocates only the results.
//
// Planned only when every value is float32 on the CPU, every op is one of
// those below, and the tensors are small (kMaxElements, kMaxProduct); any
// other graph keeps the ATen replay. A replay whose inputs (or constants) do
// not have the captured layout falls back to the ATen replay too.
#include <ATen/ATen.h>

#include <algorithm>
#include <map>
#include <optional>
#include <string>
#include <unordered_map>

#include "graph.h"
#include "small_kernels.h"

namespace torchfunc {
namespace detail {

namespace {
constexpr int64_t kMaxElements = int64_t(1) << 16;  // per value
constexpr int64_t kMaxProduct = int64_t(1) << 18;   // multiply-adds per mm / bmm
constexpr int64_t kAlign = 16;                      // floats (64 bytes)
}  // namespace

struct SmallPlan {
  enum class Kind : uint8_t { Unary, Binary, Sum, Gemm };
  struct Operand {
    int storage = kNone;
    int64_t offset = 0;
    small::View view;  // p filled at replay
  };
  struct Step {
    Kind kind;
    uint8_t op = 0;
    float a = 0;
    Operand out, x, y;
  };
  enum class Where : uint8_t { Input, Constant, Arena, Result };
  struct Storage {
    Where where = Where::Arena;
    int64_t offset = 0;  // Arena: in floats
    int64_t extent = 0;  // floats
  };
  std::vector<Step> steps;
  std::vector<Storage> storages;  // by GraphImpl::Meta::storage
  // Per value: the storage its elements are in and its offset there. As at
  // capture, except for views whose base the passes replaced (x * 1 -> x).
  std::vector<int> storage_of;
  std::vector<int64_t> offset_of;
  // Per value: a 0-dim constant of another dtype than float32 that the steps
  // read as a number (x * 2 on libtorch 1.13 is mul.Tensor(x, tensor(2))); not
  // bound at replay.
  std::vector<char> folded;
  int64_t arena = 0, work = 0, acc = 0;
};

namespace {

using Meta = GraphImpl::Meta;

int64_t extent_of(const Meta& m) {
  int64_t e = 1;
  for (size_t d = 0; d < m.sizes.size(); ++d) {
    if (m.sizes[d] == 0) return 0;
    e += (m.sizes[d] - 1) * m.strides[d];
  }
  return m.offset + e;
}

int64_t numel_of(const Meta& m) {
  int64_t n = 1;
  for (int64_t s : m.sizes) n *= s;
  return n;
}

// Each element in its own place (a permutation of a contiguous layout).
bool dense(const Meta& m) {
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size) of dims longer than 1
  for (size_t d = 0; d < m.sizes.size(); ++d) {
    if (m.sizes[d] > 1) dims.emplace_back(m.strides[d], m.sizes[d]);
  }
  std::sort(dims.begin(), dims.end());
  int64_t expect = 1;
  for (const auto& d : dims) {
    if (d.first != expect) return false;
    expect *= d.second;
  }
  return true;
}

small::View view_of(const Meta& m) {
  small::View v;
  v.ndim = static_cast<int>(m.sizes.size());
  for (int d = 0; d < v.ndim; ++d) {
    v.size[d] = m.sizes[d];
    v.stride[d] = m.strides[d];
  }
  return v;
}

// x's layout seen with out's shape (broadcasting: stride 0), or nothing.
std::optional<small::View> broadcast_to(const Meta& x, const Meta& out) {
  const int nd = static_cast<int>(out.sizes.size()), xd = static_cast<int>(x.sizes.size());
  if (xd > nd) return std::nullopt;
  small::View v;
  v.ndim = nd;
  for (int d = 0; d < nd; ++d) {
    v.size[d] = out.sizes[d];
    const int e = d - (nd - xd);
    if (e < 0 || (x.sizes[e] == 1 && out.sizes[d] != 1)) {
      v.stride[d] = 0;
    } else if (x.sizes[e] == out.sizes[d]) {
      v.stride[d] = x.strides[e];
    } else {
      return std::nullopt;
    }
  }
  return v;
}

bool is_none(const Arg& a) { return a.kind == Arg::Kind::Constant && a.constant.isNone(); }

// A 0-dim CPU tensor of a real dtype other than float32, as a number: what
// ATen computes with it next to a float32 tensor (type promotion keeps
// float32, the value cast to float).
std::optional<float> scalar_tensor_value(const at::Tensor& t) {
  if (!t.defined() || t.dim() != 0 || !t.device().is_cpu() || t.layout() != c10::kStrided) return std::nullopt;
  switch (t.scalar_type()) {
    case at::kDouble:
      return static_cast<float>(t.item<double>());
    case at::kLong:
    case at::kInt:
    case at::kShort:
    case at::kChar:
    case at::kByte:
      return static_cast<float>(t.item<int64_t>());
    case at::kBool:
      return t.item<bool>() ? 1.f : 0.f;
    default:
      return std::nullopt;
  }
}

std::optional<float> number(const Arg& a) {
  if (a.kind != Arg::Kind::Constant) return std::nullopt;
  const c10::IValue& v = a.constant;
  if (v.isDouble()) return static_cast<float>(v.toDouble());
  if (v.isInt()) return static_cast<float>(v.toInt());
  if (v.isBool()) return v.toBool() ? 1.f : 0.f;
  return std::nullopt;
}

// A dtype / layout / device / memory-format argument that changes nothing
// for a float32 CPU result whose layout the plan takes from the capture.
bool harmless_option(const Arg& a) {
  if (a.kind != Arg::Kind::Constant) return false;
  if (a.constant.isNone()) return true;
  if (!a.constant.isInt()) return a.constant.isBool() && !a.constant.toBool();  // pin_memory=False
  return true;  // checked through the result's meta (dtype, device) below
}

class Planner {
 public:
  explicit Planner(const GraphImpl& g) : g_(g) {}

  std::shared_ptr<const SmallPlan> plan() {
    for (const Meta& m : g_.meta) {
      if (m.storage != kNone) num_storages_ = std::max(num_storages_, m.storage + 1);
    }
    p_->storages.resize(num_storages_);
    p_->storage_of.assign(g_.meta.size(), kNone);
    p_->offset_of.assign(g_.meta.size(), 0);
    p_->folded.assign(g_.meta.size(), 0);
    for (size_t id = 0; id < g_.meta.size(); ++id) {
      p_->storage_of[id] = g_.meta[id].storage;
      p_->offset_of[id] = g_.meta[id].offset;
    }
    std::vector<char> seen(num_storages_, 0);
    for (int id : g_.inputs) {
      if (!value_ok(id)) return refuse("input " + value_name(id));
      p_->storages[g_.meta[id].storage].where = SmallPlan::Where::Input;
      seen[g_.meta[id].storage] = 1;
    }
    for (const auto& c : g_.constants) {
      if (auto v = scalar_tensor_value(c.second)) {
        numbers_[c.first] = *v;
        p_->folded[c.first] = 1;
        continue;
      }
      if (!value_ok(c.first)) return refuse("constant " + value_name(c.first));
      auto& s = p_->storages[g_.meta[c.first].storage];
      if (seen[g_.meta[c.first].storage] && s.where != SmallPlan::Where::Constant) {
        return refuse("a constant shares memory with an input");
      }
      s.where = SmallPlan::Where::Constant;
      seen[g_.meta[c.first].storage] = 1;
    }
    std::vector<int> produced_by(num_storages_, kNone);
    for (size_t i = 0; i < g_.nodes.size(); ++i) {
      const Node& n = g_.nodes[i];
      const auto& on = n.op.schema().operator_name();
      std::string op = on.name;
      if (!on.overload_name.empty()) op += "." + on.overload_name;
      if (n.rets.size() != 1 || n.rets[0].list || n.rets[0].ids.size() != 1 || n.rets[0].ids[0] == kNone) {
        return refuse(op + " does not return one tensor");
      }
      const int out = n.rets[0].ids[0];
      if (!value_ok(out)) return refuse(op + " returns " + value_name(out));
      for (size_t k = 0; k < n.args.size(); ++k) {
        const Arg& a = n.args[k];
        if (a.kind == Arg::Kind::List || a.kind == Arg::Kind::OptionalList) return refuse(op + " takes a list of tensors");
        if (a.kind == Arg::Kind::Value && p_->folded[a.value]) {
          if (k == 1 && takes_number_tensor(op)) continue;
          return refuse(op + " reads the 0-dim constant " + value_name(a.value) + " as a tensor");
        }
        if (a.kind == Arg::Kind::Value && !value_ok(a.value)) return refuse(op + " reads " + value_name(a.value));
        if (a.kind == Arg::Kind::Constant && a.constant.isTensor()) return refuse(op + " reads a tensor constant");
      }
      const int s = g_.meta[out].storage;
      if (is_pure_view(n)) {
        const Arg& base = n.args[0];
        if (base.kind == Arg::Kind::Value && n.op.schema().operator_name().name == "aten::as_strided" &&
            n.args.size() == 4 && as_strided_matches(n, out)) {
          // Where its arguments say, in its base's memory.
          p_->storage_of[out] = p_->storage_of[base.value];
          p_->offset_of[out] = n.args[3].constant.isNone() ? p_->offset_of[base.value] : n.args[3].constant.toInt();
          continue;
        }
        if (base.kind != Arg::Kind::Value || p_->storage_of[base.value] != s) {
          return refuse(op + ": " + value_name(out) + " is not a view of " +
                        (base.kind == Arg::Kind::Value ? value_name(base.value) : std::string("a constant")) +
                        "'s memory");
        }
        continue;  // a view: its meta says where its elements are
      }
      if (seen[s] || g_.meta[out].offset != 0 || !dense(g_.meta[out])) {
        return refuse(op + " does not return a fresh dense tensor");
      }
      seen[s] = 1;
      produced_by[s] = static_cast<int>(i);
      if (!add_step(n, out)) return refuse(op + " (or these arguments of it) is not covered");
    }
    for (int id : g_.outputs) {
      if (id == kNone) continue;
      if (!value_ok(id)) return refuse("result " + value_name(id));
      const int s = p_->storage_of[id];
      if (produced_by[s] != kNone) p_->storages[s].where = SmallPlan::Where::Result;
    }
    std::vector<char> used(g_.meta.size(), 0);  // values of the graph as it is now
    for (int id : g_.inputs) used[id] = 1;
    for (const auto& c : g_.constants) used[c.first] = 1;
    for (const Node& n : g_.nodes) for_each_ret_value(n, [&](int id) { used[id] = 1; });
    for (size_t id = 0; id < g_.meta.size(); ++id) {
      const int st = p_->storage_of[id];
      if (st != kNone && used[id]) {
        Meta m = g_.meta[id];
        m.offset = p_->offset_of[id];
        p_->storages[st].extent = std::max(p_->storages[st].extent, extent_of(m));
      }
    }
    place_in_arena(produced_by);
    return p_;
  }

  std::string why;  // when plan() returned null

 private:
  // Binary ops whose second operand may be a folded 0-dim constant.
  static bool takes_number_tensor(const std::string& op) {
    return op == "aten::add.Tensor" || op == "aten::sub.Tensor" || op == "aten::mul.Tensor" || op == "aten::div.Tensor";
  }

  // The second operand as a number: a folded constant (or nothing).
  std::optional<float> folded_number(const Arg& a) const {
    if (a.kind != Arg::Kind::Value) return std::nullopt;
    auto it = numbers_.find(a.value);
    if (it == numbers_.end()) return std::nullopt;
    return it->second;
  }

  std::shared_ptr<const SmallPlan> refuse(std::string reason) {
    why = std::move(reason);
    return nullptr;
  }

  // "%4 (Float[128, 9216]: 1179648 elements, more than 65536)": the value and
  // what the loops do not take about it (nothing: "%4 (Float[3])").
  std::string value_name(int id) const {
    if (id < 0 || id >= static_cast<int>(g_.type_of.size())) return "an undefined tensor";
    std::string s(1, '%');  // appends: GCC 12 warns falsely on "%" + to_string
    s += std::to_string(id);
    s += " (";
    s += g_.type_of[id];
    const std::string problem = value_problem(id);
    if (!problem.empty()) {
      s += ": ";
      s += problem;
    }
    s += ")";
    return s;
  }

  std::string value_problem(int id) const {
    const Meta& m = g_.meta[id];
    if (m.storage == kNone) return "no storage";
    if (m.dtype != at::kFloat) return "not float32";
    if (!m.device.is_cpu()) return "not on the CPU";
    if (!m.plain) return "not a plain tensor";
    if (static_cast<int>(m.sizes.size()) > small::kMaxDims) return "more than 8 dimensions";
    if (numel_of(m) > kMaxElements) {
      std::string s = std::to_string(numel_of(m));
      s += " elements, more than ";
      s += std::to_string(kMaxElements);
      return s;
    }
    if (!std::all_of(m.strides.begin(), m.strides.end(), [](int64_t st) { return st >= 0; })) return "a negative stride";
    return "";
  }

  // as_strided(base, size, stride, offset) with the captured result's sizes and strides.
  bool as_strided_matches(const Node& n, int out) const {
    const Arg &size = n.args[1], &stride = n.args[2], &offset = n.args[3];
    if (size.kind != Arg::Kind::Constant || stride.kind != Arg::Kind::Constant || offset.kind != Arg::Kind::Constant) {
      return false;
    }
    if (!size.constant.isIntList() || !stride.constant.isIntList() || !(offset.constant.isNone() || offset.constant.isInt())) {
      return false;
    }
    return size.constant.toIntVector() == g_.meta[out].sizes && stride.constant.toIntVector() == g_.meta[out].strides;
  }

  bool value_ok(int id) const {
    return id >= 0 && id < static_cast<int>(g_.meta.size()) && value_problem(id).empty();
  }

  SmallPlan::Operand operand(int id) const {
    SmallPlan::Operand o;
    o.storage = p_->storage_of[id];
    o.offset = p_->offset_of[id];
    o.view = view_of(g_.meta[id]);
    return o;
  }

  bool operand_like(const Arg& a, int out, SmallPlan::Operand& o) const {
    if (a.kind != Arg::Kind::Value) return false;
    auto v = broadcast_to(g_.meta[a.value], g_.meta[out]);
    if (!v) return false;
    o.storage = p_->storage_of[a.value];
    o.offset = p_->offset_of[a.value];
    o.view = *v;
    return true;
  }

  bool unary(const Node& n, int out, small::Unary op, float a = 0) {
    SmallPlan::Step s{SmallPlan::Kind::Unary, static_cast<uint8_t>(op), a, operand(out), {}, {}};
    if (op != small::Unary::Fill && !operand_like(n.args[0], out, s.x)) return false;
    if (op == small::Unary::Fill) s.x = s.out;
    p_->steps.push_back(s);
    return true;
  }

  bool binary(const Node& n, int out, small::Binary op, float alpha) {
    SmallPlan::Step s{SmallPlan::Kind::Binary, static_cast<uint8_t>(op), alpha, operand(out), {}, {}};
    if (!operand_like(n.args[0], out, s.x) || !operand_like(n.args[1], out, s.y)) return false;
    p_->steps.push_back(s);
    return true;
  }

  // sum / mean over dims (none or empty: all), keepdim.
  bool reduce(const Node& n, int out, bool mean, const Arg* dims, bool keepdim) {
    const Arg& x = n.args[0];
    if (x.kind != Arg::Kind::Value) return false;
    const Meta& xm = g_.meta[x.value];
    const Meta& om = g_.meta[out];
    const int nd = static_cast<int>(xm.sizes.size());
    std::vector<char> reduced(nd, dims == nullptr ? 1 : 0);
    if (dims != nullptr) {
      if (dims->kind != Arg::Kind::Constant) return false;
      if (dims->constant.isNone()) {
        std::fill(reduced.begin(), reduced.end(), 1);
      } else if (dims->constant.isIntList()) {
        auto l = dims->constant.toIntVector();
        if (l.empty()) std::fill(reduced.begin(), reduced.end(), 1);
        for (int64_t d : l) {
          if (d < 0) d += nd;
          if (d < 0 || d >= nd) return false;
          reduced[d] = 1;
        }
      } else {
        return false;
      }
    }
    SmallPlan::Step s{SmallPlan::Kind::Sum, 0, 1.f, operand(out), operand(x.value), {}};
    small::View& ob = s.out.view;
    ob.ndim = nd;
    int64_t count = 1;
    int od = 0;
    for (int d = 0; d < nd; ++d) {
      ob.size[d] = xm.sizes[d];
      if (reduced[d]) {
        count *= xm.sizes[d];
        ob.stride[d] = 0;
        if (keepdim) {
          if (od >= static_cast<int>(om.sizes.size()) || om.sizes[od] != 1) return false;
          ++od;
        }
      } else {
        if (od >= static_cast<int>(om.sizes.size()) || om.sizes[od] != xm.sizes[d]) return false;
        ob.stride[d] = om.strides[od++];
      }
    }
    if (od != static_cast<int>(om.sizes.size())) return false;
    s.a = mean ? (count == 0 ? NAN : static_cast<float>(1.0 / static_cast<double>(count))) : 1.f;
    p_->acc = std::max(p_->acc, numel_of(om));
    p_->steps.push_back(s);
    return true;
  }

  bool gemm(const Node& n, int out, bool batched) {
    const Arg &a = n.args[0], &b = n.args[1];
    if (a.kind != Arg::Kind::Value || b.kind != Arg::Kind::Value) return false;
    SmallPlan::Step s{SmallPlan::Kind::Gemm, 0, 0.f, operand(out), operand(a.value), operand(b.value)};
    if (!batched) {  // [m, k] as [1, m, k]
      for (SmallPlan::Operand* o : {&s.out, &s.x, &s.y}) {
        if (o->view.ndim != 2) return false;
        o->view.ndim = 3;
        o->view.size[2] = o->view.size[1];
        o->view.stride[2] = o->view.stride[1];
        o->view.size[1] = o->view.size[0];
        o->view.stride[1] = o->view.stride[0];
        o->view.size[0] = 1;
        o->view.stride[0] = 0;
      }
    }
    const small::View &c = s.out.view, &x = s.x.view, &y = s.y.view;
    if (c.ndim != 3 || x.ndim != 3 || y.ndim != 3) return false;
    const int64_t B = c.size[0], m = c.size[1], nn = c.size[2], k = x.size[2];
    if (x.size[0] != B || y.size[0] != B || x.size[1] != m || y.size[1] != k || y.size[2] != nn) return false;
    if (B * m * nn * k > kMaxProduct) return false;
    p_->work = std::max(p_->work, k * ((nn + 15) / 16 * 16));
    p_->steps.push_back(s);
    return true;
  }

  bool add_step(const Node& n, int out) {
    const auto& on = n.op.schema().operator_name();
    const std::string& name = on.name;
    const std::string& ov = on.overload_name;
    const size_t na = n.args.size();
    using U = small::Unary;
    using B = small::Binary;
    if (ov.empty() && na == 1) {
      static const std::map<std::string, U> unaries = {
          {"aten::neg", U::Neg},   {"aten::relu", U::Relu}, {"aten::abs", U::Abs},
          {"aten::exp", U::Exp},   {"aten::log", U::Log},   {"aten::sqrt", U::Sqrt},
          {"aten::tanh", U::Tanh}, {"aten::sigmoid", U::Sigmoid}, {"aten::sin", U::Sin},
          {"aten::cos", U::Cos}};
      auto it = unaries.find(name);
      if (it != unaries.end()) return unary(n, out, it->second);
    }
    if (name == "aten::clone" && ov.empty() && na == 2 && harmless_option(n.args[1])) return unary(n, out, U::Copy);
    if ((name == "aten::zeros_like" || name == "aten::ones_like") && ov.empty() && na == 6) {
      for (size_t i = 1; i < na; ++i) {
        if (!harmless_option(n.args[i])) return false;
      }
      return unary(n, out, U::Fill, name == "aten::ones_like" ? 1.f : 0.f);
    }
    if ((name == "aten::add" || name == "aten::sub") && na == 3) {
      auto alpha = number(n.args[2]);
      if (!alpha) return false;
      // Two tensors: alpha 1 only (ATen fuses alpha * other into the
      // addition in its vectorised loops, not in their tails; see below).
      if (ov == "Tensor" && !folded_number(n.args[1])) {
        return *alpha == 1.f && binary(n, out, name == "aten::add" ? B::Add : B::Sub, 1.f);
      }
      if (ov == "Scalar" || ov == "Tensor") {
        auto v = ov == "Scalar" ? number(n.args[1]) : folded_number(n.args[1]);
        if (!v) return false;
        // ATen: self + alpha * other in float, fused (fma) in its vectorised
        // loops and not in their tails: the same bits only where alpha * other
        // is exact in float (alpha 1 always).
        const double scaled = static_cast<double>(*alpha) * static_cast<double>(*v);
        if (static_cast<double>(static_cast<float>(scaled)) != scaled) return false;
        return unary(n, out, U::AddScalar, (name == "aten::add" ? 1.f : -1.f) * static_cast<float>(scaled));
      }
      return false;
    }
    if ((name == "aten::mul" || name == "aten::div") && na == 2) {
      if (ov == "Tensor" && !folded_number(n.args[1])) return binary(n, out, name == "aten::mul" ? B::Mul : B::Div, 1.f);
      if (ov == "Scalar" || ov == "Tensor") {
        auto v = ov == "Scalar" ? number(n.args[1]) : folded_number(n.args[1]);
        return v && unary(n, out, name == "aten::mul" ? U::MulScalar : U::DivScalar, *v);
      }
      return false;
    }
    if (name == "aten::pow" && ov == "Tensor_Scalar" && na == 2) {
      auto e = number(n.args[1]);
      if (!e) return false;
      if (*e == 1.f) return unary(n, out, U::Copy);
      return unary(n, out, U::Pow, *e);
    }
    if (name == "aten::threshold_backward" && ov.empty() && na == 3) {
      auto t = number(n.args[2]);
      return t && binary(n, out, B::ThresholdBackward, *t);
    }
    if (name == "aten::tanh_backward" && ov.empty() && na == 2) return binary(n, out, B::TanhBackward, 1.f);
    if (name == "aten::sigmoid_backward" && ov.empty() && na == 2) return binary(n, out, B::SigmoidBackward, 1.f);
    if ((name == "aten::sum" && ov == "dim_IntList") || (name == "aten::mean" && ov == "dim")) {
      if (na != 4 || !is_none(n.args[3]) || !number(n.args[2])) return false;
      return reduce(n, out, name == "aten::mean", &n.args[1], *number(n.args[2]) != 0.f);
    }
    if ((name == "aten::sum" || name == "aten::mean") && ov.empty() && na == 2 && is_none(n.args[1])) {
      return reduce(n, out, name == "aten::mean", nullptr, false);
    }
    if (name == "aten::mm" && ov.empty() && na == 2) return gemm(n, out, false);
    if (name == "aten::bmm" && ov.empty() && na == 2) return gemm(n, out, true);
    return false;
  }

  // Offsets in one buffer for the storages no result lives in, reused once
  // their last reader has run (first fit, blocks of kAlign floats).
  void place_in_arena(const std::vector<int>& produced_by) {
    std::vector<int> last(num_storages_, kNone);
    for (size_t i = 0; i < g_.nodes.size(); ++i) {
      for_each_arg_value(g_.nodes[i], [&](int id) { last[p_->storage_of[id]] = static_cast<int>(i); });
    }
    std::vector<std::pair<int64_t, int64_t>> live;  // (offset, size), by offset
    std::vector<std::vector<int>> ends(g_.nodes.size());
    for (int s = 0; s < num_storages_; ++s) {
      if (produced_by[s] != kNone && last[s] != kNone && p_->storages[s].where == SmallPlan::Where::Arena) {
        ends[last[s]].push_back(s);
      }
    }
    for (size_t i = 0; i < g_.nodes.size(); ++i) {
      for (int s = 0; s < num_storages_; ++s) {
        if (produced_by[s] != static_cast<int>(i) || p_->storages[s].where != SmallPlan::Where::Arena) continue;
        const int64_t size = (p_->storages[s].extent + kAlign - 1) / kAlign * kAlign;
        int64_t at = 0;
        for (const auto& b : live) {
          if (b.first - at >= size) break;
          at = std::max(at, b.first + b.second);
        }
        p_->storages[s].offset = at;
        live.insert(std::upper_bound(live.begin(), live.end(), std::make_pair(at, size)), {at, size});
        p_->arena = std::max(p_->arena, at + size);
        if (last[s] == kNone) live.erase(std::find(live.begin(), live.end(), std::make_pair(at, size)));
      }
      for (int s : ends[i]) {
        const int64_t size = (p_->storages[s].extent + kAlign - 1) / kAlign * kAlign;
        live.erase(std::find(live.begin(), live.end(), std::make_pair(p_->storages[s].offset, size)));
      }
    }
  }

  const GraphImpl& g_;
  std::shared_ptr<SmallPlan> p_ = std::make_shared<SmallPlan>();
  int num_storages_ = 0;
  std::unordered_map<int, float> numbers_;  // the folded constants' values
};

bool same_layout(const at::Tensor& t, const Meta& m) {
  return t.defined() && t.scalar_type() == at::kFloat && t.device().is_cpu() && t.layout() == c10::kStrided &&
         !t.is_conj() && !t.is_neg() && !t._is_zerotensor() && t.sizes().equals(m.sizes) &&
         t.strides().equals(m.strides) && t.storage_offset() == m.offset && t.has_storage();
}

}  // namespace

std::shared_ptr<const SmallPlan> plan_small_replay(const GraphImpl& g, std::string& why) {
  Planner planner(g);
  auto p = planner.plan();
  why = p ? std::string() : planner.why;
  return p;
}

std::optional<std::vector<at::Tensor>> run_small_replay(const SmallPlan& p, const GraphImpl& g,
                                                        const std::vector<at::Tensor>& inputs) {
  const size_t S = p.storages.size();
  std::vector<float*> base(S, nullptr);
  std::vector<const at::Tensor*> owner(S, nullptr);
  auto bind = [&](int id, const at::Tensor& t) {
    const Meta& m = g.meta[id];
    if (!same_layout(t, m)) return false;
    // Where the storage starts (read only: inputs and constants are not written).
    float* b = const_cast<float*>(static_cast<const float*>(t.storage().data()));
    if (base[m.storage] != nullptr && base[m.storage] != b) return false;
    base[m.storage] = b;
    owner[m.storage] = &t;
    return true;
  };
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (!bind(g.inputs[i], inputs[i])) return std::nullopt;
  }
  for (const auto& c : g.constants) {
    if (!p.folded[c.first] && !bind(c.first, c.second)) return std::nullopt;
  }
  // Results: their own tensors; the rest: one buffer per thread, kept.
  std::vector<at::Tensor> results(S);
  for (size_t s = 0; s < S; ++s) {
    if (p.storages[s].where != SmallPlan::Where::Result) continue;
    results[s] = at::empty({p.storages[s].extent}, at::TensorOptions().dtype(at::kFloat));
    base[s] = results[s].data_ptr<float>();
  }
  thread_local std::vector<float> arena, work;
  thread_local std::vector<double> acc;
  if (static_cast<int64_t>(arena.size()) < p.arena) arena.resize(p.arena);
  if (static_cast<int64_t>(work.size()) < p.work) work.resize(p.work);
  if (static_cast<int64_t>(acc.size()) < p.acc) acc.resize(p.acc);
  for (size_t s = 0; s < S; ++s) {
    if (p.storages[s].where == SmallPlan::Where::Arena) base[s] = arena.data() + p.storages[s].offset;
  }
  auto at_ = [&](const SmallPlan::Operand& o) {
    small::View v = o.view;
    v.p = base[o.storage] + o.offset;
    return v;
  };
  for (const SmallPlan::Step& s : p.steps) {
    switch (s.kind) {
      case SmallPlan::Kind::Unary:
        small::unary(static_cast<small::Unary>(s.op), at_(s.out), at_(s.x), s.a);
        break;
      case SmallPlan::Kind::Binary:
        small::binary(static_cast<small::Binary>(s.op), at_(s.out), at_(s.x), at_(s.y), s.a);
        break;
      case SmallPlan::Kind::Sum:
        small::sum(at_(s.out), at_(s.x), s.a, acc.data());
        break;
      case SmallPlan::Kind::Gemm:
        small::gemm(at_(s.out), at_(s.x), at_(s.y), work.data());
        break;
    }
  }
  // The results, as the ATen replay returns them: an input or constant
  // itself, a view of one, or a view of a result's storage.
  at::AutoDispatchBelowADInplaceOrView below;
  std::vector<at::Tensor> outs;
  outs.reserve(g.outputs.size());
  std::unordered_map<int, size_t> first;
  for (int id : g.outputs) {
    if (id == kNone) {
      outs.emplace_back();
      continue;
    }
    auto it = first.find(id);
    if (it != first.end()) {
      outs.push_back(outs[it->second]);
      continue;
    }
    first.emplace(id, outs.size());
    const Meta& m = g.meta[id];
    const int st = p.storage_of[id];
    const at::Tensor* t = p.storages[st].where == SmallPlan::Where::Result ? &results[st] : owner[st];
    bool itself = false;
    for (size_t i = 0; i < inputs.size() && !itself; ++i) {
      if (g.inputs[i] == id) {
        outs.push_back(inputs[i]);
        itself = true;
      }
    }
    for (size_t i = 0; i < g.constants.size() && !itself; ++i) {
      if (g.constants[i].first == id) {
        outs.push_back(g.constants[i].second);
        itself = true;
      }
    }
    if (!itself) outs.push_back(t->as_strided(m.sizes, m.strides, p.offset_of[id]));
  }
  return outs;
}

}  // namespace detail
}  // namespace torchfunc
