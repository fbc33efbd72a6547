// src/core.cpp: the non-template core of every transform.
//
// Each *_flat function owns one functorch level for exactly its own scope
// (RAII: every exit path, including a user's exception, pops what it pushed),
// wraps the flat inputs for that level, calls back into the header template
// that rebuilds the user's arguments, and unwraps the results BEFORE the level
// is popped (Note [unwrap before pop]).
//
// Note [unwrap before pop]
//   A TensorWrapper of a grad level dies with the level. Unwrapping after the
//   pop loses the link to the outer level's graph: grad(grad(f)) would return
//   zeros instead of failing. So results are unwrapped while the level lives.
//
// Note [grad and vjp interaction with no_grad]
//   As in torch.func: a NoGradGuard *outside* grad(f) does not stop f from
//   being differentiated (we enable grad mode inside the level and record the
//   outer mode on the level, which restores it for outer levels), while a
//   NoGradGuard *inside* f is respected.
//
// Note [one forward-AD level]
//   libtorch 1.13 supports one forward-AD level at a time, process-wide.
//   Like torch.func, every jvp shares dual level 0 (nesting works because
//   each functorch level has its own TensorWrappers); a process-wide count
//   keeps it alive while any thread is inside a jvp.
#include <torchfunc/detail/core.h>

#include <ATen/ATen.h>
#include <c10/core/GradMode.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/forward_grad.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/detail/CUDAHooksInterface.h>

#include <mutex>
#include <sstream>

#include "compat.h"
#include "variable_hooks.h"

namespace torchfunc {
namespace detail {

namespace ft = at::functorch;

size_t layer_depth() { return compat::layer_depth(); }

void fail(const std::string& msg) { TORCH_CHECK(false, "torchfunc::", msg); }

void ensure_batch_rules();              // batch_rules.cpp: rules and decompositions libtorch lacks
void use_allocator_from_environment();  // allocator.cpp: TORCHFUNC_CACHING_ALLOCATOR
void ensure_escape_check();             // escaped.cpp: escaped grad-level tensors raise
void ensure_jvp_decompositions();       // jvp_decompositions.cpp: forward mode through softmax, nll, ...

// What the first transform of the process sets up; every later one pays a
// single static check.
static void setup_once() {
  static const bool done = [] {
    use_allocator_from_environment();
    ensure_escape_check();
    ensure_batch_rules();
    install_variable_hooks();
    return true;
  }();
  (void)done;
}

// ---- small helpers ------------------------------------------------------------

std::vector<std::string> split_field_names(const char* names) {
  std::vector<std::string> out;
  std::string cur;
  for (const char* p = names; *p; ++p) {
    if (*p == ',') {
      out.push_back(cur);
      cur.clear();
    } else if (*p != ' ' && *p != '\t' && *p != '\n') {
      cur += *p;
    }
  }
  out.push_back(cur);
  return out;
}

std::string join_keys(const std::vector<std::string>& keys) {
  std::string s = "[";
  for (size_t i = 0; i < keys.size(); ++i) s += (i ? ", '" : "'") + keys[i] + "'";
  return s + "]";
}

namespace {

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream o;
  o << s;
  return o.str();
}

/// Holds the process-wide transform lock while this thread is inside its
/// outermost transform (only where compat::kSerializeThreads).
class ThreadSerializer {
 public:
  ThreadSerializer() {
    if (compat::kSerializeThreads && depth_++ == 0) mutex().lock();
  }
  ~ThreadSerializer() {
    if (compat::kSerializeThreads && --depth_ == 0) mutex().unlock();
  }

 private:
  static std::mutex& mutex() {
    static std::mutex m;
    return m;
  }
  static thread_local int depth_;
};
thread_local int ThreadSerializer::depth_ = 0;

// The api string of each transform this thread is inside, innermost last
// (for messages raised by code that does not know which transform runs).
thread_local std::vector<const char*> t_transforms;

/// Pushes one functorch level and pops it (and anything left above it) on
/// every exit path.
class LayerGuard {
 public:
  template <class Push>
  LayerGuard(const char* api, Push&& push) : depth_(compat::layer_depth()) {
    setup_once();
    level_ = push();
    t_transforms.push_back(api);
  }
  ~LayerGuard() {
    t_transforms.pop_back();
    while (compat::layer_depth() > depth_) {
      try {
        compat::pop_layer();
      } catch (...) {
        break;
      }
    }
  }
  LayerGuard(const LayerGuard&) = delete;
  LayerGuard& operator=(const LayerGuard&) = delete;
  int64_t level() const { return level_; }

