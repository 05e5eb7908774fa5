"""Attention sinks and streaming (Xiao et al. 2023, "Efficient Streaming Language Models with
Attention Sinks"): where attention goes, and what a bounded KV cache costs in perplexity and time.

Three parts, used by the chapter and its tests:
- discovery: `attention_weights` records every layer's attention (B = 1) with a recording
  attention function; `attention_mass`, `sink_scores` and `sink_rate` (Gu et al. 2024, "When
  Attention Sink Emerges") summarize it;
- streaming perplexity: `stream` runs a text token by token through a `lectlib.kv` cache (what a
  deployment does); `sink_window_nlls` computes the same numbers in one masked pass (exact, and
  much faster on a CPU); `recompute_nlls` is the sliding window with recomputation;
  `sink_profile` asks of any model whether it has a sink and whether streaming needs it;
- cost: `fill` a cache to a given stream length and `time_per_token`.
"""

import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .attention import attention_probs, check_qkv, repeat_kv
from .kv import POSITION_MODES, KVCache
from .positions import apply_rope, rope_parameters


def _check_ids(input_ids, least: int = 2) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a (1, N) tensor of token ids, got {shape}")
    if input_ids.shape[1] < least:
        raise ValueError(f"input_ids must hold at least {least} tokens, got {input_ids.shape[1]}")


class _attention_swapped:
    """Install attention functions per layer for the duration of a `with` block, then restore."""

    def __init__(self, model, make_fn):
        self.model, self.make_fn = model, make_fn

    def __enter__(self):
        layers = self.model.layers
        self.saved = [block.self_attn.attn_fn for block in layers]
        for i, block in enumerate(layers):
            block.self_attn.attn_fn = self.make_fn(i)

    def __exit__(self, *exc):
        for block, fn in zip(self.model.layers, self.saved):
            block.self_attn.attn_fn = fn


# ---------------------------------------------------------------------------------------------
# Discovery: where attention goes.

@dataclass
class AttentionRecord:
    """weights[l]: (H, N, N) attention of layer l (rows: queries, sum to 1 over visible keys);
    value_norms[l]: (H_kv, N) ‖v_j‖ of every token's value in each KV head."""

    weights: dict[int, torch.Tensor]
    value_norms: dict[int, torch.Tensor]


