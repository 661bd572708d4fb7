// Plain C entry points of the op library, for what is not a tensor op.
#include "cc/kernels/gemm.h"

// The CPU kernel backend in use ("generic", "avx2" or "avx512"); read by
// masked_ops.cpu_backend() through ctypes.
extern "C" __attribute__((visibility("default"))) const char* MaskedOpsCpuBackend() {
  return masked_ops::SelectedGemmBackendName();
}