 private:
  ThreadSerializer serializer_;  // constructed first, released last
  size_t depth_;
  int64_t level_ = 0;
};

}  // namespace

const char* innermost_transform() { return t_transforms.empty() ? nullptr : t_transforms.back(); }

namespace {

// Note [one forward-AD level]
std::mutex g_dual_mutex;
int64_t g_dual_refs = 0;

class DualLevelGuard {
 public:
  DualLevelGuard() {
    std::lock_guard<std::mutex> lock(g_dual_mutex);
    if (g_dual_refs == 0) {
      const uint64_t idx = torch::autograd::ForwardADLevel::get_next_idx();
      TORCH_INTERNAL_ASSERT(idx == 0, "torchfunc: unexpected forward-AD level ", idx);
    }
    ++g_dual_refs;
  }
  ~DualLevelGuard() {
    std::lock_guard<std::mutex> lock(g_dual_mutex);
    if (--g_dual_refs == 0) {
      try {
        torch::autograd::ForwardADLevel::release_idx(0);
      } catch (...) {
      }
    }
  }
};

class FwGradModeGuard {
 public:
  explicit FwGradModeGuard(bool enabled) : prev_(c10::AutogradState::get_tls_state().get_fw_grad_mode()) {
    c10::AutogradState::get_tls_state().set_fw_grad_mode(enabled);
  }
  ~FwGradModeGuard() { c10::AutogradState::get_tls_state().set_fw_grad_mode(prev_); }

 private:
  bool prev_;
};

/// Under c10::InferenceMode autograd records nothing, which would make every
/// gradient silently zero. AD transforms leave inference mode for their own
/// scope, so they compute correct results there too.
class AutodiffScope {
 public:
  AutodiffScope() {
    if (c10::InferenceMode::is_enabled()) no_inference_.emplace(false);
  }

