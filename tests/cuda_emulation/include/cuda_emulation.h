// A CUDA emulation for host C++ (g++ -std=c++17, Linux x86-64), enough to
// compile and run this project's CUDA kernels on the CPU: the execution-space
// keywords, the built-in index variables, __syncthreads, the math the kernels
// call, and an engine that runs a launch's thread blocks one at a time.
//
// Execution model. Each CUDA thread of a block is a fiber (ucontext) with its
// own stack, all on the calling OS thread: the engine runs every fiber of the
// block until it exits or reaches __syncthreads, then releases the barrier
// and runs them all again, and so on. Between two barriers the threads run
// one after the other, in an order the schedule picks (forward, reverse or
// shuffled): a kernel that reads shared memory another thread writes without
// a barrier in between gives different results under different orders.
// (Fibers rather than an OS thread per CUDA thread: a 256-thread block then
// costs microseconds per barrier instead of hundreds of context switches, and
// runs are deterministic for a given schedule.)
// __shared__ is `static`: one copy per kernel instantiation, shared by the
// block's threads (blocks run one at a time, so one copy is enough; like
// real shared memory it keeps whatever the previous block left in it).
// threadIdx / blockIdx / blockDim / gridDim are thread_local globals the
// engine sets before it resumes a fiber. Launches are synchronous; one engine
// runs per OS thread, and since __shared__ variables are process-wide, two OS
// threads must not run the same kernel at once.
//
// Checks that real hardware would not report but that mark a kernel bug: a
// __syncthreads some threads skip (they exited, or wait at another
// __syncthreads), a WMMA pointer or leading dimension off the alignment the
// PTX ISA requires, __trap(). Each is recorded as a diagnostic
// (TakeDiagnostics()) and a trap also fails the launch
// (cudaErrorLaunchFailure).
//
// Warp-collective instructions (ldmatrix, mma.sync: cuda_emulation_ptx.h)
// exchange their lanes' operands: each lane deposits its operands
// (WarpExchange) and waits until every lane of its warp has deposited at the
// same call site, then reads the others' from the exchange; a collective
// that some lanes of a warp skip (they exited, or wait at a __syncthreads or
// another collective) is reported and fails the launch, as it would hang or
// be undefined on a GPU. Asynchronous copies (cp.async) are queued per
// thread and land when the thread waits for their group; until then their
// destination holds 0xff bytes (NaN in every float type), so reading it
// early, or overwriting a buffer other threads still read, shows in results.
// Tensor copies (cp.async.bulk.tensor, the TMA) are queued on their
// mbarrier, their destination 0xff bytes until a thread waits on that
// mbarrier; the wait lands them, and a thread whose phase has not completed
// (an expected arrival or byte missing) spins while the others run; spinning
// with no thread making progress is reported, since on a GPU it would hang.
//
// Not emulated: shuffles, votes, __syncwarp, atomics, the memory model, and
// anything about timing; not detected: reads of shared memory no thread
// wrote, and a WMMA operation only part of a warp executes.
//
// __CUDA_ARCH__ and __CUDACC__ stay undefined: code guarded by
// `#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800` takes its sm_80+ path.
#ifndef MASKED_OPS_TESTS_CUDA_EMULATION_CUDA_EMULATION_H_
#define MASKED_OPS_TESTS_CUDA_EMULATION_CUDA_EMULATION_H_

#if defined(__CUDA_ARCH__) || defined(__CUDACC__)
#error "the CUDA emulation is for a host compiler"
#endif

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <math.h>  // the float overloads of sqrt, isnan ... in the global namespace, as CUDA has them

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <utility>
#include <vector>

// ---------------------------------------------------------------------------
// Keywords.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static
#define __constant__ static
#define __restrict__ __restrict
#define __grid_constant__

// ---------------------------------------------------------------------------
// Vector types and the built-in variables.
struct uint3 {
  unsigned int x, y, z;
};

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

struct alignas(8) float2 {
  float x, y;
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};
inline float2 make_float2(float x, float y) { return float2{x, y}; }

inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};
constexpr int warpSize = 32;

// ---------------------------------------------------------------------------
// Runtime API subset.
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchFailure = 719,
};
struct CUstream_st;
typedef CUstream_st* cudaStream_t;

// ---------------------------------------------------------------------------
// Device math the kernels use (CUDA's overloads, global namespace).
#define MASKED_OPS_EMULATION_MIN_MAX(T)                          \
  __device__ inline T min(T a, T b) { return b < a ? b : a; }   \
  __device__ inline T max(T a, T b) { return a < b ? b : a; }
MASKED_OPS_EMULATION_MIN_MAX(int)
MASKED_OPS_EMULATION_MIN_MAX(unsigned int)
MASKED_OPS_EMULATION_MIN_MAX(long)
MASKED_OPS_EMULATION_MIN_MAX(unsigned long)
MASKED_OPS_EMULATION_MIN_MAX(long long)
MASKED_OPS_EMULATION_MIN_MAX(unsigned long long)
#undef MASKED_OPS_EMULATION_MIN_MAX
// fminf / fmin semantics for floating point, as CUDA's min(float, float).
__device__ inline float min(float a, float b) { return fminf(a, b); }
__device__ inline float max(float a, float b) { return fmaxf(a, b); }
__device__ inline double min(double a, double b) { return fmin(a, b); }
__device__ inline double max(double a, double b) { return fmax(a, b); }

__device__ inline unsigned int __float_as_uint(float v) {
  unsigned int bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return bits;
}
__device__ inline int __float_as_int(float v) {
  int bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return bits;
}
__device__ inline float __uint_as_float(unsigned int bits) {
  float v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}
