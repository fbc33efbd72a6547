// src/jvp_decompositions.cpp: forward-mode derivatives that libtorch (1.13
// and 2.13) delegates to TorchScript decompositions, and their registration.
// Not here: the ones only 1.13 needs (jvp_decompositions_1_13.cpp).
//
// For a few backward ops libtorch has no forward-mode formula; its
// autograd kernel instead runs a TorchScript decomposition of the op under
// forward AD, if one is registered, and otherwise fails with "Trying to use
// forward AD with <op> that does not support it". Python's functorch
// registers those decompositions when it is imported; a C++ program has none.
// Without them, every forward-over-reverse composition (hessian =
// jacfwd(jacrev), Hessian-vector products jvp(grad), jacfwd of a gradient)
// through softmax, log_softmax, cross_entropy / nll_loss, log_sigmoid, trace,
// logcumsumexp,
// layer norm or batch norm (nn::LayerNorm, nn::Transformer*, nn::BatchNorm*,
// nn::InstanceNorm*)
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

#include "compat.h"
#include "jvp_decompositions.h"

namespace torchfunc {
namespace detail {
namespace {

// TorchScript: one self-contained function per op, taking the op's arguments
// in order (ScalarType arguments are ints in TorchScript). Each is compiled
// on its own, so one that a libtorch cannot compile costs only its op.
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

def native_layer_norm_backward(grad_out: Tensor, input: Tensor, normalized_shape: List[int], mean: Tensor,
                               rstd: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                               output_mask: List[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    axis = input.dim() - len(normalized_shape)
    inner: List[int] = []
    outer: List[int] = []
    for d in range(input.dim()):
        if d < axis:
            outer.append(d)
        else:
            inner.append(d)
    n = 1
    for size in normalized_shape:
        n = n * size
    # Statistics recomputed from input so that they carry its tangent; eps
    # recovered from the saved rstd.
    mu = torch.mean(input, dim=inner, keepdim=True)
    var = torch.var(input, dim=inner, unbiased=False, keepdim=True)
    eps = (torch.pow(rstd.reshape(var.shape), -2) - var).detach()
    r = torch.rsqrt(var + eps)
    x_hat = (input - mu) * r
    g = grad_out
    if weight is not None:
        g = grad_out * weight
    # Outputs not asked for (output_mask) are zeros: the caller wants Tensors.
    d_input = torch.zeros_like(input)
    d_weight = torch.zeros([0], dtype=input.dtype, device=input.device)
    d_bias = torch.zeros([0], dtype=input.dtype, device=input.device)
    if weight is not None:
        d_weight = torch.zeros_like(weight)
    if bias is not None:
        d_bias = torch.zeros_like(bias)
    if output_mask[0]:
        d_input = (r / n) * (n * g - torch.sum(g, dim=inner, keepdim=True)
                             - x_hat * torch.sum(g * x_hat, dim=inner, keepdim=True))
    # (torch.sum over an empty dim list would sum over all dims)
    if output_mask[1] and weight is not None:
        d_weight = grad_out * x_hat
        if len(outer) > 0:
            d_weight = torch.sum(d_weight, dim=outer)
    if output_mask[2] and bias is not None:
        d_bias = grad_out
        if len(outer) > 0:
            d_bias = torch.sum(d_bias, dim=outer)
    return d_input, d_weight, d_bias

def native_batch_norm_backward(grad_out: Tensor, input: Tensor, weight: Optional[Tensor],
                               running_mean: Optional[Tensor], running_var: Optional[Tensor],
                               save_mean: Optional[Tensor], save_invstd: Optional[Tensor], train: bool, eps: float,
                               output_mask: List[bool]) -> Tuple[Tensor, Tensor, Tensor]:
    reduce: List[int] = []
    shape: List[int] = []
    for d in range(input.dim()):
        if d != 1:
            reduce.append(d)
            shape.append(1)
        else:
            shape.append(input.size(1))
    n = input.numel() // input.size(1)
    if train:
        # Statistics recomputed from input so that they carry its tangent.
        mean = torch.mean(input, dim=reduce)
        invstd = torch.rsqrt(torch.var(input, dim=reduce, unbiased=False) + eps)
    else:
        assert running_mean is not None and running_var is not None
        mean = running_mean
        invstd = torch.rsqrt(running_var + eps)
    x_hat = (input - mean.reshape(shape)) * invstd.reshape(shape)
    scale = invstd
    if weight is not None:
        scale = invstd * weight
    d_input = torch.zeros_like(input)
    d_weight = torch.zeros_like(invstd)
    d_bias = torch.zeros_like(invstd)
    if output_mask[0]:
        if train:
            d_input = (scale.reshape(shape) / n) * (n * grad_out - torch.sum(grad_out, dim=reduce, keepdim=True)
                                                    - x_hat * torch.sum(grad_out * x_hat, dim=reduce, keepdim=True))
        else:
            d_input = grad_out * scale.reshape(shape)
    if output_mask[1]:
        d_weight = torch.sum(grad_out * x_hat, dim=reduce)
    if output_mask[2]:
        d_bias = torch.sum(grad_out, dim=reduce)
    return d_input, d_weight, d_bias

def batch_norm_backward(grad_out: Tensor, input: Tensor, weight: Tensor, running_mean: Optional[Tensor],
                        running_var: Optional[Tensor], save_mean: Optional[Tensor], save_var: Optional[Tensor],
                        update: bool, eps: float, output_mask: List[bool], reserve: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    return native_batch_norm_backward(grad_out, input, weight, running_mean, running_var, save_mean, save_var,
                                      update, eps, output_mask)

def cudnn_batch_norm_backward(input: Tensor, grad_output: Tensor, weight: Tensor, running_mean: Optional[Tensor],
                              running_var: Optional[Tensor], save_mean: Optional[Tensor],
                              save_var: Optional[Tensor], epsilon: float,
                              reserveSpace: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    # cuDNN's backward is used in training mode only, for all three outputs.
    return native_batch_norm_backward(grad_output, input, weight, running_mean, running_var, save_mean, save_var,
                                      True, epsilon, [True, True, True])
)JIT";

// Checked against libtorch 2.13 (C++, no Python): these still fail there
// without a decomposition. (1.13 also needs jvp_decompositions_1_13().)
const JvpDecomposition kDecompositions[] = {
    {"aten::_log_softmax_backward_data", "", "log_softmax_backward", "", kSource},
    {"aten::_softmax_backward_data", "", "softmax_backward", "", kSource},
    {"aten::nll_loss_backward", "", "nll_loss_backward", "", kSource},
    {"aten::nll_loss2d_backward", "", "nll_loss_backward", "", kSource},
    {"aten::native_layer_norm_backward", "", "native_layer_norm_backward", "", kSource},
    {"aten::native_batch_norm_backward", "", "native_batch_norm_backward", "", kSource},
    // BatchNorm's paths on 2.x (batch_norm_backward) and on CUDA with cuDNN.
    {"aten::batch_norm_backward", "", "batch_norm_backward", "native_batch_norm_backward", kSource},
    {"aten::cudnn_batch_norm_backward", "", "cudnn_batch_norm_backward", "native_batch_norm_backward", kSource},
};

// The source of one top-level function of a TorchScript source text.
std::string function_source(const char* source, const std::string& name) {
  const std::string all(source), head = "\ndef " + name + "(";
  const size_t begin = all.find(head);
  TORCH_INTERNAL_ASSERT(begin != std::string::npos, "torchfunc: no TorchScript function ", name);
  const size_t end = all.find("\ndef ", begin + 1);
  return all.substr(begin, end == std::string::npos ? std::string::npos : end - begin);
}

std::vector<std::string> register_all() {
  std::vector<JvpDecomposition> all(std::begin(kDecompositions), std::end(kDecompositions));
#if TORCHFUNC_LIBTORCH_1_13
  for (const JvpDecomposition& d : jvp_decompositions_1_13()) all.push_back(d);
#endif
  std::vector<std::string> names;
  for (const JvpDecomposition& d : all) {
    auto op = c10::Dispatcher::singleton().findSchema({d.op, d.overload});
    if (!op) continue;
    // The registry is keyed by the dispatcher's own schema object.
    const c10::FunctionSchema& schema = op->schema();
    try {
      if (torch::jit::has_jit_decomposition(schema)) continue;  // registered already (by Python, say)
      std::string source = function_source(d.source, d.function);
      if (*d.helper) source = function_source(d.source, d.helper) + source;
      auto cu = torch::jit::compile(source);
      auto graph = torch::jit::toGraphFunction(cu->get_function(d.function)).graph()->copy();
      torch::jit::RegisterDecomposition(schema, graph);
      names.push_back(std::string(d.op));
    } catch (const std::exception&) {  // c10::Error, torch::jit::ErrorReport
      // A libtorch that cannot compile the function, or whose schema differs
      // from it: the op keeps its own behaviour (a forward-mode error if it
      // has no formula).
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