 private:
  c10::optional<c10::InferenceMode> no_inference_;
};

bool is_differentiable_dtype(const at::Tensor& t) { return t.is_floating_point() || t.is_complex(); }

/// Wraps every input for grad level `lvl`; diff inputs also require grad.
Tensors wrap_for_grad(const Tensors& inputs, const std::vector<char>& diff, int64_t lvl, const char* api,
                      LeafName name, Tensors& diff_wrapped) {
  Tensors out;
  out.reserve(inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) {
    const at::Tensor& t = inputs[i];
    if (!t.defined()) {
      TORCH_CHECK(!diff[i], "torchfunc::", api, ": cannot differentiate with respect to ", name(i),
                  ", which is an undefined Tensor.");
      out.push_back(t);
      continue;
    }
    at::Tensor w = ft::makeTensorWrapper(t, lvl);
    if (diff[i]) {
      TORCH_CHECK(is_differentiable_dtype(t), "torchfunc::", api,
                  ": only floating-point or complex Tensors can be differentiated, but ", name(i),
                  " has dtype ", t.scalar_type(), ". Pass it as a non-differentiated argument (argnums) "
                  "or convert it with .to(torch::kFloat).");
      InternalRequiresGrad internal;
      w.requires_grad_(true);
      diff_wrapped.push_back(w);
    }
    out.push_back(std::move(w));
  }
  return out;
}

/// torch.autograd.grad that treats unused inputs and outputs that do not
/// require grad as giving zero gradients (never undefined tensors).
Tensors autograd_grad(const Tensors& outputs, const Tensors& inputs, const Tensors& grad_outputs,
                      bool retain_graph, bool create_graph) {
  if (inputs.empty()) return {};
  Tensors outs, gos;
  for (size_t i = 0; i < outputs.size(); ++i) {
    if (outputs[i].requires_grad()) {
      outs.push_back(outputs[i]);
      if (!grad_outputs.empty()) gos.push_back(grad_outputs[i]);
    }
  }
  Tensors result;
  if (outs.empty()) {
    result.reserve(inputs.size());
    for (const auto& in : inputs) result.push_back(at::zeros_like(compat::unwrap_dead(in)));
    return result;
  }
  result = torch::autograd::grad(outs, inputs, gos, retain_graph, create_graph, /*allow_unused=*/true);
  // (Zeros of the plain value where the inputs belong to a popped level: a
  // vjp_fn called after its vjp returned.)
  for (size_t j = 0; j < result.size(); ++j)
    if (!result[j].defined()) result[j] = at::zeros_like(compat::unwrap_dead(inputs[j]));
  return result;
}

void unwrap_all(Tensors& ts, int64_t lvl) {
  for (auto& t : ts)
    if (t.defined()) t = compat::unwrap_grad(t, lvl);
}

void check_tensor_outputs(const FlatResult& res, const char* api) {
  for (size_t k = 0; k < res.num_primary; ++k) {
    TORCH_CHECK(res.leaves[k].defined(), "torchfunc::", api, ": output ", k,
                " of f is an undefined Tensor; every output must be a defined Tensor.");
  }
}

}  // namespace

// ---- grad ----------------------------------------------------------------------

GradOut grad_flat(const Tensors& inputs, const std::vector<char>& diff, FlatFn f, const char* api,
                  LeafName name) {
  AutodiffScope autodiff;
  const bool prev_grad_mode = c10::GradMode::is_enabled();
  LayerGuard layer(api, [&] { return compat::push_grad_layer(prev_grad_mode); });
  const int64_t lvl = layer.level();
  c10::AutoGradMode enable_grad(true);  // Note [grad and vjp interaction with no_grad]

  Tensors diff_wrapped;
  Tensors wrapped = wrap_for_grad(inputs, diff, lvl, api, name, diff_wrapped);
  TORCH_CHECK(!diff_wrapped.empty(), "torchfunc::", api,
              ": the arguments selected by argnums contain no Tensors to differentiate.");
  FlatResult res;
  f(wrapped, res);
  TORCH_CHECK(res.leaves[0].defined(), "torchfunc::", api,
              ": Expected f(*args) to return a Tensor, got an undefined Tensor.");
  const at::Tensor& out = res.leaves[0];
  TORCH_CHECK(out.dim() == 0, "torchfunc::", api,
              ": Expected f(*args) to return a scalar Tensor, got tensor with ", out.dim(), " dims (shape ",
              shape_str(out.sizes()), "). Maybe you wanted to use the vjp or jacrev APIs instead?");
  TORCH_CHECK(is_differentiable_dtype(out), "torchfunc::", api,
              ": Expected f(*args) to return a floating-point or complex Tensor, got dtype ",
              out.scalar_type(), ".");
  Tensors g = autograd_grad({out}, diff_wrapped, {}, /*retain_graph=*/false, /*create_graph=*/true);

  GradOut result;
  result.grads.resize(inputs.size());
  for (size_t i = 0, j = 0; i < inputs.size(); ++i)
    if (diff[i]) result.grads[i] = compat::unwrap_grad(g[j++], lvl);
  result.outputs = std::move(res.leaves);
  unwrap_all(result.outputs, lvl);  // Note [unwrap before pop]
  return result;
}

// ---- vjp -----------------------------------------------------------------------

struct VjpState {
  Tensors outputs;          // wrapped, primary only
  Tensors inputs;           // wrapped diff inputs
  std::vector<size_t> where;  // position of each diff input in the flat inputs
  size_t num_inputs = 0;
  std::vector<std::vector<int64_t>> out_sizes;
};

VjpOut vjp_flat(const Tensors& inputs, const std::vector<char>& diff, FlatFn f, const char* api,
                LeafName name) {
  AutodiffScope autodiff;
  const bool prev_grad_mode = c10::GradMode::is_enabled();
  LayerGuard layer(api, [&] { return compat::push_grad_layer(prev_grad_mode); });
  const int64_t lvl = layer.level();
  c10::AutoGradMode enable_grad(true);  // Note [grad and vjp interaction with no_grad]

  auto state = std::make_shared<VjpState>();
  state->num_inputs = inputs.size();
  Tensors wrapped = wrap_for_grad(inputs, diff, lvl, api, name, state->inputs);
  for (size_t i = 0; i < inputs.size(); ++i)
    if (diff[i] && inputs[i].defined()) state->where.push_back(i);
  FlatResult res;
  f(wrapped, res);
  TORCH_CHECK(res.num_primary > 0, "torchfunc::", api,
              ": Expected f to return at least one Tensor, got none.");
  check_tensor_outputs(res, api);
  VjpOut out;
  for (size_t k = 0; k < res.num_primary; ++k) {
    const at::Tensor& o = res.leaves[k];
    TORCH_CHECK(is_differentiable_dtype(o), "torchfunc::", api,
                ": All outputs of f must be floating-point or complex Tensors, got Tensor with dtype ",
                o.scalar_type(), " at output ", k, ".");
    state->outputs.push_back(o);
    state->out_sizes.push_back(o.sizes().vec());
    out.outputs.push_back(compat::unwrap_grad(o, lvl));
  }
  for (size_t k = res.num_primary; k < res.leaves.size(); ++k)
    out.aux.push_back(res.leaves[k].defined() ? compat::unwrap_grad(res.leaves[k], lvl) : res.leaves[k]);
  out.state = std::move(state);
  return out;
}

Tensors vjp_apply(const VjpState& s, const Tensors& cts, LeafName ct_name) {
  TORCH_CHECK(cts.size() == s.outputs.size(), "torchfunc::vjp(f, *primals): vjp_fn(cotangents): Expected ",
              s.outputs.size(), " cotangent Tensors (one per output of f), got ", cts.size(), ".");
  for (size_t k = 0; k < cts.size(); ++k) {
    TORCH_CHECK(cts[k].defined(), "torchfunc::vjp(f, *primals): vjp_fn(cotangents): ", ct_name(k), " is an undefined Tensor.");
    TORCH_CHECK(cts[k].sizes().vec() == s.out_sizes[k], "torchfunc::vjp(f, *primals): vjp_fn(cotangents): Expected ",
                ct_name(k), " to have the shape of the corresponding output of f, ",
                shape_str(s.out_sizes[k]), ", but got ", shape_str(cts[k].sizes()), ".");
  }
  const bool create_graph = c10::GradMode::is_enabled();
  Tensors g = autograd_grad(s.outputs, s.inputs, cts, /*retain_graph=*/true, create_graph);
  Tensors result(s.num_inputs);
  for (size_t j = 0; j < g.size(); ++j) result[s.where[j]] = compat::unwrap_dead(g[j]);
  return result;
}

// ---- jvp -----------------------------------------------------------------------

JvpOut jvp_flat(const Tensors& primals, const std::vector<char>& diff, const Tensors& tangents, FlatFn f,
                const char* api, LeafName name) {
  AutodiffScope autodiff;
  const bool prev_fwd = c10::AutogradState::get_tls_state().get_fw_grad_mode();
  ensure_jvp_decompositions();
  LayerGuard layer(api, [&] { return compat::push_jvp_layer(prev_fwd); });
  const int64_t lvl = layer.level();
  DualLevelGuard dual;  // Note [one forward-AD level]
  FwGradModeGuard fw(true);

  Tensors in;
  in.reserve(primals.size());
  for (size_t i = 0; i < primals.size(); ++i) {
    if (!diff[i]) {
      // Wrapped at this level too (as torch.func does), so f may write into
      // them in place (e.g. y.copy_(x) under jacfwd); their tangent is zero.
      in.push_back(primals[i].defined() ? ft::makeTensorWrapper(primals[i], lvl) : primals[i]);
      continue;
    }
    const at::Tensor& p = primals[i];
    const at::Tensor& t = tangents[i];
    TORCH_CHECK(p.defined(), "torchfunc::", api, ": primal ", name(i), " is an undefined Tensor.");
    TORCH_CHECK(t.defined(), "torchfunc::", api, ": the tangent for ", name(i), " is an undefined Tensor.");
    TORCH_CHECK(is_differentiable_dtype(p), "torchfunc::", api,
                ": only floating-point or complex primals can have tangents, but ", name(i), " has dtype ",
                p.scalar_type(), ".");
    TORCH_CHECK(p.sizes().equals(t.sizes()), "torchfunc::", api,
                ": Expected each tangent to have the shape of its primal, but ", name(i), " has shape ",
                shape_str(p.sizes()), " and its tangent has shape ", shape_str(t.sizes()), ".");
    TORCH_CHECK(p.scalar_type() == t.scalar_type(), "torchfunc::", api,
                ": Expected each tangent to have the dtype of its primal, but ", name(i), " has dtype ",
                p.scalar_type(), " and its tangent has dtype ", t.scalar_type(), ".");
    in.push_back(at::_make_dual(ft::makeTensorWrapper(p, lvl), ft::makeTensorWrapper(t, lvl), 0));
  }
  FlatResult res;
  f(in, res);
  TORCH_CHECK(res.num_primary > 0, "torchfunc::", api, ": Expected f to return at least one Tensor, got none.");
  check_tensor_outputs(res, api);
  JvpOut out;
  for (size_t k = 0; k < res.num_primary; ++k) {
    auto unpacked = at::_unpack_dual(res.leaves[k], 0);
    at::Tensor primal = std::get<0>(unpacked);
    at::Tensor tangent = std::get<1>(unpacked);
    if (!tangent.defined()) tangent = at::zeros_like(primal);
    out.outputs.push_back(compat::unwrap_grad(primal, lvl));
    out.tangents.push_back(compat::unwrap_grad(tangent, lvl));
  }
  for (size_t k = res.num_primary; k < res.leaves.size(); ++k) {
    const at::Tensor& a = res.leaves[k];
    out.aux.push_back(a.defined() ? compat::unwrap_grad(std::get<0>(at::_unpack_dual(a, 0)), lvl) : a);
  }
  return out;
}

// ---- linearize -------------------------------------------------------------------
//
// J·t without re-running f: g(u) = J^T u is linear in u, so d<g(u), t>/du = J t.
// We record g(u) for a dummy cotangent u with create_graph, then each call
// differentiates g w.r.t. u with grad_outputs t.

struct LinearizeState {
  Tensors u;        // dummy cotangents (wrapped), one per output
  Tensors g;        // J^T u (wrapped), one per input
  Tensors outputs;  // unwrapped, for zeros
  std::vector<std::vector<int64_t>> in_sizes;
  std::vector<at::ScalarType> in_dtypes;
};

LinearizeOut linearize_flat(const Tensors& primals, FlatFn f, LeafName name) {
  const char* api = "linearize(f, *primals)";
  AutodiffScope autodiff;
  const bool prev_grad_mode = c10::GradMode::is_enabled();
  LayerGuard layer(api, [&] { return compat::push_grad_layer(prev_grad_mode); });
  const int64_t lvl = layer.level();
  c10::AutoGradMode enable_grad(true);

  std::vector<char> diff(primals.size(), 1);
  Tensors ins;
  Tensors wrapped = wrap_for_grad(primals, diff, lvl, api, name, ins);
  FlatResult res;
  f(wrapped, res);
  TORCH_CHECK(res.num_primary > 0, "torchfunc::", api, ": Expected f to return at least one Tensor.");
  check_tensor_outputs(res, api);
  auto state = std::make_shared<LinearizeState>();
  Tensors outs(res.leaves.begin(), res.leaves.begin() + res.num_primary);
  for (const auto& o : outs) {
    TORCH_CHECK(is_differentiable_dtype(o), "torchfunc::", api,
                ": All outputs of f must be floating-point or complex Tensors, got dtype ", o.scalar_type(), ".");
    InternalRequiresGrad internal;
    state->u.push_back(at::zeros_like(o).requires_grad_(true));
  }
  for (const auto& p : primals) {
    state->in_sizes.push_back(p.sizes().vec());
    state->in_dtypes.push_back(p.scalar_type());
  }
  state->g = autograd_grad(outs, ins, state->u, /*retain_graph=*/true, /*create_graph=*/true);
  LinearizeOut out;
  for (const auto& o : outs) out.outputs.push_back(compat::unwrap_grad(o, lvl));
  state->outputs = out.outputs;
  out.state = std::move(state);
  return out;
}

Tensors linearize_apply(const LinearizeState& s, const Tensors& tangents, LeafName name) {
  const char* api = "linearize: jvp_fn(*tangents)";
  TORCH_CHECK(tangents.size() == s.g.size(), "torchfunc::", api, ": Expected ", s.g.size(),
              " tangent Tensors, got ", tangents.size(), ".");
  Tensors gs, ts;
  for (size_t j = 0; j < tangents.size(); ++j) {
    TORCH_CHECK(tangents[j].defined(), "torchfunc::", api, ": ", name(j), " is an undefined Tensor.");
    TORCH_CHECK(tangents[j].sizes().vec() == s.in_sizes[j], "torchfunc::", api, ": Expected ", name(j),
                " to have the shape of its primal, ", shape_str(s.in_sizes[j]), ", but got ",
                shape_str(tangents[j].sizes()), ".");
    TORCH_CHECK(tangents[j].scalar_type() == s.in_dtypes[j], "torchfunc::", api, ": Expected ", name(j),
                " to have the dtype of its primal, ", s.in_dtypes[j], ", but got ", tangents[j].scalar_type(),
                ".");
    if (s.g[j].requires_grad()) {
      gs.push_back(s.g[j]);
      ts.push_back(tangents[j]);
    }
  }
  Tensors r;
  if (gs.empty()) {
    for (const auto& o : s.outputs) r.push_back(at::zeros_like(o));
    return r;
  }
  r = torch::autograd::grad(gs, s.u, ts, /*retain_graph=*/true, c10::GradMode::is_enabled(),
                            /*allow_unused=*/true);
  for (size_t k = 0; k < r.size(); ++k)
    r[k] = r[k].defined() ? compat::unwrap_dead(r[k]) : at::zeros_like(s.outputs[k]);
  return r;
}

// ---- vmap ----------------------------------------------------------------------

void dims_fail(const DimsCtx& ctx, const std::string& problem) {
  fail(std::string(ctx.api) + "(f, " + ctx.what + "=" + ctx.whole->str() + ", ...)(<inputs>): " + problem);
}

namespace {

ft::RandomnessType to_functorch(Randomness r) {
  switch (r) {
    case Randomness::Same:
      return ft::RandomnessType::Same;
    case Randomness::Different:
      return ft::RandomnessType::Different;
    case Randomness::Error:
    default:
      return ft::RandomnessType::Error;
  }
}

/// The default generators' states (CPU, and every CUDA device's), restored
/// before each chunk of a chunked vmap with randomness Same: "same" means
/// every sample of the whole batch sees the same random values, so every
/// chunk must draw what the first one drew (torch.func does this too).
class RngSnapshot {
 public:
  RngSnapshot() {
    gens_.push_back(at::detail::getDefaultCPUGenerator());
    if (at::globalContext().hasCUDA()) {
      const auto n = static_cast<c10::DeviceIndex>(at::detail::getCUDAHooks().getNumGPUs());
      for (c10::DeviceIndex d = 0; d < n; ++d) gens_.push_back(at::globalContext().defaultGenerator(c10::Device(at::kCUDA, d)));
    }
    for (auto& g : gens_) {
      std::lock_guard<std::mutex> lock(g.mutex());
      states_.push_back(g.get_state());
    }
  }
  void restore() const {
    for (size_t i = 0; i < gens_.size(); ++i) {
      at::Generator g = gens_[i];
      std::lock_guard<std::mutex> lock(g.mutex());
      g.set_state(states_[i]);
    }
  }

