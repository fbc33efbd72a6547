// tests/opinfo/sweep.cpp: torchfunc's transforms over every case that
// tests/opinfo/export.py wrote from PyTorch's OpInfo database.
//
// Each case is one OpInfo sample traced to TorchScript (the ATen ops the
// sample runs) plus its inputs and torch.func 2.13's results. For each case
// and transform the sweep prints one line to the results file:
//   case  name  dtype  transform  outcome  torch.func-status  detail
// outcome: pass | fallback (correct, through libtorch's per-sample loop) |
// error (a c10::Error: unsupported) | mismatch | n/a. References that do not use
// the transform under test: a loop of single-sample calls (vmap),
// torch::autograd::grad (vjp, vmap(grad)), the identity <u, J v> = <J^T u, v>
// with torch::autograd (jvp), jacfwd against jacrev, and torch.func's own
// results where it succeeded. A crash ends the process; run.py restarts after
// the case named on the last "start" line and records the crash.
//
// Usage: torchfunc_opinfo_sweep DIR RESULTS [--from N]
#include <torch/script.h>
#include <torch/torch.h>
#include <torchfunc/torchfunc.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

namespace func = torchfunc;
using torch::Tensor;
using Tensors = std::vector<Tensor>;

namespace {

#if TORCH_VERSION_MAJOR >= 2
namespace warning_api = c10::WarningUtils;
#else
namespace warning_api = c10::Warning;
#endif

/// Records whether vmap went through libtorch's per-sample fallback.
class FallbackLog : public c10::WarningHandler {
 public:
  FallbackLog() : prev_(warning_api::get_warning_handler()) { warning_api::set_warning_handler(this); }
  ~FallbackLog() override { warning_api::set_warning_handler(prev_); }
#if TORCH_VERSION_MAJOR >= 2
  void process(const c10::Warning& w) override { record(w.msg()); }
#else
  void process(const c10::SourceLocation&, const std::string& msg, const bool) override { record(msg); }
#endif
  std::string ops;

