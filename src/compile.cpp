// src/compile.cpp: capture (a RecordFunction observer), the passes on a
// captured graph, and its replay. See include/torchfunc/compile.h,
// Note [how capture works].
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
namespace detail {

// Graph, Node, Arg, Ret, GraphImpl: src/graph.h.

namespace {

std::string describe(const at::Tensor& t) {
  if (!t.defined()) return "undefined";
  std::ostringstream s;
  s << c10::toString(t.scalar_type()) << t.sizes();
  if (!t.is_cpu()) s << "@" << t.device();
  return s.str();
}

bool is_plain(const at::Tensor& t) {
  return !t.defined() || (!at::functorch::isBatchedTensor(t) && !compat::wrapper_of(t) &&
                          !at::functionalization::impl::isFunctionalTensor(t));
}

bool all_plain(c10::ArrayRef<const c10::IValue> inputs) {
  for (const auto& iv : inputs) {
    if (iv.isTensor()) {
      if (!is_plain(iv.toTensor())) return false;
    } else if (iv.isTensorList()) {
      for (const at::Tensor& t : iv.toTensorList()) {
        if (!is_plain(t)) return false;
      }
    } else if (iv.isList()) {
      for (const auto& e : iv.toListRef()) {
        if (e.isTensor() && !is_plain(e.toTensor())) return false;
      }
    }
  }
  return true;
}


bool is_view_op(const c10::FunctionSchema& s) {
  return !s.returns().empty() && s.returns()[0].alias_info() && !s.returns()[0].alias_info()->isWrite();
}

bool is_empty_op(const std::string& name) {
  return name == "aten::empty" || name == "aten::empty_like" || name == "aten::empty_strided" ||
         name == "aten::new_empty" || name == "aten::new_empty_strided";
}

// Ops that return numbers computed from metadata only (fixed by the signature).
bool returns_metadata(const std::string& name) {
  static const std::unordered_set<std::string> ok = {
      "aten::size", "aten::sym_size", "aten::stride", "aten::sym_stride", "aten::numel", "aten::sym_numel",
      "aten::sym_storage_offset", "aten::dim", "aten::is_same_size", "aten::is_complex", "aten::is_floating_point",
      "aten::is_conj", "aten::is_neg", "aten::is_inference", "aten::result_type", "aten::can_cast",
      "aten::promote_types", "aten::_has_compatible_shallow_copy_type", "aten::_debug_has_internal_overlap",
      "aten::output_nr", "aten::_version", "aten::is_leaf", "aten::is_nonzero_metadata"};
  return ok.count(name) > 0;
}

bool has_generator_argument(const c10::FunctionSchema& s, c10::ArrayRef<const c10::IValue> inputs, bool& given) {
  given = false;
  bool found = false;
  for (size_t i = 0; i < s.arguments().size() && i < inputs.size(); ++i) {
    auto type = s.arguments()[i].type();
    if (type->kind() == c10::TypeKind::OptionalType) type = type->containedType(0);
    if (type->kind() == c10::TypeKind::GeneratorType) {
      found = true;
      given = given || !inputs[i].isNone();
    }
  }
  return found;
}

struct Recorded : at::ObserverContext {
  explicit Recorded(size_t n) : node(n) {}
  size_t node;
};

}  // namespace

// The state of one capture on this thread.
struct Capture {
  const char* who;
  std::shared_ptr<GraphImpl> g = std::make_shared<GraphImpl>();
  std::unordered_map<const c10::TensorImpl*, int> id_of;
  std::unordered_map<const c10::StorageImpl*, int> storage_owner;
  std::unordered_map<const c10::StorageImpl*, int> storage_id;
  std::vector<at::Tensor> tensor_of;  // per value, alive until the capture ends (no address is reused)
  std::vector<int> unwritten;         // per value: the empty(...) value whose contents no recorded op wrote, or kNone
  std::vector<int> producer;          // per value: the node that made it, or kNone
  int depth = 0;                      // > 0 inside a recorded op
  bool busy = false;                  // inside the observer itself (its own ops are not the function's)
  std::string refusal;
  size_t mark = 0;  // capture_mark()