@torch.no_grad()
def attention_weights(model, input_ids: torch.Tensor, *, layers=None) -> AttentionRecord:
    """Run `model` on `input_ids` (1, N) and record P = softmax(QKᵀ/√D + causal mask) per layer.

    The recording attention function materializes P, (H, N, N) per layer: keep N to a few hundred.
    """
    _check_ids(input_ids, least=1)
    wanted = set(range(model.config.n_layers) if layers is None else layers)
    weights, norms = {}, {}

    def recorder(layer):
        def attend(q, k, v, *, causal=False, scale=None):
            check_qkv(q, k, v)
            p = attention_probs(q, k, causal=causal, scale=scale)  # (1, H, N, N), fp32
            if layer in wanted:
                weights[layer] = p[0].to(q.dtype).cpu()
                norms[layer] = v[0].norm(dim=-1).cpu()
            return (p @ repeat_kv(v, q.shape[1] // k.shape[1]).to(p.dtype)).to(q.dtype)
        return attend

    with _attention_swapped(model, recorder):
        model(input_ids)
    return AttentionRecord(weights, norms)


def _stack(weights) -> torch.Tensor:
    """dict {layer: (H, N, N)} or a tensor (L, H, N, N) -> (L, H, N, N)."""
    if isinstance(weights, dict):
        weights = torch.stack([weights[i] for i in sorted(weights)])
    if weights.dim() != 4 or weights.shape[-1] != weights.shape[-2]:
        raise ValueError(f"weights must be (L, H, N, N) or a dict of (H, N, N), got {tuple(weights.shape)}")
    return weights


def attention_mass(weights, keys, *, first_query: int = 16) -> torch.Tensor:
    """(L,) mean attention that queries t >= first_query put on the key set `keys`, per layer.

    `keys` is a slice or an index tensor over key positions (e.g. slice(0, 1) for token 0,
    slice(0, 4) for the first four, or the recent window). Averaged over heads and queries.
    """
    w = _stack(weights)
    if not 0 <= first_query < w.shape[-1]:
        raise ValueError(f"first_query must lie in [0, {w.shape[-1]}), got {first_query}")
    return w[:, :, first_query:, keys].sum(-1).mean(dim=(1, 2))


def recent_mass(weights, recent: int, *, first_query: int = 16) -> torch.Tensor:
    """(L,) mean attention that each query t >= first_query puts on its own last `recent` keys (t-recent+1 .. t)."""
    w = _stack(weights)
    n = w.shape[-1]
    t = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    band = (j <= t) & (j > t - recent)
    return (w * band)[:, :, first_query:].sum(-1).mean(dim=(1, 2))


def uniform_mass(n: int, *, first_query: int = 16) -> float:
    """What `attention_mass` on one token would be if every query spread evenly: mean of 1/(t+1)
    over the queries t = first_query .. n-1 (so n must exceed first_query, as in `attention_mass`)."""
    if isinstance(n, bool) or not isinstance(n, int) or isinstance(first_query, bool) or not isinstance(first_query, int) \
            or not 0 <= first_query < n:
        raise ValueError(f"need 0 <= first_query < n (queries first_query .. n-1), got n={n!r}, first_query={first_query!r}")
    return sum(1.0 / (t + 1) for t in range(first_query, n)) / (n - first_query)


def sink_scores(weights, token: int = 0) -> torch.Tensor:
    """(L, H) α = mean attention to `token` over the queries that see it (t >= token), per head.

    Gu et al. 2024, eq. (2): α_k^{l,h} = 1/(T-k+1) Σ_{t=k}^{T} A^{l,h}_{t,k}.

    Shown in chapter 4.
    """
    w = _stack(weights)
    if not 0 <= token < w.shape[-1]:
        raise ValueError(f"token must lie in [0, {w.shape[-1]}), got {token}")
    return w[:, :, token:, token].mean(-1)


def sink_rate(weights, token: int = 0, threshold: float = 0.3) -> float:
    """Share of (layer, head) pairs whose sink score on `token` exceeds `threshold` (Gu et al. 2024, ε = 0.3)."""
    return (sink_scores(weights, token) > threshold).float().mean().item()


def value_norm_ratio(record: AttentionRecord, token: int = 0) -> torch.Tensor:
    """(L,) ‖v_token‖ / mean_{j != token} ‖v_j‖ per layer, averaged over KV heads."""
    out = []
    for layer in sorted(record.value_norms):
        norms = record.value_norms[layer]  # (H_kv, N)
        others = torch.cat([norms[:, :token], norms[:, token + 1:]], dim=1)
        out.append((norms[:, token] / others.mean(-1)).mean())
    return torch.stack(out)


def sink_output_share(record: AttentionRecord, token: int = 0, *, first_query: int = 16) -> torch.Tensor:
    """(L,) share of Σ_j p_tj ‖v_j‖ that `token` carries, averaged over heads and queries t >= first_query.

    Compare with `attention_mass` on the same token: a sink draws much attention (p_t0 large) but
    its short value makes its share of the output small.
    """
    out = []
    for layer in sorted(record.weights):
        p = record.weights[layer][:, first_query:]  # (H, n, N)
        norms = record.value_norms[layer].repeat_interleave(p.shape[0] // record.value_norms[layer].shape[0], 0)
        weighted = p * norms[:, None, :]  # (H, n, N)
        out.append((weighted[..., token] / weighted.sum(-1)).mean())
    return torch.stack(out)


# ---------------------------------------------------------------------------------------------
# Streaming perplexity.

@dataclass
class StreamResult:
    """nlls[t] = -log p(x_{t+1} | what the cache held), per token; per step: `fed`, the tokens fed so
    far, `nbytes`, the bytes the cache holds after the step, and `seconds`, how long the step took."""

    nlls: torch.Tensor
    fed: list[int]
    nbytes: list[int]
    seconds: list[float]

    def perplexity(self) -> float:
        return math.exp(self.nlls.mean().item())


@torch.no_grad()
def stream(model, input_ids: torch.Tensor, cache: KVCache, *, prefill: int = 1, chunk: int = 1,
           progress: bool = True) -> StreamResult:
    """Feed `input_ids` (1, N) through `cache`: the first `prefill` tokens at once, then `chunk` per step.

    With chunk=1 this is how a deployed model generates: every next-token prediction sees only
    what the cache holds. A larger chunk is how it reads a long document: each step's tokens see
    the cache as the policy left it for them plus each other (causally), so under a sink + window
    policy a query sees between capacity - chunk + 1 and capacity tokens, and the weights are read
    once per chunk rather than once per token. A prefill no longer than the cache's capacity
    changes nothing (no token is evicted while it runs).
    """
    _check_ids(input_ids)
    n = input_ids.shape[1]
    if not 1 <= prefill < n:
        raise ValueError(f"prefill must lie in [1, {n}) for {n} tokens, got {prefill}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    nlls, fed, nbytes, seconds = [], [], [], []
    starts = [0] + list(range(prefill, n - 1, chunk))
    for start in tqdm(starts, desc=f"streaming {type(cache).__name__}", disable=not progress, mininterval=2):
        end = prefill if start == 0 else min(start + chunk, n - 1)
        begin = time.perf_counter()
        logits = model(input_ids[:, start:end], cache=cache)[0].float()
        seconds.append(time.perf_counter() - begin)
        nlls.append(F.cross_entropy(logits, input_ids[0, start + 1:end + 1], reduction="none"))
        fed.append(end)
        nbytes.append(cache.nbytes())
    return StreamResult(torch.cat(nlls).cpu(), fed, nbytes, seconds)


def sink_window_attention(*, sinks: int, window: int, inv_freq: torch.Tensor, positions: str = "cache",
                          block: int = 256, gap: int = 0):
    """An attention function (q, k, v, *, causal, scale) for a whole text that equals streaming it
    through `SinkCache(sinks, window, positions=...)` one token at a time.

    q and k arrive rotated by their text positions 0..N-1. Query t < sinks + window sees tokens
    0..t (nothing evicted yet); later it sees the sinks 0..sinks-1 and its recent tokens
    t-window+1..t. RoPE scores depend only on distances, which the band keeps as in the text;
    in the cache the sinks sit at places i while the query sits at sinks + window - 1, so their
    scores use the query rotated back by t - (sinks + window - 1). Cost O(N·(sinks + window + block)).

    `gap` (text positions only) puts the sinks `gap` positions further from every query that
    sees them, as in a stream `gap` tokens longer: how text positions age as a stream runs on.

    Shown in chapter 4.
    """
    if positions not in POSITION_MODES:
        raise ValueError(f"positions must be one of {POSITION_MODES}, got {positions!r}")
    for name, value, least in (("sinks", sinks, 0), ("window", window, 1), ("block", block, 1), ("gap", gap, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    if gap and positions != "text":
        raise ValueError(f"gap moves text positions; with positions={positions!r} it must be 0, got {gap}")
    capacity = sinks + window

    def attend(q, k, v, *, causal=True, scale=None):
        check_qkv(q, k, v)
        if not causal:
            raise ValueError("sink_window_attention is causal: call it with causal=True")
        n_rep = q.shape[1] // k.shape[1]
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        n = q.shape[2]
        t_all = torch.arange(n, device=q.device)
        sink_offset = (capacity - 1) - t_all if positions == "cache" else torch.full_like(t_all, gap)
        q_sink = apply_rope(q, sink_offset, inv_freq.to(q.device))
        k_sink, v_sink = k[:, :, :sinks], v[:, :, :sinks]
        out = torch.empty_like(q)
        for s in range(0, n, block):
            e = min(n, s + block)
            lo = 0 if s < capacity else s - window + 1
            t, j = t_all[s:e, None], t_all[None, lo:e]
            seen = (j <= t) & ((t < capacity) | (j > t - window))
            sink_seen = (t >= capacity).expand(-1, k_sink.shape[2])
            scores = torch.cat([q_sink[:, :, s:e] @ k_sink.transpose(-1, -2),
                                q[:, :, s:e] @ k[:, :, lo:e].transpose(-1, -2)], dim=-1) * scale
            scores = scores.masked_fill(~torch.cat([sink_seen, seen], dim=-1), float("-inf"))
            p = torch.softmax(scores.float(), dim=-1).to(q.dtype)
            out[:, :, s:e] = p @ torch.cat([v_sink, v[:, :, lo:e]], dim=2)
        return out

    return attend


def _nlls_from_hidden(model, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Next-token NLLs from final hidden states (N, dim), a chunk of logits at a time."""
    return torch.cat([F.cross_entropy(model.lm_head(hidden[s:s + chunk]).float(), targets[s:s + chunk], reduction="none")
                      for s in range(0, len(targets), chunk)])


@torch.no_grad()
def sink_window_nlls(model, input_ids: torch.Tensor, *, sinks: int, window: int, positions: str = "cache",
                     block: int = 256, gap: int = 0) -> torch.Tensor:
    """(N-1,) next-token NLLs of `input_ids` (1, N) streamed through a sink + window cache, in one pass.

    Equal (to float rounding) to `stream(model, input_ids, SinkCache(sinks, window, positions=...))`,
    but the whole text goes through each layer at once: about as fast as one dense forward.
    `sinks=0` is window attention. `gap`: see `sink_window_attention`.
    """
    _check_ids(input_ids)
    if sinks < 0 or window < 1:
        raise ValueError(f"need sinks >= 0 and window >= 1, got sinks={sinks}, window={window}")
    c = model.config
    inv_freq, _ = rope_parameters(c.head_dim, c.rope_theta, c.rope_scaling, input_ids.shape[1])
    fn = sink_window_attention(sinks=sinks, window=window, inv_freq=inv_freq, positions=positions, block=block, gap=gap)
    with _attention_swapped(model, lambda layer: fn):
        hidden = model.hidden_states(input_ids)[0]
    return _nlls_from_hidden(model, hidden[:-1], input_ids[0, 1:]).cpu()


@torch.no_grad()
def recompute_nlls(model, input_ids: torch.Tensor, *, window: int, targets, batch: int = 8,
                   progress: bool = True) -> torch.Tensor:
    """NLL of each token t in `targets` predicted from a fresh forward over tokens t-window .. t-1.

    Sliding window with recomputation: every prediction re-encodes its window from scratch
    (positions 0..window-1), so nothing evicted leaks in through cached states, at O(window²)
    work per token. Each target needs t >= window.
    """
    _check_ids(input_ids)
    targets = torch.as_tensor(targets, dtype=torch.long).flatten()
    n = input_ids.shape[1]
    if len(targets) == 0 or targets.min() < window or targets.max() >= n:
        raise ValueError(f"targets must lie in [window={window}, {n}), got {targets.tolist()[:8]}...")
    out = []
    for s in tqdm(range(0, len(targets), batch), desc="recomputing windows", disable=not progress, mininterval=2):
        ts = targets[s:s + batch]
        windows = torch.stack([input_ids[0, t - window:t] for t in ts.tolist()])
        hidden = model.hidden_states(windows)[:, -1]
        out.append(F.cross_entropy(model.lm_head(hidden).float(), input_ids[0, ts], reduction="none"))
    return torch.cat(out).cpu()


@torch.no_grad()
def sink_profile(model, input_ids: torch.Tensor, *, cache: int, sinks=(0, 1, 4), attn_tokens: int = 128) -> dict:
    """Does `model` have an attention sink, and does streaming `input_ids` (1, N) need it? One table row:

    - "mass on token 0": the largest per-layer `attention_mass` on token 0 over the first
      `attn_tokens` tokens, and "uniform", what an even spread would give it;
    - "sink rate": `sink_rate` on token 0 over the same tokens (Gu et al. 2024);
    - "S + R": perplexity through a cache of S sinks and R = cache - S recent tokens, for S in
      `sinks`, over the predictions made by queries t >= cache (those that miss evicted tokens).
    """
    if max(sinks) >= cache:
        raise ValueError(f"cache must be larger than every sink count {tuple(sinks)}, got {cache}")
    _check_ids(input_ids, least=max(attn_tokens, cache) + 2)
    record = attention_weights(model, input_ids[:, :attn_tokens])
    row = {"mass on token 0": attention_mass(record.weights, slice(0, 1)).max().item(),
           "uniform": uniform_mass(attn_tokens), "sink rate": sink_rate(record.weights)}
    for s in sinks:
        nll = sink_window_nlls(model, input_ids, sinks=s, window=cache - s)[cache:]
        row[f"{s} + {cache - s}"] = math.exp(nll.mean().item())
    return row


# ---------------------------------------------------------------------------------------------
# Cost.

@torch.no_grad()
def fill(cache: KVCache, config, n_tokens: int, *, device=None, dtype=torch.float32, seed: int = 0) -> KVCache:
    """Put `n_tokens` random keys/values in every layer, as after a stream of that length (for timing)."""
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
    g = torch.Generator().manual_seed(seed)
    shape = (1, config.n_kv_heads, n_tokens, config.head_dim)
    positions = torch.arange(n_tokens, device=device)
    for layer in range(config.n_layers):
        k = torch.randn(shape, generator=g, dtype=dtype).to(device)
        v = torch.randn(shape, generator=g, dtype=dtype).to(device)
        cache.update(layer, k, v, positions)
    return cache


@torch.no_grad()
def time_per_token(model, cache: KVCache | None = None, *, window: int | None = None, steps: int = 5,
                   token: int = 198) -> float:
    """Seconds to produce one token's logits: the fastest of `steps` (the least disturbed by other work).

    With `cache`: one decoding step through it (the cache keeps its policy: it stays full while
    the stream grows). With `window` instead: sliding window with recomputation, a fresh forward
    over `window` tokens per generated token.
    """
    if (cache is None) == (window is None):
        raise ValueError("give exactly one of cache (decode through a KV cache) or window (recompute)")
    device = next(model.parameters()).device
    times = []
    for _ in range(steps + 1):  # the first step warms up
        begin = time.perf_counter()
        if cache is None:
            model(torch.full((1, window), token, device=device))
        else:
            model(torch.tensor([[token]], device=device), cache=cache)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - begin)
    return min(times[1:])
