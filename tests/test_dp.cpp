// Tests for dp::clipped_grad_sum: per-sample norms and the clipped sum against
// a loop of single-sample torch::autograd::grad calls (no transforms), on an
// MLP, CNNs (stride, padding, dilation, groups, non-square; Conv1d; float and double), an embedding model,
// a transformer layer, LayerNorm and GroupNorm models, in every norm mode, and through the vmap(grad)
// path for a model that is not an nn::Sequential; each also with augmentation
// multiplicity (group_size: an example's gradient is the mean of its rows').
#include "common.h"
#include "../apps/dpsgd/augment.h"  // the demo's augmentation multiplicity views
#include "../apps/dpsgd/model.h"  // the demo's CNN
#include "../src/noise_kernel.h"  // dp::detail::philox_block, to check against ATen's Philox

#include <ATen/core/PhiloxRNGEngine.h>

namespace nn = torch::nn;
namespace F = torch::nn::functional;
namespace dp = torchfunc::dp;

namespace {

Tensor per_sample_ce(const Tensor& out, const Tensor& y) {
  return F::cross_entropy(out, y, F::CrossEntropyFuncOptions().reduction(torch::kNone));
}

struct Reference {
  std::vector<std::vector<Tensor>> grads;  // [sample][parameter]
  Tensor norms;
};

/// Per-sample gradients one sample at a time with plain autograd.
template <class M>
Reference loop_reference(M& model, const Tensor& x, const Tensor& y) {
  std::vector<Tensor> params;
  for (auto& p : model->parameters())
    if (p.requires_grad()) params.push_back(p);
  Reference r;
  std::vector<double> norms;
  for (int64_t i = 0; i < x.size(0); ++i) {
    Tensor li = per_sample_ce(model->forward(x.narrow(0, i, 1)), y.narrow(0, i, 1)).sum();
    auto g = torch::autograd::grad({li}, params, {}, false, false, true);
    double n2 = 0;
    for (auto& t : g) {
      if (!t.defined()) t = torch::zeros({});
      n2 += t.to(torch::kDouble).pow(2).sum().item<double>();
    }
    r.grads.push_back(g);
    norms.push_back(std::sqrt(n2));
  }
  r.norms = torch::tensor(norms, torch::kDouble);
  return r;
}

template <class M>
void expect_matches(M& model, const dp::ClippedGradients& got, const Reference& ref, double clip) {
  expect_close(got.norms.to(torch::kDouble), ref.norms, 1e-4 * (1 + ref.norms.abs().max().item<double>()));
  Tensor c = (clip / (ref.norms + 1e-6)).clamp_max(1.0);
  size_t k = 0;
  for (const auto& p : model->named_parameters()) {
    if (!p.value().requires_grad()) continue;
    ASSERT_TRUE(got.grad_sum.contains(p.key())) << p.key();
    Tensor want = torch::zeros(p.value().sizes(), torch::kDouble);
    for (size_t i = 0; i < ref.grads.size(); ++i) want += c[i].item<double>() * ref.grads[i][k].to(torch::kDouble);
    SCOPED_TRACE(p.key());
    expect_close(got.grad_sum[p.key()].to(torch::kDouble), want, 1e-5 * (1 + want.abs().max().item<double>()));
    ++k;
  }
  EXPECT_EQ(got.grad_sum.size(), k);
}

/// Augmentation multiplicity: an example of K rows has the mean of their
/// gradients (from the per-row loop), and its norm.
Reference grouped(const Reference& rows, int64_t K) {
  Reference r;
  std::vector<double> norms;
  for (size_t s = 0; s < rows.grads.size(); s += K) {
    std::vector<Tensor> mean;
    double n2 = 0;
    for (size_t k = 0; k < rows.grads[s].size(); ++k) {
      Tensor m = torch::zeros(rows.grads[s][k].sizes(), torch::kDouble);
      for (int64_t j = 0; j < K; ++j) m += rows.grads[s + j][k].to(torch::kDouble);
      mean.push_back(m / double(K));
      n2 += mean.back().pow(2).sum().item<double>();
    }
    r.grads.push_back(mean);
    norms.push_back(std::sqrt(n2));
  }
  r.norms = torch::tensor(norms, torch::kDouble);
  return r;
}

/// Checks every mode of the Sequential path, with a clip norm that clips
/// some samples and not others, and the generic vmap(grad) path; then the
/// same with the rows taken as groups of K (one example's augmentations).
void check_model(nn::Sequential model, const Tensor& x, const Tensor& y) {
  const Reference rows = loop_reference(model, x, y);
  const int64_t B = x.size(0), K = B % 2 == 0 ? 2 : 3;
  ASSERT_EQ(B % K, 0);
  ASSERT_GE(B / K, 3);
  for (int64_t group : {int64_t(1), K}) {
    SCOPED_TRACE("group_size " + std::to_string(group));
    const Reference ref = group == 1 ? rows : grouped(rows, group);
    const double clip = ref.norms.median().item<double>();
    ASSERT_GT(ref.norms.max().item<double>(), clip);  // some are clipped
    const auto options = dp::ClipOptions().max_norm(clip).group_size(group);
    for (auto mode : {dp::NormMode::Auto, dp::NormMode::Ghost, dp::NormMode::Materialize}) {
      SCOPED_TRACE("mode " + std::to_string(int(mode)));
      auto got = dp::clipped_grad_sum(model, per_sample_ce, x, y, dp::ClipOptions(options).mode(mode));
      expect_matches(model, got, ref, clip);
      expect_close(got.losses, per_sample_ce(model->forward(x), y).detach(), 1e-5);
    }
    // The template overload on a shared_ptr<SequentialImpl>: vmap(grad) of the whole model.
    auto impl = model.ptr();
    expect_matches(model, dp::clipped_grad_sum(impl, per_sample_ce, x, y, options), ref, clip);
  }
}

struct BatchFirstEncoderImpl : nn::Module {  // C++'s TransformerEncoderLayer is sequence-first
  BatchFirstEncoderImpl()
      : layer(register_module("layer", nn::TransformerEncoderLayer(
                                           nn::TransformerEncoderLayerOptions(16, 2).dim_feedforward(32).dropout(0.0)))) {
    static const bool registered = (func::register_module_members<BatchFirstEncoderImpl>(), true);
    (void)registered;
  }
  Tensor forward(const Tensor& x) { return layer(x.transpose(0, 1)).transpose(0, 1); }
  nn::TransformerEncoderLayer layer;
};
TORCH_MODULE(BatchFirstEncoder);

TEST_F(TF, DpClippedSumMatchesLoopOnMlp) {
  check_model(nn::Sequential(nn::Linear(20, 32), nn::Tanh(), nn::Linear(32, 10)), torch::randn({9, 20}),
              torch::randint(10, {9}));
}

TEST_F(TF, DpClippedSumMatchesLoopOnCnns) {
  nn::Sequential cnn(nn::Conv2d(nn::Conv2dOptions(1, 4, 3).stride(2).padding(1)), nn::ReLU(),
                     nn::Conv2d(nn::Conv2dOptions(4, 6, 3).groups(2).padding(2).dilation(2)), nn::Tanh(),
                     nn::Flatten(), nn::Linear(6 * 4 * 4, 5));
  check_model(cnn, torch::randn({6, 1, 8, 8}), torch::randint(5, {6}));
  nn::Sequential cnn1d(nn::Conv1d(nn::Conv1dOptions(3, 4, 3).stride(2).padding(1)), nn::ReLU(), nn::Flatten(),
                       nn::Linear(4 * 5, 2));
  check_model(cnn1d, torch::randn({6, 3, 10}), torch::randint(2, {6}));
  // Non-square kernel, stride, padding and dilation; 20 output channels (the
  // CPU kernel's vector blocks of 16 and 4), 18 taps (blocks of 8 and 1); double.
  nn::Sequential rect(nn::Conv2d(nn::Conv2dOptions(3, 20, {2, 3}).stride({1, 2}).padding({1, 0}).dilation({2, 1})),
                      nn::Tanh(), nn::Flatten(), nn::Linear(20 * 7 * 4, 3));
  rect->to(torch::kDouble);
  check_model(rect, torch::randn({6, 3, 7, 9}, torch::kDouble), torch::randint(3, {6}));
  // 'same' padding and reflect padding go through the generic rule.
  nn::Sequential other(nn::Conv2d(nn::Conv2dOptions(2, 3, 3).padding(torch::kSame)), nn::ReLU(),
                       nn::Conv2d(nn::Conv2dOptions(3, 3, 3).padding(1).padding_mode(torch::kReflect)), nn::Flatten(),
                       nn::Linear(3 * 5 * 5, 3));
  check_model(other, torch::randn({6, 2, 5, 5}), torch::randint(3, {6}));
}

TEST_F(TF, DpClippedSumMatchesLoopOnEmbeddingsAndATransformer) {
  // Repeated indices within a sample and the padding index 0.
  nn::Sequential emb(nn::Embedding(nn::EmbeddingOptions(30, 8).padding_idx(0)), nn::Linear(8, 8), nn::Tanh(),
                     nn::Functional([](const Tensor& t) { return t.mean(1); }), nn::Linear(8, 3));
  Tensor idx = torch::randint(0, 6, {6, 7});  // few distinct ids: many repeats
  check_model(emb, idx, torch::randint(3, {6}));
  nn::Sequential tr(nn::Linear(8, 16), BatchFirstEncoder(), nn::Functional([](const Tensor& t) { return t.mean(1); }),
                    nn::LayerNorm(nn::LayerNormOptions({16})), nn::Linear(16, 3));
  check_model(tr, torch::randn({6, 4, 8}), torch::randint(3, {6}));
}

TEST_F(TF, DpClippedSumMatchesLoopOnTheDemoCnn) {
  // Strided convs with and without padding, max-pooling with stride 1, tanh.
  check_model(dpsgd::make_model("tanh"), torch::randn({12, 1, 28, 28}), torch::randint(10, {12}));
}

TEST_F(TF, DpClippedSumMatchesLoopWithLayerNormAndGroupNorm) {
  nn::Sequential ln(nn::Linear(6, 8), nn::LayerNorm(nn::LayerNormOptions({8})), nn::Tanh(), nn::Linear(8, 3));
  check_model(ln, torch::randn({6, 6}), torch::randint(3, {6}));
  // Over a sequence: LayerNorm over the last dim (positions summed) and over the last two.
  nn::Sequential seq(nn::Linear(6, 8), nn::LayerNorm(nn::LayerNormOptions({8})), nn::ReLU(),
                     nn::LayerNorm(nn::LayerNormOptions({4, 8}).eps(1e-3)), nn::Flatten(), nn::Linear(32, 3));
  check_model(seq, torch::randn({6, 4, 6}), torch::randint(3, {6}));
  nn::Sequential gn(nn::Conv2d(nn::Conv2dOptions(1, 4, 3)), nn::GroupNorm(nn::GroupNormOptions(2, 4)), nn::ReLU(),
                    nn::Flatten(), nn::Linear(4 * 4 * 4, 3));
  check_model(gn, torch::randn({6, 1, 6, 6}), torch::randint(3, {6}));
  // GroupNorm over a sequence (Conv1d), one group per channel.
  nn::Sequential gn1(nn::Conv1d(nn::Conv1dOptions(2, 4, 3)), nn::GroupNorm(nn::GroupNormOptions(4, 4)), nn::Tanh(),
                     nn::Flatten(), nn::Linear(4 * 5, 2));
  check_model(gn1, torch::randn({6, 2, 7}), torch::randint(2, {6}));
}

// The demo's views: K consecutive rows per image, each equal to the image
// shifted by (dy, dx) in [-s, s]^2 with edges replicated, mirrored or not;
// checked against crops built here pixel by pixel.
TEST_F(TF, DpsgdAugmentViewsAreShiftsAndFlipsOfTheImage) {
  at::Generator gen = at::detail::createCPUGenerator(3);
  Tensor x = torch::randn({5, 1, 6, 7});
  expect_close(dpsgd::augment(x, 3, 0, false, gen), x.repeat_interleave(3, 0), 0);
  const int64_t K = 8, s = 2, H = 6, W = 7;
  Tensor v = dpsgd::augment(x, K, s, true, gen);
  ASSERT_EQ(v.sizes(), (std::vector<int64_t>{5 * K, 1, H, W}));
  auto crop = [&](const Tensor& img, int64_t dy, int64_t dx, bool mirror) {  // img [H, W]
    Tensor out = torch::empty({H, W});
    for (int64_t i = 0; i < H; ++i)
      for (int64_t j = 0; j < W; ++j) {
        int64_t r = std::clamp<int64_t>(i + dy, 0, H - 1), c = (mirror ? W - 1 - j : j) + dx;
        out[i][j] = img[r][std::clamp<int64_t>(c, 0, W - 1)];
      }
    return out;
  };
  int mirrored = 0, shifted = 0;
  for (int64_t row = 0; row < 5 * K; ++row) {
    const Tensor img = x[row / K][0], view = v[row][0];
    bool found = false;
    for (int64_t dy = -s; dy <= s && !found; ++dy)
      for (int64_t dx = -s; dx <= s && !found; ++dx)
        for (bool mirror : {false, true}) {
          if (found || !crop(img, dy, dx, mirror).equal(view)) continue;
          found = true;
          mirrored += mirror;
          shifted += dy != 0 || dx != 0;
        }
    EXPECT_TRUE(found) << "row " << row;
  }
  EXPECT_GT(mirrored, 5);  // both kinds occur (40 views, each mirrored with probability 1/2)
  EXPECT_LT(mirrored, 35);
  EXPECT_GT(shifted, 30);
}

TEST_F(TF, DpFrozenParametersAndErrors) {
  nn::Sequential mlp(nn::Linear(4, 5), nn::ReLU(), nn::Linear(5, 2));
  mlp->ptr(0)->as<nn::Linear>()->weight.set_requires_grad(false);
  Tensor x = torch::randn({4, 4}), y = torch::randint(2, {4});
  auto r = dp::clipped_grad_sum(mlp, per_sample_ce, x, y);
  EXPECT_FALSE(r.grad_sum.contains("0.weight"));
  expect_matches(mlp, r, loop_reference(mlp, x, y), 1.0);
  auto mean_loss = [](const Tensor& o, const Tensor& t) { return F::cross_entropy(o, t); };
  EXPECT_ERROR(dp::clipped_grad_sum(mlp, mean_loss, x, y), "the loss must return one value per sample");
  EXPECT_ERROR(dp::clipped_grad_sum(mlp, per_sample_ce, x, y.narrow(0, 0, 3)), "same size");
  EXPECT_ERROR(dp::clipped_grad_sum(mlp, per_sample_ce, x, y, dp::ClipOptions().max_norm(0)),
               "max_norm must be positive");
  EXPECT_ERROR(dp::clipped_grad_sum(mlp, per_sample_ce, x, y, dp::ClipOptions().group_size(3)),
               "not a whole number of groups of group_size 3");
  EXPECT_ERROR(dp::clipped_grad_sum(mlp, per_sample_ce, x, y, dp::ClipOptions().group_size(0)),
               "group_size must be at least 1");
  auto impl = mlp.ptr();  // the vmap(grad) overload checks before it computes
  EXPECT_ERROR(dp::clipped_grad_sum(impl, per_sample_ce, x, y, dp::ClipOptions().group_size(3)),
               "not a whole number of groups");
  // Inside vmap the Sequential overload's own backward pass would sum over
  // the vmapped samples too (it gave wrong sums): refused.
  auto inside = [&](const Tensor& xi, const Tensor& yi) { return dp::clipped_grad_sum(mlp, per_sample_ce, xi, yi).norms; };
  EXPECT_ERROR(func::vmap(inside)(torch::randn({2, 4, 4}), torch::randint(2, {2, 4})),
               "call it outside vmap / grad / functionalize");
  expect_matches(mlp, dp::clipped_grad_sum(mlp, per_sample_ce, x, y), loop_reference(mlp, x, y), 1.0);  // still fine after
}

}  // namespace

