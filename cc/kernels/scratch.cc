#include "cc/kernels/scratch.h"

#include <sys/mman.h>

#include <cstdlib>
#include <mutex>
#include <new>
#include <vector>

namespace masked_ops {
namespace {

// Buffers kept for reuse; beyond this many, the smallest free one is freed.
// Concurrent calls each hold their own buffers, so a few are kept.
constexpr size_t kMaxFreeBuffers = 6;
// Granularity of allocations: transparent huge pages, where the kernel
// offers them (madvise mode), make first touch of a big buffer cheap too.
constexpr size_t kHugePage = size_t{2} << 20;

struct FreeBuffer {
  void* data;
  size_t capacity;
};

class Pool {
 public:
  void* Acquire(size_t bytes, size_t* capacity) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      size_t best = free_.size();
      for (size_t i = 0; i < free_.size(); ++i) {
        if (free_[i].capacity >= bytes && (best == free_.size() || free_[i].capacity < free_[best].capacity)) {
          best = i;
        }
      }
      if (best != free_.size()) {
        const FreeBuffer found = free_[best];
        free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(best));
        *capacity = found.capacity;
        return found.data;
      }
    }
    const size_t alignment = bytes >= kHugePage ? kHugePage : 64;
    *capacity = (bytes + alignment - 1) / alignment * alignment;
    if (*capacity == 0) *capacity = alignment;
    void* data = std::aligned_alloc(alignment, *capacity);
    if (data == nullptr) throw std::bad_alloc();
    if (alignment == kHugePage) madvise(data, *capacity, MADV_HUGEPAGE);
    return data;
  }

  void Release(void* data, size_t capacity) {
    void* evicted = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      free_.push_back(FreeBuffer{data, capacity});
      if (free_.size() > kMaxFreeBuffers) {
        size_t smallest = 0;
        for (size_t i = 1; i < free_.size(); ++i) {
          if (free_[i].capacity < free_[smallest].capacity) smallest = i;
        }
        evicted = free_[smallest].data;
        free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(smallest));
      }
    }
    std::free(evicted);
  }

 private:
  std::mutex mutex_;
  std::vector<FreeBuffer> free_;
};

Pool& GlobalPool() {
  // Never destroyed: buffers may be released by threads still running at exit.
  static Pool* pool = new Pool();
  return *pool;
}

}  // namespace

ScratchBuffer::ScratchBuffer(size_t bytes) : data_(GlobalPool().Acquire(bytes, &capacity_)) {}

ScratchBuffer::~ScratchBuffer() { GlobalPool().Release(data_, capacity_); }

}  // namespace masked_ops