 private:
  std::vector<at::Generator> gens_;
  std::vector<at::Tensor> states_;
};

std::string vmap_prefix(const VmapConfig& cfg) {
  if (cfg.describe) return cfg.describe(cfg.describe_arg);
  return std::string(cfg.api) + "(f, ...)";
}

/// One vmap level over already-sized inputs. Returns the outputs with their
/// batch dims moved to the normalised out_dims (written to `out_dims`).
Tensors vmap_once(const Tensors& inputs, const std::vector<OptDim>& dims, int64_t batch, const VmapConfig& cfg,
                  FlatFn f, std::vector<OptDim>& out_dims) {
  LayerGuard layer(cfg.api, [&] { return compat::push_vmap_layer(batch, to_functorch(cfg.randomness)); });
  const int64_t lvl = layer.level();
  Tensors batched;
  batched.reserve(inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i)
    batched.push_back(dims[i] ? ft::addBatchDim(inputs[i], *dims[i], lvl) : inputs[i]);
  FlatResult res;
  f(batched, res);
  TORCH_INTERNAL_ASSERT(res.out_dims.size() == res.leaves.size());
  Tensors outs;
  outs.reserve(res.leaves.size());
  out_dims.assign(res.leaves.size(), c10::nullopt);
  for (size_t k = 0; k < res.leaves.size(); ++k) {
    const at::Tensor& t = res.leaves[k];
    TORCH_CHECK(t.defined(), "torchfunc::", vmap_prefix(cfg), "(<inputs>): output ", k,
                " of f is an undefined Tensor.");
    auto* b = compat::batched_at(t, lvl);
    const OptDim od = res.out_dims[k];
    if (!od) {
      TORCH_CHECK(!b, "torchfunc::", vmap_prefix(cfg), "(<inputs>): output ", k,
                  " of f has out_dim=none, but it depends on the mapped inputs (it is batched). "
                  "Use an integer out_dim for it.");
      outs.push_back(t);
      continue;
    }
    const int64_t rank = t.dim() + 1;  // logical rank plus the batch dim
    int64_t d = *od;
    TORCH_CHECK(d >= -rank && d < rank, "torchfunc::", vmap_prefix(cfg), "(<inputs>): out_dim=", d,
                " for output ", k, " is out of range: the output has ", t.dim(),
                " dims per sample, so out_dim must satisfy ", -rank, " <= out_dim < ", rank, ".");
    if (d < 0) d += rank;
    out_dims[k] = d;
    if (b) {
      // (The value itself when no move is needed: an in-place op on an input
      // returns that input, as in torch.func.)
      outs.push_back(b->bdim() == d ? b->value() : b->value().movedim(b->bdim(), d));
    } else {
      // Not batched at this level: every sample gets the same value.
      std::vector<int64_t> sizes = t.sizes().vec();
      sizes.insert(sizes.begin() + d, batch);
      outs.push_back(t.unsqueeze(d).expand(sizes));
    }
  }
  return outs;
}

}  // namespace

Tensors vmap_flat(const Tensors& inputs, const std::vector<OptDim>& in_dims, const VmapConfig& cfg, FlatFn f,
                  LeafName name) {
  TORCH_INTERNAL_ASSERT(in_dims.size() == inputs.size());
  std::vector<OptDim> dims(inputs.size());
  int64_t batch = -1;
  bool mismatch = false;
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (!in_dims[i]) continue;
    const at::Tensor& t = inputs[i];
    TORCH_CHECK(t.defined(), "torchfunc::", vmap_prefix(cfg), "(<inputs>): ", name(i),
                " is an undefined Tensor but its in_dim is ", *in_dims[i], ".");
    const int64_t rank = t.dim();
    int64_t d = *in_dims[i];
    TORCH_CHECK(d >= -rank && d < rank, "torchfunc::", vmap_prefix(cfg), "(<inputs>): Got in_dim=", d, " for ",
                name(i), ", but that input is a Tensor of dimensionality ", rank,
                " so expected in_dim to satisfy -", rank, " <= in_dim < ", rank, ".");
    if (d < 0) d += rank;
    dims[i] = d;
    const int64_t n = t.size(d);
    if (batch < 0) batch = n;
    mismatch = mismatch || n != batch;
  }
  TORCH_CHECK(batch >= 0, "torchfunc::", vmap_prefix(cfg),
              "(<inputs>): Expected at least one Tensor to vmap over, but every in_dim is none "
              "(or there are no Tensor inputs).");
  if (mismatch) {
    std::string sizes;
    for (size_t i = 0; i < inputs.size(); ++i)
      if (dims[i]) sizes += "\n  " + name(i) + " (in_dim=" + std::to_string(*dims[i]) + "): " +
                            std::to_string(inputs[i].size(*dims[i]));
    fail(vmap_prefix(cfg) + "(<inputs>): Expected all tensors to have the same size in the mapped "
         "dimension, got:" + sizes);
  }
  std::vector<OptDim> out_dims;
  const auto cs = cfg.chunk_size;
  TORCH_CHECK(!cs || *cs > 0, "torchfunc::", vmap_prefix(cfg), ": chunk_size must be a positive integer, got ",
              cs ? *cs : 0, ".");
  if (!cs || *cs >= batch) return vmap_once(inputs, dims, batch, cfg, f, out_dims);

