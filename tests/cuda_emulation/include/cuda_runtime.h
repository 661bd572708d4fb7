// cuda_runtime.h of the CUDA emulation (see cuda_emulation.h).
#ifndef MASKED_OPS_TESTS_CUDA_EMULATION_CUDA_RUNTIME_H_
#define MASKED_OPS_TESTS_CUDA_EMULATION_CUDA_RUNTIME_H_

#include "cuda_emulation.h"

#endif  // MASKED_OPS_TESTS_CUDA_EMULATION_CUDA_RUNTIME_H_
