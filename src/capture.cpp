// src/capture.cpp: capture_graph, the RecordFunction observer that records a
// function's bottom-level ATen calls into a GraphImpl (src/graph.h). See
// include/torchfunc/compile.h, Note [how capture works].
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

bool is_plain(const at::Tensor& t) {
  return !t.defined() || (!at::functorch::isBatchedTensor(t) && !compat::wrapper_of(t) &&
                          !at::functionalization::impl::isFunctionalTensor(t));
}

namespace {

std::string describe(const at::Tensor& t) {
  if (!t.defined()) return "undefined";
  std::ostringstream s;
  s << c10::toString(t.scalar_type()) << t.sizes();
  if (!t.is_cpu()) s << "@" << t.device();
  return s.str();
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
  // Per value: the empty(...) value it is or views, or kNone; that base's
  // contents are unwritten until some recorded op writes it (base_written).
  std::vector<int> empty_base;
  std::vector<char> base_written;
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
    empty_base.push_back(kNone);
    base_written.push_back(0);
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
      const auto backend = c10::DispatchKeySet(c10::computeDispatchKey(t.scalar_type(), t.layout(), t.device()));
      m.backend_only = ks == backend;
      m.plain = (ks - c10::autocast_dispatch_keyset) == backend;
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
        empty_base[id] = empty_base[s->second];
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
    empty_base.push_back(kNone);
    base_written.push_back(0);
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
    base_written[base] = 1;
  }

  // The empty(...) value whose unwritten contents the value shows, or kNone.
  int unwritten(int id) const {
    const int base = empty_base[id];
    return base != kNone && !base_written[base] ? base : kNone;
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
        const int base = id == kNone ? kNone : unwritten(id);
        if (base == kNone) continue;
        if (w) {
          base_written[base] = 1;  // written now (out= / in-place), through a view or not
        } else if (!view) {
          snapshot(base);
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
          empty_base[id] = id;
        } else if (schema.returns()[j].alias_info() && !schema.returns()[j].alias_info()->isWrite()) {
          // A view: unwritten if its base is.
          for (const Arg& a : n.args) {
            if (a.kind != Arg::Kind::Value) continue;
            const int base = unwritten(a.value);
            if (base != kNone) empty_base[id] = base;
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

bool capturing() { return t_capture != nullptr; }

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

}  // namespace detail
}  // namespace torchfunc
