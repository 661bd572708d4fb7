// The GemmBackend for generic; CMake compiles this file alone with its -m flags.
#define MASKED_OPS_ISA generic
#define MASKED_OPS_VECTOR_BYTES 16
#define MASKED_OPS_VECTOR_REGS 16
#include "cc/kernels/gemm_isa.inc"
