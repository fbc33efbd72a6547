// src/variable_hooks.cpp: requires_grad_() and retain_grad() inside a
// transformed function raise, as in torch.func.
//
// Inside grad / vjp / jacrev / ... a tensor is a wrapper of the transform's
// level, and the transform decides what is differentiated: flagging a tensor
// with requires_grad_() (or asking for .grad with retain_grad()) there
// cannot mean what the user wants, and would pass silently. torch.func
// checks this in its Python bindings only; libtorch's C++ Tensor methods
// reach autograd through one process-wide at::impl::VariableHooksInterface.
// So we install a forwarder that checks these two calls and passes every
// method on to libtorch's own hooks.
//
// The interface grows with libtorch (grad_fn's return type changed in 2.x;
// basic_autograd_not_implemented_fallback, grad_dtype and set_grad_dtype were
// added), so the methods only some versions have are forwarded by layers that
// exist only where the base class declares them. A version that adds another
// pure virtual fails to compile here, which is the signal to forward it too.
//
// Tensor::set_requires_grad(bool) does not pass through these hooks, so it is
// not checked (README: known differences).
#include "variable_hooks.h"

#include <ATen/core/VariableHooksInterface.h>
#include <ATen/core/stack.h>
#include <ATen/functorch/DynamicLayer.h>
#include <c10/util/Exception.h>

#include <mutex>
#include <type_traits>
#include <utility>

namespace torchfunc {
namespace detail {
namespace {

namespace ft = at::functorch;
using Hooks = at::impl::VariableHooksInterface;
using at::TensorBase;

void check_outside_transforms(const char* method, bool internal_allowed) {
  if (ft::getDynamicLayerStack().empty()) return;
  if (internal_allowed && ft::getInplaceRequiresGradAllowed()) return;
  const char* api = innermost_transform();
  TORCH_CHECK(false, "torchfunc::", api ? api : "transform", ": Tensor.", method,
              " was called inside the function being transformed. The transform decides what is "
              "differentiated, so this cannot take effect there: pass the tensor as an argument and "
              "differentiate with respect to it (grad, vjp, jacrev, jacfwd, hessian with argnums), or call ",
              method, " outside the transformed function.");
}

// The methods every supported libtorch declares.
class ForwardCommon : public Hooks {
 public:
  explicit ForwardCommon(Hooks* inner) : inner_(inner) {}
  Hooks* inner() const { return inner_; }

  TensorBase tensor_data(const TensorBase& t) const override { return inner_->tensor_data(t); }
  TensorBase variable_data(const TensorBase& t) const override { return inner_->variable_data(t); }
  // std::shared_ptr on 1.13, c10::intrusive_ptr on 2.x.
  auto grad_fn(const TensorBase& t) const -> decltype(std::declval<const Hooks&>().grad_fn(t)) override {
    return inner_->grad_fn(t);
  }
  unsigned _register_hook(const TensorBase& t, std::function<TensorBase(const TensorBase&)> hook) const override {
    return inner_->_register_hook(t, std::move(hook));
  }
  void remove_hook(const TensorBase& t, unsigned pos) const override { inner_->remove_hook(t, pos); }
  bool is_view(const TensorBase& t) const override { return inner_->is_view(t); }
  const TensorBase& base(const TensorBase& t) const override { return inner_->base(t); }
  const std::string& name(const TensorBase& t) const override { return inner_->name(t); }
  bool is_leaf(const TensorBase& t) const override { return inner_->is_leaf(t); }
  int64_t output_nr(const TensorBase& t) const override { return inner_->output_nr(t); }
  void set_data(const TensorBase& t, const TensorBase& d) const override { inner_->set_data(t, d); }
  TensorBase data(const TensorBase& t) const override { return inner_->data(t); }
  int64_t _version(const TensorBase& t) const override { return inner_->_version(t); }
  bool retains_grad(const TensorBase& t) const override { return inner_->retains_grad(t); }
  void _backward(const at::Tensor& t, at::TensorList inputs, const c10::optional<at::Tensor>& gradient,
                 c10::optional<bool> keep_graph, bool create_graph) const override {
    inner_->_backward(t, inputs, gradient, keep_graph, create_graph);
  }

  // The two checked methods.
  void retain_grad(const TensorBase& t) const override {
    check_outside_transforms("retain_grad()", /*internal_allowed=*/false);
    inner_->retain_grad(t);
  }
  void requires_grad_(const TensorBase& t, bool b) const override {
    check_outside_transforms("requires_grad_()", /*internal_allowed=*/true);
    inner_->requires_grad_(t, b);
  }

 private:
  Hooks* inner_;
};

// basic_autograd_not_implemented_fallback: libtorch 2.x.
template <class B, class = void>
struct HasFallback : std::false_type {};
template <class B>
struct HasFallback<B, std::void_t<decltype(&B::basic_autograd_not_implemented_fallback)>> : std::true_type {};

template <class Base, bool = HasFallback<Hooks>::value>
struct ForwardFallback : Base {
  using Base::Base;
};
template <class Base>
struct ForwardFallback<Base, true> : Base {
  using Base::Base;
  void basic_autograd_not_implemented_fallback(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                                               torch::jit::Stack* stack) const override {
    this->inner()->basic_autograd_not_implemented_fallback(op, keys, stack);
  }
};

// grad_dtype / set_grad_dtype: newer libtorch 2.x.
template <class B, class = void>
struct HasGradDtype : std::false_type {};
template <class B>
struct HasGradDtype<B, std::void_t<decltype(&B::grad_dtype)>> : std::true_type {};

template <class Base, bool = HasGradDtype<Hooks>::value>
struct ForwardGradDtype : Base {
  using Base::Base;
};
template <class Base>
struct ForwardGradDtype<Base, true> : Base {
  using Base::Base;
  c10::optional<c10::ScalarType> grad_dtype(const TensorBase& t) const override {
    return this->inner()->grad_dtype(t);
  }
  void set_grad_dtype(const TensorBase& t, const c10::optional<c10::ScalarType>& d) const override {
    this->inner()->set_grad_dtype(t, d);
  }
};

using CheckingHooks = ForwardGradDtype<ForwardFallback<ForwardCommon>>;

}  // namespace

void install_variable_hooks() {
  static std::once_flag once;
  std::call_once(once, [] {
    // Never destroyed: libtorch keeps the raw pointer, and tensors freed
    // during static destruction may still call it.
    static auto* hooks = new CheckingHooks(at::impl::GetVariableHooks());
    at::impl::SetVariableHooks(hooks);
  });
}

InternalRequiresGrad::InternalRequiresGrad() : prev_(ft::getInplaceRequiresGradAllowed()) {
  ft::setInplaceRequiresGradAllowed(true);
}
InternalRequiresGrad::~InternalRequiresGrad() { ft::setInplaceRequiresGradAllowed(prev_); }

}  // namespace detail
}  // namespace torchfunc