// ---- dp::NoiseGenerator: Philox words against ATen's own Philox engine, the
// numbers against Box-Muller in double with libm on those words, the
// distribution against N(0, 1), and the same bits on any thread count.
namespace {

// Number k of the stream by the documented layout (src/noise_kernel.h), from
// at::philox_engine's words and std::log / std::cos / std::sin in double.
std::vector<double> reference_normals(uint64_t seed, int64_t n, bool dbl) {
  const int64_t C = 64, per = dbl ? 2 * C : 4 * C;
  std::vector<double> z(static_cast<size_t>(n));
  for (int64_t k = 0; k < n; ++k) {
    const int64_t block = k / per, j = (k % per) / C, i = k % C;
    at::philox_engine e(seed, 0, uint64_t(block * C + i));
    uint32_t w[4];
    for (auto& x : w) x = e();
    double u, turn;  // u in (0, 1]; the angle in turns
    if (dbl) {
      u = (double((uint64_t(w[0]) << 21) | (w[1] >> 11)) + 1) / 9007199254740992.0;  // 2^53
      turn = double((uint64_t(w[2]) << 21) | (w[3] >> 11)) / 9007199254740992.0;
    } else {
      const uint32_t a = w[j < 2 ? 0 : 2], b = w[j < 2 ? 1 : 3];
      u = double(float(int32_t(a >> 2) + 1)) / 1073741824.0;  // float(...): the kernel's f is a float
      turn = double((b >> 30) * 16777216u + ((b >> 6) & 0xFFFFFFu)) / 67108864.0;
    }
    const double r = std::sqrt(-2 * std::log(u)), angle = 2 * M_PI * turn;
    z[size_t(k)] = (j % 2 == 0) ? r * std::cos(angle) : r * std::sin(angle);
  }
  return z;
}

double normal_cdf(double x) { return 0.5 * std::erfc(-x / std::sqrt(2.0)); }

// Kolmogorov-Smirnov distance to N(0, 1), moments, tails and correlations of
// neighbours: in the stream, and within a Box-Muller pair (64 apart).
void expect_standard_normal(const Tensor& z, const std::string& what) {
  SCOPED_TRACE(what);
  Tensor d = z.to(torch::kDouble).flatten();
  const int64_t n = d.numel();
  const double se = 1 / std::sqrt(double(n));
  EXPECT_LT(std::abs(d.mean().item<double>()), 5 * se);
  EXPECT_LT(std::abs(d.pow(2).mean().item<double>() - 1), 5 * std::sqrt(2.0) * se);
  EXPECT_LT(std::abs(d.pow(4).mean().item<double>() - 3), 5 * std::sqrt(96.0) * se);
  std::vector<double> s(d.data_ptr<double>(), d.data_ptr<double>() + n);
  std::sort(s.begin(), s.end());
  double ks = 0;
  for (int64_t k = 0; k < n; ++k) {
    const double F = normal_cdf(s[size_t(k)]);
    ks = std::max({ks, std::abs(F - double(k) / double(n)), std::abs(F - double(k + 1) / double(n))});
  }
  EXPECT_LT(ks, 1.95 * se) << "KS distance (critical value at 0.001: " << 1.95 * se << ")";
  for (double t : {2.0, 3.0, 4.0}) {
    const double p = 2 * normal_cdf(-t), got = (d.abs() > t).to(torch::kDouble).mean().item<double>();
    EXPECT_LT(std::abs(got - p), 5 * std::sqrt(p * (1 - p) / double(n)) + 1e-12) << "tail beyond " << t;
  }
  auto corr = [&](const Tensor& a, const Tensor& b) {
    return ((a - a.mean()) * (b - b.mean())).mean().item<double>() / (a.std().item<double>() * b.std().item<double>());
  };
  EXPECT_LT(std::abs(corr(d.narrow(0, 0, n - 1), d.narrow(0, 1, n - 1))), 5 * se) << "lag 1";
  Tensor blocks = d.narrow(0, 0, n / 128 * 128).view({-1, 2, 64});  // both floats' and doubles' pairs lie 64 apart
  Tensor z0 = blocks.select(1, 0).flatten(), z1 = blocks.select(1, 1).flatten();
  const double pse = 1 / std::sqrt(double(z0.numel()));
  EXPECT_LT(std::abs(corr(z0, z1)), 5 * pse) << "Box-Muller pair";
  EXPECT_LT(std::abs(corr(z0.pow(2), z1.pow(2))), 5 * pse) << "Box-Muller pair, squares";
}

}  // namespace

