// Shared pieces of the emulated launchers (emulator_*.cc): the launch policy
// that runs a kernel under the CUDA emulation, the element / mask type
// dispatch of the C entry points, and guarded copies of the caller's arrays.
//
// The launch sequences themselves are the GPU launchers' own
// (cc/kernels/cuda/*_launch.cuh), run with EmulatedLaunch instead of
// CudaLaunch. Each emulator_*.cc includes one of them (they share helper
// names in their anonymous namespaces, as their .cu files do), so each is
// its own translation unit.
#ifndef MASKED_OPS_TESTS_CUDA_EMULATION_EMULATOR_H_
#define MASKED_OPS_TESTS_CUDA_EMULATION_EMULATOR_H_

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cc/kernels/block_mask.h"
#include "cc/kernels/cuda/masked_matmul_gpu.h"

namespace masked_ops {
namespace emulation {

// The arguments of a launch convert to the kernel's parameter types
// implicitly, as in kernel<<<...>>>(args...).
template <typename Param, typename Arg>
Param Implicit(const Arg& arg) {
  return arg;
}

// Whether a test has EmulatedLaunch refuse every tensor map
// (emu_set_tensor_maps_refused).
bool TensorMapsRefused();

// The launch policy of the *_launch.cuh sequences under emulation: every
// thread of every block runs kernel(params...) on its own copy of the
// parameters, with shared_bytes of dynamic shared memory; the launch is
// synchronous, in stream order.
struct EmulatedLaunch {
  size_t shared_bytes = 0;

  EmulatedLaunch WithSharedMemory(size_t bytes) const { return EmulatedLaunch{bytes}; }

  template <typename... Params, typename... Args>
  void operator()(void (*kernel)(Params...), dim3 grid, dim3 block, const Args&... args) const {
    static_assert(sizeof...(Params) == sizeof...(Args), "a kernel launch with the wrong number of arguments");
    const std::tuple<std::decay_t<Params>...> bound(Implicit<std::decay_t<Params>>(args)...);
    cuda_emulation::Engine::Get().Launch(grid, block, shared_bytes, [&] { std::apply(kernel, bound); });
  }

  int Status() const { return static_cast<int>(cudaGetLastError()); }

  // CudaLaunch::EncodeTensorMap's checks of the driver's (and false where
  // it would refuse, or where a test has every map refused), then the map.
  bool EncodeTensorMap(cuda_emulation::TensorMap* map, const void* base, int64_t inner, int64_t outer,
                       int box_inner, int box_outer) const {
    constexpr int64_t kCoordinates = int64_t{1} << 31;
    const bool valid = !TensorMapsRefused() && reinterpret_cast<uintptr_t>(base) % 16 == 0 && inner % 8 == 0 &&
                       inner >= 1 && inner < kCoordinates && outer >= 1 && outer < kCoordinates &&
                       (box_inner == 16 || box_inner == 32 || box_inner == 64) && box_outer >= 1 && box_outer <= 256;
    if (!valid) return false;
    *map = cuda_emulation::TensorMap{static_cast<const unsigned char*>(base), inner, outer, inner * 2, box_inner,
                                     box_outer, box_inner * 2};
    return true;
  }
};

// Reports (as `message`) a cp.async read, since the engine's last
// TakeCopyReads, of one of the `count` elements of T at `array` whose index
// is `forbidden`: a check that a kernel staged nothing it must not read (a
// dead block of a masked weight).
template <typename T, typename Forbidden>
void CheckNoCopyReads(const T* array, int64_t count, const char* message, const Forbidden& forbidden) {
  const auto* begin = reinterpret_cast<const unsigned char*>(array);
  const auto* end = begin + count * int64_t(sizeof(T));
  for (const auto& [address, bytes] : cuda_emulation::Engine::Get().TakeCopyReads()) {
    for (const unsigned char* byte = address; byte < address + bytes; byte += sizeof(T)) {
      if (byte >= begin && byte < end && forbidden((byte - begin) / int64_t(sizeof(T)))) {
        cuda_emulation::Engine::Get().Report(message);
        return;
      }
    }
  }
}

// Status codes of the entry points besides cudaError_t values.
constexpr int kUnknownType = -1000;
constexpr int kEmulationFault = -1001;  // the kernels wrote outside an output, or to an input

template <typename T>
struct Tag {
  using type = T;
};

// dtype codes: 0 float32, 1 float64, 2 float16, 3 bfloat16.
template <typename Result, typename Run>
Result WithElementType(int dtype, Result unknown, const Run& run) {
  switch (dtype) {
    case 0:
      return run(Tag<float>{});
    case 1:
      return run(Tag<double>{});
    case 2:
      return run(Tag<Float16Bits>{});
    case 3:
      return run(Tag<BFloat16Bits>{});
    default:
      return unknown;
  }
}

// mask dtype codes: 0 float32, 1 bool.
template <typename Run>
int WithMaskType(int mask_dtype, const Run& run) {
  switch (mask_dtype) {
    case 0:
      return run(Tag<float>{});
    case 1:
      return run(Tag<bool>{});
    default:
      return kUnknownType;
  }
}

template <typename Run>
int WithTypes(int dtype, int mask_dtype, const Run& run) {
  return WithElementType(dtype, kUnknownType, [&](auto element) {
    return WithMaskType(mask_dtype, [&](auto mask) { return run(element, mask); });
  });
}

inline MaskLevel LevelOf(int level) { return level == 0 ? MaskLevel::kElement : MaskLevel::kBlock; }
inline gpu::GpuMath MathOf(int tensor_cores) {
  return tensor_cores != 0 ? gpu::GpuMath::kTensorCores : gpu::GpuMath::kCudaCores;
}

// The arrays of one call, copied into "device memory" between red zones:
// after the launches, a red zone that changed means a write out of bounds, an
// input that changed a write to an input, and outputs are copied back.
// Inputs' red zones hold 0xff bytes (NaN in every float type, a live mask
// entry), so an out-of-bounds read shows in the results; scratch memory
// (the workspace) starts as 0xff bytes too (NaN in every float type, -1 in
// integers), so that nothing relies on zeros and a float the kernels read
// before any wrote it shows in the results.
class Arena {
 public:
  Arena() = default;
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  ~Arena() {
    for (Region& region : regions_) std::free(region.base);
  }

