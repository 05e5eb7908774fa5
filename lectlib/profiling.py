"""Measuring time and peak memory of a function, on CPU and GPU alike.

Peak memory on a GPU is CUDA's own high-water mark. On a CPU torch keeps no such counter, so
the torch profiler records every allocation and free and the peak is replayed from them.
"""

import statistics
import time
from typing import Callable

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable, *, repeats: int = 5, warmup: int = 1, device=None) -> float:
    """Median wall time of fn() in seconds over `repeats` runs, after `warmup` runs."""
    device = torch.device(device or "cpu")
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_memory_bytes(fn: Callable, *, device=None) -> int:
    """Peak bytes allocated by torch while fn() runs, above what was allocated before it."""
    device = torch.device(device or "cpu")
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # Allocations are charged to the op that made them, frees appear as "[memory]" events.
    deltas = sorted((e.time_range.start, e.cpu_memory_usage if e.name == "[memory]" else e.self_cpu_memory_usage)
                    for e in prof.events())
    held = peak = 0
    for _, delta in deltas:
        held += delta
        peak = max(peak, held)
    return peak


def attention_cost(attn_fn: Callable, lengths, *, batch: int = 1, heads: int = 1, head_dim: int = 64,
                   dtype=torch.float32, device=None, repeats: int = 3, seed: int = 0) -> list[dict]:
    """Time and peak memory of attn_fn(q, k, v) for each sequence length: rows {n, seconds, peak_bytes}."""
    device = torch.device(device or "cpu")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    rows = []
    for n in lengths:
        q, k, v = (torch.randn(batch, heads, n, head_dim, generator=generator, dtype=dtype).to(device)
                   for _ in range(3))
        run = lambda: attn_fn(q, k, v)  # noqa: E731
        rows.append({"n": n, "seconds": time_fn(run, repeats=repeats, device=device),
                     "peak_bytes": peak_memory_bytes(run, device=device)})
    return rows
