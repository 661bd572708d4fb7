// The GemmBackend for avx2; CMake compiles this file alone with its -m flags.
#define MASKED_OPS_ISA avx2
#define MASKED_OPS_VECTOR_BYTES 32
#define MASKED_OPS_VECTOR_REGS 16
#include "cc/kernels/gemm_isa.inc"
