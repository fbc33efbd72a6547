// Privacy accounting for DP-SGD: Renyi differential privacy (RDP) of the
// Poisson-subsampled Gaussian mechanism (Mironov, Talwar, Zhang 2019), composed
// over steps and converted to (epsilon, delta)-DP.
//
// Pure C++ (no torch) so that it is cheap to build and to test.
#pragma once

#include <cstdint>
#include <vector>

namespace dpsgd {

// The RDP orders (alpha > 1) searched when converting to epsilon: 1.1 .. 10.9
// in steps of 0.1, the integers 11 .. 63, and 64, 128, 256, 512.
std::vector<double> default_orders();

// RDP at order `alpha` of ONE step of the subsampled Gaussian mechanism with
// sampling rate q (each example is in a batch with probability q) and noise
// multiplier sigma (noise std / clipping norm). Integer alpha uses the exact
// binomial expansion; fractional alpha the convergent two-sided series.
double rdp_subsampled_gaussian(double q, double sigma, double alpha);

// How an RDP curve is turned into (epsilon, delta)-DP.
enum class Conversion {
  // eps = rdp - log(delta) / (alpha - 1)   (Mironov 2017; TF Privacy <= 2020,
  // the conversion behind most published DP-SGD figures).
  Classic,
  // eps = rdp + log1p(-1/alpha) - (log(delta) + log(alpha)) / (alpha - 1)
  // (Balle et al. 2020, Canonne, Kamath, Steinke 2020; what Opacus reports).
  // Always at least as tight as Classic.
  Improved,
};

struct PrivacySpent {
  double epsilon;
  double best_order;  // the alpha that attains epsilon
};

// Epsilon after `steps` steps at rate q and noise sigma, for a given delta.
PrivacySpent epsilon_after(double q, double sigma, int64_t steps, double delta,
                           Conversion conv = Conversion::Improved,
                           const std::vector<double>& orders = default_orders());

// Running accountant: add steps as training goes, ask for epsilon any time.
// Steps with different (q, sigma) compose by adding their RDP curves.
class RdpAccountant {
 public:
  explicit RdpAccountant(std::vector<double> orders = default_orders());
  void step(double q, double sigma, int64_t n = 1);
  PrivacySpent spent(double delta, Conversion conv = Conversion::Improved) const;
  int64_t steps() const { return steps_; }

 private:
  std::vector<double> orders_;
  std::vector<double> rdp_;  // total RDP per order
  int64_t steps_ = 0;
  std::vector<double> cached_;  // per-step RDP curve of the last (q, sigma)
  double cached_q_ = -1, cached_sigma_ = -1;
};

// Smallest noise multiplier (to 1e-3 relative) for which `steps` steps at rate q
// stay within epsilon at delta, after what `before` holds (mechanisms already run
// on the same data, e.g. a private feature statistic). Throws
// std::invalid_argument if none <= 1e3.
double noise_for_epsilon(double target_epsilon, double q, int64_t steps, double delta,
                         Conversion conv = Conversion::Improved, const RdpAccountant& before = RdpAccountant());

}  // namespace dpsgd
