// src/jvp_decompositions.h: one TorchScript decomposition that gives an op a
// forward-mode derivative (see jvp_decompositions.cpp).
#pragma once

#include <vector>

#include "compat.h"

namespace torchfunc {
namespace detail {

struct JvpDecomposition {
  const char* op;        // "aten::trace"
  const char* overload;  // "" for the default
  const char* function;  // the TorchScript function in `source`
  const char* helper;    // another function of `source` that `function` calls, or ""
  const char* source;    // TorchScript text holding both
};

#if TORCHFUNC_LIBTORCH_1_13
/// Ops that have a forward-mode formula on 2.x but not on 1.13
/// (jvp_decompositions_1_13.cpp).
std::vector<JvpDecomposition> jvp_decompositions_1_13();
#endif

}  // namespace detail
}  // namespace torchfunc
