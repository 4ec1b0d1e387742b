"""Builds scratchformer's two extensions.

- scratchformer._bpe: the tokenizer core, plain pybind11 + C++17, no torch headers.
- scratchformer._kernels: the torch ops. A glue file on torch's stable ABI (csrc/kernels/ops.cpp)
  plus kernels in plain CUDA files that never include torch, so the build takes seconds and one
  binary loads in every torch from TORCH_TARGET below on.

Install against the torch you will run, without pip's build isolation:

    pip install torch ninja pybind11 setuptools wheel
    pip install --no-build-isolation .

Why no isolation: an isolated build installs a second torch (several GB, pip does not apply its
constraints there) just to compile against, possibly another version than the one installed.
Building against the installed torch is the only way to be sure the two match.

Environment:
  SCRATCHFORMER_CUDA    auto (default: build CUDA kernels when nvcc and a CUDA torch exist),
                        1 (require them: fail if they cannot be built), 0 (skip them).
  TORCH_CUDA_ARCH_LIST  compute capabilities to compile for (default 8.0;9.0a;10.0;12.0+PTX).
  CUDA_HOME             the CUDA toolkit (default: found from nvcc).
  MAX_JOBS              parallel compile jobs (ninja).
"""

import glob
import os
import sys

from setuptools import setup

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tools"))
import cuda_toolkit  # noqa: E402

try:
    import torch
    from pybind11.setup_helpers import Pybind11Extension
except ImportError as e:
    sys.exit(
        f"scratchformer: cannot build: {e}. The kernels are compiled against your installed torch, "
        "so install the build tools first and build without isolation:\n"
        "    pip install torch ninja pybind11 setuptools wheel\n"
        "    pip install --no-build-isolation ."
    )

# The oldest stable ABI the glue uses (contiguous, mutable_data_ptr: torch 2.10).
TORCH_TARGET = "0x020A000000000000"


def cuda_skip_reason(mode, cuda_home):
    if mode == "0":
        return "SCRATCHFORMER_CUDA=0"
    if not torch.version.cuda:
        return f"torch {torch.__version__} is a CPU-only build"
    if cuda_home is None:
        return "no CUDA toolkit found (set CUDA_HOME to a folder with bin/nvcc)"
    nvcc = cuda_toolkit.nvcc_version(cuda_home)
    if nvcc is None or nvcc.split(".")[0] != torch.version.cuda.split(".")[0]:
        return f"nvcc {nvcc} in {cuda_home} does not match torch's CUDA {torch.version.cuda}"
    return None


def log(line):
    print(f"scratchformer: {line}", file=sys.stderr, flush=True)


mode = os.environ.get("SCRATCHFORMER_CUDA", "auto").strip().lower()
if mode not in ("auto", "0", "1"):
    sys.exit(f"scratchformer: SCRATCHFORMER_CUDA must be auto, 1 or 0, not {mode!r}")
cuda_home = cuda_toolkit.find_cuda_home() if mode != "0" else None
skip = cuda_skip_reason(mode, cuda_home)
if skip and mode == "1":
    sys.exit(f"scratchformer: SCRATCHFORMER_CUDA=1 but the CUDA kernels cannot be built: {skip}")
if skip:
    log(f"building without CUDA kernels ({skip}); every op runs PyTorch's own")
else:
    os.environ["CUDA_HOME"] = cuda_home
    try:
        os.environ["TORCH_CUDA_ARCH_LIST"] = cuda_toolkit.arch_list()
    except ValueError as e:
        sys.exit(f"scratchformer: {e}")
    log(f"building CUDA kernels with {cuda_home} for compute capabilities {os.environ['TORCH_CUDA_ARCH_LIST']}")

from torch.utils import cpp_extension  # noqa: E402  (reads CUDA_HOME when imported)

cpp_extension.CUDA_HOME = cuda_home if not skip else cpp_extension.CUDA_HOME

kernel_args = dict(
    name="scratchformer._kernels",
    py_limited_api=True,
    define_macros=[("TORCH_TARGET_VERSION", TORCH_TARGET)],
    include_dirs=[os.path.abspath("csrc/kernels")],
    extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", "-lineinfo"]},
)
if skip:
    kernels = cpp_extension.CppExtension(sources=["csrc/kernels/ops.cpp"], **kernel_args)
else:
    archs = os.environ["TORCH_CUDA_ARCH_LIST"]
    kernel_args["define_macros"] += [("SCRATCHFORMER_CUDA", None), ("USE_CUDA", None),
                                     ("SCRATCHFORMER_PTX_ARCH", str(cuda_toolkit.ptx_arch(archs)))]
    # Our own -gencode flags (torch then adds none): Blackwell's cubins share one front-end pass.
    kernel_args["extra_compile_args"]["nvcc"] += cuda_toolkit.gencode_flags(archs)
    # The cubins' capabilities for ops.cpp, which C++ compiles (nvcc would split the list at its commas).
    kernel_args["extra_compile_args"]["cxx"] += [f"-DSCRATCHFORMER_CUDA_ARCHS={','.join(map(str, cuda_toolkit.real_archs(archs)))}"]
    # Longest compile first: ninja starts jobs in this order, so on few cores none starts last and
    # runs alone.
    slowest = ["attention_bwd.cu", "layernorm.cu", "attention_simt.cu", "attention_fwd.cu", "attention_hopper.cu"]
    cuda_sources = sorted(glob.glob("csrc/kernels/*.cu"), key=lambda f: (slowest + [os.path.basename(f)]).index(os.path.basename(f)))
    kernels = cpp_extension.CUDAExtension(sources=[*cuda_sources, "csrc/kernels/ops.cpp"], **kernel_args)

bpe = Pybind11Extension("scratchformer._bpe", sorted(glob.glob("csrc/bpe/*.cpp")), cxx_std=17)
bpe.extra_compile_args += ["-O3"]

setup(ext_modules=[bpe, kernels], cmdclass={"build_ext": cpp_extension.BuildExtension})
