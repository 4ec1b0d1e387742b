"""What this installation of scratchformer was built with: `scratchformer info` prints it."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import metadata

import torch

from . import _extensions


@dataclass(frozen=True)
class BuildInfo:
    version: str
    torch: str
    torch_cuda: str | None  # CUDA version of the installed torch (None: CPU build)
    bpe: bool  # the C++ tokenizer core loaded
    kernels: bool  # the torch ops library loaded
    cuda_kernels: bool  # ...with CUDA kernels compiled in
    cuda_archs: tuple[int, ...]  # compute capabilities compiled for, e.g. (80, 90)
    ptx_arch: int  # the one whose PTX is embedded, or 0
    kernels_cuda: str | None  # CUDA version the kernels were compiled with
    kernels_torch: str | None  # torch version whose headers built the kernels
    gpu: str | None  # the visible GPU, if any
    problems: tuple[str, ...]  # why an extension did not load

    def __str__(self) -> str:
        def yes(flag: bool, detail: str = "") -> str:
            return ("yes" + (f" ({detail})" if detail else "")) if flag else "no"

        archs = ", ".join(f"sm_{a}" for a in self.cuda_archs) + (f" + PTX of compute_{self.ptx_arch}" if self.ptx_arch else "")
        lines = [
            f"scratchformer {self.version}",
            f"  torch            {self.torch} (CUDA {self.torch_cuda or 'none: CPU build'})",
            f"  C++ tokenizer    {yes(self.bpe)}",
            f"  kernels library  {yes(self.kernels, f'built against torch {self.kernels_torch}')}",
            f"  CUDA kernels     {yes(self.cuda_kernels, f'CUDA {self.kernels_cuda}, {archs}')}",
            f"  GPU              {self.gpu or 'none visible'}",
        ]
        if not self.cuda_kernels:
            lines.append("  every op runs PyTorch's own (backend \"auto\")")
        lines += [f"  problem: {p}" for p in self.problems]
        return "\n".join(lines)


def build_info() -> BuildInfo:
    kernels = _extensions.kernels
    gpu = None
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability()
        gpu = f"{torch.cuda.get_device_name()} (sm_{major}{minor})"
    problems = tuple(
        f"scratchformer.{name} did not load: {err}"
        for name, err in (("_kernels", _extensions.kernels_error), ("_bpe", _extensions.bpe_error))
        if err
    ) + ((_extensions.cuda_problem,) if _extensions.cuda_problem else ())
    return BuildInfo(
        version=metadata.version("scratchformer"),
        torch=torch.__version__,
        torch_cuda=torch.version.cuda,
        bpe=_extensions.bpe is not None,
        kernels=kernels is not None,
        cuda_kernels=bool(_extensions.cuda_archs),
        cuda_archs=_extensions.cuda_archs,
        ptx_arch=_extensions.ptx_arch,
        kernels_cuda=kernels.cuda_version() if kernels is not None else None,
        kernels_torch=kernels.torch_version() if kernels is not None else None,
        gpu=gpu,
        problems=problems,
    )
