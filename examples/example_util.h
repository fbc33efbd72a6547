// Small helpers shared by the tutorial programs: checks that set the exit
// status, a median-of-n timer, and the command-line options every program has.
#pragma once

#include <torch/torch.h>
#include <torchfunc/allocator.h>

#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <string>
#include <thread>
#include <vector>

namespace example {

inline int failures = 0;

// Prints "[ok]" or "[FAILED]" with the largest deviation seen.
inline void check_close(const torch::Tensor& got, const torch::Tensor& want, double tol, const std::string& what) {
  bool ok = got.sizes() == want.sizes();
  double err = ok ? (got - want).abs().max().item<double>() : INFINITY;
  ok = ok && err <= tol;
  std::printf("  [%s] %s (max abs diff %.2e, tolerance %.0e)\n", ok ? "ok" : "FAILED", what.c_str(), err, tol);
  if (!ok) ++failures;
}

inline void check(bool ok, const std::string& what) {
  std::printf("  [%s] %s\n", ok ? "ok" : "FAILED", what.c_str());
  if (!ok) ++failures;
}

// Reference Jacobian by plain autograd, no transforms: one backward pass per
// element of y; row i holds d y_i / d inputs, flattened and concatenated.
inline torch::Tensor autograd_jacobian(const torch::Tensor& y, const std::vector<torch::Tensor>& inputs) {
  std::vector<torch::Tensor> rows;
  torch::Tensor flat_y = y.flatten();
  for (int64_t i = 0; i < flat_y.numel(); ++i) {
    auto grads = torch::autograd::grad({flat_y[i]}, inputs, {}, /*retain_graph=*/true);
    std::vector<torch::Tensor> parts;
    for (auto& g : grads) parts.push_back(g.flatten());
    rows.push_back(torch::cat(parts));
  }
  return torch::stack(rows);
}

// Median wall time of `reps` calls of f after one warm-up call, in milliseconds.
template <class F>
double median_ms(int reps, F&& f) {
  f();
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    auto start = std::chrono::steady_clock::now();
    f();
    t.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count());
  }
  std::nth_element(t.begin(), t.begin() + t.size() / 2, t.end());
  return t[t.size() / 2];
}

// Options every tutorial program takes.
struct Common {
  bool quick = false;
  int threads = 0;
  uint64_t seed = 0;
  bool caching_allocator = false;
  void add_to(CLI::App& app) {
    app.add_flag("--caching-allocator", caching_allocator,
                 "allocate CPU tensors through torchfunc::use_caching_cpu_allocator() (fewer page faults)");
    app.add_flag("--quick", quick, "small sizes and few repetitions (what ctest runs)");
    app.add_option("--threads", threads, "intra-op threads (default: all cores)");
    app.add_option("--seed", seed, "random seed")->capture_default_str();
  }
  // Applies the options and prints the settings that affect timings.
  void apply(const char* name) const {
    int n = threads > 0 ? threads : int(std::max(1u, std::thread::hardware_concurrency()));
    torch::set_num_threads(n);
    torch::manual_seed(seed);
    if (caching_allocator) torchfunc::use_caching_cpu_allocator();
    std::printf("%s: libtorch %s, %d threads%s%s\n", name, TORCH_VERSION, torch::get_num_threads(),
                quick ? ", quick mode" : "", caching_allocator ? ", caching CPU allocator" : "");
  }
};

inline int finish(const char* name) {
  if (failures) std::printf("%s: %d check(s) FAILED\n", name, failures);
  else std::printf("%s: all checks passed\n", name);
  return failures ? 1 : 0;
}

}  // namespace example
