// src/jvp_decompositions_1_13.cpp: forward-mode decompositions only libtorch
// 1.13 needs (2.13 has forward-mode formulas for log_sigmoid_forward /
// log_sigmoid_backward, trace and logcumsumexp). Built only against
// libtorch < 2; dropping 1.13 deletes this file.
#include "jvp_decompositions.h"

namespace torchfunc {
namespace detail {
namespace {

constexpr const char* kSource113 = R"JIT(
def log_sigmoid_forward(self: Tensor) -> Tuple[Tensor, Tensor]:
    z = torch.exp(-torch.abs(self))
    out = torch.minimum(torch.zeros_like(self), self) - torch.log1p(z)
    if self.is_cuda:
        return out, self.new_zeros([0])
    return out, z

def log_sigmoid_backward(grad_output: Tensor, self: Tensor, buffer: Tensor) -> Tensor:
    return grad_output * torch.sigmoid(-self)

def logcumsumexp(self: Tensor, dim: int) -> Tensor:
    # out[i] = logsumexp(x[j] for j <= i): a masked [L, L] logsumexp (stable,
    # and every op in it has a forward-mode formula).
    if self.dim() == 0:
        return self.clone()
    x = self.movedim(dim, -1)
    n = x.size(-1)
    lower = torch.ones([n, n], device=self.device).tril() > 0
    minus_inf = torch.full([1], float('-inf'), dtype=x.dtype, device=x.device)
    out = torch.logsumexp(torch.where(lower, x.unsqueeze(-2), minus_inf), dim=-1)
    return out.movedim(-1, dim)

def trace(self: Tensor) -> Tensor:
    return torch.sum(torch.diag(self))
)JIT";

}  // namespace

std::vector<JvpDecomposition> jvp_decompositions_1_13() {
  return {
      {"aten::log_sigmoid_forward", "", "log_sigmoid_forward", "", kSource113},
      {"aten::log_sigmoid_backward", "", "log_sigmoid_backward", "", kSource113},
      {"aten::trace", "", "trace", "", kSource113},
      {"aten::logcumsumexp", "", "logcumsumexp", "", kSource113},
  };
}

}  // namespace detail
}  // namespace torchfunc