TEST_F(TF, DpNoisePhiloxWordsAreAtenPhiloxEngines) {
  for (uint64_t seed : {uint64_t(0), uint64_t(1), uint64_t(0x123456789abcdef0ULL), ~uint64_t(0)})
    for (uint64_t block : {uint64_t(0), uint64_t(1), uint64_t(3) << 30, ~uint64_t(0) / 64}) {  // counters past 2^32 and 2^64 - 64
      uint32_t words[4][64];
      dp::detail::philox_block(seed, block, words);
      for (int i = 0; i < 64; ++i) {
        at::philox_engine e(seed, 0, block * 64 + uint64_t(i));
        for (int w = 0; w < 4; ++w) ASSERT_EQ(words[w][i], e()) << "seed " << seed << " block " << block << " counter " << i << " word " << w;
      }
    }
}

TEST_F(TF, DpNoiseNumbersAreBoxMullerOfThoseWords) {
  for (bool dbl : {false, true}) {
    const int64_t n = 3 * 256 + 77;  // whole blocks and a partial one
    dp::NoiseGenerator g(20261203);
    Tensor z = g.randn({n}, dbl ? torch::kDouble : torch::kFloat).to(torch::kDouble);
    const auto ref = reference_normals(20261203, n, dbl);
    double worst = 0;
    for (int64_t k = 0; k < n; ++k) worst = std::max(worst, std::abs(z[k].item<double>() - ref[size_t(k)]));
    EXPECT_LT(worst, dbl ? 1e-13 : 2e-6) << (dbl ? "double" : "float");
  }
}

