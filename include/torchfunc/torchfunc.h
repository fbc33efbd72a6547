// torchfunc/torchfunc.h: everything. torch.func's composable function
// transforms for C++ users of libtorch.
//
//   #include <torchfunc/torchfunc.h>
//   namespace func = torchfunc;
//   auto g = func::grad(f)(x);
#pragma once

#include <torchfunc/options.h>
#include <torchfunc/tree.h>
#include <torchfunc/grad.h>
#include <torchfunc/vjp.h>
#include <torchfunc/jvp.h>
#include <torchfunc/vmap.h>
#include <torchfunc/jacobian.h>
#include <torchfunc/functional_call.h>
#include <torchfunc/allocator.h>
#include <torchfunc/debug_unwrap.h>
#include <torchfunc/fallback.h>
#include <torchfunc/rearrange.h>
#include <torchfunc/linear_transpose.h>
#include <torchfunc/functionalize.h>
#include <torchfunc/dp.h>
#include <torchfunc/noise.h>
#include <torchfunc/custom_function.h>
#include <torchfunc/checkpoint.h>
#include <torchfunc/compile.h>
#include <torchfunc/aot.h>
