// src/modules.cpp: module surgery for functional_call and friends.
//
// Note [finding a module's tensors]
//   A built-in module keeps each parameter twice: in its registered dict
//   (named_parameters) and in a C++ member its forward reads (weight, bias,
//   RNN's flat_weights_). Both handles share one TensorImpl. For each module
//   type we list the member handles ("slots"); a registered tensor is
//   substituted in every slot that holds the same TensorImpl, and in the
//   dict. A registered tensor that no slot holds cannot be substituted, and
//   that is an error (unless the type is registered as reading its tensors
//   from the dict).
#include <torchfunc/functional_call.h>

#include "reparametrize.h"
#include "variable_hooks.h"

#include <torch/nn.h>

#include <mutex>
#include <thread>
#include <typeinfo>
#include <set>
#include <unordered_map>

namespace torchfunc {
namespace detail {
namespace {

namespace nn = torch::nn;

// Module::buffers_ is private and has no mutable accessor. An explicit
// template instantiation may name a private member (access is not checked
// there), which hands us a pointer to it without undefined behaviour.
struct BuffersTag {
  using type = TensorDict nn::Module::*;
  friend type get(BuffersTag);
};
template <class Tag, typename Tag::type Member>
struct Expose {
  friend typename Tag::type get(Tag) { return Member; }
};
template struct Expose<BuffersTag, &nn::Module::buffers_>;

// Protected members are reached through pointers to members named in a
// derived class.
struct ModuleAccess : nn::Module {
  static TensorDict& params(nn::Module& m) { return m.*(&ModuleAccess::parameters_); }
  static TensorDict& buffers(nn::Module& m) { return m.*get(BuffersTag{}); }
};
template <class Derived>
struct RnnAccess : nn::detail::RNNImplBase<Derived> {
  static std::vector<at::Tensor>& flat(nn::detail::RNNImplBase<Derived>& m) {
    return m.*(&RnnAccess::flat_weights_);
  }
};

std::mutex& registry_mutex() {
  static std::mutex m;
  return m;
}
std::unordered_map<std::type_index, SlotLister>& registry() {
  static std::unordered_map<std::type_index, SlotLister> r;
  return r;
}

template <class T>
bool add(nn::Module& m, std::vector<at::Tensor*>& out, std::initializer_list<at::Tensor T::*> members) {
  auto* p = dynamic_cast<T*>(&m);
  if (!p) return false;
  for (auto mp : members) out.push_back(&(p->*mp));
  return true;
}

template <class T>
bool add_norm(nn::Module& m, std::vector<at::Tensor*>& out) {
  auto* p = dynamic_cast<T*>(&m);
  if (!p) return false;
  for (at::Tensor* t : {&p->weight, &p->bias, &p->running_mean, &p->running_var, &p->num_batches_tracked})
    out.push_back(t);
  return true;
}

template <class T>
bool add_rnn(nn::Module& m, std::vector<at::Tensor*>& out) {
  auto* p = dynamic_cast<T*>(&m);
  if (!p) return false;
  for (auto& t : RnnAccess<T>::flat(*p)) out.push_back(&t);
  return true;
}

/// The member slots of one module; false if its type is unknown.
bool member_slots(nn::Module& m, std::vector<at::Tensor*>& out) {
  {
    std::lock_guard<std::mutex> lock(registry_mutex());
    auto it = registry().find(typeid(m));
    if (it != registry().end()) {
      it->second(m, out);
      return true;
    }
  }
  using nn::Module;
  return add<nn::LinearImpl>(m, out, {&nn::LinearImpl::weight, &nn::LinearImpl::bias}) ||
         add<nn::BilinearImpl>(m, out, {&nn::BilinearImpl::weight, &nn::BilinearImpl::bias}) ||
         add<nn::Conv1dImpl>(m, out, {&nn::Conv1dImpl::weight, &nn::Conv1dImpl::bias}) ||
         add<nn::Conv2dImpl>(m, out, {&nn::Conv2dImpl::weight, &nn::Conv2dImpl::bias}) ||
         add<nn::Conv3dImpl>(m, out, {&nn::Conv3dImpl::weight, &nn::Conv3dImpl::bias}) ||
         add<nn::ConvTranspose1dImpl>(m, out, {&nn::ConvTranspose1dImpl::weight, &nn::ConvTranspose1dImpl::bias}) ||
         add<nn::ConvTranspose2dImpl>(m, out, {&nn::ConvTranspose2dImpl::weight, &nn::ConvTranspose2dImpl::bias}) ||
         add<nn::ConvTranspose3dImpl>(m, out, {&nn::ConvTranspose3dImpl::weight, &nn::ConvTranspose3dImpl::bias}) ||
         add_norm<nn::BatchNorm1dImpl>(m, out) || add_norm<nn::BatchNorm2dImpl>(m, out) ||
         add_norm<nn::BatchNorm3dImpl>(m, out) || add_norm<nn::InstanceNorm1dImpl>(m, out) ||
         add_norm<nn::InstanceNorm2dImpl>(m, out) || add_norm<nn::InstanceNorm3dImpl>(m, out) ||
         add<nn::LayerNormImpl>(m, out, {&nn::LayerNormImpl::weight, &nn::LayerNormImpl::bias}) ||
         add<nn::GroupNormImpl>(m, out, {&nn::GroupNormImpl::weight, &nn::GroupNormImpl::bias}) ||
         add<nn::EmbeddingImpl>(m, out, {&nn::EmbeddingImpl::weight}) ||
         add<nn::EmbeddingBagImpl>(m, out, {&nn::EmbeddingBagImpl::weight}) ||
         add<nn::PReLUImpl>(m, out, {&nn::PReLUImpl::weight}) ||
         add<nn::RNNCellImpl>(m, out, {&nn::RNNCellImpl::weight_ih, &nn::RNNCellImpl::weight_hh,
                                       &nn::RNNCellImpl::bias_ih, &nn::RNNCellImpl::bias_hh}) ||
         add<nn::LSTMCellImpl>(m, out, {&nn::LSTMCellImpl::weight_ih, &nn::LSTMCellImpl::weight_hh,
                                        &nn::LSTMCellImpl::bias_ih, &nn::LSTMCellImpl::bias_hh}) ||
         add<nn::GRUCellImpl>(m, out, {&nn::GRUCellImpl::weight_ih, &nn::GRUCellImpl::weight_hh,
                                       &nn::GRUCellImpl::bias_ih, &nn::GRUCellImpl::bias_hh}) ||
         add_rnn<nn::RNNImpl>(m, out) || add_rnn<nn::LSTMImpl>(m, out) || add_rnn<nn::GRUImpl>(m, out) ||
         add<nn::MultiheadAttentionImpl>(
             m, out,
             {&nn::MultiheadAttentionImpl::in_proj_weight, &nn::MultiheadAttentionImpl::in_proj_bias,
              &nn::MultiheadAttentionImpl::bias_k, &nn::MultiheadAttentionImpl::bias_v,
              &nn::MultiheadAttentionImpl::q_proj_weight, &nn::MultiheadAttentionImpl::k_proj_weight,
              &nn::MultiheadAttentionImpl::v_proj_weight}) ||
         // Containers and dict-based modules read from the registered dicts.
         dynamic_cast<nn::ParameterDictImpl*>(&m) || dynamic_cast<nn::ParameterListImpl*>(&m);
}

struct Entry {
  nn::Module* owner;
  std::string local;
  bool buffer;
  at::Tensor tensor;
};

void walk(nn::Module& m, const std::string& prefix, std::vector<std::pair<std::string, Entry>>& out) {
  for (const auto& p : ModuleAccess::params(m))
    if (p.value().defined()) out.push_back({prefix + p.key(), Entry{&m, p.key(), false, p.value()}});
  for (const auto& b : ModuleAccess::buffers(m))
    if (b.value().defined()) out.push_back({prefix + b.key(), Entry{&m, b.key(), true, b.value()}});
  for (const auto& c : m.named_children()) walk(*c.value(), prefix + c.key() + ".", out);
}

std::string quote_list(const std::vector<std::string>& names) {
  std::string s;
  for (size_t i = 0; i < names.size(); ++i) s += (i ? ", '" : "'") + names[i] + "'";
  return s;
}

}  // namespace

std::vector<c10::optional<at::Tensor>> resolve_values(const std::string& where,
                                                      const std::vector<std::string>& names,
                                                      const std::vector<at::Tensor>& current,
                                                      const std::vector<std::pair<std::string, at::Tensor>>& values,
                                                      const std::vector<size_t>& dict_of,
                                                      const FunctionalCallOptions& options) {
  std::unordered_map<std::string, size_t> index;
  for (size_t i = 0; i < names.size(); ++i) index.emplace(names[i], i);

  // Which dict gave each key; keys must not repeat across dicts.
  std::unordered_map<std::string, size_t> given;
  std::vector<std::string> repeated, unexpected;
  for (size_t v = 0; v < values.size(); ++v) {
    auto ins = given.emplace(values[v].first, v);
    if (!ins.second && dict_of[ins.first->second] != dict_of[v]) repeated.push_back(values[v].first);
    if (!index.count(values[v].first)) unexpected.push_back(values[v].first);
  }
  TORCH_CHECK(repeated.empty(), "torchfunc::", where, ": got multiple values for keys [", quote_list(repeated),
              "], which are used in multiple dicts.");
  std::vector<std::string> missing;
  if (options.strict())
    for (const auto& n : names)
      if (!given.count(n)) missing.push_back(n);
  if (!unexpected.empty() || !missing.empty()) {
    std::string msg = "torchfunc::" + where + ": Error(s) in reparametrizing:";
    if (!unexpected.empty()) msg += "\n\tUnexpected key(s): " + quote_list(unexpected) + ".";
    if (!missing.empty()) msg += "\n\tMissing key(s): " + quote_list(missing) + ".";
    if (!unexpected.empty() && !options.strict())
      msg += "\n(Unknown keys are an error even without strict: a misspelt name would otherwise leave the "
             "module's own tensor in use.)";
    TORCH_CHECK(false, msg);
  }

  // The value each registered name gets; ties share one value.
  std::vector<c10::optional<at::Tensor>> value_of(names.size());
  for (const auto& g : given) value_of[index.at(g.first)] = values[g.second].second;
  if (options.tie_weights()) {
    std::unordered_map<c10::TensorImpl*, std::vector<size_t>> groups;
    for (size_t i = 0; i < names.size(); ++i) groups[current[i].unsafeGetTensorImpl()].push_back(i);
    for (const auto& kv : groups) {
      if (kv.second.size() < 2) continue;
      const at::Tensor* chosen = nullptr;
      size_t chosen_i = 0;
      for (size_t i : kv.second) {
        if (!value_of[i]) continue;
        if (chosen && !chosen->is_same(*value_of[i])) {
          TORCH_CHECK(false, "torchfunc::", where, ": got values for both '", names[chosen_i], "' and '",
                      names[i], "', which are tied. Consider using tie_weights(false).");
        }
        chosen = &*value_of[i];
        chosen_i = i;
      }
      if (chosen) {
        at::Tensor v = *chosen;
        for (size_t i : kv.second) value_of[i] = v;
      }
    }
  }

  return value_of;
}

void register_module_slots(std::type_index type, SlotLister lister) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  registry()[type] = std::move(lister);
}

namespace {
struct ModuleUse {
  std::thread::id thread;
  int depth = 0;
};
std::mutex& use_mutex() {
  static std::mutex m;
  return m;
}
std::unordered_map<const void*, ModuleUse>& uses() {
  static std::unordered_map<const void*, ModuleUse> u;
  return u;
}
}  // namespace

void claim_module(const void* root, const std::string& where) {
  std::lock_guard<std::mutex> lock(use_mutex());
  auto [it, fresh] = uses().try_emplace(root, ModuleUse{std::this_thread::get_id(), 0});
  TORCH_CHECK(fresh || it->second.thread == std::this_thread::get_id(), "torchfunc::", where,
              ": this module is inside functional_call in another thread right now. functional_call sets the "
              "module's parameters for the duration of the call, so one module object cannot serve two "
              "threads at once; give each thread its own copy (e.g. module->clone()).");
  ++it->second.depth;
}

void release_module(const void* root) noexcept {
  std::lock_guard<std::mutex> lock(use_mutex());
  auto it = uses().find(root);
  if (it != uses().end() && --it->second.depth == 0) uses().erase(it);
}

Reparametrize::Reparametrize(nn::Module& root, const std::vector<std::pair<std::string, at::Tensor>>& values,
                             const std::vector<size_t>& dict_of, const FunctionalCallOptions& options) {
  const std::string where = "functional_call(" + root.name() + ", ...)";
  claim_module(&root, where);
  claimed_ = &root;
  try {
    substitute(root, values, dict_of, options, where);
  } catch (...) {
    release_module(claimed_);
    throw;
  }
}

void Reparametrize::substitute(nn::Module& root, const std::vector<std::pair<std::string, at::Tensor>>& values,
                               const std::vector<size_t>& dict_of, const FunctionalCallOptions& options,
                               const std::string& where) {
  std::vector<std::pair<std::string, Entry>> entries;
  walk(root, "", entries);

  std::vector<std::string> names;
  std::vector<at::Tensor> current;
  for (const auto& e : entries) names.push_back(e.first), current.push_back(e.second.tensor);
  std::vector<c10::optional<at::Tensor>> value_of = resolve_values(where, names, current, values, dict_of, options);

  // One tensor registered under several names of the same module sits in
  // all of those members: such names can only take one value together.
  for (size_t i = 0; i < entries.size(); ++i) {
    for (size_t j = i + 1; j < entries.size(); ++j) {
      const Entry& a = entries[i].second;
      const Entry& b = entries[j].second;
      if (a.owner != b.owner || !a.tensor.is_same(b.tensor)) continue;
      const bool same = value_of[i].has_value() == value_of[j].has_value() &&
                        (!value_of[i] || value_of[i]->is_same(*value_of[j]));
      TORCH_CHECK(same, "torchfunc::", where, ": '", entries[i].first, "' and '", entries[j].first,
                  "' are one tensor in the members of module ", a.owner->name(),
                  ", so they cannot take different values (give both the same tensor, or use tie_weights(true)).");
    }
  }

  // Find every slot before changing anything, so a failure changes nothing.
  std::vector<std::pair<at::Tensor*, at::Tensor>> plan;  // slot, new value
  std::unordered_map<nn::Module*, std::pair<bool, std::vector<at::Tensor*>>> slots;
  for (size_t i = 0; i < entries.size(); ++i) {
    if (!value_of[i]) continue;
    const Entry& e = entries[i].second;
    auto it = slots.find(e.owner);
    if (it == slots.end()) {
      std::vector<at::Tensor*> s;
      bool known = member_slots(*e.owner, s);
      it = slots.emplace(e.owner, std::make_pair(known, std::move(s))).first;
    }
    const bool known = it->second.first;
    size_t hits = 0;
    for (at::Tensor* slot : it->second.second) {
      if (slot->defined() && slot->is_same(e.tensor)) {
        plan.emplace_back(slot, *value_of[i]);
        ++hits;
      }
    }
    const bool in_dict_only = known && hits == 0 && it->second.second.empty();
    TORCH_CHECK(hits > 0 || in_dict_only, "torchfunc::", where, ": cannot substitute ",
                e.buffer ? "buffer '" : "parameter '", entries[i].first, "' of module ", e.owner->name(), ": ",
                known ? "its C++ member no longer holds the registered tensor (was the member reassigned "
                        "without register_parameter?)."
                      : "its forward reads it from a C++ member torchfunc does not know. Register the members "
                        "once: torchfunc::register_module_members<" + e.owner->name() + ">(&" +
                            e.owner->name() + "::" + e.local + ", ...);");
    TensorDict& dict = e.buffer ? ModuleAccess::buffers(*e.owner) : ModuleAccess::params(*e.owner);
    plan.emplace_back(&dict[e.local], *value_of[i]);
  }
  saved_.reserve(plan.size());
  for (auto& p : plan) {
    saved_.emplace_back(p.first, *p.first);
    *p.first = p.second;
  }
}

void Reparametrize::restore() noexcept {
  for (auto it = saved_.rbegin(); it != saved_.rend(); ++it) *it->first = std::move(it->second);
  saved_.clear();
}

Reparametrize::~Reparametrize() {
  restore();
  release_module(claimed_);
}

}  // namespace detail

