"""python -m lectlib.bench attention [--quick] [--record]: attention speed (TFLOP/s) and peak memory.

Methods, measured in the same run: `flash` (lectlib.flash's Triton kernel), `sdpa` (torch SDPA;
on CUDA pinned to its FlashAttention backend), `naive` (lectlib.attention.naive_attention;
skipped where its N x N scores would not fit) and, on CPU, `blockwise`.

FLOPs are the standard count (FlashAttention papers): 4·B·H·N²·D for the forward (two
matmuls), halved when causal, and 2.5 times that for the backward. The GPU sweep keeps
B·N = 16k tokens and H·D = 2048 as the FlashAttention-2 benchmark does, for N = 512 … 16k,
D = 64 and 128, causal and not, in fp16 (bf16 with --dtype bf16). `--quick` is a CPU smoke run
at small sizes (the kernel under Triton's interpreter), in under a minute.

GPU results are recorded to data/results/attention-<device>.json (`--record` records a CPU run too).
"""

import argparse
import math
from contextlib import nullcontext

import torch

from .. import attention, profiling
from . import load_results, record, table

LENGTHS = [512, 1024, 2048, 4096, 8192, 16384]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def attention_flops(*, batch: int, heads: int, n: int, head_dim: int, causal: bool, direction: str) -> float:
    """4·B·H·N²·D for the forward, halved when causal; ×2.5 for the backward."""
    flops = 4 * batch * heads * n * n * head_dim / (2 if causal else 1)
    return flops * (2.5 if direction == "bwd" else 1.0)


# Published figures (NVIDIA H100 SXM5 datasheet and architecture whitepaper). SRAM bandwidth is not
# published as one number; ~33 TB/s is the common estimate (132 SMs x 128 B/clock x 1.98 GHz).
H100 = dict(name="H100 SXM5", hbm_bytes=80e9, hbm_bandwidth=3.35e12, sram_bytes_per_sm=228 * 1024, sms=132,
            sram_bandwidth=33e12, tensor_flops_bf16=989e12)


def naive_attention_traffic(*, n: int, head_dim: int, bytes_per_element: int = 2) -> dict:
    """FLOPs and HBM bytes of one head of naive attention's forward, and their ratio (FLOP/byte).

    Reads Q, K, V and writes O (4·N·D elements); writes S, reads it for the softmax, writes P
    and reads it for PV (4·N² elements). FLOPs: 4·N²·D for the two matmuls (+ ~5·N² softmax).
    """
    flops = 4 * n * n * head_dim + 5 * n * n
    moved = (4 * n * head_dim + 4 * n * n) * bytes_per_element
    return dict(n=n, flops=flops, bytes=moved, intensity=flops / moved)


def _methods(device: torch.device) -> dict:
    from .. import flash

    methods = {"flash": flash.flash_attention, "sdpa": attention.sdpa_attention, "naive": attention.naive_attention}
    if device.type == "cpu":
        methods["blockwise"] = attention.blockwise_attention
    return methods


def _sdpa_backend(device: torch.device, method: str):
    """On CUDA, pin SDPA to its FlashAttention backend so that the baseline is the one we claim."""
    if method != "sdpa" or device.type != "cuda":
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def _time(fn, device: torch.device, *, slow: bool = False) -> float:
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100) / 1e3
    return profiling.time_fn(fn, repeats=1 if slow else 3, warmup=1, device=device)


def _fits(batch, heads, n, dtype, device) -> bool:
    """Whether naive attention's scores (and their softmax and gradients, ~4 copies) fit in free memory."""
    if device.type != "cuda":
        return n <= 4096
    free, _ = torch.cuda.mem_get_info(device)
    return 4 * batch * heads * n * n * torch.finfo(dtype).bits // 8 < 0.8 * free


