// src/jit.cpp: functional_call for TorchScript modules (torch::jit::Module):
// their attributes are swapped for the given tensors for one call. Not here:
// torch::nn modules (modules.cpp); the shared checks (reparametrize.h).
#include <torchfunc/jit.h>

#include "reparametrize.h"

namespace torchfunc {
namespace detail {

JitReparametrize::JitReparametrize(torch::jit::Module& root,
                                   const std::vector<std::pair<std::string, at::Tensor>>& values,
                                   const std::vector<size_t>& dict_of, const FunctionalCallOptions& options) {
  const std::string where = "functional_call(" + root.type()->name()->name() + ", ...)";
  claim_module(root._ivalue().get(), where);
  claimed_ = root._ivalue().get();
  try {
    substitute(root, values, dict_of, options, where);
  } catch (...) {
    release_module(claimed_);
    throw;
  }
}

void JitReparametrize::substitute(torch::jit::Module& root,
                                  const std::vector<std::pair<std::string, at::Tensor>>& values,
                                  const std::vector<size_t>& dict_of, const FunctionalCallOptions& options,
                                  const std::string& where) {
  std::vector<std::string> names;
  std::vector<at::Tensor> current;
  for (const auto& p : root.named_parameters(/*recurse=*/true)) names.push_back(p.name), current.push_back(p.value);
  for (const auto& b : root.named_buffers(/*recurse=*/true)) names.push_back(b.name), current.push_back(b.value);
  std::vector<c10::optional<at::Tensor>> value_of = resolve_values(where, names, current, values, dict_of, options);

  // Find every owner before changing anything, so a failure changes nothing.
  std::vector<std::pair<Saved, at::Tensor>> plan;
  for (size_t i = 0; i < names.size(); ++i) {
    if (!value_of[i]) continue;
    // A TorchScript parameter is typed Tensor: it cannot become None.
    TORCH_CHECK(value_of[i]->defined(), "torchfunc::", where, ": '", names[i],
                "' is given as an undefined Tensor (none), but a TorchScript module's parameters and buffers "
                "must be Tensors; give a tensor, or leave the key out to keep the module's own.");
    torch::jit::Module owner = root;
    std::string attr = names[i];
    for (size_t dot; (dot = attr.find('.')) != std::string::npos; attr = attr.substr(dot + 1))
      owner = owner.attr(attr.substr(0, dot)).toModule();
    plan.push_back({Saved{owner, attr, owner.attr(attr)}, *value_of[i]});
  }
  saved_.reserve(plan.size());
  try {
    for (auto& [saved, value] : plan) {
      saved.owner.setattr(saved.attr, value);
      saved_.push_back(std::move(saved));
    }
  } catch (...) {
    restore();
    throw;
  }
}

JitReparametrize::~JitReparametrize() {
  restore();
  release_module(claimed_);
}

void JitReparametrize::restore() noexcept {
  for (auto it = saved_.rbegin(); it != saved_.rend(); ++it) it->owner.setattr(it->attr, it->original);
  saved_.clear();
}

}  // namespace detail

TensorDict named_parameters(const torch::jit::Module& module) {
  TensorDict out;
  for (const auto& p : module.named_parameters(/*recurse=*/true)) out.insert(p.name, p.value.detach());
  return out;
}

TensorDict named_buffers(const torch::jit::Module& module) {
  TensorDict out;
  for (const auto& b : module.named_buffers(/*recurse=*/true)) out.insert(b.name, b.value.detach());
  return out;
}

}  // namespace torchfunc
