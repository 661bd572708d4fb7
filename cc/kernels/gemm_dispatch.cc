#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "cc/kernels/gemm.h"

namespace masked_ops {

// Each backend's accessor, defined in gemm_<isa>.cc.
#define MASKED_OPS_DECLARE_BACKEND(ISA) \
  namespace ISA {                       \
  template <typename T>                 \
  const GemmBackend<T>& Backend();      \
  }
MASKED_OPS_DECLARE_BACKEND(generic)
#if MASKED_OPS_X86_BACKENDS
MASKED_OPS_DECLARE_BACKEND(avx2)
MASKED_OPS_DECLARE_BACKEND(avx512)
#endif
#undef MASKED_OPS_DECLARE_BACKEND

namespace {

enum class Isa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

Isa BestSupportedIsa() {
#if MASKED_OPS_X86_BACKENDS
  __builtin_cpu_init();
  // libgcc's checks include the OS saving the wider registers (XCR0).
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("fma")) {
    return Isa::kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kGeneric;
}

// MASKED_OPS_CPU_ISA may lower the choice (to test or compare the slower
// paths), never raise it past what the CPU runs.
Isa ChooseIsa() {
  const Isa best = BestSupportedIsa();
  const char* requested = std::getenv("MASKED_OPS_CPU_ISA");
  if (requested == nullptr || *requested == '\0') return best;
  Isa wanted;
  if (std::strcmp(requested, "generic") == 0) {
    wanted = Isa::kGeneric;
  } else if (std::strcmp(requested, "avx2") == 0) {
    wanted = Isa::kAvx2;
  } else if (std::strcmp(requested, "avx512") == 0) {
    wanted = Isa::kAvx512;
  } else {
    std::fprintf(stderr,
                 "masked_ops: ignoring MASKED_OPS_CPU_ISA=%s (expected generic, avx2 or avx512)\n",
                 requested);
    return best;
  }
  return static_cast<int>(wanted) < static_cast<int>(best) ? wanted : best;
}

Isa SelectedIsa() {
  static const Isa isa = ChooseIsa();
  return isa;
}

}  // namespace

template <typename T>
const GemmBackend<T>& SelectedGemmBackend() {
  switch (SelectedIsa()) {
#if MASKED_OPS_X86_BACKENDS
    case Isa::kAvx512:
      return avx512::Backend<T>();
    case Isa::kAvx2:
      return avx2::Backend<T>();
#endif
    default:
      return generic::Backend<T>();
  }
}

const char* SelectedGemmBackendName() { return SelectedGemmBackend<float>().name; }

template const GemmBackend<float>& SelectedGemmBackend<float>();
template const GemmBackend<double>& SelectedGemmBackend<double>();

}  // namespace masked_ops
