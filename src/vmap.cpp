// src/vmap.cpp: the flat core of vmap: in_dims checks, one vmap level per call
// (or per chunk), out_dims, randomness "same" across chunks, and Dims
// printing for messages. Not here: batching rules (batch_rules/).
#include "levels.h"

#include "fallback_scope.h"

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/detail/CUDAHooksInterface.h>

namespace torchfunc {
namespace detail {

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

/// Why libtorch could not batch f, when the reason is that f depends on the
/// data (what sequential_fallback loops over); null for any other error.
const char* data_dependent_reason(const std::string& msg) {
  if (msg.find("calling .item() on a Tensor") != std::string::npos) return ".item()";
  if (msg.find("data-dependent control flow") != std::string::npos) return "data-dependent control flow";
  if (msg.find("dynamic shape") != std::string::npos || msg.find("differently shaped") != std::string::npos)
    return "data-dependent shape";
  if (msg.find("We could not generate a fallback") != std::string::npos) return "no batching rule or fallback";
  if (msg.find("would take different paths for different samples") != std::string::npos)
    return "torch::equal differing between samples";
  return nullptr;
}

/// Some of libtorch's vmap errors do not say what to do in torchfunc's terms:
/// the innermost torchfunc transform adds a line that does (once).
void add_hint(c10::Error& e, const VmapConfig& cfg) {
  for (const auto& c : e.context())
    if (c.rfind("torchfunc::", 0) == 0) return;
  const std::string msg = e.msg();
  const std::string api = cfg.describe ? vmap_prefix(cfg) : std::string(cfg.api);
  if (msg.find("called random operation while in randomness error mode") != std::string::npos) {
    const bool fwd = api.rfind("jacfwd", 0) == 0 || api.rfind("hessian", 0) == 0;
    e.add_context("torchfunc::" + api + ": f drew random numbers under randomness 'error' (the default); pass " +
                  (fwd ? "JacfwdOptions()" : "VmapOptions()") +
                  ".randomness(Randomness::Same) or (Randomness::Different), or draw them outside the transform.");
  } else if (const char* reason = data_dependent_reason(msg); reason && cfg.describe && !cfg.sequential_fallback) {
    e.add_context("torchfunc::" + api + ": f depends on the values of its inputs here (" + reason +
                  "); VmapOptions().sequential_fallback(true) runs it once per sample instead.");
  } else if (msg.find("doesn't match the broadcast shape") != std::string::npos) {
    e.add_context("torchfunc::" + api + ": if an in-place op wrote a batched value into a Tensor that is not "
                  "batched (created outside vmap, or passed with in_dim none), use the out-of-place op instead.");
  }
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
  try {
    FallbackScope count_fallbacks([&cfg] { return vmap_prefix(cfg); });
    f(batched, res);
  } catch (c10::Error& e) {
    add_hint(e, cfg);
    throw;
  }
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

/// f once per sample, outside any new level, the results stacked at their
/// out_dims: what vmap means, computed as a loop.
Tensors vmap_sequential(const Tensors& inputs, const std::vector<OptDim>& dims, int64_t batch,
                        const VmapConfig& cfg, FlatFn f, std::vector<OptDim>& out_dims,
                        const c10::optional<RngSnapshot>& rng) {
  std::vector<Tensors> per_output;
  for (int64_t i = 0; i < batch; ++i) {
    if (rng && cfg.randomness == Randomness::Same) rng->restore();  // every sample draws the same
    Tensors sample;
    sample.reserve(inputs.size());
    for (size_t j = 0; j < inputs.size(); ++j) sample.push_back(dims[j] ? inputs[j].select(*dims[j], i) : inputs[j]);
    FlatResult res;
    f(sample, res);
    TORCH_INTERNAL_ASSERT(res.out_dims.size() == res.leaves.size());
    if (i == 0) {
      per_output.resize(res.leaves.size());
      out_dims.assign(res.leaves.size(), c10::nullopt);
    }
    TORCH_CHECK(res.leaves.size() == per_output.size(), "torchfunc::", vmap_prefix(cfg),
                ": with sequential_fallback, f returned differently structured outputs for different samples.");
    for (size_t k = 0; k < res.leaves.size(); ++k) {
      const at::Tensor& t = res.leaves[k];
      TORCH_CHECK(t.defined(), "torchfunc::", vmap_prefix(cfg), "(<inputs>): output ", k,
                  " of f is an undefined Tensor.");
      if (i == 0 && res.out_dims[k]) {
        const int64_t rank = t.dim() + 1;
        int64_t d = *res.out_dims[k];
        TORCH_CHECK(d >= -rank && d < rank, "torchfunc::", vmap_prefix(cfg), "(<inputs>): out_dim=", d,
                    " for output ", k, " is out of range: the output has ", t.dim(),
                    " dims per sample, so out_dim must satisfy ", -rank, " <= out_dim < ", rank, ".");
        out_dims[k] = d < 0 ? d + rank : d;
      }
      if (i == 0 || out_dims[k]) per_output[k].push_back(t);
    }
  }
  Tensors outs;
  for (size_t k = 0; k < per_output.size(); ++k) {
    if (!out_dims[k]) {
      outs.push_back(per_output[k][0]);
      continue;
    }
    // Differing shapes (nonzero's) cannot be stacked: say so in vmap's terms.
    for (const auto& t : per_output[k])
      TORCH_CHECK(t.sizes() == per_output[k][0].sizes(), "torchfunc::", vmap_prefix(cfg), ": with "
                  "sequential_fallback, output ", k, " of f has shape ", t.sizes(), " for one sample and ",
                  per_output[k][0].sizes(), " for sample 0; vmap's result stacks them, so every sample's output "
                  "must have the same shape.");
    outs.push_back(at::stack(per_output[k], *out_dims[k]));
  }
  return outs;
}

/// One vmap level, or with sequential_fallback and an f that depends on
/// the data, a loop over the samples.
Tensors vmap_level(const Tensors& inputs, const std::vector<OptDim>& dims, int64_t batch, const VmapConfig& cfg,
                   FlatFn f, std::vector<OptDim>& out_dims) {
  if (!cfg.sequential_fallback) return vmap_once(inputs, dims, batch, cfg, f, out_dims);
  c10::optional<RngSnapshot> rng;
  if (cfg.randomness != Randomness::Error) rng.emplace();
  const char* reason = nullptr;
  try {
    return vmap_once(inputs, dims, batch, cfg, f, out_dims);
  } catch (const c10::Error& e) {
    reason = data_dependent_reason(e.msg());
    if (!reason) throw;
  }
  count_own_fallback(std::string("vmap sequential fallback: ") + reason, vmap_prefix(cfg));
  if (rng) rng->restore();  // the failed batched attempt drew nothing for the loop
  return vmap_sequential(inputs, dims, batch, cfg, f, out_dims, rng);
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
  if (cfg.axis_size) {
    TORCH_CHECK(batch < 0 || batch == *cfg.axis_size, "torchfunc::", vmap_prefix(cfg),
                "(<inputs>): axis_size=", *cfg.axis_size, " but the mapped inputs have size ", batch,
                " in the mapped dimension; leave axis_size unset when inputs are mapped, or make them agree.");
    batch = *cfg.axis_size;
  }
  TORCH_CHECK(batch >= 0, "torchfunc::", vmap_prefix(cfg),
              "(<inputs>): Expected at least one Tensor to vmap over, but every in_dim is none "
              "(or there are no Tensor inputs). To run f over a batch with nothing mapped, give "
              "VmapOptions().axis_size(n).");
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
  if (!cs || *cs >= batch) return vmap_level(inputs, dims, batch, cfg, f, out_dims);

  // Chunked: run each slice of the batch at its own level, then concatenate.
  c10::optional<RngSnapshot> rng;
  if (cfg.randomness == Randomness::Same) rng.emplace();
  // Outside every transform each chunk is copied into one preallocated
  // result and freed: peak memory is the result plus one chunk (autograd
  // tracks the copies). Inside another transform the result could not be
  // an unwrapped tensor, so the chunks are concatenated.
  const bool in_place = layer_depth() == 0;
  std::vector<Tensors> chunks;
  Tensors outs;
  for (int64_t start = 0; start < batch; start += *cs) {
    if (rng && start > 0) rng->restore();
    const int64_t len = std::min(*cs, batch - start);
    Tensors part;
    part.reserve(inputs.size());
    for (size_t i = 0; i < inputs.size(); ++i)
      part.push_back(dims[i] ? inputs[i].narrow(*dims[i], start, len) : inputs[i]);
    std::vector<OptDim> od;
    Tensors c = vmap_level(part, dims, len, cfg, f, od);
    const bool first = start == 0;
    TORCH_CHECK(first || (c.size() == outs.size() && od == out_dims), "torchfunc::", vmap_prefix(cfg),
                ": f returned differently structured outputs for different chunks of the batch.");
    out_dims = std::move(od);
    if (first) outs.resize(c.size());
    for (size_t k = 0; k < c.size(); ++k) {
      if (!out_dims[k]) {
        if (first) outs[k] = c[k];
      } else if (in_place) {
        if (first) {
          std::vector<int64_t> sizes = c[k].sizes().vec();
          sizes[*out_dims[k]] = batch;
          outs[k] = at::empty(sizes, c[k].options());
        }
        outs[k].narrow(*out_dims[k], start, len).copy_(c[k]);
        c[k] = at::Tensor();
      }
    }
    if (!in_place) chunks.push_back(std::move(c));
  }
  if (in_place) return outs;
  for (size_t k = 0; k < outs.size(); ++k) {
    if (!out_dims[k]) continue;
    Tensors parts;
    parts.reserve(chunks.size());
    for (auto& c : chunks) parts.push_back(std::move(c[k]));
    outs[k] = at::cat(parts, *out_dims[k]);
  }
  return outs;
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