  int new_value(const at::Tensor& t) {
    int id = g->num_values++;
    id_of[t.unsafeGetTensorImpl()] = id;
    if (t.has_storage() && t.storage().unsafeGetStorageImpl()) {
      storage_owner.emplace(t.storage().unsafeGetStorageImpl(), id);
    }
    tensor_of.push_back(t);
    unwritten.push_back(kNone);
    producer.push_back(kNone);
    add_meta(t);
    return id;
  }

  void add_meta(const at::Tensor& t) {
    g->type_of.push_back(describe(t));
    GraphImpl::Meta m;
    m.dtype = t.scalar_type();
    m.device = t.device();
    if (t.layout() == c10::kStrided) {
      m.sizes = t.sizes().vec();
      m.strides = t.strides().vec();
      m.offset = t.storage_offset();
    }
    if (t.layout() == c10::kStrided) {
      auto ks = (t.key_set() - c10::autograd_dispatch_keyset).remove(c10::DispatchKey::ADInplaceOrView);
      m.backend_only = ks == c10::DispatchKeySet(c10::computeDispatchKey(t.scalar_type(), t.layout(), t.device()));
    }
    if (t.has_storage() && t.storage().unsafeGetStorageImpl()) {
      auto it = storage_id.emplace(t.storage().unsafeGetStorageImpl(), static_cast<int>(storage_id.size())).first;
      m.storage = it->second;
    }
    g->meta.push_back(std::move(m));
  }

  void refuse(const std::string& msg) {
    if (refusal.empty()) refusal = msg;
  }

  // The value a tensor argument is; tensors the graph has not seen are
  // aliases made without the dispatcher (shallow copies of a value: replayed as
  // as_strided of it) or constants.
  int value_of(const at::Tensor& t, const std::string& opname) {
    auto it = id_of.find(t.unsafeGetTensorImpl());
    if (it != id_of.end()) return it->second;
    if (t.has_storage() && t.storage().unsafeGetStorageImpl()) {
      auto s = storage_owner.find(t.storage().unsafeGetStorageImpl());
      if (s != storage_owner.end()) {
        const at::Tensor& base = tensor_of[s->second];
        if (base.scalar_type() != t.scalar_type() || base.layout() != c10::kStrided) {
          refuse(opname + " reads a tensor that shares memory with a value of the graph but was made without "
                          "an ATen op, with another dtype; it cannot be replayed");
          return s->second;
        }
        static const auto as_strided = c10::Dispatcher::singleton().findSchemaOrThrow("aten::as_strided", "");
        Node n(as_strided);
        Arg base_arg;
        base_arg.kind = Arg::Kind::Value;
        base_arg.value = s->second;
        n.args.push_back(base_arg);
        for (c10::IValue c : {c10::IValue(t.sizes().vec()), c10::IValue(t.strides().vec()),
                              c10::IValue(c10::optional<int64_t>(t.storage_offset()))}) {
          Arg a;
          a.constant = std::move(c);
          n.args.push_back(std::move(a));
        }
        int id = new_value(t);
        producer[id] = static_cast<int>(g->nodes.size());
        unwritten[id] = unwritten[s->second];
        Ret r;
        r.ids = {id};
        n.rets.push_back(r);
        g->nodes.push_back(std::move(n));
        return id;
      }
    }
    if (t.requires_grad() && c10::GradMode::is_enabled()) {
      refuse(opname + " reads a tensor that requires grad and is not an argument (a module parameter the "
                      "function closes over?): the replay would not differentiate it. Pass it as an argument "
                      "(functional_call) or call under torch::NoGradGuard");
    }
    int id = new_value(t);
    g->constants.emplace_back(id, t);
    return id;
  }

