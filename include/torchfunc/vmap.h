// torchfunc/vmap.h: vectorising map. Mirrors torch.func.vmap.
#pragma once

#include <torchfunc/detail/meta.h>

namespace torchfunc {
namespace detail {

struct VmapSpec {
  Dims in = 0;
  Dims out = 0;
  VmapOptions options;
};

/// "vmap(f, in_dims=(none, 0), out_dims=0)": the call shape errors start with.
inline std::string describe_vmap(const void* p) {
  const auto& s = *static_cast<const VmapSpec*>(p);
  std::string r = "vmap(f, in_dims=" + s.in.str() + ", out_dims=" + s.out.str();
  if (s.options.chunk_size()) r += ", chunk_size=" + std::to_string(*s.options.chunk_size());
  if (s.options.randomness() == Randomness::Same) r += ", randomness=same";
  if (s.options.randomness() == Randomness::Different) r += ", randomness=different";
  if (s.options.sequential_fallback()) r += ", sequential_fallback=true";
  return r + ")";
}

template <class F>
class VmapTransform {
 public:
  VmapTransform(F f, VmapSpec spec) : f_(std::move(f)), spec_(std::move(spec)) {}

  template <class... Args>
  auto operator()(const Args&... args) const {
    using R = result_t<F, Args...>;
    static_assert(only_tensor_leaves<R>(),
                  "torchfunc::vmap: f must return a Tensor or a container of Tensors (no non-tensor "
                  "leaves).");
    const auto like = std::forward_as_tuple(args...);
    if constexpr (sizeof...(Args) == 0) {
      if (!spec_.options.axis_size())
        fail(describe_vmap(&spec_) + "(<inputs>): got no inputs. Maybe you forgot to add inputs, or "
             "you are trying to vmap over a function with no inputs; that needs VmapOptions().axis_size(n).");
    }
    const auto fa = flatten_args(like);
    std::vector<OptDim> dims;
    dims.reserve(fa.leaves.size());
    {
      DimsCtx ctx{"vmap", "in_dims", &spec_.in};
      Path root{nullptr, "", "args"};
      match_dims(like, spec_.in, dims, root, ctx);
    }
    std::optional<R> out;
    auto flat_fn = [&](Tensors& in, FlatResult& res) {
      out.emplace(call_rebuilt(f_, like, in));
      flatten_into(*out, res.leaves);
      res.num_primary = res.leaves.size();
      DimsCtx ctx{"vmap", "out_dims", &spec_.out};
      Path root{nullptr, "", "output"};
      match_dims(*out, spec_.out, res.out_dims, root, ctx);
    };
    VmapConfig cfg;
    cfg.chunk_size = spec_.options.chunk_size();
    cfg.randomness = spec_.options.randomness();
    cfg.axis_size = spec_.options.axis_size();
    cfg.sequential_fallback = spec_.options.sequential_fallback();
    cfg.describe = &describe_vmap;
    cfg.describe_arg = &spec_;
    auto name = [&](size_t i) { return leaf_path(like, i, "args"); };
    Tensors res = vmap_flat(fa.leaves, dims, cfg, flat_fn, name);
    const at::Tensor* it = res.data();
    R result = unflatten(*out, it);
    return result;
  }

 private:
  F f_;
  VmapSpec spec_;
};

inline void vmap_parse(VmapSpec&, int&) {}
template <class A, class... Rest>
void vmap_parse(VmapSpec& s, int& positional, A&& a, Rest&&... rest) {
  using T = std::decay_t<A>;
  if constexpr (std::is_same_v<T, InDimsTag>) {
    TORCH_CHECK(positional == 0, "torchfunc::vmap: in_dims given twice");
    s.in = a.dims;
    positional = 1;  // a following bare value is out_dims
  } else if constexpr (std::is_same_v<T, OutDimsTag>) {
    TORCH_CHECK(positional < 2, "torchfunc::vmap: out_dims given twice");
    s.out = a.dims;
    positional = 2;
  } else if constexpr (std::is_same_v<T, VmapOptions>) {
    s.options = a;
  } else if constexpr (std::is_same_v<T, Randomness>) {
    s.options.randomness(a);
  } else {
    static_assert(std::is_constructible_v<Dims, A>,
                  "torchfunc::vmap: expected in_dims, out_dims (an int, none, Dims, in_dims(...), "
                  "out_dims(...)) or VmapOptions after f.");
    if constexpr (std::is_constructible_v<Dims, A>) {
      TORCH_CHECK(positional < 2, "torchfunc::vmap: too many positional dims arguments; use "
                                  "vmap(f, in_dims, out_dims, VmapOptions)");
      (positional == 0 ? s.in : s.out) = Dims(std::forward<A>(a));
      ++positional;
    }
  }
  vmap_parse(s, positional, std::forward<Rest>(rest)...);
}

}  // namespace detail

/// vmap(f, [in_dims], [out_dims], [VmapOptions])(args...)
///
/// Mirrors torch.func.vmap. in_dims: a bare int or `none` broadcasts to every
/// argument; `in_dims(d0, d1, ...)` gives one entry per argument, each an
/// int, `none` or a nested Dims tree. out_dims: the same for the outputs
/// (a bare value as the second positional argument, or `out_dims(...)`).
/// Options: chunk_size, randomness, axis_size (the batch size when nothing
/// is mapped: vmap(f, none, 0, VmapOptions().axis_size(8))(w) runs f for a
/// batch of 8, e.g. 8 random draws with Randomness::Different),
/// sequential_fallback (a loop over the samples where f depends on the data).
///   auto ys = vmap(model_fn, in_dims(none, 0))(weights, xs);
///   auto per_sample = vmap(grad(loss), in_dims(none, 0, 0))(w, xs, ys);
template <class F, class... Opts>
auto vmap(F f, Opts&&... opts) {
  detail::VmapSpec spec;
  int positional = 0;
  detail::vmap_parse(spec, positional, std::forward<Opts>(opts)...);
  // Checked when the transform is built, as torch.func does.
  const auto cs = spec.options.chunk_size();
  TORCH_CHECK(!cs.has_value() || *cs > 0, "torchfunc::vmap: chunk_size should be none or greater than 0, got ",
              cs.has_value() ? *cs : 0, ".");
  const auto as = spec.options.axis_size();
  TORCH_CHECK(!as.has_value() || *as >= 0, "torchfunc::vmap: axis_size should be none or at least 0, got ",
              as.has_value() ? *as : 0, ".");
  return detail::VmapTransform<F>(std::move(f), std::move(spec));
}

}  // namespace torchfunc
