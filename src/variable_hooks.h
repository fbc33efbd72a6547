// src/variable_hooks.h: Tensor methods that cannot mean what the user wants
// inside a transform raise there (see variable_hooks.cpp).
#pragma once

namespace torchfunc {
namespace detail {

/// Installs the checking VariableHooks (once per process; the first
/// transform calls it).
void install_variable_hooks();

/// While alive, requires_grad_() inside transforms is torchfunc's own doing
/// (grad wrapping its inputs) and passes.
class InternalRequiresGrad {
 public:
  InternalRequiresGrad();
  ~InternalRequiresGrad();
  InternalRequiresGrad(const InternalRequiresGrad&) = delete;
  InternalRequiresGrad& operator=(const InternalRequiresGrad&) = delete;

 private:
  bool prev_;
};

/// The api string of this thread's innermost transform, or nullptr outside
/// transforms (levels.cpp keeps it).
const char* innermost_transform();

}  // namespace detail
}  // namespace torchfunc