  // The contents of an empty(...) value that no recorded op wrote were written
  // without the dispatcher (torch::tensor({...}), from_blob copies): the graph
  // makes them from a snapshot taken now.
  void snapshot(int base) {
    static const bool trace = std::getenv("TORCHFUNC_CAPTURE_TRACE") != nullptr;
    if (trace) std::cerr << "[capture] snapshot of %" << base << " " << g->type_of[base] << "\n";
    static const auto clone = c10::Dispatcher::singleton().findSchemaOrThrow("aten::clone", "");
    int node = producer[base];
    TORCH_INTERNAL_ASSERT(node != kNone);
    at::Tensor snap = tensor_of[base].clone();
    int cid = g->num_values++;
    tensor_of.push_back(snap);
    unwritten.push_back(kNone);
    producer.push_back(kNone);
    add_meta(snap);
    g->constants.emplace_back(cid, snap);
    Node n(clone);
    Arg a;
    a.kind = Arg::Kind::Value;
    a.value = cid;
    n.args.push_back(a);
    n.args.emplace_back();  // memory_format=None
    n.rets = g->nodes[node].rets;
    g->nodes[node] = std::move(n);
    for (int& u : unwritten) {
      if (u == base) u = kNone;
    }
  }

  void check_replayable(const c10::OperatorHandle& op, c10::ArrayRef<const c10::IValue> inputs) {
    const std::string name = op.schema().operator_name().name;
    if (op.hasTag(at::Tag::data_dependent_output)) {
      refuse(name + " reads tensor data on the host (.item(), a comparison, control flow on values): a replay "
                    "cannot follow data-dependent control flow");
    }
    // aten::index is tagged (a boolean mask makes its shape data-dependent) but
    // integer indices give a static shape; untagged libtorch versions are covered too.
    bool dynamic = op.hasTag(at::Tag::dynamic_output_shape) && name != "aten::index";
    if (name == "aten::index" && inputs.size() > 1 && inputs[1].isList()) {
      for (const auto& e : inputs[1].toListRef()) {
        if (e.isTensor() && e.toTensor().defined() &&
            (e.toTensor().scalar_type() == at::kBool || e.toTensor().scalar_type() == at::kByte)) {
          dynamic = true;
        }
      }
    }
    if (dynamic) {
      refuse(name + " has an output whose shape depends on tensor data (nonzero, boolean-mask indexing, "
                    "unique): it cannot be replayed; use a mask multiply or torch::where");
    }
    if (op.hasTag(at::Tag::nondeterministic_seeded)) {
      bool given = false;
      bool has = has_generator_argument(op.schema(), inputs, given);
      if (!given) {
        refuse(name + " draws random numbers from the global generator" +
               (has ? "" : " (it takes no generator)") +
               ": a replay would not reproduce the capture's numbers. Give the op a torch::Generator, or draw "
               "the random tensor outside and pass it as an argument");
      }
    }
  }

  Arg arg_of(const c10::IValue& iv, const std::string& opname) {
    Arg a;
    if (iv.isTensor() && iv.toTensor().defined()) {
      a.kind = Arg::Kind::Value;
      a.value = value_of(iv.toTensor(), opname);
    } else if (iv.isTensorList()) {
      a.kind = Arg::Kind::List;
      for (const at::Tensor& t : iv.toTensorList()) a.items.push_back(value_of(t, opname));
    } else if (iv.isList() && !iv.isIntList() && !iv.isDoubleList() && !iv.isBoolList()) {
      bool tensors = false;
      for (const auto& e : iv.toListRef()) tensors = tensors || e.isTensor();
      if (tensors) {
        a.kind = Arg::Kind::OptionalList;
        for (const auto& e : iv.toListRef()) {
          a.items.push_back(e.isTensor() && e.toTensor().defined() ? value_of(e.toTensor(), opname) : kNone);
        }
      } else {
        a.constant = iv;
      }
    } else {
      a.constant = iv;
    }
    return a;
  }