TEST_F(TF, DpNoiseIsStandardNormal) {
  expect_standard_normal(dp::NoiseGenerator(7).randn({1 << 22}), "float32, seed 7");
  expect_standard_normal(dp::NoiseGenerator(~uint64_t(0) - 5).randn({1 << 22}), "float32, seed 2^64 - 6");
  expect_standard_normal(dp::NoiseGenerator(8).randn({1 << 21}, torch::kDouble), "float64");
  // Successive calls and two seeds are independent streams.
  dp::NoiseGenerator g(9);
  Tensor a = g.randn({1 << 20}), b = g.randn({1 << 20}), c = dp::NoiseGenerator(10).randn({1 << 20});
  EXPECT_LT(std::abs((a * b).mean().item<double>()), 5.0 / 1024);
  EXPECT_LT(std::abs((a * c).mean().item<double>()), 5.0 / 1024);
}

TEST_F(TF, DpNoiseIsTheSameOnAnyThreadCountAndResumesFromItsOffset) {
  // (1 << 20) + 1000 numbers: two threads split them inside a block.
  const int threads = at::get_num_threads();
  at::set_num_threads(1);
  Tensor one = dp::NoiseGenerator(5).randn({(1 << 20) + 1000}), one_d = dp::NoiseGenerator(5).randn({300001}, torch::kDouble);
  at::set_num_threads(2);
  Tensor two = dp::NoiseGenerator(5).randn({(1 << 20) + 1000}), two_d = dp::NoiseGenerator(5).randn({300001}, torch::kDouble);
  at::set_num_threads(threads);
  EXPECT_TRUE(torch::equal(one, two));
  EXPECT_TRUE(torch::equal(one_d, two_d));
  dp::NoiseGenerator g(5);
  Tensor first = g.randn({1000});
  EXPECT_EQ(g.offset(), 4u * 64);  // 1000 float32 numbers: 4 blocks of 256
  EXPECT_TRUE(torch::equal(first, one.narrow(0, 0, 1000)));
  const uint64_t at = g.offset();
  Tensor next = g.randn({300}, torch::kDouble);
  EXPECT_TRUE(torch::equal(next, dp::NoiseGenerator(5, at).randn({300}, torch::kDouble)));
  EXPECT_EQ(g.offset(), at + 3 * 64);  // 300 float64 numbers: 3 blocks of 128
}

