// src/jvp_decompositions.cpp: forward-mode derivatives that libtorch 1.13
// delegates to TorchScript decompositions.
//
// For a few backward ops libtorch 1.13 has no forward-mode formula; its
// autograd kernel instead runs a TorchScript decomposition of the op under
// forward AD, if one is registered, and otherwise fails with "Trying to use
// forward AD with <op> that does not support it". Python's functorch
// registers those decompositions when it is imported; a C++ program has none.
// Without them, every forward-over-reverse composition (hessian =
// jacfwd(jacrev), Hessian-vector products jvp(grad), jacfwd of a gradient)
// through softmax, log_softmax, cross_entropy / nll_loss, log_sigmoid or trace
// fails. torchfunc registers its own decompositions of these ops (the same
// math as ATen's kernels, written with ops that have forward-mode formulas)
// the first time a forward-mode transform runs. They are used only where the
// op itself has no forward-mode formula, i.e. only under forward AD.
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/jit/api/compilation_unit.h>
#include <torch/csrc/jit/api/function_impl.h>
#include <torch/csrc/jit/frontend/ir_emitter.h>
#include <torch/csrc/jit/runtime/decomposition_registry.h>
#include <torch/jit.h>

#include <mutex>


namespace torchfunc {
namespace detail {
namespace {

// TorchScript: one function per op, taking the op's arguments in order.
// (ScalarType arguments are ints in TorchScript.)
constexpr const char* kSource = R"JIT(
def log_softmax_backward(grad_output: Tensor, output: Tensor, dim: int, input_dtype: int) -> Tensor:
    grad_input = grad_output - torch.exp(output) * torch.sum(grad_output, dim=dim, keepdim=True)
    return grad_input.to(input_dtype)

def softmax_backward(grad_output: Tensor, output: Tensor, dim: int, input_dtype: int) -> Tensor:
    weighted = grad_output * output
    grad_input = weighted - output * torch.sum(weighted, dim=dim, keepdim=True)
    return grad_input.to(input_dtype)

def nll_loss_backward(grad_output: Tensor, self: Tensor, target: Tensor, weight: Optional[Tensor],
                      reduction: int, ignore_index: int, total_weight: Tensor) -> Tensor:
    channel_dim = 0 if self.dim() < 2 else 1
    if reduction == 1:
        grad_output = grad_output / total_weight
    elif reduction == 0 and self.dim() >= 2:
        grad_output = grad_output.unsqueeze(channel_dim)
    target = target.unsqueeze(channel_dim)
    kept = target != ignore_index
    safe = torch.where(kept, target, torch.zeros_like(target))
    grad_input = torch.scatter(torch.zeros_like(self), channel_dim, safe, -1.0) * kept
    if weight is not None:
        shape = [1] * self.dim()
        shape[channel_dim] = weight.size(0)
        grad_input = grad_input * weight.reshape(shape)
    return grad_input * grad_output

def log_sigmoid_forward(self: Tensor) -> Tuple[Tensor, Tensor]:
    z = torch.exp(-torch.abs(self))
    out = torch.minimum(torch.zeros_like(self), self) - torch.log1p(z)
    if self.is_cuda:
        return out, self.new_zeros([0])
    return out, z

def log_sigmoid_backward(grad_output: Tensor, self: Tensor, buffer: Tensor) -> Tensor:
    return grad_output * torch.sigmoid(-self)

def trace(self: Tensor) -> Tensor:
    return torch.sum(torch.diag(self))
)JIT";

struct Decomposition {
  const char* op;
  const char* overload;
  const char* function;
};
constexpr Decomposition kDecompositions[] = {
    {"aten::_log_softmax_backward_data", "", "log_softmax_backward"},
    {"aten::_softmax_backward_data", "", "softmax_backward"},
    {"aten::nll_loss_backward", "", "nll_loss_backward"},
    {"aten::nll_loss2d_backward", "", "nll_loss_backward"},
    {"aten::log_sigmoid_forward", "", "log_sigmoid_forward"},
    {"aten::log_sigmoid_backward", "", "log_sigmoid_backward"},
    {"aten::trace", "", "trace"},
};

std::vector<std::string> register_all() {
  std::vector<std::string> names;
  auto cu = torch::jit::compile(kSource);
  for (const Decomposition& d : kDecompositions) {
    auto op = c10::Dispatcher::singleton().findSchema({d.op, d.overload});
    if (!op) continue;
    // The registry is keyed by the dispatcher's own schema object.
    const c10::FunctionSchema& schema = op->schema();
    if (torch::jit::has_jit_decomposition(schema)) continue;  // someone (Python) registered one
    try {
      auto graph = torch::jit::toGraphFunction(cu->get_function(d.function)).graph()->copy();
      torch::jit::RegisterDecomposition(schema, graph);
      names.push_back(std::string(d.op));
    } catch (const c10::Error&) {
      // A libtorch whose schema differs from the function here: the op keeps
      // its own behaviour (a forward-mode error if it has no formula).
    }
  }
  return names;
}

}  // namespace

const std::vector<std::string>& own_jvp_decompositions() {
  static const std::vector<std::string> registered = register_all();
  return registered;
}

void ensure_jvp_decompositions() { (void)own_jvp_decompositions(); }

}  // namespace detail
}  // namespace torchfunc
