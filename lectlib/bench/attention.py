"""python -m lectlib.bench attention [--quick] [--record] [--device-run]: attention speed (TFLOP/s) and peak memory.

Methods, measured in the same run: `flash` (lectlib.flash's Triton kernel), `sdpa` (torch SDPA;
on CUDA pinned to its FlashAttention backend), `naive` (lectlib.attention.naive_attention;
skipped where its N x N scores would not fit) and, on CPU, `blockwise`.

FLOPs are the standard count (FlashAttention papers): 4·B·H·N²·D for the forward (two
matmuls), halved when causal, and 2.5 times that for the backward. The GPU sweep keeps
B·N = 16k tokens and H·D = 2048 as the FlashAttention-2 benchmark does, for N = 512 … 16k,
D = 64 and 128, causal and not, in fp16 (bf16 with --dtype bf16). `--quick` is a CPU smoke run
at small sizes (the kernel under Triton's interpreter), in under a minute.

GPU results are recorded to data/results/attention-<device>.json (`--record` records a CPU run too).

`--device-run [--budget-s S] [--tiny]` is the one command of a GPU session (see `device_run`): it
checks the kernel's forward and backward against SDPA (fp16 and bf16, D = 64 and 128, causal and
not, GQA, odd lengths), lets Triton autotune the launch settings, times forward and forward+backward
at N = 1k…16k against SDPA's flash and memory-efficient backends and naive attention (bf16), and
writes data/results/flash_<device>.json after each part. `--tiny` rehearses it on a CPU.
`--compile-only CAP [CAP]` compiles every shipped config for an sm<CAP> GPU without one (`compile_configs`).
"""

import argparse
import json
import os
import subprocess
import sys
from contextlib import nullcontext
from pathlib import Path

import torch

from .. import attention, profiling
from . import RESULTS, device_run, load_results, record, table

LENGTHS = [512, 1024, 2048, 4096, 8192, 16384]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def attention_flops(*, batch: int, heads: int, n: int, head_dim: int, causal: bool, direction: str) -> float:
    """4·B·H·N²·D for the forward, halved when causal; ×2.5 for the backward, ×3.5 for forward+backward."""
    flops = 4 * batch * heads * n * n * head_dim / (2 if causal else 1)
    return flops * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[direction]


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


# SDPA pinned to one backend: `sdpa` is its FlashAttention backend (on CUDA; unpinned on CPU), the
# baseline we claim; `sdpa_mem_efficient` its memory-efficient backend (xFormers' kernel).
SDPA_BACKENDS = {"sdpa": "FLASH_ATTENTION", "sdpa_mem_efficient": "EFFICIENT_ATTENTION"}


def _sdpa_backend(device: torch.device, method: str):
    """The context that pins SDPA to `method`'s backend (nothing for the other methods)."""
    if method not in SDPA_BACKENDS or (method == "sdpa" and device.type != "cuda"):
        return nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[method]))


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