def speed(*, lengths, head_dims, causals, dtype, device, tokens: int, width: int, backward: bool = True) -> list[dict]:
    """Rows {method, direction, n, head_dim, causal, batch, heads, ms, tflops} for every configuration."""
    rows = []
    methods = _methods(device)
    for head_dim in head_dims:
        for causal in causals:
            for n in lengths:
                batch, heads = max(1, tokens // n), max(1, width // head_dim)
                g = torch.Generator().manual_seed(0)
                q, k, v = (torch.randn(batch, heads, n, head_dim, generator=g).to(device, dtype).requires_grad_(backward)
                           for _ in range(3))
                grad = torch.randn_like(q)
                for method, fn in methods.items():
                    if method == "naive" and not _fits(batch, heads, n, dtype, device):
                        continue
                    slow = method == "flash" and device.type == "cpu"  # the interpreter
                    with _sdpa_backend(device, method):
                        run = lambda: fn(q, k, v, causal=causal)  # noqa: E731
                        measured = {"fwd": _time(run, device, slow=slow)}
                        if backward:
                            out = run()
                            measured["bwd"] = _time(lambda: torch.autograd.grad(out, (q, k, v), grad, retain_graph=True),
                                                    device, slow=slow)
                    for direction, seconds in measured.items():
                        flops = attention_flops(batch=batch, heads=heads, n=n, head_dim=head_dim, causal=causal,
                                                direction=direction)
                        rows.append(dict(method=method, direction=direction, n=n, head_dim=head_dim, causal=causal,
                                         batch=batch, heads=heads, ms=seconds * 1e3, tflops=flops / seconds / 1e12))
                    done = table(rows[-len(measured):], ["method", "direction", "n", "head_dim", "causal", "ms", "tflops"])
                    print("\n".join(done.splitlines()[1:]), flush=True)
    return rows


def memory(*, lengths, head_dim: int, heads: int, dtype, device) -> list[dict]:
    """Rows {method, n, head_dim, heads, peak_bytes}: peak memory of one forward above the inputs.

    On CPU the kernel runs in the interpreter's numpy arrays, which torch does not see, so there
    the rows are naive and blockwise attention.
    """
    rows = []
    methods = {"naive": attention.naive_attention}
    if device.type == "cuda":
        methods.update(sdpa=attention.sdpa_attention, flash=_methods(device)["flash"])
    else:
        methods["blockwise"] = attention.blockwise_attention
    for n in lengths:
        q, k, v = (torch.randn(1, heads, n, head_dim).to(device, dtype) for _ in range(3))
        for method, fn in methods.items():
            if method == "naive" and not _fits(1, heads, n, dtype, device):
                continue
            with torch.no_grad(), _sdpa_backend(device, method):
                peak = profiling.peak_memory_bytes(lambda: fn(q, k, v), device=device)
            rows.append(dict(method=method, n=n, head_dim=head_dim, heads=heads, peak_bytes=peak))
    return rows


def ratios(rows: list[dict], *, method: str = "flash", baseline: str = "sdpa") -> list[dict]:
    """`method`'s speed over `baseline`'s, per configuration both measured."""
    key = lambda r: (r["direction"], r["n"], r["head_dim"], r["causal"])  # noqa: E731
    base = {key(r): r["tflops"] for r in rows if r["method"] == baseline}
    return [dict(direction=r["direction"], n=r["n"], head_dim=r["head_dim"], causal=r["causal"],
                 ratio=r["tflops"] / base[key(r)])
            for r in rows if r["method"] == method and key(r) in base]


def gpu_results() -> list[dict]:
    """Recorded results of this benchmark that come from a GPU."""
    return [r for r in load_results("attention") if r["environment"]["device"] != "cpu"]


def speed_figure(result: dict, *, direction: str = "fwd", head_dim: int = 128, causal: bool = False):
    """TFLOP/s against N per method, from one recorded result."""
    from .. import viz

    rows = [r for r in result["rows"] if r.get("direction") == direction and r["head_dim"] == head_dim
            and r["causal"] == causal]
    methods = sorted({r["method"] for r in rows})
    lengths = sorted({r["n"] for r in rows})
    by = {(r["method"], r["n"]): r["tflops"] for r in rows}
    env = result["environment"]
    return viz.line_figure(lengths, {m: [by.get((m, n)) for n in lengths] for m in methods}, log_x=True,
                           title=f"{direction}, D={head_dim}, {'causal' if causal else 'not causal'} "
                                 f"({env['device']}, {env['date']})",
                           x_title="sequence length N", y_title="TFLOP/s")


def memory_figure(result: dict):
    """Peak memory of one forward against N per method, from one recorded result (the memory rows)."""
    from .. import viz

    rows = [r for r in result["rows"] if r.get("kind") == "memory"]
    methods = sorted({r["method"] for r in rows})
    lengths = sorted({r["n"] for r in rows})
    by = {(r["method"], r["n"]): r["peak_bytes"] / 2**20 for r in rows}
    env = result["environment"]
    return viz.line_figure(lengths, {m: [by.get((m, n)) for n in lengths] for m in methods}, log_x=True, log_y=True,
                           title=f"Peak memory of one forward ({env['device']}, {env['date']})",
                           x_title="sequence length N", y_title="MiB")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m lectlib.bench attention", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small CPU-sized run (the kernel under the interpreter)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="fp16 on GPU, fp32 on CPU by default")
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--head-dims", type=int, nargs="+", default=None)
    parser.add_argument("--record", action="store_true", help="record a CPU run too (GPU runs are always recorded)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    quick = args.quick or device.type == "cpu"
    dtype = DTYPES[args.dtype or ("fp32" if device.type == "cpu" else "fp16")]
    lengths = args.lengths or ([64, 128] if quick else LENGTHS)
    head_dims = args.head_dims or ([64] if quick else [64, 128])
    tokens, width = (256, 128) if quick else (16384, 2048)
    print(f"attention benchmark on {device} ({dtype}), N = {lengths}, D = {head_dims}")
    rows = speed(lengths=lengths, head_dims=head_dims, causals=[False, True], dtype=dtype, device=device,
                 tokens=tokens, width=width)
    columns = ["method", "direction", "n", "head_dim", "causal", "batch", "heads", "ms", "tflops"]
    print(table(rows, columns))
    print("\nflash / sdpa speed:")
    print(table(ratios(rows), ["direction", "n", "head_dim", "causal", "ratio"]))
    mem_lengths = [512, 1024, 2048] if quick else [1024, 2048, 4096, 8192, 16384, 32768]
    mem_rows = memory(lengths=mem_lengths, head_dim=head_dims[-1], heads=1 if quick else 16, dtype=dtype, device=device)
    print("\npeak memory of one forward:")
    print(table(mem_rows, ["method", "n", "head_dim", "heads", "peak_bytes"]))
    if device.type == "cuda" or args.record:
        record("attention", rows + [dict(kind="memory", **r) for r in mem_rows],
               flops="4·B·H·N²·D forward, /2 causal, ×2.5 backward", dtype=str(dtype).removeprefix("torch."))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
