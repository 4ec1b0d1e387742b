#!/usr/bin/env bash
# Data-parallel training with torchrun: one process per GPU, each with a full copy of the model.
#
# How the batch splits: --batch-size is the global batch of one optimizer step. Every process
# draws the same random windows for it (one seeded sampler) and keeps its own slice, batch-size /
# (grad-accum * processes) sequences per micro-batch; DistributedDataParallel averages the
# gradients. So N processes train exactly like one process on the whole batch (a test checks
# this), and --batch-size must be divisible by grad-accum * processes. Rank 0 evaluates, logs and
# writes the run folder; --resume on several nodes needs the folder where every node can read it.
#
# One node, 8 GPUs:
#   torchrun --standalone --nproc_per_node 8 -m scratchformer.cli train --preset seed --data wikitext2 --out runs/seed
#
# Two nodes of 8 GPUs (run on each node; HOST is node 0's address, reachable from the other):
#   torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 --rdzv_id seed-run \
#       -m scratchformer.cli train --preset seed --data wikitext2 --out /shared/runs/seed
#
# This script runs the one-node form on this machine: every GPU, or without one 2 CPU processes
# (gloo) at toy size, so that it can be tried anywhere:
#   bash examples/multi_gpu.sh [OUT] [extra train options]
set -euo pipefail
out=${1:-runs/multi}
shift || true
if python -c "import sys, torch; sys.exit(0 if torch.cuda.device_count() > 0 else 1)"; then
    procs=$(python -c "import torch; print(torch.cuda.device_count())")
    device=cuda
    size=(--batch-size $((32 * procs)))
else
    procs=2
    device=cpu
    size=(--steps 20 --batch-size 8 --eval-every 10 --checkpoint-every 10 --sample-tokens 20)
    export OMP_NUM_THREADS=1  # two processes share the cores
fi
echo "+ $procs processes on $device"
torchrun --standalone --nproc_per_node "$procs" -m scratchformer.cli train --device "$device" --out "$out" \
    --no-progress "${size[@]}" "$@"
