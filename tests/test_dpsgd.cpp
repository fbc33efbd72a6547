// Tests of the DP-SGD demo's torch-free parts: the RDP accountant (against
// published values and an independent numerical integration), the IDX reader's
// error paths, and the chart writer.
#include <gtest/gtest.h>
#include <zlib.h>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <functional>
#include <stdexcept>
#include <string>
#include <random>
#include <sstream>
#include <algorithm>

#include "idx_reader.h"
#include "plot.h"
#include "prv_accountant.h"
#include "rdp_accountant.h"

namespace fs = std::filesystem;
using namespace dpsgd;

// ---- accountant ---------------------------------------------------------------

// RDP of one step straight from its definition (Mironov, Talwar, Zhang 2019):
// A_alpha = E_{z ~ N(0, s^2)} [((1 - q) + q * mu1(z) / mu0(z))^alpha] with
// mu1 / mu0 = exp((2z - 1) / (2 s^2)), integrated numerically (trapezoid rule
// in log space). Shares no code with the accountant's series.
static double rdp_by_integration(double q, double sigma, double alpha) {
  const double lo = -40 * sigma, hi = 40 * sigma + alpha + 1, h = 2e-4 * sigma;
  const int64_t n = int64_t((hi - lo) / h);
  double m = -INFINITY;
  std::vector<double> logs(n + 1);
  for (int64_t i = 0; i <= n; ++i) {
    double z = lo + i * h;
    double log_mu0 = -z * z / (2 * sigma * sigma) - std::log(sigma * std::sqrt(2 * M_PI));
    double ratio_log = (2 * z - 1) / (2 * sigma * sigma);
    // log((1-q) + q e^r), stable for large r.
    double mix = ratio_log > 0 ? ratio_log + std::log(q + (1 - q) * std::exp(-ratio_log))
                               : std::log((1 - q) + q * std::exp(ratio_log));
    logs[i] = log_mu0 + alpha * mix + ((i == 0 || i == n) ? std::log(0.5) : 0.0);
    m = std::max(m, logs[i]);
  }
  double s = 0;
  for (double l : logs) s += std::exp(l - m);
  return (m + std::log(s * h)) / (alpha - 1);
}

TEST(Accountant, MatchesNumericalIntegrationOfTheDefinition) {
  for (double q : {0.004, 0.034, 0.2})
    for (double sigma : {0.8, 1.1, 2.15, 4.0})
      for (double alpha : {1.5, 2.0, 3.7, 8.0, 12.5, 32.0}) {
        double ours = rdp_subsampled_gaussian(q, sigma, alpha);
        double ref = rdp_by_integration(q, sigma, alpha);
        EXPECT_NEAR(ours, ref, 1e-6 * std::abs(ref) + 1e-12) << "q=" << q << " sigma=" << sigma << " alpha=" << alpha;
      }
}

TEST(Accountant, FractionalOrdersAreContinuousWithIntegerOrders) {
  // The integer formula and the fractional series are different code paths.
  for (double alpha : {2.0, 5.0, 17.0}) {
    double at = rdp_subsampled_gaussian(0.01, 1.1, alpha);
    double mid = 0.5 * (rdp_subsampled_gaussian(0.01, 1.1, alpha - 1e-6) + rdp_subsampled_gaussian(0.01, 1.1, alpha + 1e-6));
    EXPECT_NEAR(at, mid, 1e-8 * at) << alpha;
  }
}

TEST(Accountant, PublishedValues) {
  // Abadi et al. 2016, Sec. 3.1: q = 0.01, sigma = 4, T = 10000, delta = 1e-5
  // gives epsilon ~ 1.26 with the moments accountant (integer orders up to 32).
  std::vector<double> ints;
  for (int a = 2; a <= 32; ++a) ints.push_back(a);
  EXPECT_NEAR(epsilon_after(0.01, 4.0, 10000, 1e-5, Conversion::Classic, ints).epsilon, 1.26, 0.005);
  // TF Privacy's MNIST DP-SGD tutorial (N = 60000, batch 256, delta = 1e-5):
  // sigma 1.1 for 60 epochs -> epsilon 3.01; sigma 0.7 for 45 epochs -> 7.10.
  const double q = 256.0 / 60000;
  EXPECT_NEAR(epsilon_after(q, 1.1, int64_t(std::ceil(60 * 60000.0 / 256)), 1e-5, Conversion::Classic).epsilon, 3.01,
              0.01);
  EXPECT_NEAR(epsilon_after(q, 0.7, int64_t(std::ceil(45 * 60000.0 / 256)), 1e-5, Conversion::Classic).epsilon, 7.10,
              0.01);
}

