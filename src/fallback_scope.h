// src/fallback_scope.h: counts libtorch's per-sample fallbacks while a
// torchfunc vmap level runs (src/fallback.cpp).
#pragma once

#include <functional>
#include <memory>
#include <string>

#include "compat.h"

namespace torchfunc {
namespace detail {

/// Installs this thread's fallback counter while alive (once per thread:
/// nested vmaps share the outermost one). `describe` names the transform in
/// errors; it is called only then (vmap calls this on every level).
class FallbackScope {
 public:
  explicit FallbackScope(const std::function<std::string()>& describe);
  ~FallbackScope();
  FallbackScope(const FallbackScope&) = delete;
  FallbackScope& operator=(const FallbackScope&) = delete;

 private:
  std::unique_ptr<compat::WarningFilter> counter_;  // null in nested scopes
};

/// Counts one call of a torchfunc-made fallback (vmap's sequential
/// fallback) under `op` in fallback_report(); under FallbackMode::Error
/// raises instead, naming `describe` and `op`.
void count_own_fallback(const std::string& op, const std::string& describe);

}  // namespace detail
}  // namespace torchfunc
