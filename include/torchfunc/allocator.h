// torchfunc/allocator.h: an opt-in caching CPU allocator.
//
// Why: vmap materialises whole batches of per-sample tensors (per-sample
// gradients of a 9216x128 layer for 64 samples are 300 MB). glibc returns
// allocations that large to the OS on free, so every call page-faults all of
// it in again; on VMs where a 4 KiB fault costs ~10 us that dominates
// per-sample-gradient workloads. This allocator keeps freed large blocks
// (>= 1 MiB) for reuse and backs them with transparent huge pages. Smaller
// allocations go to libtorch's default allocator (malloc), which is told to
// keep freed memory in its heap rather than return it to the OS at once.
#pragma once

#include <cstddef>

namespace torchfunc {

struct CachingAllocatorStats {
  size_t hits = 0;          // large allocations served from the cache
  size_t misses = 0;        // large allocations that mapped new memory
  size_t cached_bytes = 0;  // freed blocks held for reuse right now
};

/// Makes libtorch allocate CPU tensors through the caching allocator from now
/// on (tensors allocated before keep their own deleters). At most
/// `max_cached_bytes` of freed blocks are kept; beyond that they go back to
/// the OS. Also raises glibc malloc's mmap and trim thresholds (32 MiB and
/// 256 MiB) for the whole process. Call once, early, from the program (not
/// from a library).
///
/// Without code changes: run the program with TORCHFUNC_CACHING_ALLOCATOR=1
/// in its environment; the first transform it runs then makes this call.
void use_caching_cpu_allocator(size_t max_cached_bytes = size_t(4) << 30);

/// Goes back to libtorch's default CPU allocator for new tensors, returns the
/// cached blocks to the OS and resets malloc's thresholds to glibc's defaults. Tensors from the caching allocator stay valid.
void use_default_cpu_allocator();

CachingAllocatorStats caching_cpu_allocator_stats();

}  // namespace torchfunc
