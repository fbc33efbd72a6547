// torchfunc/fallback.h: which operators vmap ran through libtorch's slow
// per-sample fallback, and what such a fallback does. torch.func only warns.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace torchfunc {

/// An operator that had no batching rule under vmap (or jacrev / jacfwd /
/// hessian, which use vmap), so libtorch ran it once per sample and stacked
/// the results: correct, but a loop. `calls` counts the batched calls.
struct FallbackEntry {
  std::string op;  // "aten::take", with the overload when there is one
  int64_t calls = 0;
};

/// Every fallback since the program started or reset_fallback_report(), all
/// threads together, most calls first.
///   func::reset_fallback_report();
///   run_my_model();
///   for (const auto& e : func::fallback_report()) std::cout << e.op << " " << e.calls << "\n";
std::vector<FallbackEntry> fallback_report();
void reset_fallback_report();

/// What a fallback does besides being counted: Warn passes libtorch's
/// "There is a performance drop ..." warning on (the default), Silent drops
/// it, Error raises a c10::Error naming the op instead of running the loop
/// (for tests that must stay on batching rules).
enum class FallbackMode { Warn, Silent, Error };

/// Sets the mode for every thread; returns the previous one.
FallbackMode set_fallback_mode(FallbackMode mode);
FallbackMode fallback_mode();

}  // namespace torchfunc