TEST(Accountant, ClosedFormsAndOrderings) {
  // q = 1 is the plain Gaussian mechanism: RDP alpha / (2 sigma^2).
  EXPECT_DOUBLE_EQ(rdp_subsampled_gaussian(1.0, 2.0, 3.0), 3.0 / 8.0);
  EXPECT_EQ(rdp_subsampled_gaussian(0.0, 2.0, 3.0), 0.0);
  // The improved conversion is never looser; more steps never cost less.
  double classic = epsilon_after(0.02, 1.0, 1000, 1e-5, Conversion::Classic).epsilon;
  double improved = epsilon_after(0.02, 1.0, 1000, 1e-5, Conversion::Improved).epsilon;
  EXPECT_LT(improved, classic);
  EXPECT_LT(epsilon_after(0.02, 1.0, 500, 1e-5).epsilon, improved);
  // The running accountant composes like one call with the total steps.
  RdpAccountant acc;
  for (int i = 0; i < 10; ++i) acc.step(0.02, 1.0, 100);
  EXPECT_NEAR(acc.spent(1e-5).epsilon, improved, 1e-9);
  EXPECT_EQ(acc.steps(), 1000);
}

TEST(Accountant, NoiseForEpsilonRoundTrips) {
  double sigma = noise_for_epsilon(3.0, 2048.0 / 60000, 40 * 30, 1e-5);
  EXPECT_LE(epsilon_after(2048.0 / 60000, sigma, 40 * 30, 1e-5).epsilon, 3.0);
  EXPECT_GT(epsilon_after(2048.0 / 60000, sigma * 0.99, 40 * 30, 1e-5).epsilon, 3.0);
}

TEST(Accountant, BadParametersThrow) {
  EXPECT_THROW(rdp_subsampled_gaussian(1.5, 1.0, 2.0), std::invalid_argument);
  EXPECT_THROW(rdp_subsampled_gaussian(0.1, -1.0, 2.0), std::invalid_argument);
  EXPECT_THROW(rdp_subsampled_gaussian(0.1, 1.0, 1.0), std::invalid_argument);
  EXPECT_THROW(RdpAccountant().spent(0.0), std::invalid_argument);
}

// ---- IDX reader -----------------------------------------------------------------

// ---- the PRV accountant ---------------------------------------------------------

// The closed-form CDF of one step's privacy loss against sampling: X from
// the mixture (1 - q) N(0, s^2) + q N(1, s^2), Y = log(P(X) / Q(X)).
TEST(PrvAccountant, LossCdfMatchesSampling) {
  std::mt19937_64 rng(11);
  for (auto [q, sigma] : {std::pair{0.05, 1.0}, std::pair{0.5, 2.0}, std::pair{1.0, 0.8}}) {
    std::normal_distribution<double> noise(0.0, sigma);
    std::bernoulli_distribution in_batch(q);
    const int n = 400000;
    std::vector<double> ys(n);
    for (auto& y : ys) {
      const double x = noise(rng) + (in_batch(rng) ? 1.0 : 0.0);
      y = std::log((1 - q) + q * std::exp((2 * x - 1) / (2 * sigma * sigma)));
    }
    std::sort(ys.begin(), ys.end());
    for (double p : {0.01, 0.1, 0.5, 0.9, 0.99}) {
      const double t = ys[static_cast<size_t>(p * n)];
      EXPECT_NEAR(dpsgd::prv_cdf(q, sigma, t), p, 4 * std::sqrt(p * (1 - p) / n)) << "q " << q << " sigma " << sigma;
    }
  }
}

std::vector<std::string> split(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::string part;
  std::istringstream in(s);
  while (std::getline(in, part, sep)) out.push_back(part);
  return out;
}

