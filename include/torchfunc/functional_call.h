// torchfunc/functional_call.h: torch::nn modules under transforms.
// Mirrors torch.func.functional_call, torch.func.stack_module_state and
// torch.func.replace_all_batch_norm_modules_.
//
// Built-in libtorch modules read their tensors from C++ members
// (LinearImpl::weight), not from named_parameters(). functional_call points
// those members (and the registered entries) at the given tensors for the
// duration of one forward call, then restores the module's own tensors, also
// when forward throws. Every parameter or buffer it is asked to substitute is
// found by identity in the module's members; if it cannot be, that is an
// error naming it, never a silent computation with a stale tensor.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>
#include <torch/ordered_dict.h>
#include <torchfunc/tree.h>

#include <functional>
#include <map>
#include <memory>
#include <string>
#include <tuple>
#include <typeindex>
#include <unordered_map>
#include <utility>
#include <vector>

namespace torchfunc {

using TensorDict = torch::OrderedDict<std::string, at::Tensor>;

/// Options of functional_call. Mirrors functional_call(..., strict=, tie_weights=).
struct FunctionalCallOptions {
  /// Every parameter and buffer must be given (and no unknown key).
  TORCH_ARG(bool, strict) = false;
  /// A value given for one of several tied names (one tensor registered under
  /// several names) is used for all of them.
  TORCH_ARG(bool, tie_weights) = true;
};

namespace detail {

using SlotLister = std::function<void(torch::nn::Module&, std::vector<at::Tensor*>&)>;
void register_module_slots(std::type_index type, SlotLister lister);

/// Substitutes tensors into a module tree for its lifetime (RAII).
class Reparametrize {
 public:
  Reparametrize(torch::nn::Module& root, const std::vector<std::pair<std::string, at::Tensor>>& values,
                const std::vector<size_t>& dict_of_value, const FunctionalCallOptions& options);
  ~Reparametrize();
  Reparametrize(const Reparametrize&) = delete;
  Reparametrize& operator=(const Reparametrize&) = delete;

