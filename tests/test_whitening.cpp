// The scatternet preset's private whitening (apps/dpsgd/whitening.h): its
// second moments against loops over the examples, the sensitivity its privacy
// accounting assumes, the noise it adds, and its matrices against their
// defining equation.
#include <gtest/gtest.h>
#include <torch/torch.h>

#include <cmath>

#include "whitening.h"

namespace {

using torch::Tensor;

Tensor random_features(int64_t n, uint64_t seed) {
  torch::manual_seed(seed);
  // Unequal scales per example, channel and position, as real features have.
  return torch::randn({n, 5, 3, 4}, torch::kDouble) * torch::rand({n, 5, 1, 1}, torch::kDouble).add(0.1) *
         torch::linspace(0.5, 3, 12, torch::kDouble).view({1, 1, 3, 4}) * 7;
}

// C = sum_n sum_p u[:, p] u[:, p]^T and P = sum_n sum_c u[c, :]^T u[c, :] of
// u = x / |x|, one example and one outer product at a time.
std::pair<Tensor, Tensor> moments_by_loops(const Tensor& x) {
  const int64_t n = x.size(0), c = x.size(1), hw = x.size(2) * x.size(3);
  Tensor C = torch::zeros({c, c}, torch::kDouble), P = torch::zeros({hw, hw}, torch::kDouble);
  for (int64_t i = 0; i < n; ++i) {
    Tensor u = x[i].reshape({c, hw}).to(torch::kDouble);
    u = u / u.norm();
    for (int64_t p = 0; p < hw; ++p) C += torch::outer(u.select(1, p), u.select(1, p));
    for (int64_t k = 0; k < c; ++k) P += torch::outer(u[k], u[k]);
  }
  return {C, P};
}

TEST(Whitening, SecondMomentsAreTheSumsOverExamples) {
  const Tensor x = random_features(40, 1);
  const auto [C, P] = dpsgd::second_moments(x);
  const auto [C_ref, P_ref] = moments_by_loops(x);
  EXPECT_TRUE(torch::allclose(C, C_ref, 1e-12, 1e-12));
  EXPECT_TRUE(torch::allclose(P, P_ref, 1e-12, 1e-12));
  // Each sum's trace is the number of examples (every u has norm 1).
  EXPECT_NEAR(C.trace().item<double>(), 40, 1e-9);
  EXPECT_NEAR(P.trace().item<double>(), 40, 1e-9);
}

// More examples than one chunk of second_moments' loop (4096): the sums add
// up over the chunks as over any split of the examples (each part below is
// one chunk, checked against the loops above).
TEST(Whitening, SecondMomentsAddUpOverChunks) {
  const Tensor x = random_features(9000, 2);
  const auto [C, P] = dpsgd::second_moments(x);
  const auto [C1, P1] = dpsgd::second_moments(x.narrow(0, 0, 3000));
  const auto [C2, P2] = dpsgd::second_moments(x.narrow(0, 3000, 3000));
  const auto [C3, P3] = dpsgd::second_moments(x.narrow(0, 6000, 3000));
  EXPECT_TRUE(torch::allclose(C, C1 + C2 + C3, 1e-12, 1e-9));
  EXPECT_TRUE(torch::allclose(P, P1 + P2 + P3, 1e-12, 1e-9));
  EXPECT_NEAR(C.trace().item<double>(), 9000, 1e-7);
}

// The accounting counts each sum as a Gaussian mechanism of sensitivity 1:
// one more example, however large, moves each by at most 1 (Frobenius).
TEST(Whitening, OneExampleMovesEachSumByAtMostOne) {
  const Tensor x = random_features(30, 2);
  const auto [C, P] = dpsgd::second_moments(x);
  for (double scale : {1e-3, 1.0, 1e6}) {
    for (int trial = 0; trial < 5; ++trial) {
      const Tensor extra = torch::randn({1, 5, 3, 4}, torch::kDouble) * scale;
      const auto [C1, P1] = dpsgd::second_moments(torch::cat({x, extra}));
      EXPECT_LE((C1 - C).norm().item<double>(), 1 + 1e-9);
      EXPECT_LE((P1 - P).norm().item<double>(), 1 + 1e-9);
    }
  }
  // The bound is attained by an example concentrated on one channel and position.
  Tensor spike = torch::zeros({1, 5, 3, 4}, torch::kDouble);
  spike[0][2][1][3] = 5;
  const auto [C1, P1] = dpsgd::second_moments(torch::cat({x, spike}));
  EXPECT_NEAR((C1 - C).norm().item<double>(), 1, 1e-9);
  EXPECT_NEAR((P1 - P).norm().item<double>(), 1, 1e-9);
}

// Without noise: each matrix M solves M (S + lam I) M = I, lam = reg * n / d;
// apply() is channels . x . positions per example, rescaled to norm sqrt(D).
TEST(Whitening, ExactMatricesAndTheirApplication) {
  const Tensor x = random_features(50, 3);
  const auto [C, P] = moments_by_loops(x);
  const double reg = 0.5;
  const auto w = dpsgd::private_kronecker_whitening(x, 0.0, reg, at::detail::getDefaultCPUGenerator());
  const Tensor IC = torch::eye(5, torch::kDouble), IP = torch::eye(12, torch::kDouble);
  EXPECT_TRUE(torch::allclose(w.channels.mm(C + reg * 50 / 5 * IC).mm(w.channels), IC, 1e-9, 1e-9));
  EXPECT_TRUE(torch::allclose(w.positions.mm(P + reg * 50 / 12 * IP).mm(w.positions), IP, 1e-9, 1e-9));
  EXPECT_TRUE(torch::allclose(w.channels, w.channels.t()));
  const Tensor y = w.apply(x);
  ASSERT_EQ(y.sizes(), x.sizes());
  for (int64_t i = 0; i < 50; i += 7) {
    Tensor expect = w.channels.mm(x[i].reshape({5, 12})).mm(w.positions);
    expect = expect * (std::sqrt(60.0) / expect.norm());
    EXPECT_TRUE(torch::allclose(y[i].reshape({5, 12}), expect, 1e-10, 1e-10)) << "example " << i;
  }
}

// With noise: (M^-2 - lam I) is the released sum, S plus symmetric noise of
// the stated standard deviation (checked where the noisy sum stays positive
// definite, so that no eigenvalue was clamped).
TEST(Whitening, NoiseHasTheStatedScale) {
  const Tensor x = random_features(4000, 4);
  const auto [C, P] = dpsgd::second_moments(x);
  const double sigma = 2.0, reg = 1.0;
  at::Generator gen = at::detail::createCPUGenerator(7);
  const auto w = dpsgd::private_kronecker_whitening(x, sigma, reg, gen);
  const Tensor released = torch::linalg_inv(w.positions.mm(w.positions)) - reg * 4000 / 12 * torch::eye(12, torch::kDouble);
  const Tensor noise = released - P;
  EXPECT_TRUE(torch::allclose(noise, noise.t(), 1e-6, 1e-6));
  const Tensor upper = noise.masked_select(torch::ones({12, 12}, torch::kBool).triu());  // 78 independent draws
  EXPECT_NEAR(upper.std().item<double>(), sigma, 0.35 * sigma);
  EXPECT_LT(std::abs(upper.mean().item<double>()), 4 * sigma / std::sqrt(78.0));
  // Another generator state: other noise, so other matrices.
  const auto w2 = dpsgd::private_kronecker_whitening(x, sigma, reg, gen);
  EXPECT_FALSE(torch::allclose(w.channels, w2.channels));
  (void)C;
}

TEST(Whitening, BadInputsAreClearErrors) {
  auto message = [](auto&& f) {
    try {
      f();
    } catch (const c10::Error& e) {
      return std::string(e.what_without_backtrace());
    }
    return std::string("no error");
  };
  auto gen = at::detail::getDefaultCPUGenerator();
  EXPECT_NE(message([&] { dpsgd::second_moments(torch::rand({3, 4})); }).find("dpsgd::second_moments: features must be"),
            std::string::npos);
  EXPECT_NE(message([&] { dpsgd::private_kronecker_whitening(torch::rand({3, 2, 2, 2}), -1, 1, gen); })
                .find("the noise multiplier must be >= 0"),
            std::string::npos);
  const auto w = dpsgd::private_kronecker_whitening(torch::rand({3, 2, 2, 2}), 0, 1, gen);
  EXPECT_NE(message([&] { w.apply(torch::rand({3, 3, 2, 2})); }).find("dpsgd::KroneckerWhitening::apply"),
            std::string::npos);
}

}  // namespace