// Opacus 1.6's PRVAccountant on a grid (tests/data/make_prv_reference.py
// wrote the file): within 0.01, and never looser than RDP.
TEST(PrvAccountant, MatchesOpacusOnAGrid) {
  std::ifstream in(std::string(TORCHFUNC_TEST_DATA) + "/prv_opacus.csv");
  ASSERT_TRUE(in) << "tests/data/prv_opacus.csv";
  std::string line;
  int checked = 0;
  double worst = 0;
  while (std::getline(in, line)) {
    if (line.empty() || line[0] == '"' || line.rfind("schedule", 0) == 0) continue;
    auto cols = split(line, ',');
    ASSERT_EQ(cols.size(), 4u) << line;
    const double delta = std::stod(cols[1]), opacus = std::stod(cols[2]), rdp = std::stod(cols[3]);
    if (!std::isfinite(opacus)) continue;  // Opacus overflows there (epsilon in the hundreds)
    dpsgd::PrvAccountant a;
    for (const auto& g : split(cols[0], ';')) {
      auto f = split(g, ':');
      a.step(std::stod(f[0]), std::stod(f[1]), std::stoll(f[2]));
    }
    const auto e = a.epsilon(delta);
    EXPECT_NEAR(e.upper, opacus, 0.01) << cols[0] << " delta " << delta;
    EXPECT_LE(e.lower, e.estimate);
    EXPECT_LE(e.estimate, e.upper);
    EXPECT_LE(e.upper, rdp + 0.01) << cols[0] << " delta " << delta;
    worst = std::max(worst, std::abs(e.upper - opacus));
    ++checked;
  }
  EXPECT_GE(checked, 150);
  std::printf("PRV vs Opacus: %d schedules, largest difference %.2e\n", checked, worst);
}

TEST(PrvAccountant, IssueExampleAndNoiseForEpsilon) {
  dpsgd::PrvAccountant a;
  for (int i = 0; i < 1176; ++i) a.step(0.034, 2.0);  // one group, as 1176 single steps
  const double prv = a.epsilon(1e-5).upper, rdp = dpsgd::epsilon_after(0.034, 2.0, 1176, 1e-5).epsilon;
  EXPECT_NEAR(prv, 2.63, 0.01);
  EXPECT_NEAR(rdp, 2.85, 0.01);
  const double sigma = dpsgd::noise_for_epsilon_prv(prv, 0.034, 1176, 1e-5);
  EXPECT_NEAR(sigma, 2.0, 0.01);
  EXPECT_LT(sigma, dpsgd::noise_for_epsilon(prv, 0.034, 1176, 1e-5));  // PRV needs less noise than RDP
  EXPECT_EQ(dpsgd::PrvAccountant().epsilon(1e-5).upper, 0.0);
  EXPECT_THROW(a.step(0.0, 1.0), std::invalid_argument);
  EXPECT_THROW(a.step(0.1, 0.0), std::invalid_argument);
  EXPECT_THROW(a.epsilon(0.0), std::invalid_argument);
  EXPECT_THROW(a.epsilon(1e-5, 0.01, 1e-4), std::invalid_argument);
}

// The scatternet preset releases two noisy second moments before training
// (two Gaussian mechanisms, q = 1): sigma is solved with them counted, so the
// run still ends within the target, and needs more noise than without them.
TEST(PrvAccountant, NoiseForEpsilonCountsEarlierMechanisms) {
  const double q = 8192.0 / 60000, delta = 1e-5;
  const int64_t steps = 640;
  dpsgd::PrvAccountant before;
  before.step(1.0, 8.0, 2);
  const double alone = dpsgd::noise_for_epsilon_prv(3.0, q, steps, delta);
  const double sigma = dpsgd::noise_for_epsilon_prv(3.0, q, steps, delta, before);
  EXPECT_GT(sigma, alone * 1.01);
  dpsgd::PrvAccountant enough = before, too_little = before;
  enough.step(q, sigma, steps);
  too_little.step(q, sigma * 0.99, steps);
  EXPECT_LE(enough.epsilon(delta).upper, 3.0);
  EXPECT_GT(too_little.epsilon(delta).upper, 3.0);
  dpsgd::RdpAccountant rdp_before;
  rdp_before.step(1.0, 8.0, 2);
  const double rdp_sigma = dpsgd::noise_for_epsilon(3.0, q, steps, delta, dpsgd::Conversion::Improved, rdp_before);
  EXPECT_GT(rdp_sigma, dpsgd::noise_for_epsilon(3.0, q, steps, delta) * 1.01);
  EXPECT_GT(rdp_sigma, sigma);  // RDP is the looser of the two
  dpsgd::RdpAccountant r = rdp_before;
  r.step(q, rdp_sigma, steps);
  EXPECT_LE(r.spent(delta).epsilon, 3.0);
}

class Idx : public ::testing::Test {
 protected:
  void SetUp() override {
    dir = fs::temp_directory_path() / ("torchfunc_idx_" + std::to_string(::getpid()));
    fs::create_directories(dir);
  }
  void TearDown() override { fs::remove_all(dir); }