  size_t start(const c10::OperatorHandle& op, c10::ArrayRef<const c10::IValue> inputs) {
    const auto& schema = op.schema();
    const std::string opname = schema.operator_name().name;
    check_replayable(op, inputs);
    std::vector<Arg> args;
    args.reserve(inputs.size());
    for (const auto& iv : inputs) args.push_back(arg_of(iv, opname));
    // Reads of empty(...) values nobody wrote, and writes that define them.
    const bool view = is_view_op(schema);
    for (size_t i = 0; i < args.size(); ++i) {
      std::vector<int> ids = args[i].kind == Arg::Kind::Value ? std::vector<int>{args[i].value} : args[i].items;
      const bool w = i < schema.arguments().size() && writes(schema.arguments()[i]);
      for (int id : ids) {
        if (id == kNone || unwritten[id] == kNone) continue;
        if (w) {
          // Written now (out= / in-place); a write through a view counts for its base too.
          int base = unwritten[id];
          for (int& u : unwritten) {
            if (u == base) u = kNone;
          }
        } else if (!view) {
          snapshot(unwritten[id]);
        }
      }
    }
    Node n(op);
    n.args = std::move(args);
    g->nodes.push_back(std::move(n));
    return g->nodes.size() - 1;
  }

  void end(size_t index, c10::ArrayRef<c10::IValue> outputs) {
    Node& n = g->nodes[index];
    const auto& schema = n.op.schema();
    const std::string opname = schema.operator_name().name;
    if (outputs.size() < schema.returns().size()) {  // the op threw
      n.failed = true;
      return;
    }
    // A boxed call reports its whole stack: the op's returns are the last ones.
    outputs = outputs.slice(outputs.size() - schema.returns().size());
    bool any_tensor = false;
    for (size_t j = 0; j < outputs.size(); ++j) {
      const c10::IValue& iv = outputs[j];
      Ret r;
      auto add = [&](const at::Tensor& wrapped) {
        if (at::functorch::isBatchedTensor(wrapped)) {
          refuse(opname + " made a batched result from unbatched arguments (a vmap randomness rule?); it "
                          "cannot be replayed");
        }
        at::Tensor t = debug_unwrap(wrapped);
        if (!t.defined()) {
          r.ids.push_back(kNone);
          return;
        }
        int id = new_value(t);
        producer[id] = static_cast<int>(index);
        if (is_empty_op(opname)) {
          unwritten[id] = id;
        } else if (schema.returns()[j].alias_info() && !schema.returns()[j].alias_info()->isWrite()) {
          // A view: unwritten if its base is.
          for (const Arg& a : n.args) {
            if (a.kind == Arg::Kind::Value && unwritten[a.value] != kNone) unwritten[id] = unwritten[a.value];
          }
        }
        r.ids.push_back(id);
        any_tensor = true;
      };
      if (iv.isTensor()) {
        add(iv.toTensor());
      } else if (iv.isTensorList()) {
        r.list = true;
        for (const at::Tensor& t : iv.toTensorList()) add(t);
      } else if (iv.isNone()) {
        r.ids.push_back(kNone);
      } else if (!returns_metadata(opname)) {
        refuse(opname + " returns a " + iv.tagKind() +
               " to the function: values computed from tensor data cannot be replayed");
      }
      n.rets.push_back(std::move(r));
    }
    bool writes_any = false;
    for (const auto& a : schema.arguments()) writes_any = writes_any || writes(a);
    if (!any_tensor && !writes_any) n.failed = true;  // metadata queries: nothing to replay
  }
};

namespace {

thread_local Capture* t_capture = nullptr;

// While the observer itself works (its own ops are not the function's).
class Busy {
 public:
  explicit Busy(Capture& c) : c_(c) { c_.busy = true; }
  ~Busy() { c_.busy = false; }
  Busy(const Busy&) = delete;
  Busy& operator=(const Busy&) = delete;

