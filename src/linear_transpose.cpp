// src/linear_transpose.cpp: the linearity check of linear_transpose (the
// transpose itself is vjp at zero, in include/torchfunc/linear_transpose.h).
#include <ATen/CPUGeneratorImpl.h>
#include <torchfunc/debug_unwrap.h>

#include "levels.h"

namespace torchfunc {
namespace detail {

namespace {

// How far a linear f may stray from exact linearity through rounding,
// relative to the largest output magnitude.
double linear_rtol(at::ScalarType t) {
  switch (t) {
    case at::kDouble:
    case at::kComplexDouble:
      return 1e-9;
    case at::kHalf:
    case at::kBFloat16:
    case at::kComplexHalf:
      return 3e-2;
    default:
      return 1e-4;
  }
}

// The largest |t| over every sample and level (t unwrapped: the check runs
// inside any transform, and a maximum is not data-dependent control flow
// for the transforms once the values are plain).
double max_abs(const at::Tensor& t) {
  at::Tensor plain = debug_unwrap(t);
  if (plain.numel() == 0) return 0.0;
  return plain.abs().max().item<double>();
}

}  // namespace

void check_linear(const Tensors& primals, const Tensors& zero_out,
                  c10::function_ref<Tensors(const Tensors&)> eval, const char* api) {
  at::NoGradGuard no_grad;
  for (size_t k = 0; k < zero_out.size(); ++k) {
    const double z = max_abs(zero_out[k]);
    TORCH_CHECK(z == 0.0, "torchfunc::", api, ": f is not linear in its inputs: f(0) is not zero at output ", k,
                " (largest |f(0)| = ", z, "). An affine function (one with a constant term) has no transpose; "
                "transpose x -> f(x) - f(0) instead.");
  }
  // Seeded and private: the user's random stream is untouched, and the
  // check is the same on every call.
  at::Generator gen = at::make_generator<at::CPUGeneratorImpl>(0x5eed);
  const double a = 1.5;
  Tensors x, y, axy;
  for (const auto& p : primals) {
    if (!p.defined() || !(p.is_floating_point() || p.is_complex())) {
      x.push_back(p);
      y.push_back(p);
      axy.push_back(p);
      continue;
    }
    auto cpu = at::TensorOptions().dtype(p.scalar_type());
    at::Tensor xi = at::randn(p.sizes(), gen, cpu).to(p.options());
    at::Tensor yi = at::randn(p.sizes(), gen, cpu).to(p.options());
    axy.push_back(xi * a + yi);
    x.push_back(std::move(xi));
    y.push_back(std::move(yi));
  }
  Tensors fx = eval(x), fy = eval(y), faxy = eval(axy);
  for (size_t k = 0; k < faxy.size(); ++k) {
    const double err = max_abs(faxy[k] - fx[k] * a - fy[k]);
    const double scale = std::max({max_abs(faxy[k]), max_abs(fx[k]) * a, max_abs(fy[k])});
    const double tol = linear_rtol(faxy[k].scalar_type()) * scale;
    TORCH_CHECK(err <= tol, "torchfunc::", api, ": f is not linear in its inputs: at output ", k,
                ", f(a*x + y) differs from a*f(x) + f(y) by ", err, " (tolerance ", tol,
                ") for random x, y and a = 1.5. Only a linear function has a transpose; pass "
                "LinearTransposeOptions().check_linear(false) to skip this check.");
  }
}

}  // namespace detail
}  // namespace torchfunc