def speed(*, lengths, head_dims, causals, dtype, device, tokens: int, width: int, backward: bool = True,
          methods: dict | None = None, directions=None) -> list[dict]:
    """Rows {method, direction, n, head_dim, causal, batch, heads, ms, tflops, max_diff} for every configuration.

    directions: "fwd", "bwd" (the backward alone) and "fwd+bwd" (default fwd and bwd, or fwd only
    without `backward`); a "fwd+bwd" row also has the peak memory of that step (peak_bytes).
    max_diff is the largest |output - SDPA's output| (the first method's where SDPA is absent). An
    SDPA backend that has no kernel for these inputs, or a method out of GPU memory, gives a row
    with `error` and no time.
    """
    rows = []
    methods = methods or _methods(device)
    directions = directions or (("fwd", "bwd") if backward else ("fwd",))
    for head_dim in head_dims:
        for causal in causals:
            for n in lengths:
                batch, heads = max(1, tokens // n), max(1, width // head_dim)
                g = torch.Generator().manual_seed(0)
                q, k, v = (torch.randn(batch, heads, n, head_dim, generator=g).to(device, dtype)
                           .requires_grad_(directions != ("fwd",)) for _ in range(3))
                grad = torch.randn_like(q)
                config = dict(n=n, head_dim=head_dim, causal=causal, batch=batch, heads=heads)
                done, reference = len(rows), None
                for method, fn in methods.items():
                    if method == "naive" and not _fits(batch, heads, n, dtype, device):
                        continue
                    slow = method == "flash" and device.type == "cpu"  # the interpreter
                    run = lambda: fn(q, k, v, causal=causal)  # noqa: E731
                    step = lambda: torch.autograd.grad(run(), (q, k, v), grad)  # noqa: E731
                    try:
                        with _sdpa_backend(device, method):
                            with torch.no_grad():
                                out = run().float()
                            measured = {}
                            for direction in directions:
                                if direction == "fwd":
                                    measured[direction] = _time(run, device, slow=slow)
                                elif direction == "bwd":
                                    kept = run()
                                    measured[direction] = _time(lambda: torch.autograd.grad(
                                        kept, (q, k, v), grad, retain_graph=True), device, slow=slow)
                                else:
                                    measured[direction] = _time(step, device, slow=slow)
                            # On a CPU the interpreter's memory is invisible to torch (see `memory`).
                            peak = (profiling.peak_memory_bytes(step, device=device)
                                    if "fwd+bwd" in directions and device.type == "cuda" else None)
                    except RuntimeError as error:  # "No available kernel" for this SDPA backend, or out of memory
                        if method not in SDPA_BACKENDS and not isinstance(error, torch.OutOfMemoryError):
                            raise
                        if device.type == "cuda":
                            torch.cuda.empty_cache()
                        rows.append(dict(method=method, direction="fwd", **config, ms=None, tflops=None,
                                         error=str(error).splitlines()[0]))
                        continue
                    if reference is None or method == "sdpa":
                        reference = out
                    for direction, seconds in measured.items():
                        flops = attention_flops(batch=batch, heads=heads, n=n, head_dim=head_dim, causal=causal,
                                                direction=direction)
                        row = dict(method=method, direction=direction, **config, ms=seconds * 1e3,
                                   tflops=flops / seconds / 1e12, output=out)
                        if direction == "fwd+bwd":
                            row["peak_bytes"] = peak
                        rows.append(row)
                for row in rows[done:]:  # differences to SDPA's output, known once every method has run
                    if "output" in row:
                        row["max_diff"] = (row.pop("output") - reference).abs().max().item()
                timed = [r for r in rows[done:] if r["ms"] is not None]
                if timed:
                    print("\n".join(table(timed, ["method", "direction", "n", "head_dim", "causal", "ms", "tflops",
                                                  "max_diff"]).splitlines()[1:]), flush=True)
    return rows


def memory(*, lengths, head_dim: int, heads: int, dtype, device, methods: dict | None = None) -> list[dict]:
    """Rows {method, n, head_dim, heads, peak_bytes}: peak memory of one forward above the inputs.

    Default methods: naive, SDPA and lectlib's kernel on CUDA; on CPU the kernel runs in the
    interpreter's numpy arrays, which torch does not see, so there naive and blockwise attention.
    """
    rows = []
    if methods is None:
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
    """Recorded results that come from a GPU: `--device-run` records (flash_<device>.json, newest
    first, as {environment, rows}) then this benchmark's plain records."""
    return [r for r in device_run_results() + load_results("attention") if r["environment"]["device"] != "cpu"]


def device_run_results(results: Path = RESULTS) -> list[dict]:
    """Each flash_<device>.json as {environment, rows, checks, tuning}: speed rows and memory rows
    (kind="memory") as `speed_figure` and `memory_figure` read them."""
    out = []
    for path in sorted(results.glob("flash_*.json")):
        data = json.loads(path.read_text())
        parts = {name: p.get("result") or {} for name, p in data["parts"].items() if p["status"] == "ok"}
        rows = [r for name, p in parts.items() if name.startswith("speed") for r in p.get("rows", [])]
        rows += [dict(kind="memory", **r) for r in parts.get("memory", {}).get("rows", [])]
        out.append(dict(environment=data["environment"], rows=rows, checks=parts.get("checks", {}).get("rows", []),
                        tuning=parts.get("tuning", {}), parts={n: p["status"] for n, p in data["parts"].items()}))
    return sorted(out, key=lambda r: r["environment"]["date"], reverse=True)


def speed_figure(result: dict, *, direction: str = "fwd", head_dim: int = 128, causal: bool = False):
    """TFLOP/s against N per method, from one recorded result."""
    from .. import viz

    rows = [r for r in result["rows"] if r.get("direction") == direction and r["head_dim"] == head_dim
            and r["causal"] == causal and r.get("tflops") is not None]
    methods = sorted({r["method"] for r in rows})
    lengths = sorted({r["n"] for r in rows})
    by = {(r["method"], r["n"]): r["tflops"] for r in rows}
    env = result["environment"]
    return viz.line_figure(lengths, {m: [by.get((m, n)) for n in lengths] for m in methods}, log_x=True,
                           title=f"{direction}, D={head_dim}, {'causal' if causal else 'not causal'} "
                                 f"({env['device']}, {env['date']})",
                           x_title="sequence length N", y_title="TFLOP/s")


def recorded_figure(result: dict):
    """Chapter 1's view of one recorded GPU result (an item of `gpu_results`): TFLOP/s against N per
    method, for each direction, head dim and causal flag it holds (a slider each; device and date in
    the title). Shows the static twin and the live panel (`viz.explore`)."""
    from .. import viz

    rows = [r for r in result["rows"] if r.get("tflops") is not None]
    controls = {"direction": sorted({r["direction"] for r in rows}), "head_dim": sorted({r["head_dim"] for r in rows}),
                "causal": ["not causal", "causal"]}
    viz.explore(lambda direction, head_dim, causal: speed_figure(result, direction=direction, head_dim=head_dim,
                                                                 causal=causal == "causal"), controls)


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


def check_cases(*, tiny: bool) -> list[dict]:
    """The shapes `check_against_sdpa` runs: every dtype × head dim × causal flag with GQA at an odd
    length (tiny: each value once), then a decode-length query, and end-aligned causal queries with
    one KV head for every query head."""
    dims, n, heads, batch = ((16, 32), 19, 2, 1) if tiny else ((64, 128), 1003, 4, 2)
    grid = [(dtype, d, causal) for dtype in ("fp16", "bf16") for d in dims for causal in (False, True)]
    if tiny:  # the interpreter is slow: each dtype, head dim and causal flag once, not every combination
        grid = [("fp16", dims[0], False), ("bf16", dims[1], True)]
    cases = [dict(dtype=dtype, head_dim=d, causal=causal, batch=batch, heads=heads, kv_heads=heads // 2, n_q=n, n_k=n)
             for dtype, d, causal in grid]
    cases += [dict(dtype="bf16", head_dim=dims[1], causal=True, batch=batch, heads=heads, kv_heads=heads, n_q=1,
                   n_k=2 * n + 3),
              dict(dtype="fp16", head_dim=dims[0], causal=True, batch=batch, heads=heads, kv_heads=1, n_q=n // 2,
                   n_k=2 * n)]
    return cases


def check_against_sdpa(cases: list[dict], *, device, seed: int = 0) -> list[dict]:
    """Forward and gradients of lectlib's kernel and of SDPA, both in the case's dtype, against SDPA in
    fp32 (the oracle): one row per case with both errors, and ok = the kernel's error is at most
    twice SDPA's own plus 1e-3 (FlashAttention's test criterion), forward and every gradient.
    Cases are dicts {dtype, head_dim, causal, batch, heads, kv_heads, n_q, n_k}."""
    from .. import flash

    rows = []
    for i, case in enumerate(cases):
        g = torch.Generator().manual_seed(seed + i)
        q = torch.randn(case["batch"], case["heads"], case["n_q"], case["head_dim"], generator=g)
        k, v = (torch.randn(case["batch"], case["kv_heads"], case["n_k"], case["head_dim"], generator=g) for _ in range(2))
        d_out = torch.randn(q.shape, generator=g).to(device)

        def result(fn, dtype):
            inputs = [t.to(device, dtype).requires_grad_() for t in (q, k, v)]
            out = fn(*inputs, causal=case["causal"])
            return [out.float()] + [t.float() for t in torch.autograd.grad(out, inputs, d_out.to(dtype))]

        want = result(attention.sdpa_attention, torch.float32)
        errors = {name: [(a - b).abs().max().item() for a, b in zip(result(fn, DTYPES[case["dtype"]]), want)]
                  for name, fn in (("flash", flash.flash_attention), ("sdpa", attention.sdpa_attention))}
        row = dict(case, out_error=errors["flash"][0], sdpa_out_error=errors["sdpa"][0],
                   grad_error=max(errors["flash"][1:]), sdpa_grad_error=max(errors["sdpa"][1:]))
        row["ok"] = all(mine <= 2 * theirs + 1e-3 for mine, theirs in zip(errors["flash"], errors["sdpa"]))
        rows.append(row)
        print(table([row], list(row))) if i == 0 else print(table([row], list(row)).splitlines()[1], flush=True)
    return rows


def _tuned_kernels() -> dict:
    from .. import flash

    return {"forward": flash._forward_tuned, "backward_dkdv": flash._backward_dkdv_tuned,
            "backward_dq": flash._backward_dq_tuned}


class default_configs:
    """Within it, every kernel launches with its default (first) config: no tuning, one compile per shape."""

    def __enter__(self):
        self.saved = {name: kernel.configs for name, kernel in _tuned_kernels().items()}
        for kernel in _tuned_kernels().values():
            kernel.configs = kernel.configs[:1]

    def __exit__(self, *exc):
        for name, kernel in _tuned_kernels().items():
            kernel.configs = self.saved[name]


def tuning_choices() -> dict:
    """What the autotuner chose so far: {kernel: [{key, config, ...}]}, key = (N_q, N_k, D, causal, dtypes)."""
    return {name: [dict(key=str(key), config=str(config)) for key, config in kernel.cache.items()]
            for name, kernel in _tuned_kernels().items()}


def ratio_table(rows: list[dict], *, baseline: str = "sdpa") -> list[dict]:
    """The closing note's table: per (N, D, causal), TFLOP/s of lectlib's kernel and of `baseline`,
    forward and forward+backward, and their ratios."""
    by = {(r["method"], r["direction"], r["n"], r["head_dim"], r["causal"]): r["tflops"] for r in rows
          if r.get("tflops") is not None}
    out = []
    for n, d, causal in sorted({key[2:] for key in by}, key=lambda c: (c[1], c[2], c[0])):
        row = dict(n=n, head_dim=d, causal=causal)
        for direction in ("fwd", "fwd+bwd"):
            mine, theirs = by.get(("flash", direction, n, d, causal)), by.get((baseline, direction, n, d, causal))
            row[f"{direction} lectlib"], row[f"{direction} {baseline}"] = mine, theirs
            row[f"{direction} ratio"] = mine / theirs if mine and theirs else None
        out.append(row)
    return out


def device_run_parts(*, tiny: bool, device) -> list[device_run.Part]:
    """Issue 18's measurements in priority order: checks, then speed at D=128 (the target), D=64, memory, tuning."""
    dtype = torch.float32 if tiny else torch.bfloat16  # the interpreter computes in fp32 whatever it loads
    lengths = [32] if tiny else [1024, 2048, 4096, 8192, 16384]
    tokens, width = (32, 32) if tiny else (16384, 2048)
    methods = {"flash": _methods(device)["flash"], "sdpa": attention.sdpa_attention,
               "sdpa_mem_efficient": attention.sdpa_attention, "naive": attention.naive_attention}

    def checks():
        with default_configs():
            rows = check_against_sdpa(check_cases(tiny=tiny), device=device)
        return dict(rows=rows, all_ok=all(r["ok"] for r in rows))

    def speed_at(head_dim):
        return lambda: dict(rows=speed(lengths=lengths, head_dims=[head_dim], causals=[False, True], dtype=dtype,
                                       device=device, tokens=tokens, width=width, methods=methods,
                                       directions=("fwd", "fwd+bwd")),
                            dtype=str(dtype).removeprefix("torch."), tokens=tokens, width=width,
                            flops="4·B·H·N²·D forward, /2 causal, ×3.5 forward+backward (the backward is ×2.5)")

    def memory_part():
        mem_lengths = [32] if tiny else [1024, 2048, 4096, 8192, 16384, 32768]
        return dict(rows=memory(lengths=mem_lengths, head_dim=16 if tiny else 128, heads=2 if tiny else 16,
                                dtype=dtype, device=device))

    big, small = (32, 16) if tiny else (128, 64)
    return [device_run.Part("checks", checks, needs_s=0),
            device_run.Part(f"speed_d{big}", speed_at(big), needs_s=0 if tiny else 60),
            device_run.Part(f"speed_d{small}", speed_at(small), needs_s=0 if tiny else 60),
            device_run.Part("memory", memory_part, needs_s=0 if tiny else 15),
            device_run.Part("tuning", tuning_choices)]


def run_on_device(*, budget_s: float, tiny: bool, out: Path | None = None) -> Path:
    """`--device-run`: run `device_run_parts` under the budget, rewriting flash_<device>.json after
    each part; print the ratio table; return the file's path."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not tiny:
        raise SystemExit("--device-run needs a CUDA GPU; on a CPU rehearse it with --tiny")
    path = Path(out or RESULTS) / f"flash_{device_run.device_slug()}.json"
    parts = {}

    def write(name, record):
        parts[name] = record
        return device_run.write_json(path, dict(benchmark="flash", tiny=tiny, budget_s=budget_s, parts=parts))

    statuses = device_run.run_parts(device_run_parts(tiny=tiny, device=device), device_run.Budget(budget_s), write)
    rows = [r for name, p in parts.items() if name.startswith("speed") and p["status"] == "ok"
            for r in p["result"]["rows"]]
    print(f"\nparts: {statuses}")
    if parts["checks"]["status"] == "ok":
        print(f"every check within 2x SDPA's own error: {parts['checks']['result']['all_ok']}")
    print(f"\nlectlib.flash against SDPA's FlashAttention backend, TFLOP/s ({path.name}):")
    print(table(ratio_table(rows), ["n", "head_dim", "causal", "fwd lectlib", "fwd sdpa", "fwd ratio",
                                    "fwd+bwd lectlib", "fwd+bwd sdpa", "fwd+bwd ratio"]))
    return path


def compile_configs(capability: int, *, head_dims=(64, 128), dtype: str = "bf16", stop_after: str | None = None):
    """Compile every kernel in every shipped config for an NVIDIA GPU sm<capability> (80: A100, 90: H100)
    without one: rows {kernel, head_dim, config, shared_bytes}. `stop_after` ("ttgir") stops at
    that stage (Triton GPU IR: layouts, pipelining) to save the slow LLVM and ptxas stages.
    Needs a process started with TRITON_INTERPRET=0 (see `compile_in_subprocess`)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from .. import flash

    if flash.INTERPRET:
        raise RuntimeError("compile_configs: Triton's interpreter is on; start Python with TRITON_INTERPRET=0")

    class Reached(Exception):
        pass

    def stop_hook(backend=None, stages=None, options=None, language=None, capability=None):
        if backend is None:  # asked for a cache key
            return f"stop-after-{stop_after}", stop_after
        compile_stage = stages[stop_after]

        def stage(module, metadata):
            compile_stage(module, metadata)
            raise Reached
        stages[stop_after] = stage

    pointers = {"Q": dtype, "K": dtype, "V": dtype, "O": dtype, "DO": dtype,
                "LSE": "fp32", "DELTA": "fp32", "DQ": "fp32", "DK": "fp32", "DV": "fp32"}
    floats = {"qk_scale", "scale"}
    rows = []
    triton.knobs.runtime.add_stages_inspection_hook = stop_hook if stop_after else None
    try:
        for name, tuned in _tuned_kernels().items():
            kernel = tuned.fn
            for head_dim in head_dims:
                for config in tuned.configs:
                    constants = dict(HEAD_DIM=head_dim, BLOCK_D=flash._block_d(head_dim), CAUSAL=True, UPCAST=False,
                                     **config.kwargs)
                    if "STEP" in kernel.arg_names:
                        constants["STEP"] = flash._block_step
                    signature = {a: "constexpr" if a in constants else f"*{pointers[a]}" if a in pointers
                                 else "fp32" if a in floats else "i32" for a in kernel.arg_names}
                    row = dict(kernel=name, head_dim=head_dim, capability=capability, **config.kwargs,
                               num_warps=config.num_warps, num_stages=config.num_stages)
                    try:
                        compiled = triton.compile(ASTSource(kernel, signature, constants),
                                                  target=GPUTarget("cuda", capability, 32),
                                                  options=dict(num_warps=config.num_warps,
                                                               num_stages=config.num_stages))
                        row["shared_bytes"] = compiled.metadata.shared
                    except Reached:
                        row["shared_bytes"] = None
                    rows.append(row)
    finally:
        triton.knobs.runtime.add_stages_inspection_hook = None
    return rows


def compile_in_subprocess(capabilities, *, head_dims=(64, 128), stop_after: str | None = None) -> list[dict]:
    """Run `compile_configs` for each capability in its own fresh Python with TRITON_INTERPRET=0, all at
    once; return every row (raises, with the compiler's message, if one fails)."""
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, TRITON_INTERPRET="0", PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = ("import json; from lectlib.bench import attention; "
            "print(json.dumps(attention.compile_configs({}, head_dims={}, stop_after={!r})))")
    runs = [subprocess.Popen([sys.executable, "-c", code.format(cap, tuple(head_dims), stop_after)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for cap in capabilities]
    rows = []
    for cap, run in zip(capabilities, runs):
        out, err = run.communicate()
        if run.returncode:
            raise RuntimeError(f"compiling for sm{cap} failed:\n{err[-3000:]}")
        rows += json.loads(out.strip().splitlines()[-1])
    return rows


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m lectlib.bench attention", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small CPU-sized run (the kernel under the interpreter)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="fp16 on GPU, fp32 on CPU by default")
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--head-dims", type=int, nargs="+", default=None)
    parser.add_argument("--record", action="store_true", help="record a CPU run too (GPU runs are always recorded)")
    parser.add_argument("--device-run", action="store_true", help="a GPU session's one command (see the module doc)")
    parser.add_argument("--budget-s", type=float, default=480, help="--device-run: seconds it may take (parts that "
                        "would not fit are skipped)")
    parser.add_argument("--tiny", action="store_true", help="--device-run rehearsed on a CPU with tiny sizes")
    parser.add_argument("--out", default=None, help="--device-run: folder of the JSON (default data/results)")
    parser.add_argument("--compile-only", type=int, nargs="+", metavar="CAP", default=None,
                        help="compile every shipped config for sm<CAP> (80 90) on this machine, GPU or not")
    args = parser.parse_args(argv)
    if args.device_run:
        run_on_device(budget_s=args.budget_s, tiny=args.tiny, out=args.out)
        return
    if args.compile_only:
        print(table(compile_in_subprocess(args.compile_only), ["capability", "kernel", "head_dim", "BLOCK_M", "BLOCK_N",
                                                                "num_warps", "num_stages", "shared_bytes"]))
        return
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