  // Chunked: run each slice of the batch at its own level, then concatenate.
  c10::optional<RngSnapshot> rng;
  if (cfg.randomness == Randomness::Same) rng.emplace();
  std::vector<Tensors> chunks;
  for (int64_t start = 0; start < batch; start += *cs) {
    if (rng && start > 0) rng->restore();
    const int64_t len = std::min(*cs, batch - start);
    Tensors part;
    part.reserve(inputs.size());
    for (size_t i = 0; i < inputs.size(); ++i)
      part.push_back(dims[i] ? inputs[i].narrow(*dims[i], start, len) : inputs[i]);
    std::vector<OptDim> od;
    chunks.push_back(vmap_once(part, dims, len, cfg, f, od));
    TORCH_CHECK(chunks.size() == 1 || (chunks.back().size() == chunks.front().size() && od == out_dims),
                "torchfunc::", vmap_prefix(cfg), ": f returned differently structured outputs for different "
                "chunks of the batch.");
    out_dims = std::move(od);
  }
  Tensors outs;
  for (size_t k = 0; k < chunks.front().size(); ++k) {
    if (!out_dims[k]) {
      outs.push_back(chunks.front()[k]);
      continue;
    }
    Tensors parts;
    parts.reserve(chunks.size());
    for (auto& c : chunks) parts.push_back(std::move(c[k]));
    outs.push_back(at::cat(parts, *out_dims[k]));
  }
  return outs;
}