TensorDict named_parameters(torch::nn::Module& module) {
  TensorDict out;
  for (const auto& p : module.named_parameters()) out.insert(p.key(), p.value().detach());
  return out;
}

TensorDict named_buffers(torch::nn::Module& module) {
  TensorDict out;
  for (const auto& b : module.named_buffers()) out.insert(b.key(), b.value().detach());
  return out;
}

void set_grads(torch::nn::Module& module, const TensorDict& grads) {
  auto params = module.named_parameters();
  for (const auto& g : grads) {
    at::Tensor* p = params.find(g.key());
    TORCH_CHECK(p, "torchfunc::set_grads: the module has no parameter '", g.key(), "'.");
    TORCH_CHECK(p->sizes() == g.value().sizes(), "torchfunc::set_grads: gradient for '", g.key(), "' has shape ",
                g.value().sizes(), " but the parameter has shape ", p->sizes(), ".");
    p->mutable_grad() = g.value().detach().to(p->options());
  }
}

std::pair<TensorDict, TensorDict> stack_module_state(const std::vector<std::shared_ptr<torch::nn::Module>>& models) {
  TORCH_CHECK(!models.empty(), "torchfunc::stack_module_state: Expected at least one model, got 0.");
  for (size_t i = 1; i < models.size(); ++i) {
    TORCH_CHECK(models[i]->is_training() == models[0]->is_training(),
                "torchfunc::stack_module_state: Expected all models to have the same training/eval mode, but "
                "model 0 is in ", models[0]->is_training() ? "training" : "eval", " mode and model ", i, " in ",
                models[i]->is_training() ? "training" : "eval", " mode.");
    const torch::nn::Module& m0 = *models[0];
    const torch::nn::Module& mi = *models[i];
    TORCH_CHECK(typeid(mi) == typeid(m0), "torchfunc::stack_module_state: Expected all models to be of the same "
                "class, but model 0 is a ", m0.name(), " and model ", i, " a ", mi.name(), ".");
  }
  auto stack = [&](bool buffers) {
    auto get = [&](const torch::nn::Module& m) { return buffers ? m.named_buffers() : m.named_parameters(); };
    auto first = get(*models[0]);
    TensorDict out;
    for (size_t i = 1; i < models.size(); ++i) {
      auto other = get(*models[i]);
      TORCH_CHECK(other.keys() == first.keys(), "torchfunc::stack_module_state: Expected all models to have the "
                  "same ", buffers ? "buffers" : "parameters", ", but model 0 has [",
                  detail::quote_list(first.keys()), "] and model ", i, " has [", detail::quote_list(other.keys()),
                  "].");
    }
    for (const auto& item : first) {
      std::vector<at::Tensor> ts;
      bool all_require_grad = true;
      for (size_t i = 0; i < models.size(); ++i) {
        at::Tensor t = get(*models[i])[item.key()];
        TORCH_CHECK(t.sizes() == item.value().sizes(), "torchfunc::stack_module_state: '", item.key(),
                    "' has shape ", t.sizes(), " in model ", i, " but ", item.value().sizes(), " in model 0.");
        TORCH_CHECK(t.requires_grad() == item.value().requires_grad(), "torchfunc::stack_module_state: Expected '",
                    item.key(), "' from each model to have the same requires_grad, but it is ",
                    item.value().requires_grad() ? "true" : "false", " in model 0 and ",
                    t.requires_grad() ? "true" : "false", " in model ", i, ".");
        all_require_grad = all_require_grad && t.requires_grad();
        ts.push_back(t.detach());
      }
      at::Tensor s = at::stack(ts);
      if (!buffers && all_require_grad) {
        detail::InternalRequiresGrad internal;  // stack_module_state may run inside a transform
        s.requires_grad_(true);
      }
      out.insert(item.key(), s);
    }
    return out;
  };
  return {stack(false), stack(true)};
}

namespace {
template <class T>
bool drop_running_stats(torch::nn::Module& m) {
  auto* p = dynamic_cast<T*>(&m);
  if (!p) return false;
  p->options.track_running_stats(false);
  auto& buffers = detail::ModuleAccess::buffers(m);
  for (const char* name : {"running_mean", "running_var", "num_batches_tracked"})
    if (buffers.contains(name)) buffers.erase(name);
  p->running_mean = at::Tensor();
  p->running_var = at::Tensor();
  p->num_batches_tracked = at::Tensor();
  return true;
}
}  // namespace

void replace_all_batch_norm_modules_(torch::nn::Module& root) {
  namespace nn = torch::nn;
  drop_running_stats<nn::BatchNorm1dImpl>(root) || drop_running_stats<nn::BatchNorm2dImpl>(root) ||
      drop_running_stats<nn::BatchNorm3dImpl>(root) || drop_running_stats<nn::InstanceNorm1dImpl>(root) ||
      drop_running_stats<nn::InstanceNorm2dImpl>(root) || drop_running_stats<nn::InstanceNorm3dImpl>(root);
  for (const auto& c : root.children()) replace_all_batch_norm_modules_(*c);
}

}  // namespace torchfunc
