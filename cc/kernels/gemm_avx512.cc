// The GemmBackend for avx512; CMake compiles this file alone with its -m flags.
#define MASKED_OPS_ISA avx512
#define MASKED_OPS_VECTOR_BYTES 64
#define MASKED_OPS_VECTOR_REGS 32
#include "cc/kernels/gemm_isa.inc"