  static std::string be32(uint32_t v) {
    return {char(v >> 24), char((v >> 16) & 255), char((v >> 8) & 255), char(v & 255)};
  }
  static std::string images(uint32_t n, uint32_t r, uint32_t c, size_t pixel_bytes, uint32_t magic = 0x803) {
    return be32(magic) + be32(n) + be32(r) + be32(c) + std::string(pixel_bytes, char(7));
  }
  static std::string labels(uint32_t n, size_t bytes, char value = 3) {
    return be32(0x801) + be32(n) + std::string(bytes, value);
  }
  std::string write_gz(const std::string& name, const std::string& bytes) {
    std::string path = (dir / name).string();
    gzFile f = gzopen(path.c_str(), "wb");
    gzwrite(f, bytes.data(), unsigned(bytes.size()));
    gzclose(f);
    return path;
  }
  std::string write_plain(const std::string& name, const std::string& bytes) {
    std::string path = (dir / name).string();
    std::ofstream(path, std::ios::binary) << bytes;
    return path;
  }
  // Runs f, expects a runtime_error whose message contains every piece.
  static void expect_error(const std::function<void()>& f, std::initializer_list<std::string> pieces) {
    try {
      f();
      ADD_FAILURE() << "no error thrown";
    } catch (const std::runtime_error& e) {
      for (const auto& p : pieces) EXPECT_NE(std::string(e.what()).find(p), std::string::npos) << e.what();
    }
  }
  fs::path dir;
};

TEST_F(Idx, ReadsValidFilesGzippedOrPlain) {
  write_gz("train-images-idx3-ubyte.gz", images(3, 2, 2, 12));
  write_plain("train-labels-idx1-ubyte", labels(3, 3));
  ImageSet s = load_split(dir.string(), "train");
  EXPECT_EQ(s.images.count, 3);
  EXPECT_EQ(s.images.rows, 2);
  EXPECT_EQ(s.images.pixels.size(), 12u);
  EXPECT_EQ(s.images.pixels[5], 7);
  EXPECT_EQ(s.labels, std::vector<uint8_t>({3, 3, 3}));
}

TEST_F(Idx, ErrorsNameTheFileAndTheProblem) {
  std::string missing = (dir / "nothing-here.gz").string();
  expect_error([&] { read_idx_images(missing); }, {missing, "not found"});
  std::string magic = write_gz("magic.gz", images(1, 2, 2, 4, 0x801));
  expect_error([&] { read_idx_images(magic); }, {magic, "wrong magic number 0x00000801"});
  std::string lmagic = write_gz("lmagic.gz", images(1, 2, 2, 4));
  expect_error([&] { read_idx_labels(lmagic); }, {lmagic, "wrong magic number 0x00000803"});
  std::string trunc = write_gz("trunc.gz", images(10, 28, 28, 100));
  expect_error([&] { read_idx_images(trunc); }, {trunc, "truncated", "7840 bytes of pixels, found 100"});
  std::string header = write_gz("header.gz", be32(0x803) + be32(5));
  expect_error([&] { read_idx_images(header); }, {header, "truncated", "header"});
  std::string extra = write_gz("extra.gz", labels(2, 5));
  expect_error([&] { read_idx_labels(extra); }, {extra, "trailing data"});
  // A gzip stream cut in the middle.
  std::string full = (dir / "cut.gz").string();
  write_gz("cut.gz", images(100, 28, 28, 78400));
  fs::resize_file(full, fs::file_size(full) / 2);
  expect_error([&] { read_idx_images(full); }, {full});
}

TEST_F(Idx, SplitChecksCountsAndLabels) {
  write_gz("train-images-idx3-ubyte.gz", images(3, 2, 2, 12));
  std::string lab = write_gz("train-labels-idx1-ubyte.gz", labels(4, 4));
  expect_error([&] { load_split(dir.string(), "train"); }, {lab, "holds 4 labels but", "holds 3 images"});
  write_gz("train-labels-idx1-ubyte.gz", labels(3, 3, 12));
  expect_error([&] { load_split(dir.string(), "train"); }, {lab, "label 12 at index 0"});
  expect_error([&] { load_split(dir.string(), "t10k"); }, {"t10k-images-idx3-ubyte.gz", "not found"});
}

// ---- chart ----------------------------------------------------------------------

TEST_F(Idx, ChartIsAPng) {
  std::string path = (dir / "chart.png").string();
  write_line_chart(path, "t", "x", "y", {{"a", {0.5, 1.0, 2.0}, {60, 70, 80}}});
  std::ifstream f(path, std::ios::binary);
  char sig[8] = {};
  f.read(sig, 8);
  EXPECT_EQ(std::string(sig + 1, 3), "PNG");
  EXPECT_THROW(write_line_chart(path, "t", "x", "y", {{"empty", {}, {}}}), std::runtime_error);
}

