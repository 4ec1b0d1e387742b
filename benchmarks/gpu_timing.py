"""GPU timing shared by the benchmarks."""

from __future__ import annotations

import time

import torch


def l2_flush_buffer() -> torch.Tensor:
    """A buffer larger than any GPU's L2 cache; zeroing it evicts what a timed call would reuse."""
    return torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")


def timed(fn, reps: int, flush: torch.Tensor) -> float:
    """Median milliseconds of fn() over reps (CUDA events, after one warm-up call), the L2 cache
    flushed before each."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def host_us(fn, reps: int) -> float:
    """Median microseconds until fn() returns, the GPU still busy with what it queued: the host's
    share of a call, which the GPU waits on whenever it is longer than the kernels. The queue is
    drained between calls, so a full launch queue never stalls the call being timed."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
        torch.cuda.synchronize()
    return sorted(times)[len(times) // 2]
