"""Train the same model with two kernel backends and compare the loss curves, then the greedy text.

    python benchmarks/train_curves.py [--steps 200] [--backends fused,reference] [--out DIR]

Both runs share the seed, data order and settings (the `seed` preset on the bundled corpus, bf16
autocast on a GPU), so the curves differ only by the ops' rounding. Prints the largest gap
between the two train-loss curves and the final eval losses, and plots both (DIR/train_curves.png).
Then the first run's model continues a fixed prompt greedily (KV-cache decoding) on each backend;
the texts must be identical, else the script exits 1.
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--backends", default="fused,reference")
    parser.add_argument("--prompt", default="The game was released in")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="seed")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="train-curves-"))
    curves = {}
    for backend in args.backends.split(","):
        out = work / backend
        cmd = [sys.executable, "-m", "scratchformer.cli", "train", "--preset", args.preset, "--device", args.device,
               "--kernels", backend, "--steps", str(args.steps), "--eval-every", str(args.steps),
               "--checkpoint-every", str(args.steps), "--sample-tokens", "0", "--no-progress", "--out", str(out)]
        subprocess.run(cmd, check=True)
        rows = list(csv.DictReader(open(out / "metrics.csv")))
        curves[backend] = ([float(r["train_loss"]) for r in rows], float(rows[-1]["eval_loss"]))
    (a, (la, ea)), (b, (lb, eb)) = curves.items()
    gap = max(abs(x - y) for x, y in zip(la, lb))
    late = max(abs(x - y) for x, y in zip(la[-50:], lb[-50:]))
    texts = {}
    for backend in (a, b):
        cmd = [sys.executable, "-m", "scratchformer.cli", "generate", "--checkpoint", str(work / a), "--device",
               args.device, "--kernels", backend, "--prompt", args.prompt, "--temperature", "0", "--max-new-tokens", "60"]
        texts[backend] = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip()
    same = texts[a] == texts[b]
    report = (f"{args.preset} preset, {args.steps} steps: largest train-loss gap {a} vs {b} {gap:.4f} "
              f"(last 50 steps {late:.4f}); eval loss {a} {ea:.4f}, {b} {eb:.4f}\n\n"
              f"Greedy text of the {a} model, {a} vs {b} kernels: {'identical' if same else 'DIFFERENT'}\n"
              + "".join(f"\n- {name}: {text!r}" for name, text in texts.items()))
    print(report)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "train_curves.md").write_text(report + "\n")
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        for name, (losses, _) in curves.items():
            ax.plot(range(1, len(losses) + 1), losses, label=f"--kernels {name}", linewidth=1)
        ax.set_xlabel("step")
        ax.set_ylabel("train loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.out / "train_curves.png", dpi=120)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
