// src/batch_rules/registry.cpp: registers every batching rule and
// decomposition of src/batch_rules/ once (the first transform does, through
// ensure_batch_rules) and keeps the names of those that registered
// (own_batch_rules(), checked per libtorch version by the tests). Whether a
// rule registers is BatchRuleRegistrar's decision (util.h): `add` only where
// libtorch has no rule of its own, `replace` where libtorch's is known wrong.
// Not here: the rules themselves (one file per op family).
#include "util.h"

#include <map>
#include <mutex>

namespace torchfunc {
namespace detail {

using namespace batch_rules;

const std::vector<std::string>& own_batch_rules() {
  static const std::vector<std::string> registered = [] {
    std::vector<std::string> names;
    BatchRuleRegistrar r(names);
    register_loss_rules(r);
    register_activation_rules(r);
    register_reduction_rules(r);
    register_indexing_rules(r);
    register_pooling_rules(r);
#if TORCHFUNC_LIBTORCH_1_13
    register_libtorch_1_13_rules(r);
#endif
    return names;
  }();
  return registered;
}

torch::Library& BatchRuleRegistrar::library(c10::DispatchKey key) {
  static std::mutex mu;
  static std::map<c10::DispatchKey, std::unique_ptr<torch::Library>> libs;
  std::lock_guard<std::mutex> lock(mu);
  auto& lib = libs[key];
  if (!lib) lib = std::make_unique<torch::Library>(torch::Library::IMPL, "aten", key, __FILE__, __LINE__);
  return *lib;
}

void ensure_batch_rules() { (void)own_batch_rules(); }

}  // namespace detail
}  // namespace torchfunc