TEST_F(TF, DpNoiseAddsInPlaceOnAnyLayoutDtypeAndDevice) {
  Tensor t0 = torch::randn({37, 29});
  Tensor z = dp::NoiseGenerator(3).randn({37, 29});
  Tensor t = t0.clone();
  const auto version = t._version();
  dp::NoiseGenerator(3).add_noise_(t, 0.3, 0.5);
  EXPECT_GT(t._version(), version);
  EXPECT_TRUE(torch::allclose(t, (t0 + 0.3 * z) * 0.5, 1e-6, 1e-6));
  // A transposed view gets the numbers in its own (logical) order, as its contiguous copy.
  Tensor tt = t0.t().contiguous().t();  // [37, 29], not contiguous
  ASSERT_FALSE(tt.is_contiguous());
  dp::NoiseGenerator(3).add_noise_(tt, 0.3, 0.5);
  EXPECT_TRUE(torch::equal(tt, t));
  // bfloat16 takes float32 numbers; a parameter takes noise under NoGradGuard.
  Tensor h = t0.to(torch::kBFloat16);
  dp::NoiseGenerator(3).add_noise_(h, 0.3, 0.5);
  EXPECT_TRUE(torch::allclose(h.to(torch::kFloat), t, 2e-2, 2e-2));
  Tensor p = t0.clone().requires_grad_();
  {
    torch::NoGradGuard no_grad;
    dp::NoiseGenerator(3).add_noise_(p, 0.3, 0.5);
  }
  EXPECT_TRUE(torch::equal(p.detach(), t));
  // Empty tensors take nothing and use no counters; std 0 only scales.
  dp::NoiseGenerator g(3);
  Tensor e = torch::zeros({0});
  g.add_noise_(e, 1.0);
  EXPECT_EQ(g.offset(), 0u);
  Tensor s = t0.clone();
  g.add_noise_(s, 0.0, 2.0);
  EXPECT_TRUE(torch::equal(s, t0 * 2));
  if (torch::cuda::is_available()) {
    Tensor c = t0.cuda();
    dp::NoiseGenerator(3).add_noise_(c, 0.3, 0.5);
    EXPECT_TRUE(torch::allclose(c.cpu(), t, 1e-6, 1e-6));
  }
}
