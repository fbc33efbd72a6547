// The demo's scattering transform (apps/dpsgd/scattering.h): its filters
// against the closed-form Fourier transform of a Gaussian-windowed wave, its
// features against kymatio's Scattering2D (tests/data/scattering_kymatio.json,
// written by tests/data/make_scattering_reference.py).
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <nlohmann/json.hpp>

#include <cmath>
#include <fstream>

#include "scattering.h"

namespace {

constexpr double kPi = 3.14159265358979323846;

// The DFT of g sampled on the integer grid and periodised over M x N, by
// Poisson summation: sum over m of G(omega + 2 pi m), omega = 2 pi (k/M, l/N),
// where G(w) = exp(-(w - xi v)^T S (w - xi v) / 2) is the Fourier transform of
// the unit-mass envelope exp(-u^T A u / 2) times e^{i xi v.u},
// A = R diag(1, slant^2) R^T / sigma^2, S = A^-1 = sigma^2 R diag(1, slant^-2) R^T.
torch::Tensor gabor_dft(int64_t M, int64_t N, double sigma, double theta, double xi, double slant) {
  const double c = std::cos(theta), s = std::sin(theta), inv = 1.0 / (slant * slant), s2 = sigma * sigma;
  const double S00 = s2 * (c * c + inv * s * s), S01 = s2 * (c * s - inv * s * c), S11 = s2 * (s * s + inv * c * c);
  auto opts = torch::TensorOptions().dtype(torch::kDouble);
  torch::Tensor wk = (2 * kPi * torch::arange(M, opts) / M).unsqueeze(1);
  torch::Tensor wl = (2 * kPi * torch::arange(N, opts) / N).unsqueeze(0);
  torch::Tensor out = torch::zeros({M, N}, opts);
  for (int mk = -3; mk <= 3; ++mk)
    for (int ml = -3; ml <= 3; ++ml) {
      torch::Tensor a = wk + 2 * kPi * mk - xi * c, b = wl + 2 * kPi * ml - xi * s;
      out += torch::exp(-(S00 * a * a + 2 * S01 * a * b + S11 * b * b) / 2);
    }
  return out;
}

TEST(Scattering, WaveletFiltersAreTheClosedFormFourierTransforms) {
  for (int J : {2, 3}) {
    const int L = 8;
    dpsgd::Scattering2D S(28, 28, J, L);
    const int64_t M = S.padded_rows(), N = S.padded_cols();
    EXPECT_EQ(M, J == 2 ? 36 : 40);  // a multiple of 2^J with a margin on each side
    for (int j = 0; j < J; ++j)
      for (int t = 0; t < L; ++t) {
        const double sigma = 0.8 * std::pow(2.0, j), theta = (L / 2 - 1 - t) * kPi / L, xi = 0.75 * kPi / std::pow(2.0, j);
        torch::Tensor wave = gabor_dft(M, N, sigma, theta, xi, 4.0 / L);
        torch::Tensor envelope = gabor_dft(M, N, sigma, theta, 0, 4.0 / L);
        // Morlet: the wave minus beta times the envelope, zero at frequency 0.
        torch::Tensor expected = wave - envelope * (wave[0][0] / envelope[0][0]);
        const torch::Tensor& psi = S.psi(j, t, 0);
        ASSERT_EQ(psi.sizes(), expected.sizes());
        EXPECT_LT((psi - expected).abs().max().item<double>(), 1e-10) << "j " << j << " t " << t;
        EXPECT_NEAR(psi[0][0].item<double>(), 0.0, 1e-12);
      }
    torch::Tensor low = gabor_dft(M, N, 0.8 * std::pow(2.0, J - 1), 0, 0, 1);
    EXPECT_LT((S.phi(0) - low).abs().max().item<double>(), 1e-10);
    EXPECT_NEAR(S.phi(0)[0][0].item<double>(), 1.0, 1e-9);
    // Coarser levels are the spectra folded onto the subsampled grid.
    EXPECT_EQ(S.phi(1).sizes(), (torch::IntArrayRef{M / 2, N / 2}));
    EXPECT_NEAR(S.phi(1)[0][0].item<double>(), 1.0, 1e-9);
  }
}

TEST(Scattering, FeaturesMatchKymatio) {
  std::ifstream in(std::string(TORCHFUNC_TEST_DATA) + "/scattering_kymatio.json");
  ASSERT_TRUE(in) << "tests/data/scattering_kymatio.json";
  nlohmann::json ref = nlohmann::json::parse(in);
  ASSERT_EQ(ref["cases"].size(), 3u);
  // kymatio normalises its Gaussians with 3.1415 for pi: each filtering
  // scales its features by pi / 3.1415, so order m carries that to the m+1.
  const double c = kPi / 3.1415;
  for (const auto& k : ref["cases"]) {
    const int64_t M = k["M"], N = k["N"];
    const int J = k["J"], L = k["L"];
    dpsgd::Scattering2D S(M, N, J, L);
    std::vector<double> xs = k["input"], ys = k["output"];
    std::vector<int64_t> shape = k["shape"];
    torch::Tensor x = torch::tensor(xs, torch::kDouble).view({-1, M, N});
    torch::Tensor expected = torch::tensor(ys, torch::kDouble).view(shape);
    ASSERT_EQ(S.channels(), shape[1]);
    std::vector<double> scale(S.channels(), c * c * c);
    scale[0] = c;
    for (int i = 1; i <= J * L; ++i) scale[i] = c * c;
    torch::Tensor factor = torch::tensor(scale, torch::kDouble).view({1, -1, 1, 1});
    for (auto dtype : {torch::kDouble, torch::kFloat}) {
      torch::Tensor y = S.forward(x.to(dtype)).to(torch::kDouble) * factor;
      ASSERT_EQ(y.sizes(), expected.sizes()) << M << "x" << N << " J " << J;
      const double err = (y - expected).abs().max().item<double>(), top = expected.abs().max().item<double>();
      EXPECT_LT(err, 2e-6 * top) << M << "x" << N << " J " << J << " L " << L << " dtype " << dtype;
    }
    // [B, 1, M, N] is the same as [B, M, N]; chunks are the same as one call.
    torch::Tensor x32 = x.to(torch::kFloat);
    EXPECT_TRUE(torch::equal(S.forward(x32.unsqueeze(1)), S.forward(x32)));
    EXPECT_TRUE(torch::allclose(S.forward_chunked(x32, 1), S.forward(x32), 1e-6, 1e-7));
  }
}

TEST(Scattering, BadInputsAreClearErrors) {
  dpsgd::Scattering2D S(28, 28);
  EXPECT_EQ(S.channels(), 81);
  auto message = [&](const torch::Tensor& x) {
    try {
      S.forward(x);
    } catch (const c10::Error& e) {
      return std::string(e.what_without_backtrace());
    }
    return std::string("no error");
  };
  EXPECT_NE(message(torch::rand({2, 3, 28, 28})).find("Scattering2D: expected images"), std::string::npos);
  EXPECT_NE(message(torch::rand({2, 28, 27})).find("Scattering2D: expected images"), std::string::npos);
  EXPECT_NE(message(torch::ones({2, 28, 28}, torch::kLong)).find("floating-point"), std::string::npos);
  EXPECT_THROW(dpsgd::Scattering2D(4, 4, 3), c10::Error);
  EXPECT_THROW(dpsgd::Scattering2D(28, 28, 0), c10::Error);
}

}  // namespace
