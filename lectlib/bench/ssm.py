"""python -m lectlib.bench ssm [--quick] [--record]: the selective scan's speed, and generation's cost.

Scan speed, measured in the same run (ms per call, and ratios to a baseline):
- on a CPU: `parallel` (lectlib.ssm.selective_scan_parallel, the log-depth scan) against
  `sequential` (the Python loop over time), forward and forward+backward;
- on a GPU as well: `triton` (lectlib.ssm_triton, the fused scan) against `parallel` and against
  `attention` (torch SDPA, on CUDA pinned to FlashAttention, causal, fp16) of the same width.
  The Mamba paper (Fig. 8) reports its fused scan faster than FlashAttention-2 beyond 2k tokens
  and 20-40x faster than a standard PyTorch scan.
On a CPU everything runs on one thread. Scans run in fp32 (the state is kept in fp32), batch 1, D channels, N = 16 states; attention has
D / 2 / 64 heads of 64 (a Mamba block of width d_model has D = 2·d_model channels).

Generation cost (`generation_cost`, used by the chapter): time per new token and bytes kept
against the context length for a Transformer (KV cache), Mamba (state) and the hybrid.

GPU results are recorded to data/results/ssm-<device>.json (`--record` records a CPU run too).
"""

import argparse
from contextlib import nullcontext

import torch

from .. import profiling
from ..attention import sdpa_attention
from ..ssm import selective_scan
from . import record, table

LENGTHS = [512, 1024, 2048, 4096, 8192, 16384]


