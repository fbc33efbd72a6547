// src/allocator.cpp: the optional caching CPU allocator (use_caching_cpu_allocator,
// TORCHFUNC_CACHING_ALLOCATOR): large blocks are kept for reuse instead of
// going back to the OS on every free. Not here: anything transform-specific.
#include <torchfunc/allocator.h>

#include <cstdlib>
#include <cstring>
#include <string>

#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>
#include <c10/util/Exception.h>

#include <malloc.h>
#include <sys/mman.h>

#include <map>
#include <mutex>
#include <unordered_map>

namespace torchfunc {
namespace {

constexpr size_t kLarge = size_t(1) << 20;  // below this: libtorch's default path
constexpr size_t kHuge = size_t(2) << 20;   // transparent huge page size on x86-64

class CachingCpuAllocator final : public c10::Allocator {
 public:
  static CachingCpuAllocator& instance() {
    static auto* a = new CachingCpuAllocator();  // never destroyed: tensors may outlive main
    return *a;
  }

  // c10::Allocator::allocate is const up to libtorch 2.2 and non-const from
  // 2.3 on, where copy_data also became pure virtual. Defining both
  // spellings (without `override`, on purpose) overrides whichever this
  // libtorch declares; see src/compat.h for the other version differences.
  c10::DataPtr allocate(size_t n) { return allocate_impl(n); }
  c10::DataPtr allocate(size_t n) const { return allocate_impl(n); }
  void copy_data(void* dest, const void* src, std::size_t count) const {
    if (count) std::memcpy(dest, src, count);
  }

  c10::DataPtr allocate_impl(size_t n) const {
    if (n < kLarge) {
      void* p = c10::alloc_cpu(n);
      return {p, p, &free_any, c10::Device(c10::DeviceType::CPU)};
    }
    const size_t size = (n + kHuge - 1) / kHuge * kHuge;
    void* p = nullptr;
    {
      std::lock_guard<std::mutex> lock(mu_);
      // Best fit among cached blocks no more than 25% larger than needed.
      auto it = free_.lower_bound(size);
      if (it != free_.end() && it->first <= size + size / 4) {
        p = it->second;
        live_[p] = it->first;
        cached_ -= it->first;
        free_.erase(it);
        ++hits_;
      }
    }
    if (!p) {
      p = map_aligned(size);
      std::lock_guard<std::mutex> lock(mu_);
      live_[p] = size;
      ++misses_;
    }
    return {p, p, &free_any, c10::Device(c10::DeviceType::CPU)};
  }

  // One deleter for both paths, so that raw_allocate / raw_deallocate (used by
  // some kernels, e.g. oneDNN convolutions) work too.
  c10::DeleterFnPtr raw_deleter() const override { return &free_any; }

  void set_limit(size_t max_cached) {
    std::lock_guard<std::mutex> lock(mu_);
    max_cached_ = max_cached;
    trim_locked();
  }

  CachingAllocatorStats stats() const {
    std::lock_guard<std::mutex> lock(mu_);
    return {hits_, misses_, cached_};
  }

 private:
  static void free_any(void* p) {
    // Our blocks are 2 MiB-aligned; most small blocks are not, and skip the lock.
    bool maybe_ours = reinterpret_cast<uintptr_t>(p) % kHuge == 0;
    if (!maybe_ours || !instance().release(p)) c10::free_cpu(p);
  }

  // 2 MiB-aligned anonymous memory, advised to use huge pages.
  static void* map_aligned(size_t size) {
    void* raw = mmap(nullptr, size + kHuge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    TORCH_CHECK(raw != MAP_FAILED, "torchfunc caching allocator: out of memory allocating ", size, " bytes");
    auto base = reinterpret_cast<uintptr_t>(raw);
    uintptr_t aligned = (base + kHuge - 1) / kHuge * kHuge;
    if (aligned > base) munmap(raw, aligned - base);
    size_t tail = (base + size + kHuge) - (aligned + size);
    if (tail) munmap(reinterpret_cast<void*>(aligned + size), tail);
    madvise(reinterpret_cast<void*>(aligned), size, MADV_HUGEPAGE);
    return reinterpret_cast<void*>(aligned);
  }

  // Takes back a block we mapped; false for small (malloc'ed) blocks.
  bool release(void* p) {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = live_.find(p);
    if (it == live_.end()) return false;
    size_t size = it->second;
    live_.erase(it);
    free_.emplace(size, p);
    cached_ += size;
    trim_locked();
    return true;
  }

  void trim_locked() {
    // Over the limit: give back the largest blocks first.
    while (cached_ > max_cached_ && !free_.empty()) {
      auto last = std::prev(free_.end());
      munmap(last->second, last->first);
      cached_ -= last->first;
      free_.erase(last);
    }
  }

  mutable std::mutex mu_;
  mutable std::multimap<size_t, void*> free_;
  mutable std::unordered_map<void*, size_t> live_;
  mutable size_t cached_ = 0, hits_ = 0, misses_ = 0;
  size_t max_cached_ = size_t(4) << 30;
};

// SetCPUAllocator only replaces an allocator of lower or equal priority.
constexpr uint8_t kPriority = 100;

}  // namespace

// glibc's defaults for the two thresholds below (mallopt disables their
// dynamic adjustment, so going back means setting them explicitly).
constexpr int kGlibcDefaultThreshold = 128 * 1024;

void use_caching_cpu_allocator(size_t max_cached_bytes) {
  auto& a = CachingCpuAllocator::instance();
  a.set_limit(max_cached_bytes);
  c10::SetCPUAllocator(&a, kPriority);
  // The blocks below 1 MiB stay with malloc: keep them in the heap too.
  // Otherwise glibc serves 128 KiB..1 MiB blocks with fresh mmaps and trims
  // the heap top on free, and each call faults the same pages in again
  // (W3 here: 2.8 ms -> 1.8 ms).
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  mallopt(M_TRIM_THRESHOLD, 256 << 20);
}

void use_default_cpu_allocator() {
  c10::SetCPUAllocator(c10::GetDefaultCPUAllocator(), kPriority);
  CachingCpuAllocator::instance().set_limit(0);
  mallopt(M_MMAP_THRESHOLD, kGlibcDefaultThreshold);
  mallopt(M_TRIM_THRESHOLD, kGlibcDefaultThreshold);
  malloc_trim(0);
}

namespace detail {
void use_allocator_from_environment() {
  static const bool checked = [] {
    const char* v = std::getenv("TORCHFUNC_CACHING_ALLOCATOR");
    const std::string value = v ? v : "";
    if (value == "1" || value == "true" || value == "on") use_caching_cpu_allocator();
    return true;
  }();
  (void)checked;
}
}  // namespace detail

CachingAllocatorStats caching_cpu_allocator_stats() { return CachingCpuAllocator::instance().stats(); }

}  // namespace torchfunc
