"""python -m lectlib.bench sparse [--lengths N ...] [--record]: time and peak memory of sparse attention against N.

Methods, measured in the same run on causal (1, H, N, D) inputs: `dense` (torch SDPA, the
baseline of the ratios), the three sliding-window forms of lectlib.sparse (`sliding full`, an
N x N mask; `sliding loop`, one query at a time; `sliding chunks`, overlapping chunks) with the
same window, and the gathered patterns `strided` and `fixed` (stride √N: O(N√N); fixed keeps stride/16
summary keys per block) and `dilated` (segments 64 ... 4096, rates 1 ... 64: 64 keys per segment length).
`sliding full` is skipped past --max-full tokens, `sliding loop` past --max-loop. Peak memory is
above the inputs.
"""

import argparse
import math

import torch

from .. import profiling, sparse
from ..attention import sdpa_attention
from . import record, table


DILATED = dict(segments=[64, 256, 1024, 4096], rates=[1, 4, 16, 64])  # LongNet's geometric sequence: w/r = 64 keys each


def methods(n: int, window: int) -> dict:
    """name -> attention function (q, k, v) for sequences of n tokens."""
    stride = max(1, round(math.sqrt(n)))
    return {
        "dense": lambda q, k, v: sdpa_attention(q, k, v, causal=True),
        "sliding full": lambda q, k, v: sparse.sliding_window_full(q, k, v, window=window),
        "sliding loop": lambda q, k, v: sparse.sliding_window_loop(q, k, v, window=window),
        "sliding chunks": lambda q, k, v: sparse.sliding_window_chunks(q, k, v, window=window),
        "strided": lambda q, k, v: sparse.sparse_attention(q, k, v, "strided", stride=stride),
        "fixed": lambda q, k, v: sparse.sparse_attention(q, k, v, "fixed", stride=stride, summary=max(1, stride // 16)),
        "dilated": lambda q, k, v: sparse.sparse_attention(q, k, v, "dilated", **DILATED),
    }


def measure(lengths, *, heads: int = 2, head_dim: int = 64, window: int = 256, max_full: int = 4096,
            max_loop: int = 2048, repeats: int = 3) -> list[dict]:
    """Rows {method, n, ms, peak_mib, x dense time, x dense memory} for every method and length."""
    rows = []
    for n in lengths:
        g = torch.Generator().manual_seed(n)
        q, k, v = (torch.randn(1, heads, n, head_dim, generator=g) for _ in range(3))
        base = None
        for name, fn in methods(n, window).items():
            if name == "sliding full" and n > max_full or name == "sliding loop" and n > max_loop:
                continue
            with torch.no_grad():
                seconds = profiling.time_fn(lambda: fn(q, k, v), repeats=repeats, warmup=1)
                peak = profiling.peak_memory_bytes(lambda: fn(q, k, v))
            base = base or (seconds, peak)
            rows.append(dict(method=name, n=n, ms=1e3 * seconds, peak_mib=peak / 2**20,
                             x_dense_time=seconds / base[0], x_dense_memory=peak / base[1]))
            print(table(rows[-1:], list(rows[-1])).splitlines()[1], flush=True)
    return rows


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m lectlib.bench sparse", description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--max-full", type=int, default=4096, help="longest N for the N x N mask form")
    parser.add_argument("--max-loop", type=int, default=2048, help="longest N for the loop over queries")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--record", action="store_true", help="write data/results/sparse-<device>.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one core, as each ring process gets: the two benchmarks compare
    print(f"sparse attention on CPU (1 thread), H={args.heads}, D=64, window={args.window}, N = {args.lengths}")
    rows = measure(args.lengths, heads=args.heads, window=args.window, max_full=args.max_full, max_loop=args.max_loop,
                   repeats=args.repeats)
    print(table(rows, ["method", "n", "ms", "peak_mib", "x_dense_time", "x_dense_memory"]))
    if args.record:
        record("sparse", rows, heads=args.heads, head_dim=64, window=args.window, threads=1,
               command="python -m lectlib.bench sparse " + " ".join(argv))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
