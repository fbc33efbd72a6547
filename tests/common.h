// tests/common.h: fixture and independent references shared by the tests.
#pragma once

#include <gtest/gtest.h>
#include <torch/torch.h>
#include <torchfunc/torchfunc.h>

#include <functional>
#include <string>

namespace func = torchfunc;
using torch::Tensor;

/// Seeds every test and checks that it leaves no functorch level behind.
class TF : public ::testing::Test {
 protected:
  void SetUp() override {
    torch::manual_seed(0);
    ASSERT_EQ(func::detail::layer_depth(), 0u);
  }
  void TearDown() override { EXPECT_EQ(func::detail::layer_depth(), 0u) << "a transform leaked a level"; }
};

/// Expects `stmt` to throw c10::Error whose message contains `substr`.
#define EXPECT_ERROR(stmt, substr)                                                    \
  do {                                                                                \
    bool thrown_ = false;                                                             \
    try {                                                                             \
      (void)(stmt);                                                                   \
    } catch (const c10::Error& e_) {                                                  \
      thrown_ = true;                                                                 \
      EXPECT_NE(std::string(e_.what()).find(substr), std::string::npos)               \
          << "message was: " << e_.what_without_backtrace();                          \
    }                                                                                 \
    EXPECT_TRUE(thrown_) << "expected a c10::Error containing: " << (substr);         \
    EXPECT_EQ(func::detail::layer_depth(), 0u);                                       \
  } while (0)

/// While alive, records the ops that vmap ran through libtorch's per-sample
/// fallback (its "performance drop ... batching rule for <op>" warnings).
// (Warning handlers moved from c10::Warning to c10::WarningUtils in 2.x; the
// library's own spelling is in src/compat.h.)
#if TORCH_VERSION_MAJOR >= 2
namespace test_warning_api = c10::WarningUtils;
#else
namespace test_warning_api = c10::Warning;
#endif
class FallbackLog : public c10::WarningHandler {
 public:
  FallbackLog() : prev_(test_warning_api::get_warning_handler()) { test_warning_api::set_warning_handler(this); }
  ~FallbackLog() override { test_warning_api::set_warning_handler(prev_); }
  FallbackLog(const FallbackLog&) = delete;
  FallbackLog& operator=(const FallbackLog&) = delete;
#if TORCH_VERSION_MAJOR >= 2
  void process(const c10::Warning& w) override { record(w.msg()); }
#else
  void process(const c10::SourceLocation&, const std::string& msg, const bool) override { record(msg); }
#endif
  std::string ops;  // space-separated

 private:
  void record(const std::string& msg) {
    const std::string key = "batching rule for ";
    auto at = msg.find(key);
    if (at == std::string::npos) return;
    at += key.size();
    ops += msg.substr(at, msg.find_first_of(". ", at) - at) + " ";
  }
  c10::WarningHandler* prev_;
};

inline void expect_close(const Tensor& a, const Tensor& b, double tol = 1e-6) {
  ASSERT_TRUE(a.defined() && b.defined());
  ASSERT_EQ(a.sizes(), b.sizes());
  const double err = (a.to(torch::kDouble) - b.to(torch::kDouble)).abs().max().item<double>();
  EXPECT_LE(err, tol) << "max abs error " << err;
}

/// Central finite differences in double: J[out..., in...] of f at x.
inline Tensor fd_jacobian(const std::function<Tensor(const Tensor&)>& f, const Tensor& x, double eps = 1e-6) {
  torch::NoGradGuard ng;
  Tensor xd = x.to(torch::kDouble).clone();
  Tensor y0 = f(xd);
  Tensor J = torch::zeros({y0.numel(), xd.numel()}, torch::kDouble);
  auto flat = xd.view(-1);
  for (int64_t i = 0; i < xd.numel(); ++i) {
    const double v = flat[i].item<double>();
    flat[i] = v + eps;
    Tensor yp = f(xd).reshape(-1);
    flat[i] = v - eps;
    Tensor ym = f(xd).reshape(-1);
    flat[i] = v;
    J.select(1, i).copy_((yp - ym) / (2 * eps));
  }
  std::vector<int64_t> shape = y0.sizes().vec();
  for (auto s : xd.sizes()) shape.push_back(s);
  return J.view(shape);
}

/// Gradient of scalar f by plain torch::autograd::grad (no transforms).
inline Tensor autograd_grad(const std::function<Tensor(const Tensor&)>& f, const Tensor& x) {
  Tensor xr = x.detach().clone().requires_grad_(true);
  return torch::autograd::grad({f(xr)}, {xr})[0];
}