 private:
  Capture& c_;
};

std::unique_ptr<at::ObserverContext> on_start(const at::RecordFunction& fn) {
  Capture* c = t_capture;
  if (c == nullptr || c->busy || fn.scope() != at::RecordScope::FUNCTION) return nullptr;
  static const bool trace = std::getenv("TORCHFUNC_CAPTURE_TRACE") != nullptr;
  if (trace) std::cerr << "[capture] " << std::string(2 * c->depth, ' ') << fn.name() << "\n";
  if (c->depth > 0) return nullptr;
  auto name = fn.operator_name();
  if (!name) return nullptr;
  auto op = c10::Dispatcher::singleton().findOp(*name);
  if (!op) {
    c->refuse("the op " + name->name + " is not in the dispatcher's registry");
    return nullptr;
  }
  // A boxed call reports its whole stack: the op's arguments are the last ones.
  auto inputs = fn.inputs();
  const size_t n_args = op->schema().arguments().size();
  if (inputs.size() < n_args) return nullptr;
  inputs = inputs.slice(inputs.size() - n_args);
  if (!all_plain(inputs)) return nullptr;
  if (trace) std::cerr << "[capture]   ^ recorded\n";
  // RecordFunction swallows exceptions thrown by observers: every problem is
  // kept in c->refusal and raised when the function returns.
  Busy busy(*c);
  try {
    size_t n = c->start(*op, inputs);
    ++c->depth;
    return std::make_unique<Recorded>(n);
  } catch (const std::exception& e) {
    c->refuse(std::string("recording ") + name->name + " failed: " + e.what());
    return nullptr;
  }
}

void on_end(const at::RecordFunction& fn, at::ObserverContext* ctx) {
  Capture* c = t_capture;
  if (c == nullptr || ctx == nullptr) return;
  --c->depth;
  Busy busy(*c);
  try {
    c->end(static_cast<Recorded*>(ctx)->node, fn.outputs());
  } catch (const std::exception& e) {
    c->refuse(std::string("recording the results of an op failed: ") + e.what());
  }
}

// Installs the observer for one capture on this thread (RAII).
class Observing {
 public:
  Observing(Capture* c, const char* who) {
    TORCH_CHECK(t_capture == nullptr, "torchfunc::", who,
                ": called while another capture runs on this thread (compile or make_graph inside a function "
                "being captured); compile the outer function only");
    t_capture = c;
    handle_ = at::addThreadLocalCallback(at::RecordFunctionCallback(on_start, on_end)
                                             .needsInputs(true)
                                             .needsOutputs(true)
                                             .scopes({at::RecordScope::FUNCTION}));
  }
  ~Observing() {
    at::removeCallback(handle_);
    t_capture = nullptr;
  }
  Observing(const Observing&) = delete;
  Observing& operator=(const Observing&) = delete;

