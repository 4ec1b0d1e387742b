"""Find the CUDA toolkit to build with, without trusting the `nvcc` first on PATH.

That `nvcc` may be a wrapper script (so `dirname(nvcc)/..` is not the toolkit and torch's guess
of CUDA_HOME fails at link time with `cannot find -lcudart`). A toolkit is a folder with
`bin/nvcc` and `include/cuda_runtime.h`; nvcc itself reports where it lives (`--dryrun` prints
`TOP=`), which sees through wrappers.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess

# A100 (and sm_86/89 through it), H100 (as sm_90a: wgmma and setmaxnreg need the
# architecture-specific target), Blackwell datacenter and desktop, and PTX (compute_100's, see
# _virtual) so that a later GPU can compile the kernels when it first loads them.
DEFAULT_ARCH_LIST = "8.0;9.0a;10.0;12.0+PTX"


def is_toolkit(path: str | None) -> bool:
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h")
    )


def _reported_by_nvcc(nvcc: str) -> str | None:
    try:
        out = subprocess.run(
            [nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull], capture_output=True, text=True, timeout=60
        )
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    return os.path.realpath(match.group(1).strip()) if match else None


def find_cuda_home() -> str | None:
    """The toolkit folder, or None. CUDA_HOME / CUDA_PATH win when they name a real toolkit."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates += [_reported_by_nvcc(nvcc), os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))]
    candidates += ["/usr/local/cuda", *sorted(glob.glob("/usr/local/cuda-*"), reverse=True), "/opt/cuda"]
    return next((os.path.realpath(c) for c in candidates if is_toolkit(c)), None)


def nvcc_version(cuda_home: str) -> str | None:
    """'13.0' for the toolkit's nvcc, or None if it cannot be run."""
    try:
        out = subprocess.run(
            [os.path.join(cuda_home, "bin", "nvcc"), "--version"], capture_output=True, text=True, timeout=60
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"release (\d+\.\d+)", out)
    return match.group(1) if match else None


_ENTRY = re.compile(r"(\d+)\.(\d)([af]?)(\+PTX)?")  # an arch list entry: 8.6, 9.0a, 12.0+PTX


def _split(arch_list: str) -> list[str]:
    return [a for a in re.split(r"[;\s]+", arch_list.strip()) if a]


def arch_list() -> str:
    """TORCH_CUDA_ARCH_LIST if set, else DEFAULT_ARCH_LIST (also when no GPU is present). A bare
    9.0 becomes 9.0a: its machine code runs on the same GPUs (H100, H200) and holds the wgmma
    kernels, which plain sm_90 cannot."""
    entries = _split(os.environ.get("TORCH_CUDA_ARCH_LIST", ""))
    for entry in entries:
        if not _ENTRY.fullmatch(entry):
            raise ValueError(
                f"TORCH_CUDA_ARCH_LIST: {entry!r} is not a compute capability: give them as numbers, e.g. "
                f"{DEFAULT_ARCH_LIST} (the default) or 8.6 for an RTX 30 (`nvidia-smi --query-gpu=compute_cap "
                "--format=csv` tells a GPU's)"
            )
    return ";".join("9.0a" if a == "9.0" else a for a in entries) or DEFAULT_ARCH_LIST


def _entries(arch_list: str) -> list[tuple[int, str, bool]]:
    """(capability, suffix, +PTX) per entry of a checked list (arch_list()): "9.0a" -> (90, "a", False)."""
    return [(int(m[1] + m[2]), m[3], bool(m[4])) for m in map(_ENTRY.fullmatch, _split(arch_list))]


def _virtual(capability: int, suffix: str) -> str:
    """The virtual architecture whose PTX a cubin is assembled from. Blackwell's (10.0 and up, not
    architecture-specific) share compute_100: nvcc 13.0 emits the same PTX for compute_100 and
    compute_120, only the .target line differs, so one front-end pass per file feeds all their
    cubins, and the PTX it embeds loads on every GPU from 10.0 on (compute_120's only from 12.0)."""
    return "100" if capability >= 100 and not suffix else f"{capability}{suffix}"


def gencode_flags(arch_list: str) -> list[str]:
    """nvcc's -gencode flags: a cubin per entry, PTX for the +PTX ones (nvcc runs its front end
    once per distinct virtual architecture)."""
    flags = []
    for capability, suffix, ptx in _entries(arch_list):
        virtual = _virtual(capability, suffix)
        flags.append(f"-gencode=arch=compute_{virtual},code=sm_{capability}{suffix}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{virtual},code=compute_{virtual}")
    return list(dict.fromkeys(flags))


def real_archs(arch_list: str) -> list[int]:
    """The capabilities an arch list has cubins for: "8.0;9.0a;12.0+PTX" -> [80, 90, 120]."""
    return list(dict.fromkeys(capability for capability, _, _ in _entries(arch_list)))


def ptx_arch(arch_list: str) -> int:
    """The compute capability from which on GPUs load the PTX an arch list embeds ("12.0+PTX" ->
    100, see _virtual), or 0. Architecture- or family-specific PTX (9.0a+PTX) counts as none: it
    loads only where the same entry's cubin already runs."""
    return max((int(_virtual(c, s)) for c, s, ptx in _entries(arch_list) if ptx and not s), default=0)
