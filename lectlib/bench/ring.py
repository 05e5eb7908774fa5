"""python -m lectlib.bench ring [--worlds P ...] [--lengths N ...] [--record]: ring attention on CPU processes.

For each world size P (gloo, one thread per process) and sequence length N: the time of one
causal forward + backward over the whole sequence (the slowest rank's), the bytes each process
sent (and the calculator's figure beside it), and the peak resident memory of one process above
what it held before the step (`peak_rss_bytes`). Causal attention is run in both layouts; each
rank's compute seconds give the idle share 1 - mean/max: the time ranks wait for the busiest one.
P = 1 is the single-process baseline of the ratios; with P processes on fewer cores the times
measure the work, not a speed-up.
"""

import argparse
import ctypes
import re
import time

import torch

from .. import ring
from . import record, table


def _status_bytes(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", open("/proc/self/status").read()).group(1)) * 1024


def peak_rss_bytes(fn) -> int:
    """Peak resident memory of this process while fn() runs, above what it held before (Linux).

    Freed memory goes back to the system first (malloc_trim) and the kernel's high-water mark
    is reset (clear_refs), so the peak counts the pages fn touches. (The profiler's replay in
    `lectlib.profiling.peak_memory_bytes` misses allocations made inside an autograd.Function.)
    """
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_bytes("VmRSS")
    fn()
    return _status_bytes("VmHWM") - before


def _worker(rank, world_size, lengths, heads, kv_heads, head_dim, repeats):
    rows = []
    for n in lengths:
        g = torch.Generator().manual_seed(n)
        full = [torch.randn(1, h, n, head_dim, generator=g) for h in (heads, kv_heads, kv_heads)]
        for layout in ring.LAYOUTS:
            q, k, v = (ring.shard(t, world_size, layout)[rank].requires_grad_() for t in full)
            grad = torch.ones_like(q)

            def step(stats=None):
                out = ring.ring_attention(q, k, v, causal=True, layout=layout, stats=stats)
                torch.autograd.grad(out, (q, k, v), grad)

            step()  # warm-up
            torch.distributed.barrier()
            times, stats = [], ring.RingStats()
            for _ in range(repeats):
                torch.distributed.barrier()
                start = time.perf_counter()
                step(stats)
                times.append(time.perf_counter() - start)
            peak = max(peak_rss_bytes(step) for _ in range(2))
            rows.append(dict(n=n, layout=layout, rank=rank, seconds=min(times), bytes_sent=stats.bytes_sent // repeats,
                             compute=sum(stats.compute_seconds) / repeats, peak_bytes=peak))
    return rows


def measure(worlds, lengths, *, heads: int = 4, kv_heads: int = 2, head_dim: int = 64, repeats: int = 2) -> list[dict]:
    """Rows {P, n, layout, ms, bytes_sent, calculated, peak_mib, idle_share} (slowest rank's time, largest peak)."""
    rows = []
    for p in worlds:
        per_rank = [r for rank_rows in ring.spawn(_worker, p, lengths, heads, kv_heads, head_dim, repeats, timeout=3600)
                    for r in rank_rows]
        for n in lengths:
            for layout in ring.LAYOUTS:
                mine = [r for r in per_rank if r["n"] == n and r["layout"] == layout]
                compute = [r["compute"] for r in mine]
                calc = sum(ring.ring_bytes_sent(seq_len=n, world_size=p, n_kv_heads=kv_heads, head_dim=head_dim,
                                                bytes_per_element=4, backward=b) for b in (False, True))
                rows.append(dict(P=p, n=n, layout=layout, ms=1e3 * max(r["seconds"] for r in mine),
                                 bytes_sent=max(r["bytes_sent"] for r in mine), calculated=calc,
                                 peak_mib=max(r["peak_bytes"] for r in mine) / 2**20,
                                 idle_share=1 - sum(compute) / len(compute) / max(compute)))
                print(table(rows[-1:], list(rows[-1])).splitlines()[1], flush=True)
    base = {(r["n"], r["layout"]): r for r in rows if r["P"] == 1}
    for r in rows:
        b = base.get((r["n"], r["layout"]))
        r["x_P1_memory"] = r["peak_mib"] / b["peak_mib"] if b else None
    return rows


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m lectlib.bench ring", description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--record", action="store_true", help="write data/results/ring-<device>.json")
    args = parser.parse_args(argv)
    print(f"ring attention, causal fwd+bwd, B=1, H=4, H_kv=2, D=64, fp32, gloo; P = {args.worlds}, N = {args.lengths}")
    rows = measure(args.worlds, args.lengths, repeats=args.repeats)
    print(table(rows, ["P", "n", "layout", "ms", "bytes_sent", "calculated", "peak_mib", "x_P1_memory", "idle_share"]))
    if args.record:
        record("ring", rows, heads=4, kv_heads=2, head_dim=64, dtype="float32", backend="gloo", threads_per_process=1,
               command="python -m lectlib.bench ring " + " ".join(argv))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