 private:
  at::CallbackHandle handle_;
};

}  // namespace

void capture_add_input(const at::Tensor& t) {
  Capture* c = t_capture;
  TORCH_INTERNAL_ASSERT(c != nullptr, "capture_add_input outside a capture");
  c->g->inputs.push_back(c->new_value(t));
}

at::Tensor capture_new_input(const at::Tensor& like) {
  Capture* c = t_capture;
  TORCH_INTERNAL_ASSERT(c != nullptr, "capture_new_input outside a capture");
  at::Tensor t;
  {
    Busy busy(*c);  // not an op of the function
    t = at::ones_like(like, at::MemoryFormat::Contiguous);
  }
  c->g->inputs.push_back(c->new_value(t));
  return t;
}

void capture_mark() {
  Capture* c = t_capture;
  TORCH_INTERNAL_ASSERT(c != nullptr, "capture_mark outside a capture");
  c->mark = c->g->nodes.size();
}

Graph capture_graph(const char* who, const std::vector<at::Tensor>& inputs,
                    const std::function<void(std::vector<at::Tensor>& outs)>& body) {
  setup_once();
  TORCH_CHECK(layer_depth() == 0, "torchfunc::", who,
              ": called inside a transform (vmap, grad, jvp, ...); a capture must see the whole program: "
              "compile the transformed function instead, e.g. compile(vmap(f))");
  const bool compiling = std::string(who) == "compile";
  Capture c;
  c.who = who;
  for (size_t i = 0; i < inputs.size(); ++i) {
    const at::Tensor& t = inputs[i];
    TORCH_CHECK(t.defined(), "torchfunc::", who, ": input ", i, " is an undefined tensor");
    TORCH_CHECK(is_plain(t), "torchfunc::", who, ": input ", i,
                " is a transform's tensor (called inside a transform?); compile the transformed function instead");
    TORCH_CHECK(t.layout() == c10::kStrided, "torchfunc::", who, ": input ", i, " is ", t.layout(),
                "; only strided tensors are supported");
    TORCH_CHECK(!(compiling && t.requires_grad() && c10::GradMode::is_enabled()), "torchfunc::", who, ": input ",
                i, " requires grad; a compiled function's replay is not recorded by autograd. Differentiate "
                "inside the function (grad, vjp), pass detached tensors, or call under torch::NoGradGuard");
    auto it = c.id_of.find(t.unsafeGetTensorImpl());
    c.g->inputs.push_back(it != c.id_of.end() ? it->second : c.new_value(t));
  }
  std::vector<at::Tensor> outs;
  {
    Observing observe(&c, who);
    body(outs);
  }
  TORCH_CHECK(c.refusal.empty(), "torchfunc::", who, ": ", c.refusal);
  for (const at::Tensor& t : outs) {
    if (!t.defined()) {
      c.g->outputs.push_back(kNone);
      continue;
    }
    TORCH_CHECK(is_plain(t), "torchfunc::", who, ": the function returned a transform's tensor (escaped?)");
    c.g->outputs.push_back(c.value_of(t, "the function's result"));
  }
  TORCH_CHECK(c.refusal.empty(), "torchfunc::", who, ": ", c.refusal);
  auto& nodes = c.g->nodes;
  for (size_t i = 0; i < c.mark && i < nodes.size(); ++i) c.g->boundary += nodes[i].failed ? 0 : 1;
  nodes.erase(std::remove_if(nodes.begin(), nodes.end(), [](const Node& n) { return n.failed; }), nodes.end());
  return Graph(c.g);
}

// ---- passes ---------------------------------------------------------------------

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


// Storages some op writes (in place, out=): values living in them change
// between two reads, so they are never merged or forwarded.
std::vector<char> written_storages(const GraphImpl& g) {
  int n = 0;
  for (const auto& m : g.meta) n = std::max(n, m.storage + 1);
  std::vector<char> written(n, 0);
  for (const Node& node : g.nodes) {
    const auto& s = node.op.schema();
    for (size_t i = 0; i < node.args.size() && i < s.arguments().size(); ++i) {
      if (!writes(s.arguments()[i])) continue;
      const Arg& a = node.args[i];
      auto mark = [&](int id) {
        if (id != kNone && g.meta[id].storage != kNone) written[g.meta[id].storage] = 1;
      };
      if (a.kind == Arg::Kind::Value) mark(a.value);
      for (int id : a.items) mark(id);
    }
  }
  return written;
}

void eliminate_common_subexpressions(GraphImpl& g) {
  const std::vector<char> written = written_storages(g);
  auto clean = [&](int id) { return g.meta[id].storage == kNone || !written[g.meta[id].storage]; };

  std::vector<int> rename(g.num_values);
  std::iota(rename.begin(), rename.end(), 0);
  std::unordered_map<std::string, size_t> seen;
  std::vector<Node> nodes;
  for (Node& n : g.nodes) {
    for (Arg& a : n.args) {
      if (a.kind == Arg::Kind::Value) a.value = rename[a.value];
      for (int& id : a.items) {
        if (id != kNone) id = rename[id];
      }
    }
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
            key += "%" + std::to_string(a.value) + ";";
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
      if (it != seen.end()) {
        const Node& first = nodes[it->second];
        for (size_t j = 0; j < n.rets.size(); ++j) {
          for (size_t k = 0; k < n.rets[j].ids.size(); ++k) {
            int id = n.rets[j].ids[k];
            if (id != kNone) rename[id] = first.rets[j].ids[k];
          }
        }
        continue;
      }
      seen.emplace(std::move(key), nodes.size());
    }
    nodes.push_back(std::move(n));
  }
  g.nodes = std::move(nodes);
  for (int& id : g.outputs) {
    if (id != kNone) id = rename[id];
  }
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

// A chain of views (view(transpose(t(w)))) is one as_strided of its root: the
// layouts are fixed by the signature, so the result's sizes, strides and
// offset are known. The views in between then die (dead code).
void collapse_views(GraphImpl& g) {
  static const auto as_strided = c10::Dispatcher::singleton().findSchemaOrThrow("aten::as_strided", "");
  std::vector<int> root(g.num_values);
  std::iota(root.begin(), root.end(), 0);
  for (Node& n : g.nodes) {
    if (!is_pure_view(n)) continue;
    const int in = n.args[0].value, out = n.rets[0].ids[0];
    if (out == kNone) continue;
    const int r = root[in];
    const auto& mo = g.meta[out];
    const auto& mr = g.meta[r];
    if (mo.storage == kNone || mo.storage != mr.storage || mo.dtype != mr.dtype || mo.device != mr.device) continue;
    root[out] = r;
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

// x * 1, x / 1, x ** 1 and copies to the same dtype give x itself where the
// layouts agree and nothing writes either storage.
void forward_identities(GraphImpl& g) {
  const std::vector<char> written = written_storages(g);
  auto clean = [&](int id) { return g.meta[id].storage == kNone || !written[g.meta[id].storage]; };
  std::vector<int> rename(g.num_values);
  std::iota(rename.begin(), rename.end(), 0);
  std::vector<Node> nodes;
  for (Node& n : g.nodes) {
    for (Arg& a : n.args) {
      if (a.kind == Arg::Kind::Value) a.value = rename[a.value];
      for (int& id : a.items) {
        if (id != kNone) id = rename[id];
      }
    }
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
      if (clean(in) && clean(out) && a.dtype == b.dtype && a.device == b.device && a.sizes == b.sizes &&
          a.strides == b.strides && a.offset == b.offset) {
        rename[out] = in;
        continue;
      }
    }
    nodes.push_back(std::move(n));
  }
  g.nodes = std::move(nodes);
  for (int& id : g.outputs) {
    if (id != kNone) id = rename[id];
  }
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

}  // namespace detail

// ---- Graph ------------------------------------------------------------------------

const detail::GraphImpl& Graph::impl() const {
  TORCH_CHECK(impl_, "torchfunc::Graph: empty graph (default-constructed)");
  return *impl_;
}
size_t Graph::num_inputs() const { return impl().inputs.size(); }
size_t Graph::num_outputs() const { return impl().outputs.size(); }
size_t Graph::num_nodes() const { return impl().nodes.size(); }
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
  auto v = [&](int id) { return id == detail::kNone ? std::string("None") : "%" + std::to_string(id); };
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
  return s.str();
}

std::vector<at::Tensor> Graph::run(const std::vector<at::Tensor>& inputs) const {
  using detail::Arg;
  using detail::kNone;
  const auto& g = impl();
  TORCH_CHECK(inputs.size() == g.inputs.size(), "torchfunc::Graph::run: expected ", g.inputs.size(),
              " inputs, got ", inputs.size());
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

namespace detail {
void optimize_graph(GraphImpl& g, const CompileOptions& options) {
  if (options.simplify_views) collapse_views(g);
  if (options.forward_identities) forward_identities(g);
  if (options.eliminate_common_subexpressions) eliminate_common_subexpressions(g);
  if (options.eliminate_dead_code) eliminate_dead_code(g);
  if (options.free_after_last_use) plan_releases(g);
  plan_dispatch(g);
}
}  // namespace detail

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
