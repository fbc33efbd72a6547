#include "rdp_accountant.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <stdexcept>
#include <string>

namespace dpsgd {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// log(exp(a) + exp(b)) without overflow.
double log_add(double a, double b) {
  if (a == -kInf) return b;
  if (b == -kInf) return a;
  double m = std::max(a, b);
  return m + std::log1p(std::exp(-std::abs(a - b)));
}

// A signed number kept as sign * exp(log_mag), so that the alternating series
// for fractional orders can be summed without overflow.
struct SignedLog {
  double log_mag = -kInf;
  int sign = 1;
  void add(double log_term, int term_sign) {
    if (log_term == -kInf) return;
    if (log_mag == -kInf) { log_mag = log_term; sign = term_sign; return; }
    if (term_sign == sign) { log_mag = log_add(log_mag, log_term); return; }
    // Opposite signs: the larger magnitude wins.
    double hi = std::max(log_mag, log_term), lo = std::min(log_mag, log_term);
    int hi_sign = log_mag >= log_term ? sign : term_sign;
    if (hi == lo) { log_mag = -kInf; sign = 1; return; }
    log_mag = hi + std::log1p(-std::exp(lo - hi));
    sign = hi_sign;
  }
};

// log(erfc(x)), accurate where erfc underflows (x beyond ~26).
double log_erfc(double x) {
  if (x < 20.0) return std::log(std::erfc(x));
  double x2 = x * x;
  // Asymptotic expansion: erfc(x) ~ exp(-x^2) / (x sqrt(pi)) * (1 - 1/(2x^2) + 3/(4x^4) - 15/(8x^6)).
  double series = 1.0 - 1.0 / (2 * x2) + 3.0 / (4 * x2 * x2) - 15.0 / (8 * x2 * x2 * x2);
  return -x2 - std::log(x) - 0.5 * std::log(M_PI) + std::log(series);
}

// log A_alpha for integer alpha: A = E_{k~Binom(alpha,q)} exp((k^2 - k) / (2 sigma^2)).
double log_a_int(double q, double sigma, int64_t alpha) {
  double log_a = -kInf;
  for (int64_t k = 0; k <= alpha; ++k) {
    double log_binom = std::lgamma(alpha + 1.0) - std::lgamma(k + 1.0) - std::lgamma(alpha - k + 1.0);
    double term = log_binom + k * std::log(q) + (alpha - k) * std::log1p(-q) +
                  (double(k) * k - k) / (2 * sigma * sigma);
    log_a = log_add(log_a, term);
  }
  return log_a;
}

// log A_alpha for fractional alpha: split the integral at the point z0 where the
// two mixture components cross and expand (1 - q + q e^{...})^alpha binomially on
// each side; the generalized binomial coefficients alternate in sign past alpha.
double log_a_frac(double q, double sigma, double alpha) {
  SignedLog a0, a1;
  const double z0 = sigma * sigma * std::log(1.0 / q - 1.0) + 0.5;
  const double s2 = 2 * sigma * sigma;
  double log_coef = 0.0;  // log |binom(alpha, i)|
  int coef_sign = 1;
  for (int64_t i = 0; i < 1000000; ++i) {
    if (i > 0) {
      double factor = (alpha - i + 1) / double(i);
      if (factor == 0.0) break;  // cannot happen for fractional alpha; guards integers
      log_coef += std::log(std::abs(factor));
      if (factor < 0) coef_sign = -coef_sign;
    }
    double j = alpha - i;
    double log_t0 = log_coef + i * std::log(q) + j * std::log1p(-q);
    double log_t1 = log_coef + j * std::log(q) + i * std::log1p(-q);
    double log_e0 = std::log(0.5) + log_erfc((i - z0) / (std::sqrt(2.0) * sigma));
    double log_e1 = std::log(0.5) + log_erfc((z0 - j) / (std::sqrt(2.0) * sigma));
    double log_s0 = log_t0 + (double(i) * i - i) / s2 + log_e0;
    double log_s1 = log_t1 + (j * j - j) / s2 + log_e1;
    a0.add(log_s0, coef_sign);
    a1.add(log_s1, coef_sign);
    if (i > alpha && std::max(log_s0, log_s1) < -30) break;
  }
  SignedLog total = a0;
  total.add(a1.log_mag, a1.sign);
  return total.log_mag;
}

void check_params(double q, double sigma) {
  if (!(q >= 0.0 && q <= 1.0))
    throw std::invalid_argument("rdp accountant: sampling rate q must be in [0, 1], got " + std::to_string(q));
  if (!(sigma >= 0.0))
    throw std::invalid_argument("rdp accountant: noise multiplier must be >= 0, got " + std::to_string(sigma));
}

double to_epsilon(double rdp, double alpha, double delta, Conversion conv) {
  if (conv == Conversion::Classic) return rdp - std::log(delta) / (alpha - 1);
  return rdp + std::log1p(-1.0 / alpha) - (std::log(delta) + std::log(alpha)) / (alpha - 1);
}

}  // namespace