  template <typename T>
  const T* In(const T* user, int64_t count, const char* name) {
    return static_cast<const T*>(Add(const_cast<T*>(user), count * int64_t(sizeof(T)), name, Kind::kIn,
                                     std::is_same_v<T, bool> ? 0x01 : 0xff));
  }
  template <typename T>
  T* InOut(T* user, int64_t count, const char* name) {
    return static_cast<T*>(Add(user, count * int64_t(sizeof(T)), name, Kind::kInOut, 0xff));
  }
  void* Scratch(int64_t bytes, const char* name) { return Add(nullptr, bytes, name, Kind::kScratch, 0xff); }

  // Checks the red zones and inputs, and copies the outputs back. Returns
  // `status`, or kEmulationFault when a check failed (reported as a
  // diagnostic).
  int Finish(int status) {
    bool fault = false;
    for (Region& region : regions_) {
      const unsigned char* bytes = static_cast<const unsigned char*>(region.base);
      const unsigned char* data = bytes + kRedZone;
      bool zones_intact = true;
      for (size_t i = 0; i < kRedZone; ++i) {
        zones_intact = zones_intact && bytes[i] == region.fill && data[region.bytes + i] == region.fill;
      }
      if (!zones_intact) {
        cuda_emulation::Engine::Get().Report(std::string("write out of the bounds of ") + region.name);
        fault = true;
      }
      if (region.kind == Kind::kIn && region.bytes != 0 && std::memcmp(data, region.user, region.bytes) != 0) {
        cuda_emulation::Engine::Get().Report(std::string("write to the input ") + region.name);
        fault = true;
      }
      if (region.kind == Kind::kInOut && region.bytes != 0) std::memcpy(region.user, data, region.bytes);
    }
    return fault ? kEmulationFault : status;
  }

 private:
  enum class Kind { kIn, kInOut, kScratch };
  struct Region {
    void* base;
    void* user;
    size_t bytes;
    Kind kind;
    unsigned char fill;
    const char* name;
  };
  static constexpr size_t kRedZone = 256;

  void* Add(void* user, int64_t bytes, const char* name, Kind kind, unsigned char fill) {
    if (kind != Kind::kScratch && user == nullptr) return nullptr;
    const size_t size = static_cast<size_t>(bytes < 0 ? 0 : bytes);
    const size_t total = (2 * kRedZone + size + 255) / 256 * 256;
    void* base = std::aligned_alloc(256, total);
    std::memset(base, fill, 2 * kRedZone + size);
    unsigned char* data = static_cast<unsigned char*>(base) + kRedZone;
    if (kind != Kind::kScratch && size != 0) std::memcpy(data, user, size);
    regions_.push_back(Region{base, user, size, kind, fill, name});
    return data;
  }

  std::vector<Region> regions_;
};

}  // namespace emulation
}  // namespace masked_ops

#endif  // MASKED_OPS_TESTS_CUDA_EMULATION_EMULATOR_H_