 private:
  void substitute(torch::nn::Module& root, const std::vector<std::pair<std::string, at::Tensor>>& values,
                  const std::vector<size_t>& dict_of_value, const FunctionalCallOptions& options,
                  const std::string& where);
  void restore() noexcept;
  std::vector<std::pair<at::Tensor*, at::Tensor>> saved_;  // slot, original handle
  const void* claimed_ = nullptr;  // the root module, claimed for this thread (src/modules.cpp)
};

// The module object behind a ModuleHolder, a std::shared_ptr or a reference.
// (Through .ptr() for a ModuleHolder: a const holder, e.g. one captured by
// value in a lambda, still names a mutable module, as a const shared_ptr does.)
template <class M>
auto& impl_ref(M& m) {
  if constexpr (std::is_base_of_v<torch::nn::Module, std::decay_t<M>>) {
    return m;
  } else if constexpr (std::is_base_of_v<torch::detail::ModuleHolderIndicator, std::decay_t<M>>) {
    return *m.ptr();
  } else {
    return *m;
  }
}

template <class M>
torch::nn::Module& module_ref(M& m) {
  return impl_ref(m);
}

template <class T>
constexpr bool dependent_false_v = false;

/// Appends the (name, tensor) entries of one dict-like value.
template <class D>
void collect_entries(const D& d, size_t which, std::vector<std::pair<std::string, at::Tensor>>& out,
                     std::vector<size_t>& dict_of) {
  using T = std::decay_t<D>;
  if constexpr (kind_of<T> == NodeKind::Dict) {
    static_assert(std::is_same_v<std::decay_t<std::tuple_element_t<0, typename node_t<T>::children>>, at::Tensor>,
                  "torchfunc::functional_call: parameter dicts must map std::string to Tensor.");
    node_t<T>::for_each(d, [&](const std::string& k, const at::Tensor& v) {
      out.emplace_back(k, v);
      dict_of.push_back(which);
    });
  } else {
    static_assert(dependent_false_v<T>,
                  "torchfunc::functional_call: expected a string-keyed dict of Tensors "
                  "(OrderedDict, std::map, std::unordered_map) or a std::tuple/std::pair of them.");
  }
}

template <class D>
void collect_dicts(const D& d, std::vector<std::pair<std::string, at::Tensor>>& out, std::vector<size_t>& dict_of) {
  using T = std::decay_t<D>;
  if constexpr (kind_of<T> == NodeKind::Dict) {
    collect_entries(d, 0, out, dict_of);
  } else {
    size_t i = 0;
    std::apply([&](const auto&... each) { ((collect_entries(each, i++, out, dict_of)), ...); }, d);
  }
}

/// forward(args[0..n-2]...): the arguments before a trailing options struct.
template <class Impl, class Tuple, size_t... I>
decltype(auto) forward_prefix(Impl& m, Tuple&& all, std::index_sequence<I...>) {
  return m.forward(std::get<I>(std::forward<Tuple>(all))...);
}

template <class T>
struct is_shared_ptr : std::false_type {};
template <class T>
struct is_shared_ptr<std::shared_ptr<T>> : std::true_type {};

}  // namespace detail

/// Lets functional_call substitute the direct tensor members of your own
/// module type. One line, once per type (e.g. in its constructor):
///   struct Net : torch::nn::Module {
///     Net() { w = register_parameter("w", torch::randn({3}));
///             torchfunc::register_module_members<Net>(&Net::w); }
///     torch::Tensor w;
///   };
/// Call it with no members for a module that reads its tensors from
/// named_parameters()/named_buffers() rather than from members.
template <class M, class... Members>
void register_module_members(Members... members) {
  static_assert((std::is_same_v<Members, at::Tensor M::*> && ...),
                "torchfunc::register_module_members: pass pointers to Tensor members, e.g. &Net::w.");
  detail::register_module_slots(typeid(M), [members...](torch::nn::Module& m, std::vector<at::Tensor*>& out) {
    auto& self = dynamic_cast<M&>(m);
    (out.push_back(&(self.*members)), ...);
  });
}

/// functional_call(module, dicts, args..., [FunctionalCallOptions])
///
/// Mirrors torch.func.functional_call: runs module->forward(args...) with the
/// tensors of `dicts` in place of the module's parameters and buffers (keyed
/// by named_parameters() / named_buffers() names). `dicts` is one
/// string-keyed dict of Tensors or a std::tuple / std::pair of them (keys
/// must not repeat). `module` is a ModuleHolder (torch::nn::Linear), a
/// std::shared_ptr<Impl> or an Impl&. The module's own tensors are restored
/// afterwards, also when forward throws.
///   auto loss = [&](const TensorDict& p, const Tensor& x, const Tensor& y) {
///     return torch::mse_loss(functional_call(model, p, x), y);
///   };
///   auto per_sample = vmap(grad(loss), in_dims(none, 0, 0))(params, xs, ys);
template <class M, class D, class... Rest>
decltype(auto) functional_call(M& module, const D& dicts, Rest&&... rest) {
  std::vector<std::pair<std::string, at::Tensor>> values;
  std::vector<size_t> dict_of;
  detail::collect_dicts(dicts, values, dict_of);
  auto all = std::forward_as_tuple(std::forward<Rest>(rest)...);
  constexpr size_t n = sizeof...(Rest);
  if constexpr (n > 0 &&
                std::is_same_v<std::decay_t<std::tuple_element_t<n - 1, decltype(all)>>, FunctionalCallOptions>) {
    const FunctionalCallOptions opts = std::get<n - 1>(all);
    detail::Reparametrize guard(detail::module_ref(module), values, dict_of, opts);
    return detail::forward_prefix(detail::impl_ref(module), std::move(all), std::make_index_sequence<n - 1>{});
  } else {
    detail::Reparametrize guard(detail::module_ref(module), values, dict_of, FunctionalCallOptions());
    return detail::impl_ref(module).forward(std::forward<Rest>(rest)...);
  }
}

/// Parameters of a module as a dict of detached tensors (ready to be
/// differentiated by a transform). Mirrors dict(model.named_parameters()).
TensorDict named_parameters(torch::nn::Module& module);
/// Buffers of a module as a dict of detached tensors.
TensorDict named_buffers(torch::nn::Module& module);
template <class M>
TensorDict named_parameters(M& module) {
  return named_parameters(detail::module_ref(module));
}
template <class M>
TensorDict named_buffers(M& module) {
  return named_buffers(detail::module_ref(module));
}

/// Writes grads[name] into .grad() of the module's parameter `name` (so a
/// torch::optim optimizer applies them). Unknown names or shape mismatches
/// are errors; parameters without an entry keep their .grad().
void set_grads(torch::nn::Module& module, const TensorDict& grads);
template <class M>
void set_grads(M& module, const TensorDict& grads) {
  set_grads(detail::module_ref(module), grads);
}

/// stack_module_state(models) -> {params, buffers}: each entry stacks the
/// models' tensors along a new leading dim (params detached and requiring
/// grad). Mirrors torch.func.stack_module_state.
std::pair<TensorDict, TensorDict> stack_module_state(const std::vector<std::shared_ptr<torch::nn::Module>>& models);
template <class M>
std::pair<TensorDict, TensorDict> stack_module_state(const std::vector<M>& models) {
  std::vector<std::shared_ptr<torch::nn::Module>> ms;
  ms.reserve(models.size());
  for (const auto& m : models) {
    if constexpr (detail::is_shared_ptr<M>::value) {
      ms.push_back(std::static_pointer_cast<torch::nn::Module>(m));
    } else {
      ms.push_back(std::static_pointer_cast<torch::nn::Module>(m.ptr()));
    }
  }
  return stack_module_state(ms);
}

/// Makes every BatchNorm / InstanceNorm in the tree stop tracking running
/// statistics (so it can run under vmap). Mirrors
/// torch.func.replace_all_batch_norm_modules_.
void replace_all_batch_norm_modules_(torch::nn::Module& root);
template <class M>
void replace_all_batch_norm_modules_(M& root) {
  replace_all_batch_norm_modules_(detail::module_ref(root));
}

}  // namespace torchfunc
