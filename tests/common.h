// tests/common.h: fixture and independent references shared by the tests.
#pragma once

#include <gtest/gtest.h>
#include <torch/torch.h>
#include <torchfunc/torchfunc.h>

#include <ATen/functorch/DynamicLayer.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/InferenceMode.h>

#include <functional>
#include <sstream>
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

/// Everything a transform changes in this thread while it runs and must put
/// back when it ends, also by an exception: functorch's level stack and its
/// in-place requires_grad flag, the grad / inference / forward-grad modes and
/// the thread's included / excluded dispatch keys.
struct ThreadState {
  size_t functorch_layers;
  bool inplace_requires_grad_allowed, grad_mode, inference_mode, fw_grad_mode;
  uint64_t included_keys, excluded_keys;

  static ThreadState now() {
    auto keys = c10::impl::tls_local_dispatch_key_set();  // (raw_repr is not const on 1.13)
    return {at::functorch::getDynamicLayerStack().size(),
            at::functorch::getInplaceRequiresGradAllowed(),
            c10::GradMode::is_enabled(),
            c10::InferenceMode::is_enabled(),
            c10::AutogradState::get_tls_state().get_fw_grad_mode(),
            keys.included_.raw_repr(),
            keys.excluded_.raw_repr()};
  }
  bool operator==(const ThreadState& o) const {
    return functorch_layers == o.functorch_layers && inplace_requires_grad_allowed == o.inplace_requires_grad_allowed &&
           grad_mode == o.grad_mode && inference_mode == o.inference_mode && fw_grad_mode == o.fw_grad_mode &&
           included_keys == o.included_keys && excluded_keys == o.excluded_keys;
  }
  bool operator!=(const ThreadState& o) const { return !(*this == o); }
  std::string str() const {
    std::ostringstream s;
    s << "{functorch layers " << functorch_layers << ", inplace requires_grad allowed " << inplace_requires_grad_allowed
      << ", grad mode " << grad_mode << ", inference mode " << inference_mode << ", forward grad mode "
      << fw_grad_mode << ", included keys " << c10::DispatchKeySet(c10::DispatchKeySet::RAW, included_keys)
      << ", excluded keys " << c10::DispatchKeySet(c10::DispatchKeySet::RAW, excluded_keys) << "}";
    return s.str();
  }
};

/// Expects `stmt` to throw c10::Error whose message contains `substr`, and
/// the thread's transform state to be as it was.
#define EXPECT_ERROR(stmt, substr)                                                    \
  do {                                                                                \
    const ThreadState state_before_ = ThreadState::now();                             \
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
    const ThreadState state_after_ = ThreadState::now();                              \
    EXPECT_TRUE(state_after_ == state_before_)                                        \
        << "before: " << state_before_.str() << "\nafter:  " << state_after_.str();   \
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
