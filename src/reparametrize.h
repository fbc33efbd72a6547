// src/reparametrize.h: the checks functional_call makes on the given tensors,
// shared by torch::nn modules (modules.cpp) and TorchScript modules (jit.cpp).
#pragma once

#include <torchfunc/functional_call.h>

#include <c10/util/Optional.h>

#include <string>
#include <vector>

namespace torchfunc {
namespace detail {

// The value each registered name (`names`, whose tensors are `current`) takes:
// nullopt where none is given (the module keeps its own); a given undefined
// Tensor means "none", as None does in torch.func (e.g. a Linear without bias). Errors, naming `where`, for keys repeated
// across dicts, unknown keys, missing keys under strict, and tied names given
// different values; with tie_weights, tied names share the given value.
std::vector<c10::optional<at::Tensor>> resolve_values(const std::string& where, const std::vector<std::string>& names,
                                       const std::vector<at::Tensor>& current,
                                       const std::vector<std::pair<std::string, at::Tensor>>& values,
                                       const std::vector<size_t>& dict_of, const FunctionalCallOptions& options);

// functional_call points a module's members at the given tensors for one
// call, so one module cannot serve two threads at once (each would see the
// other's tensors). claim_module records that this thread uses `root`
// (nested calls in the same thread are fine) and raises, naming `where`, if
// another thread is using it; release_module undoes one claim.
void claim_module(const void* root, const std::string& where);
void release_module(const void* root) noexcept;

}  // namespace detail
}  // namespace torchfunc
