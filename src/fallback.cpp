// src/fallback.cpp: the fallback report (include/torchfunc/fallback.h).
// libtorch's per-sample fallback announces itself with a warning naming the
// op; while a torchfunc vmap runs, this thread's warning handler counts those
// and, by the mode, passes them on, drops them or turns them into errors.
#include <torchfunc/fallback.h>

#include <algorithm>
#include <atomic>
#include <map>
#include <mutex>

#include "compat.h"
#include "fallback_scope.h"

namespace torchfunc {
namespace {

std::mutex g_mutex;
std::map<std::string, int64_t>& counts() {
  static std::map<std::string, int64_t> m;
  return m;
}
std::atomic<FallbackMode> g_mode{FallbackMode::Warn};

/// The op a fallback warning names, or "" for any other warning.
std::string fallback_op(const std::string& msg) {
  static const std::string key = "we have not yet implemented the batching rule for ";
  auto at = msg.find(key);
  if (at == std::string::npos) return "";
  at += key.size();
  auto end = msg.find_first_of(" ,", at);
  std::string op = msg.substr(at, end == std::string::npos ? std::string::npos : end - at);
  while (!op.empty() && op.back() == '.') op.pop_back();  // the sentence's full stop
  return op;
}

class FallbackCounter : public compat::WarningFilter {
 public:
  explicit FallbackCounter(std::function<std::string()> describe) : describe_(std::move(describe)) {}
  bool pass(const std::string& msg) override {
    const std::string op = fallback_op(msg);
    if (op.empty()) return true;
    {
      std::lock_guard<std::mutex> lock(g_mutex);
      ++counts()[op];
    }
    switch (g_mode.load()) {
      case FallbackMode::Warn:
        return true;
      case FallbackMode::Silent:
        return false;
      case FallbackMode::Error:
        break;
    }
    TORCH_CHECK(false, "torchfunc::", describe_(), ": ", op, " has no batching rule, so libtorch would run it once per "
                "sample (its slow fallback); this is an error because set_fallback_mode(FallbackMode::Error) is in "
                "effect.");
  }

 private:
  std::function<std::string()> describe_;
};

thread_local bool t_counting = false;

}  // namespace

namespace detail {

FallbackScope::FallbackScope(const std::function<std::string()>& describe) {
  if (t_counting) return;  // the outermost vmap of this thread counts for all
  counter_ = std::make_unique<FallbackCounter>(describe);
  t_counting = true;
}
FallbackScope::~FallbackScope() {
  if (!counter_) return;
  counter_.reset();
  t_counting = false;
}

void count_own_fallback(const std::string& op, const std::string& describe) {
  TORCH_CHECK(g_mode.load() != FallbackMode::Error, "torchfunc::", describe, ": ", op,
              ": f ran once per sample; this is an error because set_fallback_mode(FallbackMode::Error) is in "
              "effect.");
  std::lock_guard<std::mutex> lock(g_mutex);
  ++counts()[op];
}

}  // namespace detail

std::vector<FallbackEntry> fallback_report() {
  std::vector<FallbackEntry> out;
  {
    std::lock_guard<std::mutex> lock(g_mutex);
    for (const auto& [op, n] : counts()) out.push_back({op, n});
  }
  std::stable_sort(out.begin(), out.end(), [](const FallbackEntry& a, const FallbackEntry& b) { return a.calls > b.calls; });
  return out;
}

void reset_fallback_report() {
  std::lock_guard<std::mutex> lock(g_mutex);
  counts().clear();
}

FallbackMode set_fallback_mode(FallbackMode mode) { return g_mode.exchange(mode); }
FallbackMode fallback_mode() { return g_mode.load(); }

}  // namespace torchfunc
