// Misuse that torchfunc rejects at compile time. Each ctest entry compiles this
// file with one TORCHFUNC_CF_<NAME> defined and passes only if the compiler
// fails with the static_assert message listed next to it in CMakeLists.txt.
// The guarded snippets are what a user might write by mistake.
#include <torch/torch.h>
#include <torchfunc/torchfunc.h>

namespace func = torchfunc;
using torch::Tensor;

struct NotATensorMember : torch::nn::Module {
  int count = 0;
};

void misuse() {
  Tensor x = torch::randn({3});
  Tensor y = torch::randn({3});
  (void)x;
  (void)y;
#if defined(TORCHFUNC_CF_CONTROL)
  func::grad([](const Tensor& a, const Tensor& b) { return (a * b).sum(); }, func::argnums<0, 1>)(x, y);
  func::hessian([](const Tensor& t) { return t.pow(3).sum(); })(x);
  func::jvp([](const Tensor& t) { return t.sin(); }, std::tuple{x}, std::tuple{y});
  func::vmap([](const Tensor& t) { return std::make_pair(t.sin(), t); })(x);
  func::jacrev([](const Tensor& t) { return t.sin(); }, func::JacrevOptions().chunk_size(2))(x);
#elif defined(TORCHFUNC_CF_GRAD_NON_TENSOR_OUTPUT)
  func::grad([](const Tensor& t) { return std::make_tuple(t.sum(), t); })(x);
#elif defined(TORCHFUNC_CF_GRAD_NO_ARGUMENTS)
  func::grad([]() { return torch::zeros({}); })();
#elif defined(TORCHFUNC_CF_GRAD_AUX_NOT_A_PAIR)
  func::grad([](const Tensor& t) { return t.sum(); }, func::has_aux)(x);
#elif defined(TORCHFUNC_CF_GRAD_AUX_NON_TENSOR_LEAF)
  func::grad([](const Tensor& t) { return std::make_pair(t.sum(), std::string("aux")); }, func::has_aux)(x);
#elif defined(TORCHFUNC_CF_ARGNUM_OUT_OF_RANGE)
  func::grad([](const Tensor& a, const Tensor& b) { return (a * b).sum(); }, func::argnum<2>)(x, y);
#elif defined(TORCHFUNC_CF_ARGNUMS_DUPLICATE)
  func::grad([](const Tensor& a, const Tensor& b) { return (a * b).sum(); }, func::argnums<0, 0>)(x, y);
#elif defined(TORCHFUNC_CF_UNKNOWN_TAG)
  func::jacrev([](const Tensor& t) { return t.sin(); }, 3)(x);
#elif defined(TORCHFUNC_CF_JVP_TANGENT_TYPE)
  func::jvp([](const Tensor& t) { return t.sin(); }, std::tuple{x}, std::tuple{std::vector<Tensor>{x}});
#elif defined(TORCHFUNC_CF_VJP_NON_TENSOR_OUTPUT)
  func::vjp([](const Tensor& t) { return std::make_pair(t.sin(), 1.0); }, x);
#elif defined(TORCHFUNC_CF_VMAP_NON_TENSOR_OUTPUT)
  func::vmap([](const Tensor& t) { return std::make_pair(t.sin(), 1); })(x);
#elif defined(TORCHFUNC_CF_VMAP_BAD_DIMS_ARGUMENT)
  func::vmap([](const Tensor& t) { return t.sin(); }, std::string("0"))(x);
#elif defined(TORCHFUNC_CF_REGISTER_NON_TENSOR_MEMBER)
  func::register_module_members<NotATensorMember>(&NotATensorMember::count);
#else
#error "define one TORCHFUNC_CF_<CASE>"
#endif
}
