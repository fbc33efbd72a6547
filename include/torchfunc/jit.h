// torchfunc/jit.h: functional_call for TorchScript modules (torch::jit::Module,
// what torch::jit::load returns for a model saved from Python). Not part of
// the umbrella header: include it where you use it.
//
//   torch::jit::Module model = torch::jit::load("model.pt");
//   TensorDict params = torchfunc::named_parameters(model);
//   auto loss = [&](const TensorDict& p, const Tensor& x) {
//     return torchfunc::functional_call(model, p, x).toTensor().sum();
//   };
//   TensorDict g = torchfunc::grad(loss)(params, x);
#pragma once

#include <torch/script.h>
#include <torchfunc/functional_call.h>

namespace torchfunc {
namespace detail {

/// Sets tensors as the attributes of a TorchScript module tree for its
/// lifetime (RAII); the same checks as for torch::nn modules.
class JitReparametrize {
 public:
  JitReparametrize(torch::jit::Module& root, const std::vector<std::pair<std::string, at::Tensor>>& values,
                   const std::vector<size_t>& dict_of_value, const FunctionalCallOptions& options);
  ~JitReparametrize();
  JitReparametrize(const JitReparametrize&) = delete;
  JitReparametrize& operator=(const JitReparametrize&) = delete;

 private:
  struct Saved {
    torch::jit::Module owner;
    std::string attr;
    c10::IValue original;
  };
  void substitute(torch::jit::Module& root, const std::vector<std::pair<std::string, at::Tensor>>& values,
                  const std::vector<size_t>& dict_of_value, const FunctionalCallOptions& options,
                  const std::string& where);
  void restore() noexcept;
  std::vector<Saved> saved_;
  const void* claimed_ = nullptr;  // the root module, claimed for this thread (src/modules.cpp)
};

}  // namespace detail

/// functional_call(script_module, dicts, args..., [FunctionalCallOptions]) ->
/// c10::IValue: runs the module's forward with the dicts' tensors as its
/// parameters and buffers (keys as in named_parameters / named_buffers).
template <class D, class... Rest>
c10::IValue functional_call(torch::jit::Module& module, const D& dicts, Rest&&... rest) {
  std::vector<std::pair<std::string, at::Tensor>> values;
  std::vector<size_t> dict_of;
  detail::collect_dicts(dicts, values, dict_of);
  FunctionalCallOptions opts;
  std::vector<c10::IValue> inputs;
  auto take = [&](auto&& a) {
    if constexpr (std::is_same_v<std::decay_t<decltype(a)>, FunctionalCallOptions>) {
      opts = a;
    } else {
      inputs.emplace_back(std::forward<decltype(a)>(a));
    }
  };
  (take(std::forward<Rest>(rest)), ...);
  detail::JitReparametrize guard(module, values, dict_of, opts);
  return module.forward(std::move(inputs));
}

/// Parameters / buffers of a TorchScript module as dicts of detached tensors.
TensorDict named_parameters(const torch::jit::Module& module);
TensorDict named_buffers(const torch::jit::Module& module);
// Exact matches for non-const modules, which would otherwise pick the
// torch::nn templates in functional_call.h.
inline TensorDict named_parameters(torch::jit::Module& module) {
  return named_parameters(static_cast<const torch::jit::Module&>(module));
}
inline TensorDict named_buffers(torch::jit::Module& module) {
  return named_buffers(static_cast<const torch::jit::Module&>(module));
}

}  // namespace torchfunc
