// src/escaped.cpp: a tensor that escapes a grad-family transform is an error
// when it is used afterwards.
//
// Inside grad / vjp / jvp / jacrev / jacfwd / hessian / linearize, tensors
// are TensorWrappers of that transform's level. One that leaves the
// transform other than as a result (stored in a captured variable, a member,
// a global) is a wrapper of a dead level. libtorch's fallback for the
// FuncTorchGradWrapper key (the key only dead wrappers reach) silently
// computes with the wrapped value, as torch.func does; the gradient link is
// gone, so code that relies on it is quietly wrong. torchfunc raises instead.
//
// One legitimate user of dead wrappers remains: the autograd graph recorded
// inside a transform saves wrappers of its level, and vjp_fn / linearize's
// jvp_fn run that graph's backward after the level is gone. So the check
// lets dead wrappers through while an autograd backward pass runs on this
// thread (the engine marks its threads, CPU and device ones alike).
//
// libtorch's fallback cannot be replaced (a key has one fallback), so the
// check is a kernel for every operator registered when the first transform
// runs; an operator a library registers later keeps libtorch's behaviour.
// Inside another transform, libtorch's front-mode kernel unwraps dead
// wrappers before this key is reached (README: known differences).
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>
#include <c10/util/Exception.h>

#include <memory>
#include <mutex>
#include <vector>

#include "compat.h"

namespace torchfunc {
namespace detail {
namespace {

bool is_dead_wrapper(const at::Tensor& t) {
  auto* w = compat::wrapper_of(t);
  return w && !w->is_alive();
}

// Applies fn to every tensor among the operator's arguments on the stack
// (Tensor, Tensor[], Tensor?[]); fn returns the tensor to put back.
template <class Fn>
void for_each_tensor(torch::jit::Stack& stack, size_t begin, Fn&& fn) {
  for (size_t i = begin; i < stack.size(); ++i) {
    c10::IValue& v = stack[i];
    if (v.isTensor()) {
      v = fn(v.toTensor());
    } else if (v.isTensorList()) {
      c10::List<at::Tensor> list = v.toTensorList().copy();
      for (size_t j = 0; j < list.size(); ++j) list.set(j, fn(list.get(j)));
      v = std::move(list);
    } else if (v.isList()) {
      c10::List<c10::IValue> list = v.toList().copy();
      for (size_t j = 0; j < list.size(); ++j) {
        c10::IValue e = list.get(j);
        if (e.isTensor()) list.set(j, fn(e.toTensor()));
      }
      v = c10::IValue(std::move(list));
    }
  }
}

void escaped_wrapper_kernel(const c10::OperatorHandle& op, torch::jit::Stack* stack) {
  const size_t begin = stack->size() - op.schema().arguments().size();
  const bool in_backward = compat::inside_autograd_backward();
  size_t dead = 0;
  for_each_tensor(*stack, begin, [&](const at::Tensor& t) {
    if (!is_dead_wrapper(t)) return t;
    ++dead;
    if (!in_backward) {
      TORCH_CHECK(false, "torchfunc: ", op.schema().operator_name(),
                  " was called with a tensor that escaped a grad-family transform (grad, "
                  "grad_and_value, vjp, jvp, jacrev, jacfwd, hessian or linearize): it was created inside "
                  "the transformed function and kept (in a captured variable, a member or a global) "
                  "after the transform returned, where it no longer belongs to any computation. Return it "
                  "from the function instead: as aux (has_aux), through grad_and_value, or as an output of "
                  "vjp / jvp.");
    }
    return compat::wrapper_of(t)->value();
  });
  TORCH_INTERNAL_ASSERT(dead > 0, "torchfunc: ", op.schema().operator_name(),
                        " reached the FuncTorchGradWrapper key without a dead TensorWrapper argument.");
  op.callBoxed(stack);
}

}  // namespace

void ensure_escape_check() {
  static std::once_flag once;
  std::call_once(once, [] {
    auto& dispatcher = c10::Dispatcher::singleton();
    // Lives for the whole process, like libtorch's own registrations.
    static auto* handles = new std::vector<c10::RegistrationHandleRAII>();
    const auto key = c10::DispatchKey::FuncTorchGradWrapper;
    for (const c10::OperatorName& name : dispatcher.getAllOpNames()) {
      auto op = dispatcher.findOp(name);
      if (!op || op->hasKernelForDispatchKey(key)) continue;
      handles->push_back(dispatcher.registerImpl(
          name, key, c10::KernelFunction::makeFromBoxedFunction<&escaped_wrapper_kernel>(), c10::nullopt,
          nullptr, "torchfunc escaped-tensor check (src/escaped.cpp)"));
    }
  });
}

}  // namespace detail
}  // namespace torchfunc