// ---- jacobians -------------------------------------------------------------------

namespace {

std::vector<int64_t> concat_shapes(at::IntArrayRef a, at::IntArrayRef b) {
  std::vector<int64_t> s(a.begin(), a.end());
  s.insert(s.end(), b.begin(), b.end());
  return s;
}

/// Rows [0, total) of the identity split into column blocks of `numels`,
/// block k shaped [total, *shapes[k]] (torch.func's standard basis).
Tensors standard_basis(const Tensors& like, const std::vector<int64_t>& numels, int64_t total) {
  Tensors basis;
  int64_t offset = 0;
  for (size_t k = 0; k < like.size(); ++k) {
    at::Tensor b = at::zeros({total, numels[k]}, like[k].options());
    if (numels[k] > 0) b.diagonal(-offset).fill_(1);
    basis.push_back(b.view(concat_shapes({total}, like[k].sizes())));
    offset += numels[k];
  }
  return basis;
}

}  // namespace

namespace {
// As torch.func: Jacobians of complex functions are not defined by these
// transforms (there is no holomorphic option); a clear error instead of a
// Jacobian of some convention.
void check_real_for_jacobian(const at::Tensor& t, const char* api, const char* what, const std::string& leaf) {
  TORCH_CHECK(!t.is_complex(), "torchfunc::", api, ": Expected all ", what, " to be real but received complex "
              "tensor at ", leaf, " (dtype ", t.scalar_type(), "). Jacobians of complex functions are not "
              "supported; split it into real and imaginary parts (torch::view_as_real).");
}
}  // namespace