__device__ inline float __int_as_float(int bits) {
  float v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}
__device__ inline long long __double_as_longlong(double v) {
  long long bits;
  std::memcpy(&bits, &v, sizeof(bits));
  return bits;
}
__device__ inline double __longlong_as_double(long long bits) {
  double v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

// ---------------------------------------------------------------------------
// The engine.
namespace cuda_emulation {

// The order in which the threads of a block run between two barriers.
enum class Schedule { kForward = 0, kReverse = 1, kShuffled = 2 };

struct Stats {
  int64_t launches = 0;
  int64_t blocks = 0;
  int64_t threads = 0;
  int64_t barriers = 0;   // block-wide barrier releases
  int64_t mma_syncs = 0;  // warp-level wmma::mma_sync and mma.sync calls (counted once per warp)
  int64_t warpgroup_mma_columns = 0;  // the columns (N) of the wgmma products, counted once per warpgroup
  int64_t warpgroup_mmas = 0;         // the wgmma products, counted once per warpgroup
  int64_t async_copies = 0;           // cp.async copies, each thread's
  int64_t tensor_copies = 0;          // cp.async.bulk.tensor copies
  // The most tensor-core work (mma_syncs + warpgroup_mma_columns) one thread
  // block did: how a launch shared its products out among its blocks.
  int64_t busiest_block_tensor_work = 0;
};

// One cp.async of `size` (16 or 4) bytes: the first `bytes_read` (0 ..
// size) from src, the rest of dst's `size` bytes zero-filled.
struct PendingCopy {
  void* dst;
  const void* src;
  int bytes_read;
  int size;
};

// One thread's share of a wgmma.mma_async m64nNk16 (A M- or K-major; B N-
// or K-major), run when a wgmma.wait_group retires its group: d[i] += (A
// B)(row, column) for the thread's n / 2 accumulators (see WarpgroupMma in
// cuda_emulation_ptx.h).
struct PendingWarpgroupMma {
  float* d;
  int n;
  uint64_t a, b;
  bool a_m_major, b_n_major;
  float (*widen)(uint16_t);
  unsigned thread;  // within the block
};

// A 2-D tensor map (the TMA descriptor) of 16-bit elements, as
// EncodeTensorMap makes it: `inner` elements along a row (contiguous),
// `outer` rows `row_bytes` apart from `base`; boxes of box_inner x
// box_outer elements land in shared memory row after row, box_inner * 2
// bytes each, permuted by the swizzle of swizzle_bytes (32, 64 or 128) as
// wgmma's layouts are.
struct TensorMap {
  const unsigned char* base;
  int64_t inner, outer, row_bytes;
  int box_inner, box_outer, swizzle_bytes;
};

// One cp.async.bulk.tensor.2d into shared memory at dst: the box at
// (inner, outer) of map, landed when a thread waits on its mbarrier.
struct PendingTensorCopy {
  unsigned char* dst;
  TensorMap map;
  int64_t inner, outer;
};

class Engine {
 public:
  static Engine& Get() {
    static thread_local Engine engine;
    return engine;
  }

  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;
  ~Engine() {
    for (char* stack : stacks_) munmap(stack - kGuardBytes, kGuardBytes + kStackBytes);
  }

  void SetSchedule(Schedule schedule, uint64_t seed) {
    schedule_ = schedule;
    seed_ = seed;
  }

  // Runs body() as every thread of every block of a grid x block launch
  // with `dynamic_shared_bytes` of dynamic shared memory.
  void Launch(dim3 grid, dim3 block, size_t dynamic_shared_bytes, const std::function<void()>& body) {
    ++stats_.launches;
    if (!ValidConfiguration(grid, block)) {
      Fail(cudaErrorInvalidConfiguration, "invalid launch configuration");
      return;
    }
    if (running_) {
      Report("a kernel launched from inside a kernel");
      Fail(cudaErrorLaunchFailure, nullptr);
      return;
    }
    running_ = true;
    body_ = &body;
    // Like real shared memory, it starts with whatever was there: here 0xa5 bytes.
    dynamic_shared_.assign(dynamic_shared_bytes + kDynamicSharedAlignment, 0xa5);
    const unsigned threads = block.x * block.y * block.z;
    EnsureStacks(threads);
    fibers_.resize(threads);
    exchange_.assign(CeilWarps(threads) * 2 * warpSize * kExchangeBytes, 0);
    gridDim = grid;
    blockDim = block;
    bool trapped = false;
    for (unsigned z = 0; z < grid.z && !trapped; ++z) {
      for (unsigned y = 0; y < grid.y && !trapped; ++y) {
        for (unsigned x = 0; x < grid.x && !trapped; ++x) {
          blockIdx = uint3{x, y, z};
          trapped = !RunBlock(block, threads);
        }
      }
    }
    threadIdx = uint3{0, 0, 0};
    blockIdx = uint3{0, 0, 0};
    body_ = nullptr;
    running_ = false;
  }

  // __syncthreads() in the current thread; site: the call's return address.
  // With `predicate`: __syncthreads_or, whose result is whether any thread's
  // predicate was nonzero.
  bool Barrier(const void* site, bool predicate = false) {
    Fiber& fiber = fibers_[current_];
    fiber.state = State::kAtBarrier;
    fiber.site = site;
    fiber.barrier_predicate = predicate;
    swapcontext(&fiber.context, &scheduler_);
    return fiber.barrier_result;
  }

  // The launch's dynamic shared memory (extern __shared__), 128-byte aligned.
  unsigned char* DynamicShared() {
    const uintptr_t base = reinterpret_cast<uintptr_t>(dynamic_shared_.data());
    return reinterpret_cast<unsigned char*>((base + kDynamicSharedAlignment - 1) / kDynamicSharedAlignment *
                                            kDynamicSharedAlignment);
  }

  // A warp-collective operation of the current thread: deposits `bytes`
  // (<= kExchangeBytes) of operands, waits until every lane of the warp has
  // reached the same site, and returns the exchange: lane i's operands at
  // [i * kExchangeBytes]. Valid until the thread's next collective.
  const unsigned char* WarpExchange(const void* operands, size_t bytes, const void* site) {
    if (bytes > kExchangeBytes) {
      std::fprintf(stderr, "cuda_emulation: %zu bytes of warp-collective operands\n", bytes);
      std::abort();
    }
    Fiber& fiber = fibers_[current_];
    const unsigned warp = current_ / warpSize;
    unsigned char* exchange = exchange_.data() + ((warp * 2 + fiber.exchanges % 2) * warpSize) * kExchangeBytes;
    std::memcpy(exchange + (current_ % warpSize) * kExchangeBytes, operands, bytes);
    ++fiber.exchanges;
    fiber.state = State::kAtCollective;
    fiber.site = site;
    swapcontext(&fiber.context, &scheduler_);
    return exchange;
  }

  // cp.async of `size` bytes (16, or 4) of the current thread: dst holds
  // 0xff bytes until the copy lands (WaitCopies). Only the 16-byte copies
  // take part in the copy line check.
  void CopyAsync(void* dst, const void* src, int bytes_read, int size = 16) {
    if (reinterpret_cast<uintptr_t>(dst) % size != 0 || reinterpret_cast<uintptr_t>(src) % size != 0) {
      Report("cp.async: an address not " + std::to_string(size) + "-byte aligned");
    }
    std::memset(dst, 0xff, static_cast<size_t>(size));
    ++stats_.async_copies;
    Fiber& fiber = fibers_[current_];
    if (size == 16) {
      if (check_copy_lines_) block_copies_.push_back(IssuedCopy{current_, fiber.copies_issued, dst, src, bytes_read});
      ++fiber.copies_issued;
    }
    fiber.open_copies.push_back(PendingCopy{dst, src, bytes_read, size});
  }
  // Whether each block's cp.async copies are checked a quarter warp at a
  // time (the same copy of 8 consecutive threads) for the pattern that
  // makes them one L2 request each on the GPU: where all 8 read, the
  // 32-byte sectors they touch are read whole, and their destinations are
  // distinct 16-byte slots of one 128-byte line of the shared window.
  void SetCopyLineCheck(bool on) { check_copy_lines_ = on; }
  // The bytes cp.async and the tensor copies have read (address, count) since the last call, for a
  // check that a kernel staged nothing it must not read.
  std::vector<std::pair<const unsigned char*, int>> TakeCopyReads() { return std::move(copy_reads_); }

  // mbarrier.init: `arrivals` arrivals complete each phase (with every byte
  // expected in it landed); the phase under way is 0.
  void MbarrierInit(const void* barrier, uint32_t arrivals) {
    mbarriers_[barrier] = Mbarrier{arrivals, arrivals, 0, 0, {}};
  }
  // mbarrier.arrive.expect_tx: `bytes` more are expected in the phase under
  // way, and the current thread arrives.
  void MbarrierArriveExpectTx(const void* barrier, uint32_t bytes) {
    Mbarrier* state = MbarrierOf(barrier);
    if (state == nullptr) return;
    if (state->pending_arrivals == 0) {
      Report("mbarrier: more arrivals than the phase expects");
      return;
    }
    --state->pending_arrivals;
    state->pending_bytes += bytes;
  }
  // cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx:
  // queued on `barrier`; dst holds 0xff bytes until a wait on it lands the box.
  void TensorCopy(void* dst, const TensorMap& map, int64_t inner, int64_t outer, const void* barrier) {
    Mbarrier* state = MbarrierOf(barrier);
    if (state == nullptr) return;
    if (SharedAddress(dst) % 128 != 0) Report("cp.async.bulk.tensor: a destination not 128-byte aligned");
    CheckFenced(SharedAddress(dst), static_cast<size_t>(map.box_inner) * map.box_outer * 2,
                "cp.async.bulk.tensor: overwrites");
    std::memset(dst, 0xff, static_cast<size_t>(map.box_inner) * map.box_outer * 2);
    ++stats_.tensor_copies;
    state->copies.push_back(PendingTensorCopy{static_cast<unsigned char*>(dst), map, inner, outer});
  }
  // mbarrier.try_wait.parity: lands the copies queued on the barrier and
  // completes the phase under way if it can; true once the phase of that
  // parity has completed (an unknown barrier, reported, counts as done).
  bool MbarrierTryWait(const void* barrier, uint32_t parity) {
    Mbarrier* state = MbarrierOf(barrier);
    if (state == nullptr) return true;
    for (const PendingTensorCopy& copy : state->copies) state->pending_bytes -= LandTensorCopy(copy);
    state->copies.clear();
    if (state->pending_bytes < 0) Report("mbarrier: more bytes landed than expected");
    if (state->pending_arrivals == 0 && state->pending_bytes == 0) {
      ++state->phase;
      state->pending_arrivals = state->arrivals;
    }
    return state->phase % 2 != parity % 2;
  }
  // MbarrierTryWait in a loop: while it is false the thread spins (lets the
  // others run, then tries again). RunBlock reports threads that spin with
  // no thread making progress, which would hang on a GPU.
  void MbarrierWait(const void* barrier, uint32_t parity) {
    Fiber& fiber = fibers_[current_];
    while (!MbarrierTryWait(barrier, parity)) {
      fiber.spinning = true;
      swapcontext(&fiber.context, &scheduler_);
    }
    fiber.spinning = false;
  }

  // cp.async.commit_group: the copies issued since the last commit form a group.
  void CommitCopies() {
    Fiber& fiber = fibers_[current_];
    fiber.committed.push_back(std::move(fiber.open_copies));
    fiber.open_copies.clear();
  }
  // cp.async.wait_group: every committed group but the newest `pending` lands.
  void WaitCopies(int pending) {
    Fiber& fiber = fibers_[current_];
    while (fiber.committed.size() > static_cast<size_t>(pending)) {
      for (const PendingCopy& copy : fiber.committed.front()) {
        std::memset(copy.dst, 0, static_cast<size_t>(copy.size));
        if (copy.bytes_read != 0) {
          std::memcpy(copy.dst, copy.src, static_cast<size_t>(copy.bytes_read));
          copy_reads_.emplace_back(static_cast<const unsigned char*>(copy.src), copy.bytes_read);
        }
        NoteGenericWrite(copy.dst, static_cast<size_t>(copy.size));
      }
      fiber.committed.erase(fiber.committed.begin());
    }
  }

  // A write through the generic proxy (a store, a cp.async landing) of
  // `bytes` at p by the current thread: before an access through the async
  // proxy (wgmma's operand reads, a tensor copy's landing) the writing
  // thread must execute fence.proxy.async (PTX ISA, memory consistency
  // model: proxies). Static shared memory is never accessed asynchronously
  // here, so only the dynamic shared memory is tracked.
  void NoteGenericWrite(const void* p, size_t bytes) {
    const unsigned char* base = DynamicShared();
    const auto* byte = static_cast<const unsigned char*>(p);
    if (bytes == 0 || byte < base || byte + bytes > base + DynamicSharedBytes()) return;
    Fiber& fiber = fibers_[current_];
    for (size_t chunk = (byte - base) / 16; chunk <= (byte - base + bytes - 1) / 16; ++chunk) {
      unfenced_writer_[chunk] = current_ + 1;
      fiber.unfenced_chunks.push_back(chunk);
    }
  }
  // fence.proxy.async of the current thread: its generic writes so far are
  // ordered before later async-proxy accesses.
  void FenceProxyAsync() {
    Fiber& fiber = fibers_[current_];
    for (size_t chunk : fiber.unfenced_chunks) {
      if (unfenced_writer_[chunk] == current_ + 1) unfenced_writer_[chunk] = 0;
    }
    fiber.unfenced_chunks.clear();
  }
  // Reports an async-proxy access (`what`) of the shared-window bytes
  // [address, address + bytes) that a thread wrote through the generic
  // proxy and has not fenced since.
  void CheckFenced(uint32_t address, size_t bytes, const char* what) {
    if (address < kDynamicSharedWindowStart || bytes == 0) return;
    const size_t first = (address - kDynamicSharedWindowStart) / 16;
    const size_t last = (address - kDynamicSharedWindowStart + bytes - 1) / 16;
    for (size_t chunk = first; chunk <= last && chunk < unfenced_writer_.size(); ++chunk) {
      if (unfenced_writer_[chunk] != 0) {
        Report(std::string(what) + " shared memory that a thread wrote through the generic proxy without a "
               "fence.proxy.async since");
        return;
      }
    }
  }

  // The shared-window address of p, which must lie in the dynamic shared
  // memory (the operands of warpgroup products are taken from there).
  uint32_t SharedAddress(const void* p) {
    const unsigned char* base = DynamicShared();
    const auto* byte = static_cast<const unsigned char*>(p);
    if (byte < base || byte >= base + DynamicSharedBytes()) {
      Report("a shared-memory address outside the dynamic shared memory");
      return 0;
    }
    return kDynamicSharedWindowStart + static_cast<uint32_t>(byte - base);
  }
  size_t DynamicSharedBytes() const { return dynamic_shared_.size() - kDynamicSharedAlignment; }

  // wgmma.mma_async of the current thread: queued until a wait retires it.
  void IssueWarpgroupMma(const PendingWarpgroupMma& product) {
    if (blockDim.x * blockDim.y * blockDim.z % 128 != 0) Report("wgmma in a block that is not whole warpgroups");
    if (current_ % 128 == 0) {
      stats_.warpgroup_mma_columns += product.n;
      ++stats_.warpgroup_mmas;
      CheckWarpgroupMmaFenced(product);
    }
    fibers_[current_].open_mmas.push_back(product);
  }
  // wgmma.commit_group.
  void CommitWarpgroupMmas() {
    Fiber& fiber = fibers_[current_];
    fiber.committed_mmas.push_back(std::move(fiber.open_mmas));
    fiber.open_mmas.clear();
  }
  // wgmma.wait_group: every committed group but the newest `pending` runs,
  // for the executing warp (the PTX ISA's groups are the warp's: a wait
  // says nothing of the other warps' shares), reading shared memory as it is
  // now: a kernel that refills a buffer before every warp's products reading
  // it are waited for gets the new data.
  void WaitWarpgroupMmas(int pending) {
    Fiber& fiber = fibers_[current_];
    const unsigned first = current_ / warpSize * warpSize;
    while (fiber.committed_mmas.size() > static_cast<size_t>(pending)) {
      const int64_t group = fiber.retired_mma_groups;
      for (unsigned t = first; t < first + warpSize && t < fibers_.size(); ++t) {
        Fiber& other = fibers_[t];
        // Retired already, or not committed yet (the lanes of a warp reach
        // the wait together on the hardware): that lane's own wait runs it.
        if (other.retired_mma_groups != group || other.committed_mmas.empty()) continue;
        for (const PendingWarpgroupMma& product : other.committed_mmas.front()) RunWarpgroupMma(product);
        other.committed_mmas.erase(other.committed_mmas.begin());
        ++other.retired_mma_groups;
      }
    }
  }

  [[noreturn]] void Trap() {
    if (!running_) {
      std::fprintf(stderr, "cuda_emulation: __trap() outside a kernel\n");
      std::abort();
    }
    Fiber& fiber = fibers_[current_];
    fiber.state = State::kTrapped;
    swapcontext(&fiber.context, &scheduler_);
    std::abort();  // never resumed
  }

  // The current thread's lane within its warp (threads numbered x fastest).
  static unsigned Lane() {
    return (threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)) % warpSize;
  }

  // Records a diagnostic of the current thread (repeats of a message are
  // counted, with the first thread's place).
  void Report(const std::string& message) {
    for (Diagnostic& diagnostic : diagnostics_) {
      if (diagnostic.message == message) {
        ++diagnostic.count;
        return;
      }
    }
    char where[96] = "host";
    if (running_) {
      std::snprintf(where, sizeof(where), "block (%u, %u, %u), thread (%u, %u, %u)", blockIdx.x, blockIdx.y,
                    blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z);
    }
    diagnostics_.push_back(Diagnostic{message, where, 1});
  }

  // The diagnostics since the last call, one a line (empty when none), then
  // cleared.
  std::string TakeDiagnostics() {
    std::string out;
    for (const Diagnostic& diagnostic : diagnostics_) {
      out += diagnostic.message + " [" + diagnostic.where +
             (diagnostic.count > 1 ? ", and " + std::to_string(diagnostic.count - 1) + " more times" : "") + "]\n";
    }
    diagnostics_.clear();
    return out;
  }

  // cudaPeekAtLastError: the first error since the last TakeError().
  cudaError_t PeekError() const { return error_; }

  // cudaGetLastError: the first error since the last call, then cleared.
  cudaError_t TakeError() {
    const cudaError_t error = error_;
    error_ = cudaSuccess;
    return error;
  }

  Stats& stats() { return stats_; }

 private:
  enum class State { kRunnable, kAtBarrier, kAtCollective, kExited, kTrapped };
  struct Diagnostic {
    std::string message;
    std::string where;
    int64_t count;
  };
  struct Fiber {
    ucontext_t context;
    State state;
    const void* site;
    uint3 thread;
    unsigned exchanges;  // warp collectives so far: which half of the exchange the next one uses
    std::vector<PendingCopy> open_copies;
    std::vector<std::vector<PendingCopy>> committed;
    std::vector<PendingWarpgroupMma> open_mmas;
    std::vector<std::vector<PendingWarpgroupMma>> committed_mmas;
    int64_t retired_mma_groups;
    int64_t copies_issued;  // cp.async copies in the block so far
    bool barrier_predicate, barrier_result;  // of __syncthreads_or
    bool spinning;  // in MbarrierWait, for a phase not yet completed
    std::vector<size_t> unfenced_chunks;  // written through the generic proxy since its last fence.proxy.async
  };

  // The shared-window address of the element at (row, k) of a wgmma operand
  // (see RunWarpgroupMma), the swizzle applied.
  struct WarpgroupOperand {
    uint32_t start, leading, stride, swizzle_bytes;
  };
  static uint32_t OperandAddress(const WarpgroupOperand& operand, bool k_major, int row, int k) {
    const uint32_t row_bytes = operand.swizzle_bytes;
    const uint32_t row_chunks = row_bytes / 16;
    const uint32_t address =
        k_major ? operand.start + row / 8 * operand.stride + row % 8 * row_bytes + k * 2
                : operand.start + row % 8 * 2 + row / 8 % row_chunks * 16 + row / 8 / row_chunks * operand.leading +
                      k % 8 * row_bytes + k / 8 * operand.stride;
    return address ^ ((address >> 7) & (row_chunks - 1)) << 4;
  }
  WarpgroupOperand DecodeDescriptor(uint64_t descriptor, bool& valid);
  void RunWarpgroupMma(const PendingWarpgroupMma& product);
  void CheckWarpgroupMmaFenced(const PendingWarpgroupMma& product);

  struct Mbarrier {
    uint32_t arrivals, pending_arrivals;
    int64_t pending_bytes;
    uint32_t phase;  // phases completed
    std::vector<PendingTensorCopy> copies;
  };
  Mbarrier* MbarrierOf(const void* barrier) {
    const auto found = mbarriers_.find(barrier);
    if (found == mbarriers_.end()) {
      Report("mbarrier: used before mbarrier.init");
      return nullptr;
    }
    return &found->second;
  }
  // Writes a tensor copy's box into shared memory (elements outside the
  // tensor as zeros, the rest read and logged as cp.async's are); returns
  // the bytes landed, the whole box as the hardware counts them.
  int64_t LandTensorCopy(const PendingTensorCopy& copy) {
    const TensorMap& map = copy.map;
    const int64_t row_box_bytes = int64_t{map.box_inner} * 2;
    const uint32_t row_chunks = static_cast<uint32_t>(map.swizzle_bytes) / 16;
    const uint32_t start = SharedAddress(copy.dst);
    for (int64_t r = 0; r < map.box_outer; ++r) {
      const int64_t outer = copy.outer + r;
      const bool row_inside = outer >= 0 && outer < map.outer;
      const int64_t first = std::max<int64_t>(copy.inner, 0);
      const int64_t last = std::min<int64_t>(copy.inner + map.box_inner, map.inner);
      if (row_inside && first < last) {
        copy_reads_.emplace_back(map.base + outer * map.row_bytes + first * 2, static_cast<int>((last - first) * 2));
      }
      // A 16-byte chunk (8 elements) at a time: the swizzle moves whole chunks.
      for (int64_t c = 0; c < map.box_inner; c += 8) {
        const uint32_t address = start + static_cast<uint32_t>(r * row_box_bytes + c * 2);
        unsigned char* dst = DynamicShared() + ((address ^ (((address >> 7) & (row_chunks - 1)) << 4)) -
                                                kDynamicSharedWindowStart);
        std::memset(dst, 0, 16);
        const int64_t from = std::max(copy.inner + c, first);
        const int64_t to = std::min(copy.inner + c + 8, last);
        if (row_inside && from < to) {
          std::memcpy(dst + (from - copy.inner - c) * 2, map.base + outer * map.row_bytes + from * 2,
                      static_cast<size_t>(to - from) * 2);
        }
      }
    }
    return row_box_bytes * map.box_outer;
  }

  static constexpr size_t kExchangeBytes = 64;
  static constexpr size_t kDynamicSharedAlignment = 128;
  // Where the dynamic shared memory begins in the shared window: after a
  // kernel's static shared memory, 128-byte but not 1024-byte aligned, as it
  // can be on a GPU, so that a kernel that assumes more alignment shows.
  static constexpr uint32_t kDynamicSharedWindowStart = 1152;

  static constexpr size_t kStackBytes = 256 * 1024;
  static constexpr size_t kGuardBytes = 64 * 1024;  // PROT_NONE below each stack: an overflow faults

  Engine() = default;

  static unsigned CeilWarps(unsigned threads) { return (threads + warpSize - 1) / warpSize; }

  static bool ValidConfiguration(dim3 grid, dim3 block) {
    const uint64_t threads = uint64_t{block.x} * block.y * block.z;
    return grid.x >= 1 && grid.y >= 1 && grid.z >= 1 && grid.x <= 0x7fffffffu && grid.y <= 65535 &&
           grid.z <= 65535 && block.x >= 1 && block.y >= 1 && block.z >= 1 && block.x <= 1024 &&
           block.y <= 1024 && block.z <= 64 && threads <= 1024;
  }

  void Fail(cudaError_t error, const char* message) {
    if (message != nullptr) Report(message);
    if (error_ == cudaSuccess) error_ = error;
  }

  void EnsureStacks(unsigned threads) {
    while (stacks_.size() < threads) {
      void* memory = mmap(nullptr, kGuardBytes + kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                          -1, 0);
      if (memory == MAP_FAILED) {
        std::perror("cuda_emulation: mmap");
        std::abort();
      }
      mprotect(memory, kGuardBytes, PROT_NONE);
      stacks_.push_back(static_cast<char*>(memory) + kGuardBytes);
    }
  }

  static void FiberMain() {
    Engine& engine = Get();
    (*engine.body_)();
    Fiber& fiber = engine.fibers_[engine.current_];
    if (!fiber.open_mmas.empty() || !fiber.committed_mmas.empty()) {
      engine.Report("a thread exited with warpgroup products not waited for");
    }
    fiber.state = State::kExited;
    // Returning resumes uc_link: the scheduler.
  }

  void Order(unsigned threads, std::vector<unsigned>& order) {
    order.resize(threads);
    for (unsigned i = 0; i < threads; ++i) order[i] = i;
    if (schedule_ == Schedule::kReverse) {
      std::reverse(order.begin(), order.end());
    } else if (schedule_ == Schedule::kShuffled) {
      for (unsigned i = threads; i > 1; --i) {
        seed_ = seed_ * 6364136223846793005ull + 1442695040888963407ull;
        std::swap(order[i - 1], order[(seed_ >> 33) % i]);
      }
    }
  }

  // Runs the current block; false when a thread trapped.
  bool RunBlock(dim3 block, unsigned threads) {
    ++stats_.blocks;
    stats_.threads += threads;
    const int64_t tensor_work_before = stats_.mma_syncs + stats_.warpgroup_mma_columns;
    for (unsigned i = 0; i < threads; ++i) {
      Fiber& fiber = fibers_[i];
      getcontext(&fiber.context);
      fiber.context.uc_stack.ss_sp = stacks_[i];
      fiber.context.uc_stack.ss_size = kStackBytes;
      fiber.context.uc_link = &scheduler_;
      makecontext(&fiber.context, &Engine::FiberMain, 0);
      fiber.state = State::kRunnable;
      fiber.site = nullptr;
      fiber.thread = uint3{i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
      fiber.exchanges = 0;
      fiber.barrier_predicate = fiber.barrier_result = false;
      fiber.spinning = false;
      fiber.open_copies.clear();
      fiber.committed.clear();
      fiber.copies_issued = 0;
      fiber.open_mmas.clear();
      fiber.committed_mmas.clear();
      fiber.retired_mma_groups = 0;
      fiber.unfenced_chunks.clear();
    }
    block_copies_.clear();
    mbarriers_.clear();
    unfenced_writer_.assign(DynamicSharedBytes() / 16 + 1, 0);
    std::vector<unsigned> order;
    for (;;) {
      Order(threads, order);
      bool progress = false;  // a thread that ran did more than spin
      unsigned spinning = 0;
      for (unsigned i : order) {
        Fiber& fiber = fibers_[i];
        if (fiber.state != State::kRunnable) continue;
        current_ = i;
        threadIdx = fiber.thread;
        const bool was_spinning = fiber.spinning;
        swapcontext(&scheduler_, &fiber.context);
        if (fiber.state == State::kTrapped) {
          Report("__trap()");
          Fail(cudaErrorLaunchFailure, nullptr);
          return false;
        }
        progress = progress || !fiber.spinning || !was_spinning;
        spinning += fiber.spinning ? 1 : 0;
      }
      switch (ReleaseCollectives(threads)) {
        case Collectives::kReleased:
          continue;
        case Collectives::kStuck:
          Fail(cudaErrorLaunchFailure, nullptr);
          return false;
        case Collectives::kNone:
          break;
      }
      if (spinning != 0) {
        if (progress) continue;
        Report("mbarrier: threads wait for a phase that never completes (arrivals or bytes missing)");
        Fail(cudaErrorLaunchFailure, nullptr);
        return false;
      }
      unsigned waiting = 0;
      unsigned exited = 0;
      const void* site = nullptr;
      bool same_site = true;
      for (unsigned i = 0; i < threads; ++i) {
        if (fibers_[i].state == State::kExited) {
          ++exited;
        } else if (fibers_[i].state == State::kAtBarrier) {
          if (waiting++ == 0) site = fibers_[i].site;
          same_site = same_site && fibers_[i].site == site;
        }
      }
      if (waiting == 0) {
        stats_.busiest_block_tensor_work = std::max(
            stats_.busiest_block_tensor_work, stats_.mma_syncs + stats_.warpgroup_mma_columns - tensor_work_before);
        if (check_copy_lines_) CheckCopyLines();
        for (const auto& [barrier, state] : mbarriers_) {
          if (!state.copies.empty()) Report("a block exited with tensor copies no thread waited for");
        }
        return true;
      }
      if (exited != 0) {
        Report("__syncthreads() reached by " + std::to_string(waiting) + " threads after " + std::to_string(exited) +
               " others of the block exited");
      }
      if (!same_site) Report("threads of a block wait at different __syncthreads()");
      ++stats_.barriers;
      bool any = false;
      for (unsigned i = 0; i < threads; ++i) {
        any = any || (fibers_[i].state == State::kAtBarrier && fibers_[i].barrier_predicate);
      }
      for (unsigned i = 0; i < threads; ++i) {
        if (fibers_[i].state == State::kAtBarrier) {
          fibers_[i].state = State::kRunnable;
          fibers_[i].barrier_result = any;
        }
      }
    }
  }

  struct IssuedCopy {
    unsigned thread;
    int64_t index;  // of the thread's copies in the block
    const void* dst;
    const void* src;
    int bytes_read;
  };

  // SetCopyLineCheck's check of the block's copies; one report a block.
  void CheckCopyLines() {
    std::map<std::pair<int64_t, unsigned>, std::vector<const IssuedCopy*>> quarter_warps;
    for (const IssuedCopy& copy : block_copies_) quarter_warps[{copy.index, copy.thread / 8}].push_back(&copy);
    for (const auto& [key, copies] : quarter_warps) {
      std::set<uint32_t> lines, slots;
      std::map<uintptr_t, unsigned> sector_halves;
      bool all_read = copies.size() == 8;
      for (const IssuedCopy* copy : copies) {
        const uint32_t address = SharedAddress(copy->dst);
        lines.insert(address / 128);
        slots.insert(address / 16);
        const auto source = reinterpret_cast<uintptr_t>(copy->src);
        if (copy->bytes_read == 16) sector_halves[source / 32] |= 1u << (source / 16 % 2);
        all_read = all_read && copy->bytes_read == 16;
      }
      if (lines.size() != 1 || slots.size() != copies.size()) {
        Report("cp.async: a quarter warp's copies land in several 128-byte lines of shared memory or share a slot");
        return;
      }
      for (const auto& [sector, halves] : sector_halves) {
        if (all_read && halves != 3) {
          Report("cp.async: a quarter warp reads half of a 32-byte sector");
          return;
        }
      }
    }
  }

  enum class Collectives { kNone, kReleased, kStuck };

  // After a round: every warp whose lanes all wait at the same collective
  // goes on; a warp with only some of its lanes there is stuck.
  Collectives ReleaseCollectives(unsigned threads) {
    Collectives result = Collectives::kNone;
    for (unsigned first = 0; first < threads; first += warpSize) {
      const unsigned last = std::min(threads, first + warpSize);
      unsigned at_collective = 0;
      const void* site = nullptr;
      bool same_site = true;
      for (unsigned i = first; i < last; ++i) {
        if (fibers_[i].state != State::kAtCollective) continue;
        if (at_collective++ == 0) site = fibers_[i].site;
        same_site = same_site && fibers_[i].site == site;
      }
      if (at_collective == 0) continue;
      if (at_collective != warpSize || !same_site) {
        Report("a warp-collective operation not reached by every lane of the warp at the same place");
        return Collectives::kStuck;
      }
      for (unsigned i = first; i < last; ++i) fibers_[i].state = State::kRunnable;
      result = Collectives::kReleased;
    }
    return result;
  }

  Schedule schedule_ = Schedule::kForward;
  uint64_t seed_ = 0;
  bool running_ = false;
  const std::function<void()>* body_ = nullptr;
  ucontext_t scheduler_;
  std::vector<Fiber> fibers_;
  std::vector<char*> stacks_;
  std::vector<unsigned char> exchange_;
  std::vector<unsigned char> dynamic_shared_;
  // Per 16-byte chunk of the dynamic shared memory: 1 + the thread that
  // wrote it through the generic proxy without a fence.proxy.async since,
  // or 0.
  std::vector<unsigned> unfenced_writer_;
  std::vector<std::pair<const unsigned char*, int>> copy_reads_;
  bool check_copy_lines_ = false;
  std::vector<IssuedCopy> block_copies_;
  std::map<const void*, Mbarrier> mbarriers_;
  unsigned current_ = 0;
  cudaError_t error_ = cudaSuccess;
  std::vector<Diagnostic> diagnostics_;
  Stats stats_;
};

// One thread's share of a product. The descriptors as the PTX ISA lays them
// out (the emulation knows the swizzled layouts only): the start address,
// the leading and stride byte offsets, each in 16-byte units of 14 bits,
// and the swizzle in bits 62-63 (1: 128 bytes, 2: 64, 3: 32). In a
// swizzle of S bytes a row holds S bytes of 16-byte chunks (K-major: the
// row's k; M- or N-major: S / 2 of its rows or columns at one k); rows
// follow one another, 8 to a group, groups `stride` apart (M/N-major:
// blocks of S / 2 rows or columns `leading` apart); then each address's
// bits 4 .. are XORed with its bits 7 .. (log2(S / 16) of them), on the
// shared window's addresses.
inline Engine::WarpgroupOperand Engine::DecodeDescriptor(uint64_t descriptor, bool& valid) {
  constexpr uint64_t kFieldBits =
      (uint64_t{0x3fff} << 0) | (uint64_t{0x3fff} << 16) | (uint64_t{0x3fff} << 32) | (uint64_t{3} << 62);
  const uint32_t mode = static_cast<uint32_t>(descriptor >> 62);
  if ((descriptor & ~kFieldBits) != 0 || mode == 0) {
    Report("wgmma: a descriptor without a swizzle, or with a base offset or reserved bits set");
    valid = false;
  }
  return WarpgroupOperand{static_cast<uint32_t>(descriptor & 0x3fff) << 4,
                          static_cast<uint32_t>((descriptor >> 16) & 0x3fff) << 4,
                          static_cast<uint32_t>((descriptor >> 32) & 0x3fff) << 4, 256u >> mode};
}

// At the product's issue: every shared byte it will read (A 64 x 16, B 16 x
// n) must have been fenced by the thread that wrote it through the generic
// proxy.
inline void Engine::CheckWarpgroupMmaFenced(const PendingWarpgroupMma& product) {
  bool valid = true;
  const WarpgroupOperand a = DecodeDescriptor(product.a, valid);
  const WarpgroupOperand b = DecodeDescriptor(product.b, valid);
  if (!valid) return;
  const char* what = "wgmma: reads";
  for (int k = 0; k < 16; ++k) {
    for (int row = 0; row < 64; ++row) CheckFenced(OperandAddress(a, !product.a_m_major, row, k), 2, what);
    for (int column = 0; column < product.n; ++column) {
      CheckFenced(OperandAddress(b, !product.b_n_major, column, k), 2, what);
    }
  }
}

inline void Engine::RunWarpgroupMma(const PendingWarpgroupMma& product) {
  bool valid = true;
  const WarpgroupOperand a = DecodeDescriptor(product.a, valid);
  const WarpgroupOperand b = DecodeDescriptor(product.b, valid);
  const unsigned char* shared = DynamicShared();
  const size_t bytes = DynamicSharedBytes();
  const auto element = [&](uint32_t address) {
    if (address < kDynamicSharedWindowStart || address - kDynamicSharedWindowStart + 2 > bytes) {
      Report("wgmma: an operand outside the dynamic shared memory");
      valid = false;
      return 0.0f;
    }
    uint16_t value;
    std::memcpy(&value, shared + (address - kDynamicSharedWindowStart), sizeof(value));
    return product.widen(value);
  };
  const auto a_at = [&](int row, int k) { return element(OperandAddress(a, !product.a_m_major, row, k)); };
  const auto b_at = [&](int k, int column) { return element(OperandAddress(b, !product.b_n_major, column, k)); };
  const int lane = static_cast<int>(product.thread % warpSize);
  const int warp = static_cast<int>(product.thread % 128 / warpSize);
  for (int i = 0; i < product.n / 2 && valid; ++i) {
    const int row = 16 * warp + lane / 4 + 8 * (i / 2 % 2);
    const int column = 8 * (i / 4) + 2 * (lane % 4) + i % 2;
    float sum = product.d[i];
    for (int k = 0; k < 16; ++k) sum += a_at(row, k) * b_at(k, column);  // each product exact in float
    product.d[i] = sum;
  }
}

}  // namespace cuda_emulation

__device__ __attribute__((noinline)) inline void __syncthreads() {
  cuda_emulation::Engine::Get().Barrier(__builtin_return_address(0));
}

__device__ __attribute__((noinline)) inline int __syncthreads_or(int predicate) {
  return cuda_emulation::Engine::Get().Barrier(__builtin_return_address(0), predicate != 0) ? 1 : 0;
}

[[noreturn]] __device__ inline void __trap() { cuda_emulation::Engine::Get().Trap(); }

inline cudaError_t cudaGetLastError() { return cuda_emulation::Engine::Get().TakeError(); }
inline cudaError_t cudaPeekAtLastError() { return cuda_emulation::Engine::Get().PeekError(); }

#endif  // MASKED_OPS_TESTS_CUDA_EMULATION_CUDA_EMULATION_H_
