// Scratch memory that outlives a call: packed operands are large (up to the
// size of w or x) and a fresh allocation of that size is a fresh mmap whose
// page faults cost more than the packing itself. Released buffers go back to
// a small process-wide pool and are handed out again.
#ifndef MASKED_OPS_CC_KERNELS_SCRATCH_H_
#define MASKED_OPS_CC_KERNELS_SCRATCH_H_

#include <cstddef>
#include <cstdint>

namespace masked_ops {

template <typename T>
size_t BytesOf(int64_t elements) {
  return static_cast<size_t>(elements) * sizeof(T);
}

class ScratchBuffer {
 public:
  // At least `bytes` bytes, 64-byte aligned, contents unspecified.
  explicit ScratchBuffer(size_t bytes);
  ~ScratchBuffer();
  ScratchBuffer(const ScratchBuffer&) = delete;
  ScratchBuffer& operator=(const ScratchBuffer&) = delete;

  template <typename T>
  T* as() const {
    return static_cast<T*>(data_);
  }

 private:
  void* data_;
  size_t capacity_;
};

}  // namespace masked_ops

#endif  // MASKED_OPS_CC_KERNELS_SCRATCH_H_