 private:
  void record(const std::string& msg) {
    const std::string key = "batching rule for ";
    auto at = msg.find(key);
    if (at == std::string::npos) return;
    at += key.size();
    std::string op = msg.substr(at, msg.find_first_of(". ", at) - at);
    if (ops.find(op) == std::string::npos) ops += (ops.empty() ? "" : " ") + op;
  }
  c10::WarningHandler* prev_;
};

std::vector<char> read_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return std::vector<char>((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
}

Tensors to_tensors(const c10::IValue& v) {
  Tensors out;
  if (v.isTensor()) {
    out.push_back(v.toTensor());
  } else if (v.isTuple()) {
    for (const auto& e : v.toTupleRef().elements()) out.push_back(e.toTensor());
  } else if (v.isTensorList()) {
    for (const auto& t : v.toTensorVector()) out.push_back(t);
  } else if (v.isList()) {
    for (const auto& e : v.toListRef()) out.push_back(e.toTensor());
  }
  return out;
}

std::string first_line(const std::string& s, size_t max = 160) {
  std::string l = s.substr(0, s.find('\n'));
  // TorchScript wraps the op's error in a traceback: report the op's message.
  if (l.find("failed in the TorchScript interpreter") != std::string::npos) {
    const size_t at = s.rfind("Error: ");
    if (at != std::string::npos) l = s.substr(at + 7, s.find('\n', at) - at - 7);
  }
  for (char& c : l)
    if (c == '\t') c = ' ';
  return l.size() > max ? l.substr(0, max) : l;
}

/// max |a - b| / (atol + rtol |b|) over elements; NaNs must agree.
double closeness(const Tensor& a, const Tensor& b, double rtol, double atol) {
  if (a.sizes() != b.sizes()) return 1e30;
  if (a.numel() == 0) return 0;
  Tensor x = a.to(torch::kDouble), y = b.to(torch::kDouble);
  if (!torch::equal(x.isnan(), y.isnan())) return 1e30;
  Tensor fin = ~(x.isnan() | y.isnan());
  Tensor inf_mismatch = (x.isinf() | y.isinf()) & (x != y) & fin;
  if (inf_mismatch.any().item<bool>()) return 1e30;
  Tensor ok = fin & ~(x.isinf() | y.isinf());
  if (!ok.any().item<bool>()) return 0;
  Tensor err = (x - y).abs() / (atol + rtol * y.abs());
  return err.masked_select(ok).max().item<double>();
}

bool all_close(const Tensors& a, const Tensors& b, double rtol, double atol, std::string* why = nullptr) {
  if (a.size() != b.size()) {
    if (why) *why = "different number of outputs";
    return false;
  }
  for (size_t i = 0; i < a.size(); ++i) {
    if (!a[i].defined() || !b[i].defined()) {
      if (a[i].defined() != b[i].defined()) {
        if (why) *why = "output " + std::to_string(i) + " undefined on one side";
        return false;
      }
      continue;
    }
    if (a[i].scalar_type() == torch::kBool || !a[i].is_floating_point()) {
      if (a[i].sizes() != b[i].sizes() || !torch::equal(a[i].to(b[i].scalar_type()), b[i])) {
        if (why) *why = "output " + std::to_string(i) + " differs (exact)";
        return false;
      }
      continue;
    }
    const double c = closeness(a[i], b[i], rtol, atol);
    if (c > 1) {
      if (why) {
        std::ostringstream o;
        o << "output " << i << " off by " << c << "x tolerance (shape " << a[i].sizes() << " vs " << b[i].sizes()
          << ")";
        *why = o.str();
      }
      return false;
    }
  }
  return true;
}

struct Case {
  std::string id, name, dtype, graph;
  bool inplace = false, differentiable = false;
  Tensors leaves, batched, cotangents, tangents, tf_vmap, tf_vjp, tf_jvp, tf_vmap_grad, tf_jacrev, tf_jacfwd;
  int64_t jacobian_size = 0;
  std::vector<bool> diff;
  std::map<std::string, std::string> status;
  torch::jit::Module module;

  std::string tf_status(const std::string& t) const {
    auto it = status.find(t);
    return it == status.end() ? "-" : it->second;
  }
  bool tf_ok(const std::string& t) const { return tf_status(t) == "ok"; }

  Tensors call(const Tensors& xs) {
    std::vector<c10::IValue> in;
    for (const auto& t : xs) in.emplace_back(inplace ? t.clone() : t);
    return to_tensors(module.forward(in));
  }
};

Tensors list_of(const c10::Dict<c10::IValue, c10::IValue>& d, const char* key) {
  auto it = d.find(c10::IValue(std::string(key)));
  Tensors out;
  if (it == d.end() || it->value().isNone()) return out;
  for (const auto& e : it->value().toListRef()) out.push_back(e.toTensor());
  return out;
}

Case load_case(const std::string& dir, const std::string& id) {
  Case c;
  c.id = id;
  c.module = torch::jit::load(dir + "/" + id + ".pt");
  c.module.eval();
  auto data = torch::pickle_load(read_file(dir + "/" + id + ".data.pt")).toGenericDict();
  auto str = [&](const char* k) { return data.at(c10::IValue(std::string(k))).toStringRef(); };
  auto flag = [&](const char* k) {
    auto it = data.find(c10::IValue(std::string(k)));
    return it != data.end() && it->value().toBool();
  };
  c.name = str("name");
  c.dtype = str("dtype");
  c.graph = str("graph");
  c.inplace = flag("inplace");
  c.differentiable = flag("differentiable");
  c.leaves = list_of(data, "leaves");
  c.batched = list_of(data, "batched");
  c.cotangents = list_of(data, "cotangents");
  c.tangents = list_of(data, "tangents");
  c.tf_vmap = list_of(data, "tf_vmap");
  c.tf_vjp = list_of(data, "tf_vjp");
  c.tf_jvp = list_of(data, "tf_jvp");
  c.tf_vmap_grad = list_of(data, "tf_vmap_grad");
  c.tf_jacrev = list_of(data, "tf_jacrev");
  c.tf_jacfwd = list_of(data, "tf_jacfwd");
  auto js = data.find(c10::IValue(std::string("jacobian_size")));
  if (js != data.end()) c.jacobian_size = js->value().toInt();
  for (const auto& e : data.at(c10::IValue(std::string("diff"))).toListRef()) c.diff.push_back(e.toBool());
  for (const auto& kv : data.at(c10::IValue(std::string("status"))).toGenericDict())
    c.status[kv.key().toStringRef()] = kv.value().toStringRef();
  return c;
}

// A check that fails against its independent reference while torchfunc's
// result equals torch.func's: libtorch's derivative formulas (or the op's
// own non-smoothness at the sample) disagree, not the transform.
constexpr const char* kSameAsTorchFunc = "[same as torch.func] ";

struct Outcome {
  std::string outcome, detail;
};

/// Runs one check; c10::Error -> "error", a failed comparison -> "mismatch".
template <class Fn>
Outcome run_check(Fn&& fn) {
  FallbackLog log;
  try {
    std::string why;
    if (!fn(why)) {
      if (why.rfind(kSameAsTorchFunc, 0) == 0) return {"tf-same", why.substr(std::strlen(kSameAsTorchFunc))};
      return {"mismatch", why};
    }
  } catch (const c10::Error& e) {
    return {"error", first_line(e.what_without_backtrace())};
  } catch (const std::exception& e) {
    return {"error", first_line(e.what())};
  }
  if (!log.ops.empty()) return {"fallback", log.ops};
  return {"pass", ""};
}

double rtol_for(const Case& c) { return c.dtype == "float32" ? 1e-4 : 1e-6; }

Tensors slice(const Tensors& batched, const std::vector<bool>& mapped, const Tensors& plain, int64_t b) {
  Tensors out;
  // (A contiguous copy: memory-layout ops such as as_strided see each sample
  // as a tensor of its own, as vmap defines them.)
  for (size_t i = 0; i < batched.size(); ++i)
    out.push_back(mapped[i] ? batched[i].select(0, b).contiguous().clone() : plain[i]);
  return out;
}

/// vmap over the inputs marked in `mapped` vs a loop of single-sample calls.
bool check_vmap(Case& c, const std::vector<bool>& mapped, const Tensors* oracle, std::string& why) {
  std::vector<func::Dims> dims;
  Tensors args;
  for (size_t i = 0; i < mapped.size(); ++i) {
    dims.push_back(mapped[i] ? func::Dims(0) : func::Dims(func::none));
    args.push_back(mapped[i] ? c.batched[i] : c.leaves[i]);
  }
  Tensors got = func::vmap([&](const Tensors& xs) { return c.call(xs); }, func::in_dims(func::Dims(dims)))(args);
  const int64_t B = c.batched.front().size(0);
  std::vector<Tensors> per;
  for (int64_t b = 0; b < B; ++b) per.push_back(c.call(slice(c.batched, mapped, c.leaves, b)));
  Tensors expected;
  for (size_t k = 0; k < per.front().size(); ++k) {
    Tensors col;
    for (auto& p : per) col.push_back(p[k]);
    expected.push_back(torch::stack(col));
  }
  const double rtol = rtol_for(c);
  if (!all_close(got, expected, rtol, rtol, &why)) {
    std::string ignored;
    const bool same = oracle && !oracle->empty() && all_close(got, *oracle, rtol, rtol, &ignored);
    why = (same ? kSameAsTorchFunc : "") + std::string("vs loop: ") + why;
    return false;
  }
  if (oracle && !oracle->empty() && !all_close(got, *oracle, rtol, rtol, &why)) {
    why = "vs torch.func: " + why;
    return false;
  }
  return true;
}

struct Split {
  std::vector<size_t> di;  // positions of the differentiated leaves
  Tensors diff_values;
};
Split split(const Case& c, const Tensors& leaves) {
  Split s;
  for (size_t i = 0; i < leaves.size(); ++i)
    if (c.diff[i]) {
      s.di.push_back(i);
      s.diff_values.push_back(leaves[i]);
    }
  return s;
}
Tensors merge(const Split& s, const Tensors& d, const Tensors& rest) {
  Tensors all = rest;
  for (size_t j = 0; j < s.di.size(); ++j) all[s.di[j]] = d[j];
  return all;
}

/// torch::autograd's vector-Jacobian product at the case's inputs.
Tensors autograd_vjp(Case& c, const Split& s, const Tensors& leaves, const Tensors& cts, bool create_graph = false) {
  Tensors d;
  for (size_t j = 0; j < s.di.size(); ++j) d.push_back(leaves[s.di[j]].detach().clone().requires_grad_(true));
  Tensors outs = c.call(merge(s, d, leaves));
  Tensors used_outs, used_cts;
  for (size_t k = 0; k < outs.size(); ++k)
    if (outs[k].requires_grad()) {
      used_outs.push_back(outs[k]);
      used_cts.push_back(cts[k]);
    }
  Tensors g;
  if (!used_outs.empty()) g = torch::autograd::grad(used_outs, d, used_cts, create_graph, create_graph, true);
  for (size_t j = 0; j < d.size(); ++j)
    if (j >= g.size() || !g[j].defined()) {
      if (j >= g.size()) g.resize(d.size());
      g[j] = torch::zeros_like(d[j]);
    }
  return g;
}

bool check_vjp(Case& c, std::string& why) {
  Split s = split(c, c.leaves);
  auto [out, vjp_fn] = func::vjp([&](const Tensors& d) { return c.call(merge(s, d, c.leaves)); }, s.diff_values);
  (void)out;
  auto [got] = vjp_fn(c.cotangents);
  Tensors ref = autograd_vjp(c, s, c.leaves, c.cotangents);
  if (!all_close(got, ref, 1e-6, 1e-6, &why)) {
    why = "vs torch::autograd: " + why;
    return false;
  }
  if (c.tf_ok("vjp") && !all_close(got, c.tf_vjp, 1e-6, 1e-6, &why)) {
    why = "vs torch.func: " + why;
    return false;
  }
  return true;
}

bool check_jvp(Case& c, std::string& why) {
  Split s = split(c, c.leaves);
  auto f = [&](const Tensors& d) { return c.call(merge(s, d, c.leaves)); };
  auto [out, jv] = func::jvp(f, std::tuple{s.diff_values}, std::tuple{c.tangents});
  (void)out;
  // <u, J v> must equal <J^T u, v> (J^T u from torch::autograd). Where
  // reverse mode refuses an input forward mode accepts (batch norm's
  // running_mean), torch.func's jvp is the only reference.
  Tensors jtu;
  try {
    jtu = autograd_vjp(c, s, c.leaves, c.cotangents);
  } catch (const std::exception&) {  // (TorchScript rethrows an op's c10::Error as std::runtime_error)
    if (!c.tf_ok("jvp")) throw;
    if (!all_close(jv, c.tf_jvp, 1e-6, 1e-6, &why)) {
      why = "vs torch.func: " + why;
      return false;
    }
    return true;
  }
  double lhs = 0, rhs = 0, scale = 0;
  for (size_t k = 0; k < jv.size(); ++k) {
    lhs += (jv[k].to(torch::kDouble) * c.cotangents[k].to(torch::kDouble)).sum().item<double>();
    scale += (jv[k].to(torch::kDouble).abs() * c.cotangents[k].to(torch::kDouble).abs()).sum().item<double>();
  }
  for (size_t j = 0; j < jtu.size(); ++j)
    rhs += (jtu[j].to(torch::kDouble) * c.tangents[j].to(torch::kDouble)).sum().item<double>();
  // Outputs rounded to half / bfloat16 (a dtype conversion) round the
  // tangent too.
  double tol = 1e-6;
  for (const auto& o : jv)
    if (o.scalar_type() == torch::kHalf || o.scalar_type() == torch::kBFloat16) tol = 1e-2;
  if (std::isnan(lhs) != std::isnan(rhs) || (!std::isnan(lhs) && std::abs(lhs - rhs) > tol * (1 + scale))) {
    std::ostringstream o;
    std::string ignored;
    const bool same = c.tf_ok("jvp") && all_close(jv, c.tf_jvp, 1e-6, 1e-6, &ignored);
    o << (same ? kSameAsTorchFunc : "") << "<u, Jv> = " << lhs << " but <J^T u, v> = " << rhs;
    why = o.str();
    return false;
  }
  if (c.tf_ok("jvp") && !all_close(jv, c.tf_jvp, 1e-6, 1e-6, &why)) {
    why = "vs torch.func: " + why;
    return false;
  }
  return true;
}

/// All real outputs flattened into one vector (one Jacobian to compare).
Tensor flat_outputs(const Tensors& outs) {
  Tensors parts;
  for (const auto& o : outs) parts.push_back(o.reshape(-1));
  return torch::cat(parts);
}

bool check_jacobians(Case& c, std::string& why) {
  Split s = split(c, c.leaves);
  auto f = [&](const Tensors& d) { return flat_outputs(c.call(merge(s, d, c.leaves))); };
  Tensors rev = func::jacrev(f)(s.diff_values);
  Tensors fwd = func::jacfwd(f)(s.diff_values);
  if (!all_close(rev, fwd, 1e-6, 1e-6, &why)) {
    std::string ignored;
    const bool same = c.tf_ok("jacrev") && c.tf_ok("jacfwd") && all_close(rev, c.tf_jacrev, 1e-6, 1e-6, &ignored) &&
                      all_close(fwd, c.tf_jacfwd, 1e-6, 1e-6, &ignored);
    why = (same ? kSameAsTorchFunc : "") + std::string("jacrev vs jacfwd: ") + why;
    return false;
  }
  if (c.tf_ok("jacrev") && !all_close(rev, c.tf_jacrev, 1e-6, 1e-6, &why)) {
    why = "jacrev vs torch.func: " + why;
    return false;
  }
  return true;
}

bool check_vmap_grad(Case& c, std::string& why) {
  Split s = split(c, c.leaves);
  // Per-sample gradients: the differentiated inputs batched, the others
  // (indices, masks) shared, as torch.func's oracle does.
  Tensors dB;
  for (size_t i = 0; i < c.leaves.size(); ++i)
    if (c.diff[i]) dB.push_back(c.batched[i]);
  auto scalar = [&](const Tensors& d, const Tensors& rest) {
    Tensors outs = c.call(merge(s, d, rest));
    Tensor total = torch::zeros({}, outs.front().options());
    for (size_t k = 0; k < outs.size(); ++k) total = total + (outs[k] * c.cotangents[k]).sum();
    return total;
  };
  Tensors got = func::vmap(func::grad(scalar), func::in_dims(0, func::none))(dB, c.leaves);
  const int64_t B = c.batched.front().size(0);
  std::vector<Tensors> per;
  for (int64_t b = 0; b < B; ++b) {
    Tensors leaves_b = c.leaves;
    for (size_t i = 0; i < c.leaves.size(); ++i)
      if (c.diff[i]) leaves_b[i] = c.batched[i].select(0, b).contiguous();
    per.push_back(autograd_vjp(c, s, leaves_b, c.cotangents));
  }
  Tensors ref;
  for (size_t j = 0; j < s.di.size(); ++j) {
    Tensors col;
    for (auto& p : per) col.push_back(p[j]);
    ref.push_back(torch::stack(col));
  }
  if (!all_close(got, ref, 1e-6, 1e-6, &why)) {
    why = "vs loop of torch::autograd: " + why;
    return false;
  }
  if (c.tf_ok("vmap_grad") && !all_close(got, c.tf_vmap_grad, 1e-6, 1e-6, &why)) {
    why = "vs torch.func: " + why;
    return false;
  }
  return true;
}

void emit(std::ofstream& out, const Case& c, const std::string& transform, const std::string& tf_key,
          const Outcome& o) {
  out << c.id << '\t' << c.name << '\t' << c.dtype << '\t' << transform << '\t' << o.outcome << '\t'
      << first_line(c.tf_status(tf_key), 120) << '\t' << c.graph << '\t' << o.detail << '\n';
  out.flush();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::cerr << "usage: " << argv[0] << " DIR RESULTS [--from N]\n";
    return 2;
  }
  const std::string dir = argv[1];
  size_t from = 0;
  for (int i = 3; i + 1 < argc; ++i)
    if (std::string(argv[i]) == "--from") from = std::stoul(argv[i + 1]);
  torch::jit::setGraphExecutorOptimize(false);  // run the traced ops as they are
  std::vector<std::string> ids;
  for (const auto& e : std::filesystem::directory_iterator(dir)) {
    const std::string f = e.path().filename().string();
    if (f.size() == 8 && f.substr(5) == ".pt") ids.push_back(f.substr(0, 5));
  }
  std::sort(ids.begin(), ids.end());
  std::ofstream out(argv[2], std::ios::app);
  for (size_t n = from; n < ids.size(); ++n) {
    out << "start\t" << n << '\t' << ids[n] << '\n';
    out.flush();
    Case c;
    try {
      c = load_case(dir, ids[n]);
    } catch (const std::exception& e) {
      out << ids[n] << "\t?\t?\tload\terror\t-\t-\t" << first_line(e.what()) << '\n';
      continue;
    }
    torch::manual_seed(0);
    const bool full = c.dtype == "float64" && !c.inplace;
    std::vector<bool> all(c.leaves.size(), true);
    emit(out, c, c.inplace ? "vmap (in-place)" : "vmap", "vmap",
         run_check([&](std::string& why) { return check_vmap(c, all, &c.tf_vmap, why); }));
    if (!full) continue;
    if (c.leaves.size() > 1) {
      // Each input batched alone (the others shared by every sample).
      Outcome worst{"pass", ""};
      for (size_t i = 0; i < c.leaves.size(); ++i) {
        std::vector<bool> one(c.leaves.size(), false);
        one[i] = true;
        Outcome o = run_check([&](std::string& why) { return check_vmap(c, one, nullptr, why); });
        auto rank = [](const std::string& s) {
          return s == "mismatch" ? 3 : s == "error" ? 2 : s == "fallback" ? 1 : 0;
        };
        if (rank(o.outcome) > rank(worst.outcome)) worst = {o.outcome, "input " + std::to_string(i) + ": " + o.detail};
      }
      emit(out, c, "vmap (one input)", "-", worst);
    }
    if (!c.differentiable) continue;
    emit(out, c, "vjp", "vjp", run_check([&](std::string& why) { return check_vjp(c, why); }));
    emit(out, c, "jvp", "jvp", run_check([&](std::string& why) { return check_jvp(c, why); }));
    if (c.jacobian_size <= (int64_t{1} << 20))
      emit(out, c, "jacrev/jacfwd", c.tf_ok("jacrev") ? "jacfwd" : "jacrev",
           run_check([&](std::string& why) { return check_jacobians(c, why); }));
    emit(out, c, "vmap(grad)", "vmap_grad", run_check([&](std::string& why) { return check_vmap_grad(c, why); }));
  }
  return 0;
}