JacOut jacrev_flat(const Tensors& inputs, const std::vector<char>& diff, FlatFn f,
                   c10::optional<int64_t> chunk_size, const char* api, LeafName name) {
  TORCH_CHECK(!chunk_size || *chunk_size > 0, "torchfunc::", api,
              ": Expected chunk_size to be a positive integer.");
  for (size_t i = 0; i < inputs.size(); ++i)
    if (diff[i] && inputs[i].defined()) check_real_for_jacobian(inputs[i], api, "inputs", name(i));
  VjpOut v = vjp_flat(inputs, diff, f, api, name);
  const Tensors& outs = v.outputs;
  for (size_t k = 0; k < outs.size(); ++k)
    check_real_for_jacobian(outs[k], api, "outputs", "output " + std::to_string(k));
  std::vector<int64_t> numels;
  int64_t total = 0;
  for (const auto& o : outs) {
    numels.push_back(o.numel());
    total += o.numel();
  }
  const std::vector<size_t>& where = v.state->where;
  JacOut j;
  j.outputs = outs;
  j.aux = v.aux;
  j.jac.assign(outs.size(), Tensors(inputs.size()));
  std::vector<Tensors> per_input(where.size());  // chunks of [rows, *in.shape]

  if (total > 0) {
    Tensors basis = standard_basis(outs, numels, total);
    const int64_t cs = chunk_size ? std::min(*chunk_size, total) : total;
    auto nothing = [](size_t i) { return "cotangents[" + std::to_string(i) + "]"; };
    for (int64_t start = 0; start < total; start += cs) {
      const int64_t len = std::min(cs, total - start);
      if (cs == 1) {  // a plain loop: no vmap, as torch.func does for chunk_size=1
        Tensors cts;
        for (const auto& b : basis) cts.push_back(b.select(0, start));
        Tensors g = vjp_apply(*v.state, cts, nothing);
        for (size_t q = 0; q < where.size(); ++q) per_input[q].push_back(g[where[q]].unsqueeze(0));
        continue;
      }
      Tensors cts;
      for (const auto& b : basis) cts.push_back(b.narrow(0, start, len));
      std::vector<OptDim> in0(cts.size(), int64_t{0});
      auto pull = [&](Tensors& batched, FlatResult& res) {
        Tensors g = vjp_apply(*v.state, batched, nothing);
        for (size_t q = 0; q < where.size(); ++q) res.leaves.push_back(g[where[q]]);
        res.num_primary = res.leaves.size();
        res.out_dims.assign(res.leaves.size(), int64_t{0});
      };
      VmapConfig cfg;
      cfg.api = api;
      Tensors r = vmap_flat(cts, in0, cfg, pull, nothing);
      for (size_t q = 0; q < where.size(); ++q) per_input[q].push_back(r[q]);
    }
  }
  for (size_t q = 0; q < where.size(); ++q) {
    const at::Tensor& in = inputs[where[q]];
    at::Tensor all;
    if (total == 0) {
      all = at::zeros(concat_shapes({0}, in.sizes()), in.options());
    } else {
      all = per_input[q].size() == 1 ? per_input[q][0] : at::cat(per_input[q], 0);
    }
    auto parts = all.split_with_sizes(numels, 0);
    for (size_t k = 0; k < outs.size(); ++k)
      j.jac[k][where[q]] = parts[k].reshape(concat_shapes(outs[k].sizes(), in.sizes()));
  }
  return j;
}

