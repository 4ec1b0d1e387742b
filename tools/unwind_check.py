"""Does a failed C++ check reach Python as a RuntimeError here, or kill the process?

Each case runs in its own subprocess, so a crash is reported, not suffered:

    python tools/unwind_check.py

- torch: a check inside torch itself fails (aten::view with a bad size): whether C++ exceptions
  survive in this process at all.
- ours, CPU tensors: scratchformer's ops refuse CPU tensors at their own first check (the CPU
  registration in csrc/kernels/ops.cpp); the same throw as any rejected input.
- ours, CUDA tensors: a rejected input with CUDA tensors (head_dim 80; a LayerNorm weight of the
  wrong size), where a GPU is present.

Exit status 1 if any case crashed. Reading it: torch crashing too means the machine cannot unwind
C++ exceptions across libraries at all; only ours crashing points at how the library was built.
"""

from __future__ import annotations

import subprocess
import sys

CASES = {
    "torch": "torch.ops.aten.view.default(torch.ones(4), [3])",
    "ours, CPU tensors": "torch.ops.scratchformer.layer_norm_fwd(torch.ones(2, 8), torch.ones(8), torch.zeros(8), None, 1e-5)",
    "ours, CUDA tensors (attention)": "x = torch.randn(1, 4, 8, 80, device='cuda', dtype=torch.bfloat16); "
    "torch.ops.scratchformer.attention_fwd(x, x, x, None, None, 0.0, 0.1)",
    "ours, CUDA tensors (layer_norm)": "x = torch.randn(4, 8, device='cuda'); "
    "torch.ops.scratchformer.layer_norm_fwd(x, torch.ones(9, device='cuda'), torch.zeros(9, device='cuda'), None, 1e-5)",
}

PROGRAM = """
import torch, scratchformer.ops
try:
    {call}
except RuntimeError as e:
    print("RuntimeError:", str(e).splitlines()[0][-100:])
else:
    print("no error raised")
"""


def run(call: str) -> tuple[str, bool]:
    result = subprocess.run([sys.executable, "-P", "-c", PROGRAM.format(call=call)], capture_output=True, text=True)
    if result.returncode < 0:
        return f"crashed (signal {-result.returncode})", False
    if result.returncode != 0:
        return f"exit {result.returncode}: {(result.stderr.strip().splitlines() or [''])[-1][-100:]}", False
    return result.stdout.strip(), result.stdout.startswith("RuntimeError")


def main() -> int:
    import torch

    crashed = False
    print("| case | result |\n| --- | --- |")
    for name, call in CASES.items():
        if "cuda" in call and not torch.cuda.is_available():
            print(f"| {name} | skipped: no GPU |")
            continue
        text, ok = run(call)
        crashed |= text.startswith("crashed")
        print(f"| {name} | {text if ok else '**' + text + '**'} |")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
