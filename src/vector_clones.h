// src/vector_clones.h: for our libtorch-free kernels (noise_kernel.cpp,
// conv_grad_kernel.cpp): one copy of a function per instruction set, chosen
// when the library is loaded, and inlining of its helpers into each copy.
#pragma once

#if defined(__x86_64__) && defined(__ELF__) && (defined(__GNUC__) || defined(__clang__))
#define TORCHFUNC_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define TORCHFUNC_VECTOR_CLONES
#endif
#if defined(__GNUC__) || defined(__clang__)
#define TORCHFUNC_INLINE inline __attribute__((always_inline))
#else
#define TORCHFUNC_INLINE inline
#endif