def scan_inputs(*, batch: int, n: int, dim: int, d_state: int, device, dtype=torch.float32, seed: int = 0,
                requires_grad: bool = False) -> dict:
    """Random arguments of `selective_scan` with the statistics of a trained block (Δ ~ 0.001-0.1)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    args = dict(x=r(batch, n, dim), delta=torch.rand(batch, n, dim, generator=g) * 0.1,
                A=-torch.arange(1, d_state + 1.0).repeat(dim, 1), B=r(batch, n, d_state), C=r(batch, n, d_state),
                D=torch.ones(dim), z=r(batch, n, dim))
    return {k: v.to(device, dtype).requires_grad_(requires_grad) for k, v in args.items()}


def _time(fn, device: torch.device, slow: bool = False) -> float:
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=10, rep=50) / 1e3
    return profiling.time_fn(fn, repeats=1 if slow else 3, warmup=0 if slow else 1, device=device)


def _attention_call(n: int, dim: int, device):
    heads = max(1, dim // 2 // 64)
    q, k, v = (torch.randn(1, heads, n, 64, device=device, dtype=torch.float16 if device.type == "cuda"
                           else torch.float32) for _ in range(3))
    backend = nullcontext()
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = sdpa_kernel(SDPBackend.FLASH_ATTENTION)

    def run():
        with backend:
            return sdpa_attention(q, k, v, causal=True)

    return run


def _measure(method: str, *, n: int, dim: int, d_state: int, device, backward: bool) -> dict:
    """{direction: seconds} of one scan method (or attention) at length n."""
    if method == "attention":
        return {"fwd": _time(_attention_call(n, dim, device), device)}
    args = scan_inputs(batch=1, n=n, dim=dim, d_state=d_state, device=device, requires_grad=backward)
    run = lambda: selective_scan(**args, method=method)  # noqa: E731
    slow = device.type == "cpu" and method in ("sequential", "triton")
    with torch.no_grad():
        measured = {"fwd": _time(run, device, slow)}
    if backward:
        def step():
            y, h = run()
            torch.autograd.grad(y.sum() + h.sum(), list(args.values()))
        measured["fwd+bwd"] = _time(step, device, slow)
    return measured


def scan_speed(*, lengths, methods, dim: int = 128, d_state: int = 16, device=None, backward: bool = True,
               sequential_max: int = 1 << 30) -> list[dict]:
    """Rows {method, direction, n, dim, d_state, ms} for every length and method ('attention' too); a
    method out of GPU memory gives a row with `error` and ms None."""
    device = torch.device(device or "cpu")
    rows = []
    for n in lengths:
        for method in methods:
            if method == "sequential" and n > sequential_max:
                continue
            try:
                measured = _measure(method, n=n, dim=dim, d_state=d_state, device=device, backward=backward)
            except torch.OutOfMemoryError as error:  # the PyTorch scans keep all B·L·D·N states
                rows.append(dict(method=method, direction="fwd", n=n, dim=dim, d_state=d_state, ms=None,
                                 error=str(error).splitlines()[0]))
                torch.cuda.empty_cache()
                continue
            for direction, seconds in measured.items():
                rows.append(dict(method=method, direction=direction, n=n, dim=dim, d_state=d_state, ms=seconds * 1e3))
        print("\n".join(table([r for r in rows if r["n"] == n and r["ms"] is not None],
                                ["method", "direction", "n", "ms"]).splitlines()[1:]), flush=True)
    return rows


def ratios(rows: list[dict], *, method: str, baseline: str) -> list[dict]:
    """How many times faster `method` is than `baseline` (baseline ms / method ms), per length and direction."""
    rows = [r for r in rows if r["ms"] is not None]
    base = {(r["direction"], r["n"]): r["ms"] for r in rows if r["method"] == baseline}
    return [dict(method=method, baseline=baseline, direction=r["direction"], n=r["n"],
                 speedup=base[(r["direction"], r["n"])] / r["ms"])
            for r in rows if r["method"] == method and (r["direction"], r["n"]) in base]


@torch.no_grad()
def generation_cost(models: dict, lengths, *, new_tokens: int = 8, vocab_size: int = 16, seed: int = 0) -> list[dict]:
    """Time per generated token and bytes kept, after a prompt of each length, for each model.

    models: {name: (model, make_state)} where model(ids, state) continues from state (a KVCache
    through `cache=`, for lectlib's Llama, is adapted by the caller) and state.nbytes() is what
    it keeps. Rows {model, n, ms_per_token, state_bytes}.
    """
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in lengths:
        prompt = torch.randint(0, vocab_size, (1, n), generator=g)
        for name, (model, make_state) in models.items():
            state = make_state()
            logits = model(prompt, state)
            token = logits[:, -1:].argmax(-1)

            def decode():
                nonlocal token
                for _ in range(new_tokens):
                    token = model(token, state)[:, -1:].argmax(-1)

            seconds = profiling.time_fn(decode, repeats=1, warmup=0)
            rows.append(dict(model=name, n=n, ms_per_token=seconds * 1e3 / new_tokens, state_bytes=state.nbytes()))
    return rows


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m lectlib.bench ssm", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (under a minute on a CPU)")
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--dim", type=int, default=None, help="channels D (default 2048 on GPU, 64 on CPU)")
    parser.add_argument("--record", action="store_true", help="record a CPU run too (GPU runs are always recorded)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda":
        lengths = args.lengths or ([512, 2048] if args.quick else LENGTHS)
        methods, dim = ["triton", "parallel", "sequential", "attention"], args.dim or 2048
        pairs = [("triton", "parallel"), ("triton", "sequential"), ("triton", "attention"), ("parallel", "sequential")]
    else:
        lengths = args.lengths or ([256, 1024] if args.quick else [256, 1024, 4096])
        methods, dim = ["parallel", "sequential"], args.dim or 64
        pairs = [("parallel", "sequential")]
    torch.manual_seed(0)
    if device.type == "cpu":
        torch.set_num_threads(1)  # one thread: a shared CPU gives stable numbers only then
    print(f"selective scan benchmark on {device}: N = {lengths}, D = {dim}, d_state = 16, methods {methods}")
    rows = scan_speed(lengths=lengths, methods=methods, dim=dim, device=device, sequential_max=4096)
    speedups = [s for method, baseline in pairs for s in ratios(rows, method=method, baseline=baseline)]
    print(table(speedups, ["method", "baseline", "direction", "n", "speedup"]))
    if device.type == "cuda" or args.record:
        record("ssm", rows, speedups=speedups)
