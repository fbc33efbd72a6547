#include "prv_accountant.h"

#include <fftw3.h>

#include <algorithm>
#include <cmath>
#include <complex>
#include <stdexcept>
#include <string>

#include "rdp_accountant.h"

namespace dpsgd {
namespace {

// One step's privacy loss truncated to [t_min, t_max] and renormalised.
struct TruncatedLoss {
  double q, sigma, t_min, t_max, at_min, mass;
  TruncatedLoss(double q_, double s, double lo, double hi)
      : q(q_), sigma(s), t_min(lo), t_max(hi), at_min(prv_cdf(q_, s, lo)), mass(prv_cdf(q_, s, hi) - at_min) {}
  double cdf(double t) const {
    if (t < t_min) return 0.0;
    if (t >= t_max) return 1.0;
    return (prv_cdf(q, sigma, t) - at_min) / mass;
  }
};

// Adaptive Simpson on [a, b] with absolute tolerance tol.
template <class F>
double simpson(const F& f, double a, double fa, double b, double fb, double m, double fm, double whole, double tol,
               int depth) {
  const double lm = 0.5 * (a + m), rm = 0.5 * (m + b);
  const double flm = f(lm), frm = f(rm);
  const double left = (m - a) / 6 * (fa + 4 * flm + fm), right = (b - m) / 6 * (fm + 4 * frm + fb);
  if (depth <= 0 || std::abs(left + right - whole) <= 15 * tol) return left + right + (left + right - whole) / 15;
  return simpson(f, a, fa, m, fm, lm, flm, left, tol / 2, depth - 1) +
         simpson(f, m, fm, b, fb, rm, frm, right, tol / 2, depth - 1);
}

template <class F>
double integrate(const F& f, double a, double b, double tol) {
  const double m = 0.5 * (a + b), fa = f(a), fb = f(b), fm = f(m);
  return simpson(f, a, fa, b, fb, m, fm, (b - a) / 6 * (fa + 4 * fm + fb), tol, 60);
}

// Mean of the truncated loss: t_max - integral of its CDF over [t_min, t_max],
// split where the CDF bends (log(1 - q), and around 0 on a log scale).
double truncated_mean(const TruncatedLoss& y) {
  std::vector<double> cuts{y.t_min, y.t_max, 0.0};
  if (y.q < 1) cuts.push_back(std::log1p(-y.q));
  for (int k = -9; k <= 2; ++k) {
    cuts.push_back(std::pow(10.0, k));
    cuts.push_back(-std::pow(10.0, k));
  }
  std::vector<double> in;
  for (double c : cuts)
    if (c >= y.t_min && c <= y.t_max) in.push_back(c);
  std::sort(in.begin(), in.end());
  in.erase(std::unique(in.begin(), in.end()), in.end());
  double area = 0;
  auto f = [&](double t) { return y.cdf(t); };
  for (size_t i = 0; i + 1 < in.size(); ++i) area += integrate(f, in[i], in[i + 1], 1e-15);
  return y.t_max - area;
}

// FFTW plans and buffers, freed on scope exit.
struct Fft {
  explicit Fft(int n) : n(n), real(fftw_alloc_real(n)), spec(fftw_alloc_complex(n / 2 + 1)) {
    if (!real || !spec) throw std::runtime_error("prv accountant: out of memory for the FFT");
    fwd = fftw_plan_dft_r2c_1d(n, real, spec, FFTW_ESTIMATE);
    inv = fftw_plan_dft_c2r_1d(n, spec, real, FFTW_ESTIMATE);
  }
  ~Fft() {
    fftw_destroy_plan(fwd);
    fftw_destroy_plan(inv);
    fftw_free(real);
    fftw_free(spec);
  }
  Fft(const Fft&) = delete;
  Fft& operator=(const Fft&) = delete;
  std::complex<double>* bins() { return reinterpret_cast<std::complex<double>*>(spec); }
  int n;
  double* real;
  fftw_complex* spec;
  fftw_plan fwd, inv;
};

// A discretised distribution: pmf[j] is the mass at t_min + j * dt + shift.
struct Discrete {
  std::vector<double> pmf;
  double shift = 0;
};

// pmf composed with itself `times` times by one FFT (circular: the domain is
// wide enough that no mass wraps around). The sum of `times` variables on the
// grid t_min + i dt lands at t_min + j dt with j = i_1 + ... - (times-1) c,
// c = -t_min / dt the index of t = 0.
Discrete self_compose(const Discrete& d, int64_t times, int64_t c) {
  const int n = static_cast<int>(d.pmf.size());
  Fft fft(n);
  std::copy(d.pmf.begin(), d.pmf.end(), fft.real);
  fftw_execute(fft.fwd);
  for (int k = 0; k <= n / 2; ++k) fft.bins()[k] = std::pow(fft.bins()[k], static_cast<double>(times));
  fftw_execute(fft.inv);
  Discrete out;
  out.pmf.resize(n);
  const int64_t offset = ((times - 1) % n) * (c % n) % n;
  for (int j = 0; j < n; ++j) out.pmf[j] = fft.real[(j + offset) % n] / n;
  out.shift = d.shift * static_cast<double>(times);
  return out;
}

// Two distributions on the same grid convolved (linear, by FFT of twice the
// length), kept on that grid: index j of the result is full index j + c.
Discrete compose_two(const Discrete& a, const Discrete& b, int64_t c) {
  const int n = static_cast<int>(a.pmf.size());
  Fft fa(2 * n), fb(2 * n);
  std::fill(fa.real, fa.real + 2 * n, 0.0);
  std::fill(fb.real, fb.real + 2 * n, 0.0);
  std::copy(a.pmf.begin(), a.pmf.end(), fa.real);
  std::copy(b.pmf.begin(), b.pmf.end(), fb.real);
  fftw_execute(fa.fwd);
  fftw_execute(fb.fwd);
  for (int k = 0; k <= n; ++k) fa.bins()[k] *= fb.bins()[k];
  fftw_execute(fa.inv);
  Discrete out;
  out.pmf.resize(n);
  for (int j = 0; j < n; ++j) out.pmf[j] = fa.real[j + c] / (2 * n);
  out.shift = a.shift + b.shift;
  return out;
}

void check_group(double q, double sigma) {
  if (!(q > 0.0 && q <= 1.0))
    throw std::invalid_argument("prv accountant: sampling rate q must be in (0, 1], got " + std::to_string(q));
  if (!(sigma > 0.0))
    throw std::invalid_argument("prv accountant: noise multiplier must be > 0, got " + std::to_string(sigma));
}

}  // namespace

double prv_cdf(double q, double sigma, double t) {
  // Y <= t  <=>  X <= sigma^2 z + 1/2 with z = log((e^t - 1 + q) / q), for
  // X ~ (1 - q) N(0, s^2) + q N(1, s^2); nothing lies below log(1 - q).
  if (q < 1 && t <= std::log1p(-q)) return 0.0;
  const double z = std::log((std::expm1(t) + q) / q);
  const double s2 = sigma * sigma, r = 2 * std::sqrt(2.0) * sigma;
  return 1.0 - q / 2 * std::erfc((2 * z * s2 - 1) / r) - (1 - q) / 2 * std::erfc((2 * z * s2 + 1) / r);
}

void PrvAccountant::step(double q, double sigma, int64_t n) {
  check_group(q, sigma);
  if (n < 0) throw std::invalid_argument("prv accountant: negative step count");
  if (n == 0) return;
  if (!groups_.empty() && groups_.back().q == q && groups_.back().sigma == sigma) {
    groups_.back().steps += n;
  } else {
    groups_.push_back({q, sigma, n});
  }
}

int64_t PrvAccountant::steps() const {
  int64_t n = 0;
  for (const auto& g : groups_) n += g.steps;
  return n;
}

PrvEpsilon PrvAccountant::epsilon(double delta, double eps_error, double delta_error) const {
  if (!(delta > 0.0 && delta < 1.0)) throw std::invalid_argument("prv accountant: delta must be in (0, 1)");
  if (!(eps_error > 0.0)) throw std::invalid_argument("prv accountant: eps_error must be > 0");
  if (delta_error == 0.0) delta_error = delta / 1000;
  if (!(delta_error > 0.0 && delta_error < delta))
    throw std::invalid_argument("prv accountant: delta_error must be in (0, delta)");
  const int64_t total = steps();
  if (total == 0) return {0.0, 0.0, 0.0};

  // The domain [-L, L]: outside it, less than delta_error of mass in total
  // (an RDP tail bound, for all steps and for any single one; Gopi et al.,
  // remark 5.6, as their code and Opacus compute it).
  RdpAccountant all;
  for (const auto& g : groups_) all.step(g.q, g.sigma, g.steps);
  double L = all.spent(delta_error / 4).epsilon;
  for (const auto& g : groups_)
    L = std::max(L, epsilon_after(g.q, g.sigma, 1, delta_error / (8.0 * total)).epsilon);
  L = std::max(L, eps_error) + 3;
  // The mesh: fine enough that discretisation moves epsilon by < eps_error.
  const double dt = eps_error / std::sqrt(total * std::log(12 / delta_error) / 2);
  const double t_min = std::floor(-L / dt) * dt;
  double t_max = std::ceil(L / dt) * dt;
  int64_t size = std::llround((t_max - t_min) / dt) + 1;
  if (size % 2) {  // the FFT composition wants an even length
    ++size;
    t_max += dt;
  }
  if (size > (int64_t(1) << 28)) throw std::runtime_error("prv accountant: the discretisation needs too many points");
  const int64_t c = std::llround(-t_min / dt);

  Discrete composed;
  bool first = true;
  for (const auto& g : groups_) {
    TruncatedLoss y(g.q, g.sigma, t_min, t_max);
    Discrete d;
    d.pmf.resize(size);
    double prev = y.cdf(t_min - dt / 2), mean_d = 0;
    for (int64_t i = 0; i < size; ++i) {
      const double t = t_min + i * dt, next = y.cdf(t + dt / 2);
      d.pmf[i] = next - prev;
      mean_d += t * d.pmf[i];
      prev = next;
    }
    // Shift the grid so the discrete mean is the continuous one.
    d.shift = truncated_mean(y) - mean_d;
    if (std::abs(d.shift) >= dt / 2)
      throw std::runtime_error("prv accountant: the discrete mean differs from the continuous one by more than "
                               "half a mesh step");
    Discrete gd = self_compose(d, g.steps, c);
    composed = first ? std::move(gd) : compose_two(composed, gd, c);
    first = false;
  }

  // delta(eps) = sum_{t >= eps} p(t) (1 - e^{eps - t}); at eps = t_j it is
  // d1_j - e^{t_j} d2_j with the tail sums below.
  std::vector<long double> d1(size + 1, 0.0L), d2(size + 1, 0.0L);
  for (int64_t j = size - 1; j >= 0; --j) {
    const long double t = t_min + j * dt + composed.shift;
    d1[j] = d1[j + 1] + composed.pmf[j];
    d2[j] = d2[j + 1] + composed.pmf[j] * std::exp(-t);
  }
  auto eps_for = [&](double target) {
    for (int64_t j = 0; j < size; ++j) {
      const long double t = t_min + j * dt + composed.shift;
      if (std::exp(t) * d2[j] - d1[j] >= -target) {
        if (j == 0) throw std::runtime_error("prv accountant: delta is out of the discretised range");
        return static_cast<double>(std::log((d1[j] - target) / d2[j]));
      }
    }
    throw std::runtime_error("prv accountant: delta is out of the discretised range");
  };
  return {eps_for(delta + delta_error) - eps_error, eps_for(delta), eps_for(delta - delta_error) + eps_error};
}

double noise_for_epsilon_prv(double target_epsilon, double q, int64_t steps, double delta,
                             const PrvAccountant& before) {
  auto eps = [&](double s) {
    PrvAccountant a = before;
    a.step(q, s, steps);
    return a.epsilon(delta).upper;
  };
  // Bracket with the RDP answer (RDP is looser: its sigma reaches the target).
  RdpAccountant rdp_before;
  for (const auto& g : before.groups()) rdp_before.step(g.q, g.sigma, g.steps);
  double hi = noise_for_epsilon(target_epsilon, q, steps, delta, Conversion::Improved, rdp_before);
  double lo = hi / 2;
  while (lo > 1e-3 && eps(lo) <= target_epsilon) lo /= 2;
  while (hi - lo > 1e-3 * hi) {
    const double mid = 0.5 * (lo + hi);
    (eps(mid) > target_epsilon ? lo : hi) = mid;
  }
  return hi;
}

}  // namespace dpsgd
