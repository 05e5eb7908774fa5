"""Measuring time and peak memory of a function, on CPU and GPU alike.

Peak memory on a GPU is CUDA's own high-water mark. On a CPU torch keeps no such counter, so
the torch profiler records every allocation and free and the peak is replayed from them.
`forward_time_parts` splits one forward of lectlib's Llama into attention, projections, MLP and
output layer with module hooks, beside `llama_forward_flops`, the operation count of each part.
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


def llama_forward_flops(config, n: int) -> dict[str, int]:
    """Floating-point operations of one causal forward of n tokens through a Llama `config`, per part.

    A multiply-add counts 2. attention: QKᵀ and PV over the N(N+1)/2 (query, key) pairs a causal mask
    keeps, 2·D each per head; projections: q, k, v, o; mlp: SwiGLU's three matrices; output: the
    vocabulary head over every position. Norms, RoPE and softmax are left out (O(N·dim) each).
    """
    if n <= 0:
        raise ValueError(f"n (tokens) must be positive, got {n}")
    c = config
    per_layer_attention = 2 * 2 * c.head_dim * c.n_heads * n * (n + 1) // 2
    per_layer_projections = 2 * n * c.dim * (2 * c.n_heads * c.head_dim + 2 * c.n_kv_heads * c.head_dim)
    per_layer_mlp = 2 * n * 3 * c.dim * c.hidden_dim
    return {"attention": c.n_layers * per_layer_attention, "projections": c.n_layers * per_layer_projections,
            "mlp": c.n_layers * per_layer_mlp, "output": 2 * n * c.dim * c.vocab_size}


@torch.no_grad()
def forward_time_parts(model, input_ids: torch.Tensor) -> dict[str, float]:
    """Seconds of one forward of lectlib's Llama over input_ids (B, N), per part, as `llama_forward_flops` splits it.

    attention: the attention function itself (scores, softmax, PV), timed by wrapping each layer's
    attn_fn; projections: the rest of each attention block (q, k, v, o and RoPE); mlp: each block's
    MLP; output: the vocabulary head; other: embeddings, norms and residual adds (total minus the parts).
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids must be a (B, N) tensor with N >= 1, got "
                         f"{tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__}")
    device = input_ids.device
    spent = {"attention": 0.0, "attention block": 0.0, "mlp": 0.0, "output": 0.0}
    started: dict[int, float] = {}

    def clock(part):
        def before(module, args):
            _sync(device)
            started[id(module)] = time.perf_counter()

        def after(module, args, output):
            _sync(device)
            spent[part] += time.perf_counter() - started.pop(id(module))
        return before, after

    def timed(attn_fn):
        def attention(q, k, v, **kwargs):
            _sync(device)
            start = time.perf_counter()
            out = attn_fn(q, k, v, **kwargs)
            _sync(device)
            spent["attention"] += time.perf_counter() - start
            return out
        return attention

    parts = [(block.self_attn, "attention block") for block in model.layers] + \
            [(block.mlp, "mlp") for block in model.layers] + [(model.lm_head, "output")]
    handles = []
    for module, part in parts:
        before, after = clock(part)
        handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    saved = [block.self_attn.attn_fn for block in model.layers]
    for block in model.layers:
        block.self_attn.attn_fn = timed(block.self_attn.attn_fn)
    try:
        _sync(device)
        start = time.perf_counter()
        model(input_ids)
        _sync(device)
        total = time.perf_counter() - start
    finally:
        for handle in handles:
            handle.remove()
        for block, attn_fn in zip(model.layers, saved):
            block.self_attn.attn_fn = attn_fn
    projections = spent.pop("attention block") - spent["attention"]
    result = {"attention": spent["attention"], "projections": projections, "mlp": spent["mlp"], "output": spent["output"]}
    result["other"] = total - sum(result.values())
    result["total"] = total
    return result
