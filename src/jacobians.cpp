// src/jacobians.cpp: the flat cores of jacrev (one vjp, then vmap over the
// standard basis of cotangents) and jacfwd (vmap of jvp over the basis of
// tangents); hessian is jacfwd(jacrev) in the header. Not here: vjp / jvp
// themselves.
#include "levels.h"

namespace torchfunc {
namespace detail {

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

namespace {
void check_real_inputs(const Tensors& inputs, const std::vector<char>& diff, const char* api, LeafName name) {
  for (size_t i = 0; i < inputs.size(); ++i)
    if (diff[i] && inputs[i].defined()) check_real_for_jacobian(inputs[i], api, "inputs", name(i));
}

/// jacrev after its vjp: vmap of the pullback over the rows of the identity.
JacOut jacrev_from_vjp(VjpOut v, const Tensors& inputs, c10::optional<int64_t> chunk_size, const char* api) {
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
}  // namespace

JacOut jacrev_flat(const Tensors& inputs, const std::vector<char>& diff, FlatFn f,
                   c10::optional<int64_t> chunk_size, const char* api, LeafName name) {
  TORCH_CHECK(!chunk_size || *chunk_size > 0, "torchfunc::", api,
              ": Expected chunk_size to be a positive integer.");
  check_real_inputs(inputs, diff, api, name);
  return jacrev_from_vjp(vjp_flat(inputs, diff, f, api, name), inputs, chunk_size, api);
}

JacOut jacfwd_flat(const Tensors& inputs, const std::vector<char>& diff, FlatFn f, Randomness randomness,
                   c10::optional<int64_t> chunk_size, const char* api, LeafName name) {
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
  if (total == 0) {
    // No columns: evaluate f once for the output shapes; every Jacobian is
    // empty (out.shape + in.shape with a zero), as in torch.func.
    Tensors tangents(inputs.size());
    for (size_t q = 0; q < where.size(); ++q) tangents[where[q]] = at::zeros_like(inputs[where[q]]);
    JvpOut o = jvp_flat(inputs, diff, tangents, f, api, name);
    JacOut j;
    j.jac.assign(o.outputs.size(), Tensors(inputs.size()));
    for (size_t k = 0; k < o.outputs.size(); ++k) {
      check_real_for_jacobian(o.outputs[k], api, "outputs", "output " + std::to_string(k));
      for (size_t q = 0; q < where.size(); ++q)
        j.jac[k][where[q]] = at::zeros(concat_shapes(o.outputs[k].sizes(), inputs[where[q]].sizes()),
                                       o.outputs[k].options());
    }
    j.aux = std::move(o.aux);
    return j;
  }
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
  cfg.chunk_size = chunk_size;
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

JacOut jacobian_flat(const Tensors& inputs, const std::vector<char>& diff, FlatFn f, const JacobianOptions& o,
                     const char* api, LeafName name) {
  TORCH_CHECK(!o.chunk_size() || *o.chunk_size() > 0, "torchfunc::", api,
              ": Expected chunk_size to be a positive integer.");
  if (o.mode() == JacobianMode::Forward) return jacfwd_flat(inputs, diff, f, o.randomness(), o.chunk_size(), api, name);
  if (o.mode() == JacobianMode::Reverse) return jacrev_flat(inputs, diff, f, o.chunk_size(), api, name);
  // Auto: the output size is known only once f has run, so run it as
  // reverse mode's vjp does; keep that vjp when reverse mode wins, drop it
  // (one wasted forward pass) when forward mode does.
  check_real_inputs(inputs, diff, api, name);
  VjpOut v = vjp_flat(inputs, diff, f, api, name);
  int64_t in_numel = 0, out_numel = 0;
  for (size_t i = 0; i < inputs.size(); ++i)
    if (diff[i]) in_numel += inputs[i].numel();
  for (const auto& out : v.outputs) out_numel += out.numel();
  if (jacobian_mode(in_numel, out_numel) == JacobianMode::Reverse)
    return jacrev_from_vjp(std::move(v), inputs, o.chunk_size(), api);
  v = VjpOut{};  // frees the recorded graph before the forward-mode pass
  return jacfwd_flat(inputs, diff, f, o.randomness(), o.chunk_size(), api, name);
}

}  // namespace detail

JacobianMode jacobian_mode(int64_t in_numel, int64_t out_numel) {
  // bench/jacobian_crossover.py measures where forward and reverse mode
  // cost the same (ratio out/in); reverse mode wins below it.
  return double(out_numel) <= kJacobianCrossover * double(in_numel) ? JacobianMode::Reverse : JacobianMode::Forward;
}

}  // namespace torchfunc