std::vector<double> default_orders() {
  std::vector<double> orders;
  for (int x = 1; x <= 99; ++x) orders.push_back(1.0 + x / 10.0);
  for (int a = 11; a <= 63; ++a) orders.push_back(a);
  for (double a : {64.0, 128.0, 256.0, 512.0}) orders.push_back(a);
  return orders;
}

double rdp_subsampled_gaussian(double q, double sigma, double alpha) {
  check_params(q, sigma);
  if (!(alpha > 1.0)) throw std::invalid_argument("rdp accountant: order alpha must be > 1");
  if (q == 0.0) return 0.0;
  if (sigma == 0.0) return kInf;
  if (q == 1.0) return alpha / (2 * sigma * sigma);  // the plain Gaussian mechanism
  double log_a = (alpha == std::floor(alpha) && alpha < 1e6) ? log_a_int(q, sigma, int64_t(alpha))
                                                               : log_a_frac(q, sigma, alpha);
  return log_a / (alpha - 1);
}

RdpAccountant::RdpAccountant(std::vector<double> orders) : orders_(std::move(orders)), rdp_(orders_.size(), 0.0) {
  if (orders_.empty()) throw std::invalid_argument("rdp accountant: no orders");
}

void RdpAccountant::step(double q, double sigma, int64_t n) {
  if (n < 0) throw std::invalid_argument("rdp accountant: negative step count");
  // Training repeats one (q, sigma): compute its curve once.
  if (cached_.empty() || q != cached_q_ || sigma != cached_sigma_) {
    cached_.resize(orders_.size());
    for (size_t i = 0; i < orders_.size(); ++i) cached_[i] = rdp_subsampled_gaussian(q, sigma, orders_[i]);
    cached_q_ = q, cached_sigma_ = sigma;
  }
  for (size_t i = 0; i < orders_.size(); ++i) rdp_[i] += n * cached_[i];
  steps_ += n;
}

PrivacySpent RdpAccountant::spent(double delta, Conversion conv) const {
  if (!(delta > 0.0 && delta < 1.0)) throw std::invalid_argument("rdp accountant: delta must be in (0, 1)");
  PrivacySpent best{kInf, orders_.front()};
  for (size_t i = 0; i < orders_.size(); ++i) {
    double eps = to_epsilon(rdp_[i], orders_[i], delta, conv);
    if (std::isfinite(eps) && eps < best.epsilon) best = {std::max(eps, 0.0), orders_[i]};
  }
  return best;
}

PrivacySpent epsilon_after(double q, double sigma, int64_t steps, double delta, Conversion conv,
                           const std::vector<double>& orders) {
  RdpAccountant acc(orders);
  acc.step(q, sigma, steps);
  return acc.spent(delta, conv);
}

double noise_for_epsilon(double target_epsilon, double q, int64_t steps, double delta, Conversion conv,
                         const RdpAccountant& before) {
  auto eps = [&](double s) {
    RdpAccountant a = before;
    a.step(q, s, steps);
    return a.spent(delta, conv).epsilon;
  };
  double lo = 0.0, hi = 1.0;
  while (eps(hi) > target_epsilon) {
    lo = hi;
    hi *= 2;
    if (hi > 1e3) throw std::invalid_argument("noise_for_epsilon: no noise multiplier <= 1000 reaches the target");
  }
  while (hi - lo > 1e-3 * hi) {
    double mid = 0.5 * (lo + hi);
    (eps(mid) > target_epsilon ? lo : hi) = mid;
  }
  return hi;
}

}  // namespace dpsgd
