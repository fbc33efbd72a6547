// torchfunc/aot.h: ahead-of-time autograd for training. Mirrors
// functorch.compile.aot_function (default partition and the min-cut
// rematerialisation partitioner).
//
//   auto f = torchfunc::aot_function([](const Tensor& a, const Tensor& b) { return (a.cos() * b).sum(); });
//   Tensor loss = f(w, x);   // w requires grad: loss has a grad_fn
//   loss.backward();         // runs the captured backward graph; torch::optim works as usual
//
// The first call per signature (as compile's, requires_grad included) captures
// f's forward and its backward (torchfunc::vjp of f with respect to the
// arguments that require grad, lowered to ATen ops) as one joint graph, then
// splits it: the forward graph computes f's results and the values the
// backward reads ("saved"), the backward graph maps the results' cotangents to
// the gradients. Later calls replay the forward and attach one autograd node
// whose backward replays the backward graph.
//
// Partition::Default saves what the joint graph's backward reads, as autograd
// would. Partition::MinCut (the min-cut rematerialisation of functorch's
// partitioner) chooses the saved set of fewest bytes such that the backward can
// recompute the rest with cheap ops (pointwise ops and views; matrix
// products, convolutions, reductions and random ops are never recomputed):
// less memory between forward and backward, a little more work in backward.
//
// The backward is not differentiable again (double backward is an error; use
// grad(grad(f)) for that). f's results must be floating-point tensors.
// With no argument that requires grad (or under NoGradGuard) a call is
// compile's replay.
#pragma once

#include <torchfunc/compile.h>
#include <torchfunc/vjp.h>

#include <functional>
#include <memory>
#include <tuple>
#include <vector>

namespace torchfunc {

enum class Partition { Default, MinCut };

struct AotOptions {
  Partition partition = Partition::Default;
  CompileOptions compile = {};
};

namespace detail {

/// One signature's graphs.
struct AotGraphs {
  Graph forward;   // inputs: the flat arguments; outputs: results, then saved values
  Graph backward;  // inputs: saved values, then the results' cotangents; outputs: gradients
  Graph plain;     // no argument requires grad: the forward alone
  std::vector<size_t> diff;  // flat arguments that get gradients, in order
  size_t num_outputs = 0, num_saved = 0;
  int64_t saved_bytes = 0;   // what the forward keeps for the backward (at capture)
};

using AotFlatFn = std::function<std::vector<at::Tensor>(const std::vector<at::Tensor>&)>;
std::shared_ptr<const AotGraphs> aot_capture(const std::vector<at::Tensor>& inputs, const AotFlatFn& f,
                                             const AotOptions& options);
/// Replays the forward and connects the results to autograd.
std::vector<at::Tensor> aot_run(const std::shared_ptr<const AotGraphs>& graphs, const std::vector<at::Tensor>& inputs);

}  // namespace detail

template <class F>
class AotFunction {
 public:
  AotFunction(F f, AotOptions options)
      : f_(std::move(f)), options_(options), cache_(std::make_shared<detail::CompileCache>(options.compile)) {}

  template <class... Args>
  auto operator()(const Args&... args) const {
    using R = std::decay_t<std::invoke_result_t<const F&, const Args&...>>;
    detail::Signature sig = detail::signature_of(args...);
    const auto* e = cache_->find(sig.key);
    if (e == nullptr) {
      cache_->check_room();
      std::shared_ptr<const R> like;
      detail::AotFlatFn flat = [&](const std::vector<at::Tensor>& in) {
        const at::Tensor* it = in.data();
        std::tuple<std::decay_t<Args>...> rebuilt{detail::unflatten(args, it)...};
        R out = std::apply(f_, rebuilt);
        if (!like) {
          std::vector<at::Tensor> empties(detail::count_tensors(out));
          const at::Tensor* e_it = empties.data();
          like = std::make_shared<const R>(detail::unflatten(out, e_it));
        }
        std::vector<at::Tensor> outs;
        detail::flatten_into(out, outs);
        return outs;
      };
      auto graphs = detail::aot_capture(sig.tensors, flat, options_);
      std::shared_ptr<const HolderBase> holder = std::make_shared<const Holder<R>>(graphs, like);
      cache_->insert(sig.key, {Graph(), std::shared_ptr<const void>(holder, holder.get())});
      e = cache_->find(sig.key);
    }
    const auto* h = static_cast<const Holder<R>*>(static_cast<const HolderBase*>(e->like.get()));
    std::vector<at::Tensor> outs = detail::aot_run(h->graphs, sig.tensors);
    const at::Tensor* it = outs.data();
    return detail::unflatten(*h->like, it);
  }

  /// The graphs of each signature captured so far.
  std::vector<std::shared_ptr<const detail::AotGraphs>> graphs() const {
    std::vector<std::shared_ptr<const detail::AotGraphs>> out;
    for (const auto& l : cache_->likes()) out.push_back(static_cast<const HolderBase*>(l.get())->graphs);
    return out;
  }

 private:
  struct HolderBase {
    std::shared_ptr<const detail::AotGraphs> graphs;
  };
  template <class R>
  struct Holder : HolderBase {
    Holder(std::shared_ptr<const detail::AotGraphs> g, std::shared_ptr<const R> l) : HolderBase{std::move(g)}, like(std::move(l)) {}
    std::shared_ptr<const R> like;
  };
  F f_;
  AotOptions options_;
  std::shared_ptr<detail::CompileCache> cache_;
};

template <class F>
AotFunction<std::decay_t<F>> aot_function(F&& f, AotOptions options = {}) {
  return AotFunction<std::decay_t<F>>(std::forward<F>(f), options);
}

}  // namespace torchfunc
