"""Sparse attention: each query attends to a fixed pattern of keys, or to key blocks it routes to.

Patterns (all causal, queries end-aligned to the keys as in `lectlib.attention`; parameters by name):
- "sliding": keys i-window+1 .. i (Longformer, Beltagy et al. 2020; Mistral 7B), plus the first
  `global_tokens` keys, which every query sees;
- "strided": the last `stride` keys and every stride-th key before them (Child et al. 2019, eq. 4,
  its two heads' sets in one mask);
- "fixed": the keys of the query's own block of `stride` and the last `summary` keys of every
  earlier block (Child et al. 2019, eq. 5);
- "dilated": for each segment length w and dilation rate r (LongNet, Ding et al. 2023), the keys
  of the query's segment of w whose distance to the query is a multiple of r; the mask is the union
  over the (w, r) pairs.

`pattern_mask` draws a pattern as an (N_q, N_k) bool mask (the oracle: naive attention with that
mask). `sparse_attention` computes the same attention from each query's gathered keys only, in
O(N · keys per query) time and memory, so strided attention with stride √N costs O(N√N).

Sliding window in the three forms the lectures compare: `sliding_window_full` (an N × N mask),
`sliding_window_loop` (one query at a time) and `sliding_window_chunks` (overlapping chunks).

`moba_attention` is training-free block routing (MoBA, Lu et al. 2025): each query scores the
mean-pooled key of every earlier block of keys and attends to its top-k blocks and its own.
"""

import math

import torch

from .attention import causal_mask, check_qkv, repeat_kv

PATTERNS = ("sliding", "strided", "fixed", "dilated")
_PARAMS = {"sliding": {"window", "global_tokens"}, "strided": {"stride"}, "fixed": {"stride", "summary"},
           "dilated": {"segments", "rates"}}


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_pattern(pattern: str, params: dict) -> dict:
    """Validate a pattern's parameters; return them with defaults filled in. ValueError names the bad one."""
    if pattern not in PATTERNS:
        raise ValueError(f"pattern must be one of {PATTERNS}, got {pattern!r}")
    unknown = set(params) - _PARAMS[pattern]
    if unknown:
        raise ValueError(f"pattern {pattern!r} takes parameters {sorted(_PARAMS[pattern])}, got {sorted(unknown)}")
    p = dict(params)
    if pattern == "sliding":
        _positive_int("window", p.get("window"))
        p.setdefault("global_tokens", 0)
        if isinstance(p["global_tokens"], bool) or not isinstance(p["global_tokens"], int) or p["global_tokens"] < 0:
            raise ValueError(f"global_tokens must be an int >= 0, got {p['global_tokens']!r}")
    elif pattern == "strided":
        _positive_int("stride", p.get("stride"))
    elif pattern == "fixed":
        _positive_int("stride", p.get("stride"))
        p.setdefault("summary", 1)
        _positive_int("summary", p["summary"])
        if p["summary"] > p["stride"]:
            raise ValueError(f"summary must be at most stride={p['stride']}, got {p['summary']}")
    else:
        segments, rates = p.get("segments"), p.get("rates")
        if not isinstance(segments, (list, tuple)) or not segments:
            raise ValueError(f"segments must be a non-empty list of segment lengths, got {segments!r}")
        if not isinstance(rates, (list, tuple)) or len(rates) != len(segments):
            raise ValueError(f"rates must be a list of dilation rates, one per segment length {list(segments)}, got {rates!r}")
        for w, r in zip(segments, rates):
            _positive_int("segments", w)
            _positive_int("rates", r)
            if r > w:
                raise ValueError(f"rates: dilation rate {r} exceeds its segment length {w}")
        p["segments"], p["rates"] = tuple(segments), tuple(rates)
    return p


