// The emulated device's controls and the emulation's own conversions, as C
// entry points for tests/test_cuda_emulated.py (see emulator.h).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>

#include "cc/kernels/cuda/masked_matmul_gpu.h"
#include "cc/kernels/cuda/tensor_core_tile.cuh"

namespace {
bool device_has_tensor_cores = true;
bool device_runs_warpgroup_mma = false;
masked_ops::gpu::warpgroup::Products chosen_products = masked_ops::gpu::warpgroup::Products::kForward;
bool tensor_maps_refused = false;
int64_t tensor_map_refusals = 0;
bool tall_tiles = false;
}  // namespace

namespace masked_ops {
namespace gpu {
namespace tensor_core {
// The emulated device: compute capability 8.0+ unless a test says otherwise.
bool DeviceSupportsTensorCores() { return device_has_tensor_cores; }
}  // namespace tensor_core
namespace warpgroup {
// The emulated device runs the warpgroup tile once a test switches it on.
bool DeviceRunsWarpgroupMma() { return device_runs_warpgroup_mma; }
void SetProducts(Products products) { chosen_products = products; }
Products ChosenProducts() { return chosen_products; }
void CountTensorMapRefusal() { ++tensor_map_refusals; }
int64_t TensorMapRefusals() { return tensor_map_refusals; }
void SetTallTiles(bool on) { tall_tiles = on; }
bool TallTiles() { return tall_tiles; }
}  // namespace warpgroup
}  // namespace gpu
namespace emulation {
bool TensorMapsRefused() { return tensor_maps_refused; }
}  // namespace emulation
}  // namespace masked_ops

extern "C" {

void emu_set_device_tensor_cores(int on) { device_has_tensor_cores = on != 0; }
// products 0: a device without the warpgroup tile; 1: one with it, the
// forward product on it (the launchers' default); 2: all three products.
void emu_set_warpgroup_mma(int products) {
  device_runs_warpgroup_mma = products != 0;
  chosen_products = products == 2 ? masked_ops::gpu::warpgroup::Products::kAll
                                  : masked_ops::gpu::warpgroup::Products::kForward;
}

// on 1: the forward product and dx on the warpgroup tile take tall tiles
// where they apply (warpgroup::SetTallTiles).
void emu_set_warpgroup_tall_tiles(int on) { tall_tiles = on != 0; }

// on 1: EmulatedLaunch::EncodeTensorMap refuses every map, as a driver
// might. emu_tensor_map_refusals: warpgroup::TensorMapRefusals().
void emu_set_tensor_maps_refused(int on) { tensor_maps_refused = on != 0; }
int64_t emu_tensor_map_refusals() { return masked_ops::gpu::warpgroup::TensorMapRefusals(); }

// mode 0: a block's threads run in thread order between barriers; 1: reverse
// order; 2: shuffled (by seed).
void emu_set_schedule(int mode, uint64_t seed) {
  cuda_emulation::Engine::Get().SetSchedule(static_cast<cuda_emulation::Schedule>(mode), seed);
}

// on 1: each block's cp.async copies are checked for whole-line quarter
// warps (Engine::SetCopyLineCheck).
void emu_set_copy_line_check(int on) { cuda_emulation::Engine::Get().SetCopyLineCheck(on != 0); }

// Copies the diagnostics since the last call (empty: none) into buffer, NUL
// terminated and cut to size; returns their full length.
int64_t emu_take_diagnostics(char* buffer, int64_t size) {
  const std::string text = cuda_emulation::Engine::Get().TakeDiagnostics();
  if (size > 0) {
    const size_t copied = std::min(text.size(), static_cast<size_t>(size - 1));
    std::memcpy(buffer, text.data(), copied);
    buffer[copied] = '\0';
  }
  return static_cast<int64_t>(text.size());
}

// launches, blocks, threads, barriers, mma_syncs, warpgroup_mma_columns,
// warpgroup_mmas, async_copies, tensor_copies, busiest_block_tensor_work
// since the last reset.
void emu_stats(int64_t* out) {
  const cuda_emulation::Stats& stats = cuda_emulation::Engine::Get().stats();
  out[0] = stats.launches;
  out[1] = stats.blocks;
  out[2] = stats.threads;
  out[3] = stats.barriers;
  out[4] = stats.mma_syncs;
  out[5] = stats.warpgroup_mma_columns;
  out[6] = stats.warpgroup_mmas;
  out[7] = stats.async_copies;
  out[8] = stats.tensor_copies;
  out[9] = stats.busiest_block_tensor_work;
}

void emu_reset_stats() { cuda_emulation::Engine::Get().stats() = cuda_emulation::Stats{}; }

// The emulation's conversions, elementwise over n values.
void emu_float_to_half(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __half_as_ushort(__float2half_rn(in[i]));
}
void emu_half_to_float(const uint16_t* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __half2float(__ushort_as_half(in[i]));
}
void emu_float_to_bfloat16(const float* in, uint16_t* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __bfloat16_as_ushort(__float2bfloat16_rn(in[i]));
}
void emu_bfloat16_to_float(const uint16_t* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = __bfloat162float(__ushort_as_bfloat16(in[i]));
}
void emu_float_to_tf32(const float* in, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = nvcuda::wmma::__float_to_tf32(in[i]);
}

}  // extern "C"