JacOut jacfwd_flat(const Tensors& inputs, const std::vector<char>& diff, FlatFn f, Randomness randomness,
                   const char* api, LeafName name) {
  std::vector<size_t> where;
  Tensors diff_inputs;
  std::vector<int64_t> numels;
  int64_t total = 0;
  for (size_t i = 0; i < inputs.size(); ++i) {
    if (!diff[i]) continue;
    TORCH_CHECK(inputs[i].defined(), "torchfunc::", api, ": cannot differentiate with respect to ", name(i),
                ", which is an undefined Tensor.");
    TORCH_CHECK(is_differentiable_dtype(inputs[i]), "torchfunc::", api,
                ": only floating-point or complex Tensors can be differentiated, but ", name(i), " has dtype ",
                inputs[i].scalar_type(), ".");
    check_real_for_jacobian(inputs[i], api, "inputs", name(i));
    where.push_back(i);
    diff_inputs.push_back(inputs[i]);
    numels.push_back(inputs[i].numel());
    total += inputs[i].numel();
  }
  TORCH_CHECK(!where.empty(), "torchfunc::", api,
              ": the arguments selected by argnums contain no Tensors to differentiate.");
  TORCH_CHECK(total > 0, "torchfunc::", api,
              ": the Tensors to differentiate have no elements; the Jacobian would be empty.");
  Tensors basis = standard_basis(diff_inputs, numels, total);
  std::vector<OptDim> in0(basis.size(), int64_t{0});
  size_t num_out = 0;
  auto push = [&](Tensors& batched, FlatResult& res) {
    Tensors tangents(inputs.size());
    for (size_t q = 0; q < where.size(); ++q) tangents[where[q]] = batched[q];
    JvpOut o = jvp_flat(inputs, diff, tangents, f, api, name);
    for (size_t k = 0; k < o.outputs.size(); ++k)
      check_real_for_jacobian(o.outputs[k], api, "outputs", "output " + std::to_string(k));
    num_out = o.tangents.size();
    res.leaves = std::move(o.tangents);
    res.num_primary = num_out;
    for (auto& a : o.aux) res.leaves.push_back(std::move(a));
    res.out_dims.assign(res.leaves.size(), int64_t{0});
  };
  VmapConfig cfg;
  cfg.api = api;
  cfg.randomness = randomness;
  Tensors r = vmap_flat(basis, in0, cfg, push, name);
  JacOut j;
  j.jac.assign(num_out, Tensors(inputs.size()));
  for (size_t k = 0; k < num_out; ++k) {
    at::IntArrayRef out_shape = r[k].sizes().slice(1);
    auto parts = r[k].movedim(0, -1).split_with_sizes(numels, -1);
    for (size_t q = 0; q < where.size(); ++q)
      j.jac[k][where[q]] = parts[q].reshape(concat_shapes(out_shape, inputs[where[q]].sizes()));
  }
  for (size_t a = num_out; a < r.size(); ++a) j.aux.push_back(r[a].select(0, 0));
  return j;
}

}  // namespace detail

std::string Dims::str() const {
  switch (kind_) {
    case Kind::Int:
      return std::to_string(value_);
    case Kind::None:
      return "none";
    case Kind::Seq: {
      std::string s = "(";
      for (size_t i = 0; i < children_.size(); ++i) s += (i ? ", " : "") + children_[i].str();
      return s + (children_.size() == 1 ? ",)" : ")");
    }
    case Kind::Dict: {
      std::string s = "{";
      for (size_t i = 0; i < children_.size(); ++i)
        s += (i ? ", '" : "'") + keys_[i] + "': " + children_[i].str();
      return s + "}";
    }
  }
  return "?";
}

}  // namespace torchfunc
