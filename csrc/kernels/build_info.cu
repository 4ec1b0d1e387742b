// What this build of the kernels contains, as nvcc saw it.
#include <cuda_runtime.h>

#include "kernels.h"

namespace scratchformer {

#ifndef SCRATCHFORMER_PTX_ARCH  // set by setup.py from TORCH_CUDA_ARCH_LIST's "+PTX" entry
#define SCRATCHFORMER_PTX_ARCH 0
#endif
int compiled_ptx_arch() { return SCRATCHFORMER_PTX_ARCH; }

int compiled_cuda_version() { return CUDART_VERSION; }

}  // namespace scratchformer
