// What this build of the kernels contains, as nvcc saw it.
#include <cuda_runtime.h>

#include "kernels.h"

namespace scratchformer {

int compiled_cuda_archs(int* out, int capacity) {
  // nvcc defines __CUDA_ARCH_LIST__ as the comma-separated list of virtual architectures it
  // compiles this file for (800,900); the build compiles every .cu with the same list.
  static constexpr int archs[] = {__CUDA_ARCH_LIST__};
  constexpr int count = sizeof(archs) / sizeof(archs[0]);
  for (int i = 0; i < count && i < capacity; ++i) out[i] = archs[i] / 10;
  return count;
}

#ifndef SCRATCHFORMER_PTX_ARCH  // set by setup.py from TORCH_CUDA_ARCH_LIST's "+PTX" entry
#define SCRATCHFORMER_PTX_ARCH 0
#endif
int compiled_ptx_arch() { return SCRATCHFORMER_PTX_ARCH; }

int compiled_cuda_version() { return CUDART_VERSION; }

}  // namespace scratchformer
