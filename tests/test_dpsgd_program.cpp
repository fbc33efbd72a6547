// The DP-SGD demo program end to end (run as a process, as a user would):
// its two clipping modes follow the same run, a 2-rank data-parallel run gives
// the single-process run's parameters, and a rank that dies or hangs makes the
// run fail with a clear error instead of hanging.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>
#include <torch/torch.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <string>

#include "model.h"

namespace fs = std::filesystem;
using torch::Tensor;

namespace {

struct DemoRun {
  int status;
  double seconds;
  std::string log;
  nlohmann::json metrics;
  std::vector<Tensor> params;
};

fs::path scratch() {
  struct Dir {  // removed at exit
    fs::path path = fs::temp_directory_path() / ("torchfunc-dpsgd-test-" + std::to_string(::getpid()));
    ~Dir() {
      std::error_code ec;
      fs::remove_all(path, ec);
    }
  };
  static const Dir dir;
  fs::create_directories(dir.path);
  return dir.path;
}

/// torchfunc-dpsgd with `args` and its own out dir; reads what it wrote.
DemoRun run_demo(const std::string& name, const std::string& args) {
  const fs::path out = scratch() / name, log = scratch() / (name + ".log");
  const std::string cmd =
      std::string(TORCHFUNC_DPSGD_BIN) + " " + args + " --out-dir " + out.string() + " > " + log.string() + " 2>&1";
  DemoRun r;
  auto t0 = std::chrono::steady_clock::now();
  r.status = std::system(cmd.c_str());
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  std::ifstream in(log);
  r.log.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
  if (r.status == 0) {
    std::ifstream m(out / "metrics.json");
    r.metrics = nlohmann::json::parse(m);
    auto model = dpsgd::make_model("tanh");
    torch::load(model, (out / "model.pt").string());
    for (const auto& p : model->parameters()) r.params.push_back(p.detach().clone());
  }
  return r;
}

double max_diff(const std::vector<Tensor>& a, const std::vector<Tensor>& b) {
  EXPECT_EQ(a.size(), b.size());
  double d = 0;
  for (size_t k = 0; k < a.size() && k < b.size(); ++k) d = std::max(d, (a[k] - b[k]).abs().max().item<double>());
  return d;
}

/// The demo's initial parameters for a seed (it seeds, reads data, builds the model).
std::vector<Tensor> initial_params(uint64_t seed) {
  torch::manual_seed(seed);
  std::vector<Tensor> r;
  for (const auto& p : dpsgd::make_model("tanh")->parameters()) r.push_back(p.detach().clone());
  return r;
}

const std::string kSmoke = "--preset smoke --threads 2 ";

// ---- the e2e preset's Gabor start of the first convolution (model.h) ----------

// Filter k of gabor_bank(16, 8) with the default options, from the closed
// form in scalar loops: theta = pi (k / 2) / 8, phase 0 or pi / 2, sigma 1.5,
// wavelength 4, aspect 0.5; then zero mean and norm 1.
std::vector<double> gabor_by_loops(int k) {
  const double theta = M_PI * (k / 2) / 8, phase = (k % 2) * M_PI / 2;
  std::vector<double> v;
  for (int i = 0; i < 8; ++i) {
    for (int j = 0; j < 8; ++j) {
      const double x = j - 3.5, y = i - 3.5;
      const double along = x * std::cos(theta) + y * std::sin(theta), across = y * std::cos(theta) - x * std::sin(theta);
      v.push_back(std::exp(-(along * along + 0.25 * across * across) / (2 * 1.5 * 1.5)) *
                  std::cos(2 * M_PI * along / 4 + phase));
    }
  }
  double mean = 0, norm = 0;
  for (double e : v) mean += e / v.size();
  for (double& e : v) norm += (e -= mean) * e;
  for (double& e : v) e /= std::sqrt(norm);
  return v;
}

TEST(GaborBank, FiltersFollowTheClosedFormAndItsSymmetries) {
  const Tensor bank = dpsgd::gabor_bank(16, 8);
  ASSERT_EQ(bank.sizes(), (std::vector<int64_t>{16, 1, 8, 8}));
  ASSERT_EQ(bank.scalar_type(), torch::kFloat);
  for (int k = 0; k < 16; ++k) {
    const Tensor f = bank[k][0].to(torch::kDouble);
    const auto ref = gabor_by_loops(k);
    EXPECT_LT((f.flatten() - torch::tensor(ref, torch::kDouble)).abs().max().item<double>(), 1e-6) << "filter " << k;
    EXPECT_NEAR(f.sum().item<double>(), 0, 1e-6);
    EXPECT_NEAR(f.norm().item<double>(), 1, 1e-6);
    // Cosine filters are even under a point reflection, sine filters odd.
    const Tensor reflected = f.flip({0, 1});
    EXPECT_LT((reflected - (k % 2 == 0 ? f : -f)).abs().max().item<double>(), 1e-6) << "filter " << k;
  }
  // A quarter turn: the filters at pi / 2 are those at 0, transposed.
  EXPECT_LT((bank[8][0] - bank[0][0].t()).abs().max().item<float>(), 1e-6);
  EXPECT_LT((bank[9][0] - bank[1][0].t()).abs().max().item<float>(), 1e-6);
  // Options: the norm scales; channels 16-31 are the next scale (wider envelope, longer wave).
  dpsgd::GaborOptions o;
  o.norm = 3;
  EXPECT_TRUE(torch::allclose(dpsgd::gabor_bank(16, 8, o), 3 * bank, 1e-6, 1e-6));
  const Tensor two_scales = dpsgd::gabor_bank(32, 8);
  EXPECT_TRUE(torch::equal(two_scales.narrow(0, 0, 16), bank));
  EXPECT_GT((two_scales[16] - bank[0]).abs().max().item<float>(), 0.05);
  try {
    dpsgd::gabor_bank(0, 8);
    ADD_FAILURE() << "no error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("dpsgd::gabor_bank: channels"), std::string::npos);
  }
}

// make_model(..., "gabor") differs from the default model only in conv1's
// weights (the default initialisation still draws, so the rest is the same).
TEST(GaborBank, MakeModelStartsTheFirstConvolutionFromTheBank) {
  torch::manual_seed(3);
  const auto gabor = dpsgd::make_model("tanh", 0, "gabor")->named_parameters();
  torch::manual_seed(3);
  const auto random = dpsgd::make_model("tanh")->named_parameters();
  ASSERT_EQ(gabor.size(), random.size());
  for (const auto& p : gabor) {
    if (p.key() == "0.weight") EXPECT_TRUE(torch::equal(p.value(), dpsgd::gabor_bank(16, 8)));
    else EXPECT_TRUE(torch::equal(p.value(), random[p.key()])) << p.key();
  }
  EXPECT_FALSE(torch::equal(gabor["0.weight"], random["0.weight"]));
  EXPECT_THROW(dpsgd::make_model("tanh", 0, "gabour"), std::invalid_argument);
}

TEST(DemoProgram, Conv1InitIsCheckedBeforeAnyWork) {
  DemoRun typo = run_demo("conv1_typo", kSmoke + "--conv1-init gabour");
  EXPECT_NE(typo.status, 0);
  EXPECT_NE(typo.log.find("--conv1-init must be random or gabor, got 'gabour'"), std::string::npos) << typo.log;
  DemoRun linear = run_demo("conv1_linear", "--preset scatternet-smoke --conv1-init gabor");
  EXPECT_NE(linear.status, 0);
  EXPECT_NE(linear.log.find("--conv1-init gabor applies to the CNN"), std::string::npos) << linear.log;
}

// --clipping ghost (per-layer norms, nothing materialised) and vmap (every
// per-sample gradient materialised) compute the same clipped sums up to
// rounding and draw the same random numbers, so with one seed the two runs
// follow the same trajectory.
TEST(DemoProgram, GhostAndVmapClippingFollowTheSameRun) {
  DemoRun g = run_demo("ghost", kSmoke + "--epochs 2 --seed 7 --clipping ghost");
  DemoRun v = run_demo("vmap", kSmoke + "--epochs 2 --seed 7 --clipping vmap");
  ASSERT_EQ(g.status, 0) << g.log;
  ASSERT_EQ(v.status, 0) << v.log;
  EXPECT_EQ(g.metrics["config"]["clipping"], "ghost");
  EXPECT_EQ(v.metrics["config"]["clipping"], "vmap");
  ASSERT_EQ(g.metrics["epochs"].size(), 2u);
  ASSERT_EQ(v.metrics["epochs"].size(), 2u);
  for (size_t e = 0; e < 2; ++e) {
    const auto &a = g.metrics["epochs"][e], &b = v.metrics["epochs"][e];
    SCOPED_TRACE("epoch " + std::to_string(e + 1));
    EXPECT_NEAR(a["train_loss"].get<double>(), b["train_loss"].get<double>(), 1e-4 * b["train_loss"].get<double>());
    EXPECT_NEAR(a["test_accuracy"].get<double>(), b["test_accuracy"].get<double>(), 0.2);
    EXPECT_EQ(a["epsilon"].get<double>(), b["epsilon"].get<double>());
  }
  // 16 steps of lr 0.5 with momentum moved the parameters; both runs alike
  // up to rounding, which the steps amplify: 6e-8 on libtorch 2.13 (both
  // modes reach the same folded-convolution kernels), 1e-4 on Debian's 1.13.
  EXPECT_GT(max_diff(g.params, initial_params(7)), 1e-2);
  EXPECT_LT(max_diff(g.params, v.params), 1e-3);
  std::printf("max |ghost - vmap| over the parameters after 16 steps: %.3g\n", max_diff(g.params, v.params));
  DemoRun bad = run_demo("bad", "--clipping sometimes");
  EXPECT_NE(bad.status, 0);
  EXPECT_NE(bad.log.find("--clipping must be ghost or vmap"), std::string::npos) << bad.log;
}

// --ema: model.pt holds the moving average of the iterates with De et al.'s
// warm-up (decay min(ema, (1 + t) / (10 + t)) at step t = 0, 1, ...), built
// here from the iterates of runs without it (one step per epoch; the average
// draws no random numbers, so the runs share their trajectory).
TEST(DemoProgram, EmaAveragesTheIterates) {
  const std::string one_step = kSmoke + "--seed 5 --train-limit 256 --batch-size 256 ";
  DemoRun p1 = run_demo("p1", one_step + "--epochs 1 --ema 0");
  DemoRun p2 = run_demo("p2", one_step + "--epochs 2 --ema 0");
  DemoRun avg = run_demo("avg", one_step + "--epochs 2 --ema 0.15");
  ASSERT_EQ(p1.status, 0) << p1.log;
  ASSERT_EQ(p2.status, 0) << p2.log;
  ASSERT_EQ(avg.status, 0) << avg.log;
  EXPECT_NE(avg.log.find("weight average (EMA) decay 0.15"), std::string::npos) << avg.log;
  const std::vector<Tensor> p0 = initial_params(5);
  std::vector<Tensor> expected;
  for (size_t k = 0; k < p0.size(); ++k) {
    const double d0 = std::min(0.15, 1.0 / 10), d1 = std::min(0.15, 2.0 / 11);  // 0.1, then the cap
    expected.push_back(d1 * (d0 * p0[k] + (1 - d0) * p1.params[k]) + (1 - d1) * p2.params[k]);
  }
  EXPECT_GT(max_diff(p2.params, p1.params), 1e-3);  // the steps moved the parameters
  EXPECT_LT(max_diff(avg.params, expected), 1e-6);
  const auto& last = avg.metrics["final"];
  EXPECT_NEAR(last["test_accuracy_last_iterate"].get<double>(), p2.metrics["final"]["test_accuracy"].get<double>(), 1e-9);
  EXPECT_EQ(avg.metrics["config"]["ema"].get<double>(), 0.15);
}

// Augmentation multiplicity with views that are all the image itself (no
// shift, no flip): every example's mean gradient is its gradient, so the run
// is the plain run (its views draw from their own generator: same masks and noise).
TEST(DemoProgram, AugmentationsOfIdenticalViewsGiveThePlainRun) {
  const std::string args = kSmoke + "--seed 4 --train-limit 512 --batch-size 128 --epochs 1 ";
  DemoRun plain = run_demo("plain", args);
  DemoRun same = run_demo("same", args + "--augmentations 3 --aug-shift 0 --no-aug-flip");
  DemoRun aug = run_demo("aug", args + "--augmentations 3");
  ASSERT_EQ(plain.status, 0) << plain.log;
  ASSERT_EQ(same.status, 0) << same.log;
  ASSERT_EQ(aug.status, 0) << aug.log;
  EXPECT_GT(max_diff(plain.params, initial_params(4)), 1e-3);
  EXPECT_LT(max_diff(same.params, plain.params), 1e-5);
  EXPECT_NEAR(same.metrics["final"]["train_loss"].get<double>(), plain.metrics["final"]["train_loss"].get<double>(), 1e-5);
  EXPECT_GT(max_diff(aug.params, plain.params), 1e-4);  // real views change the gradients
  EXPECT_EQ(aug.metrics["config"]["augmentations"].get<int64_t>(), 3);
  EXPECT_EQ(aug.metrics["final"]["epsilon"].get<double>(), plain.metrics["final"]["epsilon"].get<double>());
}

#ifdef TORCHFUNC_DPSGD_DISTRIBUTED
// Every rank draws the same Poisson mask and noise (one seed), clips the part
// of the batch in its shard, and the clipped sums are all-reduced: the update
// is the single-process one up to the order of the float sums.
TEST(DemoProgram, TwoRanksGiveTheSingleProcessParameters) {
  DemoRun one = run_demo("one", kSmoke + "--epochs 1 --seed 11");
  DemoRun two = run_demo("two", kSmoke + "--epochs 1 --seed 11 --nproc 2");
  ASSERT_EQ(one.status, 0) << one.log;
  ASSERT_EQ(two.status, 0) << two.log;
  EXPECT_EQ(two.metrics["config"]["ranks"], 2);
  EXPECT_NE(two.log.find("2 ranks"), std::string::npos) << two.log;
  EXPECT_GT(max_diff(one.params, initial_params(11)), 1e-2);
  EXPECT_LE(max_diff(one.params, two.params), 1e-5);
  std::printf("max |1 rank - 2 ranks| over the parameters after 8 steps: %.3g\n", max_diff(one.params, two.params));
  EXPECT_NEAR(one.metrics["final"]["train_loss"].get<double>(), two.metrics["final"]["train_loss"].get<double>(), 1e-4);
  EXPECT_EQ(one.metrics["final"]["epsilon"].get<double>(), two.metrics["final"]["epsilon"].get<double>());
}

// A rank that dies mid-run: the other's all-reduce fails at once (the
// connection closes), with an error naming the all-reduce; the launcher
// reports both ranks and fails.
TEST(DemoProgram, ADeadRankFailsTheRunWithAClearError) {
  DemoRun r = run_demo("dead", kSmoke + "--seed 1 --nproc 2 --dist-timeout 30 --debug-exit-rank 1 --debug-exit-step 2");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.log.find("rank 1 exited with status 3"), std::string::npos) << r.log;
  EXPECT_NE(r.log.find("rank 0: the all-reduce of the clipped gradient sums failed"), std::string::npos) << r.log;
  EXPECT_LT(r.seconds, 25.0) << r.log;  // well before the 30 s timeout
}

// A rank that hangs (alive, silent): the other times out after
// --dist-timeout and fails; the launcher then kills the hung one.
TEST(DemoProgram, AHungRankTimesOut) {
  DemoRun r = run_demo("hung", kSmoke + "--seed 1 --nproc 2 --dist-timeout 4 --debug-exit-rank 1 --debug-exit-step 2 "
                   "--debug-stall");
  EXPECT_NE(r.status, 0);
  EXPECT_NE(r.log.find("did not answer within 4 s"), std::string::npos) << r.log;
  EXPECT_NE(r.log.find("rank 1 was killed by signal 9"), std::string::npos) << r.log;
  EXPECT_LT(r.seconds, 60.0) << r.log;
}
#endif

}  // namespace