def _allowed(pattern: str, p: dict, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
    """Whether query position i may see key position j (broadcast), causality included: the one rule per pattern."""
    d = i - j
    seen = (j >= 0) & (d >= 0)
    if pattern == "sliding":
        rule = (d < p["window"]) | (j < p["global_tokens"])
    elif pattern == "strided":
        rule = (d < p["stride"]) | (d % p["stride"] == 0)
    elif pattern == "fixed":
        l = p["stride"]
        rule = (i // l == j // l) | (j % l >= l - p["summary"])
    else:
        rule = torch.zeros_like(seen)
        for w, r in zip(p["segments"], p["rates"]):
            rule = rule | ((i // w == j // w) & (d % r == 0))
    return seen & rule


def pattern_mask(pattern: str, n_q: int, n_k: int | None = None, *, device=None, **params) -> torch.Tensor:
    """(N_q, N_k) bool: True where query i (at position i + N_k - N_q) may see key j under `pattern`."""
    p = check_pattern(pattern, params)
    n_k = n_q if n_k is None else n_k
    _positive_int("n_q", n_q)
    if n_k < n_q:
        raise ValueError(f"n_k must be >= n_q={n_q} (queries are the last n_q positions), got {n_k}")
    i = torch.arange(n_k - n_q, n_k, device=device)[:, None]
    j = torch.arange(n_k, device=device)[None, :]
    return _allowed(pattern, p, i, j)


def keys_share(mask: torch.Tensor) -> float:
    """Share of the causally visible (query, key) pairs that a mask (N_q, N_k) keeps."""
    return mask.sum().item() / causal_mask(*mask.shape).sum().item()


def _candidates(pattern: str, p: dict, i: torch.Tensor, n_k: int) -> torch.Tensor:
    """(N_q, C) key positions that contain every key query positions i (N_q, 1) may see (and others, to be filtered)."""
    if pattern == "sliding":
        return torch.cat([i - torch.arange(p["window"], device=i.device),
                          torch.arange(p["global_tokens"], device=i.device).expand(len(i), -1)], 1)
    if pattern == "strided":
        s = p["stride"]
        return torch.cat([i - torch.arange(s, device=i.device), i - s * torch.arange(1, n_k // s + 2, device=i.device)], 1)
    if pattern == "fixed":
        l, c = p["stride"], p["summary"]
        own = i // l * l + torch.arange(l, device=i.device)
        ends = (torch.arange(n_k // l + 1, device=i.device)[:, None] * l + torch.arange(l - c, l, device=i.device)).flatten()
        return torch.cat([own, ends.expand(len(i), -1)], 1)
    cols = []
    for w, r in zip(p["segments"], p["rates"]):
        start = i // w * w
        cols.append(start + (i - start) % r + r * torch.arange(math.ceil(w / r), device=i.device))
    return torch.cat(cols, 1)


def pattern_index(pattern: str, n_q: int, n_k: int | None = None, *, device=None, **params):
    """Each query's keys as (index (N_q, C) long, valid (N_q, C) bool): the positions of `pattern_mask`'s
    True entries per row, padded; built without the N_q × N_k mask, in O(N · C)."""
    p = check_pattern(pattern, params)
    n_k = n_q if n_k is None else n_k
    if n_k < n_q:
        raise ValueError(f"n_k must be >= n_q={n_q} (queries are the last n_q positions), got {n_k}")
    i = torch.arange(n_k - n_q, n_k, device=device)[:, None]
    j = _candidates(pattern, p, i, n_k).sort(dim=1).values
    valid = _allowed(pattern, p, i, j) & (j < n_k)
    valid[:, 1:] &= j[:, 1:] != j[:, :-1]  # a key listed twice (two rules, two segments) counts once
    # Valid keys first in each row, then drop the columns no row needs: C = the most keys any query sees.
    order = torch.where(valid, j, n_k).argsort(dim=1)[:, :max(1, int(valid.sum(1).max()))]
    return j.gather(1, order).clamp(0, n_k - 1), valid.gather(1, order)


def gathered_attention(q, k, v, index, valid, *, scale=None, query_block: int = 256) -> torch.Tensor:
    """Attention of each query over its own keys only: (B, H, N_q, D).

    index, valid (N_q, C): query i attends to keys index[i, c] where valid[i, c]. Keys are
    gathered a block of `query_block` queries at a time, (B, H_kv, block, C, D), so time and
    memory are O(N_q · C · D) instead of O(N_q · N_k · D). A query with no valid key gets 0.
    """
    check_qkv(q, k, v)
    if index.shape != valid.shape or index.shape[0] != q.shape[2]:
        raise ValueError(f"index and valid must be (N_q={q.shape[2]}, C), got {tuple(index.shape)} and {tuple(valid.shape)}")
    b, h, n_q, d = q.shape
    h_kv = k.shape[1]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    out = torch.empty_like(q)
    for s in range(0, n_q, query_block):
        e = min(n_q, s + query_block)
        idx, ok = index[s:e].to(q.device), valid[s:e].to(q.device)
        kg, vg = (x.index_select(2, idx.flatten()).unflatten(2, idx.shape) for x in (k, v))  # (B, H_kv, block, C, D)
        qg = q[:, :, s:e].reshape(b, h_kv, h // h_kv, e - s, d)  # query heads grouped by their KV head
        scores = torch.einsum("bgrqd,bgqcd->bgrqc", qg.float(), kg.float()) * scale
        scores = scores.masked_fill(~ok, float("-inf"))
        p = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no key: all -inf -> nan -> 0
        out[:, :, s:e] = torch.einsum("bgrqc,bgqcd->bgrqd", p, vg.float()).reshape(b, h, e - s, d).to(q.dtype)
    return out


def sparse_attention(q, k, v, pattern: str, *, causal: bool = True, scale=None, **params) -> torch.Tensor:
    """Attention under `pattern` (see the module docstring) from gathered keys: (B, H, N_q, D).

    Equals naive attention with `pattern_mask(pattern, N_q, N_k, **params)` as its mask.
    """
    check_qkv(q, k, v)
    if not causal:
        raise ValueError("sparse patterns here are causal: call with causal=True")
    index, valid = pattern_index(pattern, q.shape[2], k.shape[2], device=q.device, **params)
    return gathered_attention(q, k, v, index, valid, scale=scale)


def pattern_attention(pattern: str, **params):
    """An attention function (q, k, v, *, causal, scale) for `Llama.set_attention`: `sparse_attention` under `pattern`."""
    check_pattern(pattern, params)

    def attend(q, k, v, *, causal=True, scale=None):
        return sparse_attention(q, k, v, pattern, causal=causal, scale=scale, **params)

    return attend


# ---------------------------------------------------------------------------------------------
# Sliding window, three ways. Query i (at position i + N_k - N_q) sees keys i - window + 1 .. i.

def _check_window(q, k, v, window):
    check_qkv(q, k, v)
    _positive_int("window", window)
    if k.shape[2] < q.shape[2]:
        raise ValueError(f"k must hold at least as many positions as q, got {k.shape[2]} < {q.shape[2]}")


def sliding_window_full(q, k, v, *, window: int, scale=None) -> torch.Tensor:
    """Sliding window as a full (N_q, N_k) mask over dense scores: O(N²) time and memory. (B, H, N_q, D)."""
    _check_window(q, k, v, window)
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    mask = pattern_mask("sliding", q.shape[2], k.shape[2], device=q.device, window=window)
    scores = (q.float() @ k.float().transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    return (torch.softmax(scores, dim=-1) @ v.float()).to(q.dtype)


def sliding_window_loop(q, k, v, *, window: int, scale=None) -> torch.Tensor:
    """Sliding window one query at a time over its own `window` keys: O(N·w) work, in N small steps. (B, H, N_q, D)."""
    _check_window(q, k, v, window)
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    offset = k.shape[2] - q.shape[2]
    out = torch.empty_like(q)
    for i in range(q.shape[2]):
        lo, hi = max(0, i + offset - window + 1), i + offset + 1
        p = torch.softmax(q[:, :, i:i + 1].float() @ k[:, :, lo:hi].float().transpose(-1, -2) * scale, dim=-1)
        out[:, :, i:i + 1] = (p @ v[:, :, lo:hi].float()).to(q.dtype)
    return out


def sliding_chunk_mask(q_start: int, q_end: int, k_start: int, window: int, *, device=None) -> torch.Tensor:
    """(q_end - q_start, q_end - k_start) bool: which keys k_start .. q_end - 1 the queries at positions
    q_start .. q_end - 1 see in a causal window of `window` (0 <= i - j < window): one chunk's band."""
    i = torch.arange(q_start, q_end, device=device)[:, None]
    j = torch.arange(k_start, q_end, device=device)[None, :]
    return (j <= i) & (j > i - window)


def sliding_window_chunks(q, k, v, *, window: int, scale=None) -> torch.Tensor:
    """Sliding window over overlapping chunks (Longformer's "sliding chunks"): (B, H, N_q, D).

    Queries go in chunks of `window`; a chunk's keys are its own positions and the `window` - 1
    before it, so each chunk is a (w, 2w - 1) score block with a band mask: O(N·w) time and memory
    in N/w vectorized steps.
    """
    _check_window(q, k, v, window)
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    n_q, n_k = q.shape[2], k.shape[2]
    offset = n_k - n_q
    out = torch.empty_like(q)
    for s in range(0, n_q, window):
        e = min(n_q, s + window)
        lo = max(0, s + offset - window + 1)
        band = sliding_chunk_mask(s + offset, e + offset, lo, window, device=q.device)
        scores = (q[:, :, s:e].float() @ k[:, :, lo:e + offset].float().transpose(-1, -2) * scale).masked_fill(~band, float("-inf"))
        out[:, :, s:e] = (torch.softmax(scores, dim=-1) @ v[:, :, lo:e + offset].float()).to(q.dtype)
    return out


# ---------------------------------------------------------------------------------------------
# Block routing (MoBA).

def _check_routing(block_size, top_k):
    _positive_int("block_size", block_size)
    _positive_int("top_k", top_k)


def moba_mask(q, k, *, block_size: int, top_k: int, scale=None) -> torch.Tensor:
    """(B, H, N_q, N_k) bool: the keys each query attends to under MoBA routing (Lu et al. 2025, eq. 4-6).

    Keys are cut into blocks of `block_size`; query i scores each block b that ends before its own
    by q_i · mean(k_b) and keeps the top_k - 1 best, plus its own block (causally): at most
    top_k · block_size keys. q (B, H, N_q, D), k (B, H_kv, N_k, D) (GQA: a KV head's blocks, each
    query head routes on its own).
    """
    _check_routing(block_size, top_k)
    n_q, n_k = q.shape[2], k.shape[2]
    k = repeat_kv(k, q.shape[1] // k.shape[1])
    n_blocks = math.ceil(n_k / block_size)
    pad = n_blocks * block_size - n_k
    sums = torch.nn.functional.pad(k.float(), (0, 0, 0, pad)).unflatten(2, (n_blocks, block_size)).sum(3)
    counts = (n_k - block_size * torch.arange(n_blocks, device=k.device)).clamp(max=block_size)  # the last may be short
    pooled = sums / counts[:, None]  # (B, H, n_blocks, D): each block's mean key
    gate = q.float() @ pooled.transpose(-1, -2)  # (B, H, N_q, n_blocks); the scale does not change the ranking
    own = (torch.arange(n_k - n_q, n_k, device=q.device) // block_size)[:, None]  # each query's block
    blocks = torch.arange(n_blocks, device=q.device)[None, :]
    gate = gate.masked_fill(blocks >= own, float("-inf"))  # only whole earlier blocks compete
    chosen = (blocks == own).expand_as(gate)
    if top_k > 1 and n_blocks > 1:
        best = gate.topk(min(top_k - 1, n_blocks), dim=-1)
        picked = torch.zeros_like(gate, dtype=torch.bool).scatter(-1, best.indices, best.values > float("-inf"))
        chosen = chosen | picked
    token_block = torch.arange(n_k, device=q.device) // block_size
    return chosen[..., token_block] & causal_mask(n_q, n_k, q.device)


def moba_attention(*, block_size: int, top_k: int, query_block: int = 512):
    """An attention function (q, k, v, *, causal, scale) for `Llama.set_attention`: MoBA block routing.

    Computes each block of `query_block` queries densely under its `moba_mask` rows, so it shows
    the quality of routing, not its speed (that needs a kernel that skips unchosen blocks).
    """
    _check_routing(block_size, top_k)
    _positive_int("query_block", query_block)

    def attend(q, k, v, *, causal=True, scale=None):
        check_qkv(q, k, v)
        if not causal:
            raise ValueError("moba_attention is causal: call it with causal=True")
        n_rep = q.shape[1] // k.shape[1]
        scale_ = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        n_q, n_k = q.shape[2], k.shape[2]
        kr, vr = repeat_kv(k, n_rep).float(), repeat_kv(v, n_rep).float()
        out = torch.empty_like(q)
        for s in range(0, n_q, query_block):
            e = min(n_q, s + query_block)
            # The rows s..e of the routing mask: queries s..e against all keys, as positions n_k - n_q + s ...
            mask = moba_mask(q[:, :, s:e], k[:, :, :n_k - n_q + e], block_size=block_size, top_k=top_k)
            keys = n_k - n_q + e
            scores = (q[:, :, s:e].float() @ kr[:, :, :keys].transpose(-1, -2) * scale_).masked_fill(~mask, float("-inf"))
            out[:, :, s:e] = (torch.softmax(scores, dim=-1) @ vr[:, :, :keys]).to(q.dtype)
        return out

    return attend


def moba_share(n: int, *, block_size: int, top_k: int) -> float:
    """Share of the causally visible (query, key) pairs MoBA keeps in a sequence of n tokens (queries = keys)."""
    _check_routing(block_size, top_k)
    i = torch.arange(n)
    kept = (i % block_size + 1) + torch.clamp(i // block_size, max=top_k - 1) * block_size
    return kept.sum().item() / (n * (n + 1) / 2)


def moba_recall(q: torch.Tensor, k: torch.Tensor, *, block_size: int, top_k: int, top_keys: int) -> float:
    """Share of each query's true top-`top_keys` keys that MoBA's routing (`moba_mask`) keeps: how well a
    block's mean key stands in for its best key. Comparable with Quest's page bound at equal blocks
    (`lectlib.quest.topk_recall` with pages = top_k, page_size = block_size). q (B, H, n, D) are the
    last n of the N keys k (B, H_kv, N, D)."""
    from .quest import top_key_recall

    _positive_int("top_keys", top_keys)
    return top_key_recall(moba_mask(q, k, block_size=block_size, top_k=top_k), q, k, top_keys)


# ---------------------------------------------------------------------------------------------
# Quality without training: SmolLM2 with each pattern in every layer.

def variants(window: int = 256) -> dict[str, tuple]:
    """name -> (attention function or None for full attention, share(n) of the causal keys it keeps).

    Sizes scale with `window`, so each family is shown at a few shares of the keys: sliding
    windows of w and 4w (with and without 4 global tokens, the attention sink of chapter 4),
    strided and fixed with stride w/4, dilated with LongNet's geometric segments w/2 .. 8w, and
    MoBA with blocks of w/2 and 2 or 4 blocks per query.
    """
    def share(pattern, **p):
        return lambda n: keys_share(pattern_mask(pattern, n, **p))

    def routing(b, k):
        return moba_attention(block_size=b, top_k=k), lambda n: moba_share(n, block_size=b, top_k=k)

    s = max(1, window // 4)
    table = {"full": (None, lambda n: 1.0)}
    for name, pattern, p in [
        (f"sliding {window}", "sliding", dict(window=window)),
        (f"sliding {window} + 4 global", "sliding", dict(window=window, global_tokens=4)),
        (f"sliding {4 * window} + 4 global", "sliding", dict(window=4 * window, global_tokens=4)),
        (f"strided {s}", "strided", dict(stride=s)),
        (f"fixed {window}, {s} summary", "fixed", dict(stride=window, summary=s)),
        (f"dilated {window // 2}..{8 * window}", "dilated", dict(segments=[window // 2, 2 * window, 8 * window], rates=[1, 4, 16])),
    ]:
        table[name] = (pattern_attention(pattern, **p), share(pattern, **p))
    for k in (2, 4):
        table[f"MoBA {window // 2} x {k}"] = routing(window // 2, k)
    return table


def quality(model, tokenizer, *, n: int, passkey_length: int, depths, trials: int, window: int = 256,
            start: int = 300_000, names=None, progress: bool = True, on_row=None) -> list[dict]:
    """Rows {variant, share, ppl, ppl_late, passkey, passkey_share}: SmolLM2 with each of `variants(window)`
    in every layer, no training, beside full attention.

    ppl: perplexity of n tokens of the KJV from token `start` (well past Genesis 1, which the
    model has memorised); ppl_late: over the second half, whose queries have the most keys to
    lose. passkey: retrieval accuracy (`lectlib.evals.passkey_accuracy`) at `passkey_length`
    tokens over `depths` x `trials`. share: the share of causal keys kept at n (and at the
    passkey length). `on_row(rows)` is called after each variant (a recording saves progress
    there). The model's own attention is restored afterwards.
    """
    from tqdm.auto import tqdm

    from . import data, evals
    from .attention import sdpa_attention

    table = variants(window)
    names = list(table) if names is None else names
    ids = data.window(tokenizer, n, start=start).to(next(model.parameters()).device)
    rows = []
    try:
        for name in tqdm(names, desc="variants", disable=not progress):
            fn, share = table[name]
            model.set_attention(fn or sdpa_attention)
            nll = evals.token_nlls(model, ids)
            cells = evals.passkey_accuracy(model, tokenizer, [passkey_length], list(depths), trials=trials, progress=False)
            rows.append({"variant": name, "share": share(n), "ppl": math.exp(nll.mean().item()),
                         "ppl_late": math.exp(nll[n // 2:].mean().item()),
                         "passkey": sum(c["accuracy"] for c in cells) / len(cells),
                         "passkey_share": share(cells[0]["tokens"])})
            if on_row is not None:
                on_row(rows)
    finally:
        model.set_attention(sdpa_attention)
    return rows


def main(argv=None) -> None:
    """python -m lectlib.sparse [--n N] [--passkey-length L] ... [--names ...] [--out F]: record `quality` to data/results/F.

    Runs with different --names and --out (sparse_quality_*.json) split the variants over processes."""
    import argparse
    import json

    from . import models, runtime
    from .bench import RESULTS, environment, table as text_table

    parser = argparse.ArgumentParser(prog="python -m lectlib.sparse", description=main.__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=4096)
    parser.add_argument("--passkey-length", type=int, default=2048)
    parser.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9])
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--names", nargs="+", default=None, help="variants to run (default: all of `variants`)")
    parser.add_argument("--out", default="sparse_quality.json", help="file name under data/results (sparse_quality*.json)")
    args = parser.parse_args(argv)
    model, tok = models.load(device=runtime.device())
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / args.out

    def save(rows):
        path.write_text(json.dumps({"experiment": "sparse quality", "environment": environment(), "settings": vars(args),
                                    "model": "SmolLM2-135M-Instruct", "rows": rows}, indent=1))
        print(f"recorded {len(rows)} rows to {path}", flush=True)

    rows = quality(model, tok, n=args.n, passkey_length=args.passkey_length, depths=args.depths, trials=args.trials,
                   window=args.window, names=args.names, on_row=save)
    print(text_table(rows, list(rows[0])))


if __name__ == "__main__":
    main()
