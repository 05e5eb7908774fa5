"""The KV cache and its policies, behind one small interface.

A cache stores, per layer, the keys and values of the tokens it keeps, BEFORE rotary embedding,
with the text position of each token. Each step the attention layer hands it the new tokens'
keys and values; the cache returns what the attention should see and the positions to rotate
queries and keys by:

    keys, values, key_pos, query_pos = cache.update(layer, k, v, positions)

Shapes: k, v (B, H_kv, n, D) for n new tokens at text `positions` (n,); keys, values
(B, H_kv, N, D); key_pos (N,) when every KV head holds the same tokens, (B, H_kv, N) when the
policy keeps different tokens per (layer, KV head); query_pos (n,). Positions are the tokens'
places in the text (`positions="text"`) or in the cache (`positions="cache"`, StreamingLLM's
choice, which keeps every distance inside the trained range however long the stream).

Two kinds of policy
-------------------
1. Position rules, which need no attention: the full cache (`KVCache`), window attention
   (`WindowCache`) and StreamingLLM (`SinkCache`). They override `keep(layer, n_old, n_new)`.

2. Scoring rules (`ScoredCache`, in the spirit of NVIDIA kvpress's `score()`): after a layer's
   attention the cache is shown what that attention saw, `observe(layer, q, k, scale)` with the
   rotated queries (B, H, n, D) and keys (B, H_kv, N, D); the policy's `score` rates every held
   token per (batch, KV head), and the shared `evict` keeps the `capacity()` best per head
   (plus protected sinks and a recent window) and frees the rest: the tensors shrink, so
   `nbytes()` is what is really held. The budget is a number of tokens (int) or a ratio of the
   tokens seen (float in (0, 1]).

Writing a new scoring policy takes one method:

    class MyCache(ScoredCache):
        "Paper (year), eq. N: keep the tokens with the largest ..."
        def score(self, layer, q, k, scale):       # -> (B, H_kv, N) float, higher = keep
            return ...                             # or None: evict nothing this step

Helpers compute only the attention a rule needs: `attention_column_sums` (every query's weights
summed per key, in query blocks: O(block · N) memory, never N × N) and `last_query_weights`.
Per-token state that must follow the tokens it rates (H2O's running sums) is named in
`per_token_state`: the shared machinery pads it for new tokens and gathers it on eviction.
Scoring policies must see the attention: run the model inside `with attach(model, cache):`
(an update while the previous step was not observed raises). Policies that change how attention
reads the cache (Quest, `lectlib.quest`) override `attention`; policies that change how keys
and values are stored (KIVI, `lectlib.kvquant`) override `update` and `nbytes`.
"""

import math
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .attention import attention_probs, sdpa_attention

POSITION_MODES = ("text", "cache")


def _check_int(name: str, value, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ValueError(f"{name} must be an int >= {least}, got {value!r}")


class KVCache:
    """Keeps every token (the full cache); subclasses evict."""

    def __init__(self, *, positions: str = "text"):
        if positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {POSITION_MODES}, got {positions!r}")
        self.position_mode = positions
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.text_positions: dict[int, torch.Tensor] = {}  # (N,) or (B, H_kv, N) per head
        self.seen = 0  # tokens ever appended (to layer 0): the next text position

    def __len__(self) -> int:
        """Tokens held (in layer 0, per head)."""
        return 0 if 0 not in self.keys else self.keys[0].shape[2]

    def keep(self, layer: int, n_old: int, n_new: int) -> torch.Tensor | None:
        """Indices (into the n_old stored tokens) to keep before appending n_new; None keeps all."""
        return None

    def _check_update(self, layer: int, k, v, positions) -> None:
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or t.dim() != 4:
                raise ValueError(f"{name} must be a (B, H_kv, n, D) tensor, got {getattr(t, 'shape', t)!r}")
        if k.shape != v.shape:
            raise ValueError(f"k and v must have the same shape (B, H_kv, n, D), got {tuple(k.shape)} and {tuple(v.shape)}")
        if k.shape[2] == 0:
            raise ValueError(f"k must hold at least one new token, got shape {tuple(k.shape)}")
        if not isinstance(positions, torch.Tensor) or positions.shape != (k.shape[2],):
            raise ValueError(f"positions must be ({k.shape[2]},), one per new token, got {getattr(positions, 'shape', positions)!r}")
        if layer in self.keys:
            held = self.keys[layer].shape
            if (held[0], held[1], held[3]) != (k.shape[0], k.shape[1], k.shape[3]):
                raise ValueError(f"k {tuple(k.shape)} must match the cache's (B, H_kv, ·, D) = {tuple(held)} in layer {layer}")

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """Store new (B, H_kv, n, D) keys/values at text `positions` (n,); return what attention sees.

        Returns keys, values (B, H_kv, N, D), key positions (N,) or (B, H_kv, N), query positions (n,).
        """
        self._check_update(layer, k, v, positions)
        n_new, new_pos = k.shape[2], positions
        if layer in self.keys:
            old_k, old_v, old_p = self.keys[layer], self.values[layer], self.text_positions[layer]
            index = self.keep(layer, old_k.shape[2], n_new)
            if index is not None:
                old_k, old_v, old_p = old_k[:, :, index], old_v[:, :, index], old_p[..., index]
            k, v = torch.cat([old_k, k], dim=2), torch.cat([old_v, v], dim=2)
            if old_p.dim() == 3:  # per-head positions: every head gets the new tokens
                positions = positions.expand(*old_p.shape[:2], n_new)
            positions = torch.cat([old_p, positions], dim=-1)
        self.keys[layer], self.values[layer], self.text_positions[layer] = k, v, positions
        if layer == 0:
            self.seen = int(new_pos[-1]) + 1
        if self.position_mode == "text":
            return k, v, positions, new_pos
        places = torch.arange(positions.shape[-1], device=k.device)
        return k, v, places, places[-n_new:]

    def attention(self, layer: int, q, k, v, *, causal: bool, scale: float, attn_fn=sdpa_attention):
        """Attention over what `update` returned (rotated): attn_fn's output, then `observe`."""
        out = attn_fn(q, k, v, causal=causal, scale=scale)
        self.observe(layer, q, k, scale)
        return out

    def observe(self, layer: int, q: torch.Tensor, k: torch.Tensor, scale: float) -> None:
        """The rotated queries (B, H, n, D) and keys (B, H_kv, N, D) of the last attention; ignored here."""

    def nbytes(self) -> int:
        """Bytes held by the keys and values of every layer."""
        return sum(t.numel() * t.element_size() for store in (self.keys, self.values) for t in store.values())


class SinkCache(KVCache):
    """StreamingLLM (Xiao et al. 2023): keep the first `sinks` tokens and the `window` most recent.

    After every update the cache holds exactly the tokens at text positions 0 .. sinks-1 and
    seen-window .. seen-1 (all of them while seen <= sinks + window); a new token attends to
    sinks + window tokens, itself included. Positions default to places in the cache, as in the
    paper: the query sits at sinks + window - 1 however long the stream.
    """

    def __init__(self, sinks: int, window: int, *, positions: str = "cache"):
        _check_int("sinks", sinks, 0)
        _check_int("window", window, 1)  # the new token itself
        super().__init__(positions=positions)
        self.sinks, self.window = sinks, window

    @property
    def capacity(self) -> int:
        """Tokens a full cache holds: sinks + window."""
        return self.sinks + self.window

    def keep(self, layer: int, n_old: int, n_new: int) -> torch.Tensor:
        n_sink = min(self.sinks, n_old)
        room = max(self.window - n_new, 0)  # old recent tokens that still fit beside the new ones
        return torch.cat([torch.arange(n_sink), torch.arange(max(n_sink, n_old - room), n_old)])

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        out = super().update(layer, k, v, positions)
        # a chunk longer than the window was seen whole by its own queries; store only what the policy keeps
        index = self.keep(layer, self.keys[layer].shape[2], 0)
        if len(index) < self.keys[layer].shape[2]:
            self.keys[layer] = self.keys[layer][:, :, index]
            self.values[layer] = self.values[layer][:, :, index]
            self.text_positions[layer] = self.text_positions[layer][index]
        return out


class WindowCache(SinkCache):
    """Window attention: keep only the `window` most recent tokens (a SinkCache with no sinks)."""

    def __init__(self, window: int, *, positions: str = "cache"):
        super().__init__(0, window, positions=positions)


class ScoredCache(KVCache):
    """Evicts, per (layer, batch, KV head), the lowest-scoring tokens down to a budget.

    budget: tokens kept per head (int >= 1) or a ratio of the tokens seen (float in (0, 1]).
    window: the most recent tokens, always kept (int, or a float in [0, 1): a share of the
    capacity); sinks: the first tokens, always kept. Subclasses implement `score`.
    """

    per_token_state: tuple[str, ...] = ()  # names of dicts layer -> (B, H_kv, N) that follow the tokens

    def __init__(self, budget: int | float, *, window: int | float = 0, sinks: int = 0, positions: str = "text"):
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or \
                (isinstance(budget, int) and budget < 1) or (isinstance(budget, float) and not 0 < budget <= 1):
            raise ValueError(f"budget must be a number of tokens (int >= 1) or a ratio of the tokens seen "
                             f"(float in (0, 1]), got {budget!r}")
        if isinstance(window, bool) or not isinstance(window, (int, float)) or window < 0 or \
                (isinstance(window, float) and window >= 1):
            raise ValueError(f"window must be an int >= 0 or a share of the capacity in [0, 1), got {window!r}")
        _check_int("sinks", sinks, 0)
        super().__init__(positions=positions)
        self.budget, self.window, self.sinks = budget, window, sinks
        self._unobserved: set[int] = set()
        for name in self.per_token_state:
            setattr(self, name, {})

    def capacity(self) -> int:
        """Tokens each head keeps now: the budget, or ceil(ratio · seen)."""
        return self.budget if isinstance(self.budget, int) else max(1, math.ceil(self.budget * self.seen))

    def protected(self, capacity: int) -> tuple[int, int]:
        """(first, last): how many of the oldest (sinks) and newest (window) held tokens are always kept."""
        window = self.window if isinstance(self.window, int) else int(self.window * capacity)
        return min(self.sinks, capacity), min(window, capacity - min(self.sinks, capacity))

    def score(self, layer: int, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor | None:
        """(B, H_kv, N) how much each held token is worth keeping (higher = keep); None: evict nothing."""
        raise NotImplementedError

    def update(self, layer, k, v, positions):
        if layer in self._unobserved:
            raise RuntimeError(f"{type(self).__name__} scores tokens by attention but layer {layer}'s last "
                               "attention was not observed: run the model inside `with kv.attach(model, cache):`")
        n_new = k.shape[2]
        out = super().update(layer, k, v, positions)
        for name in self.per_token_state:  # new tokens start with zero state
            store = getattr(self, name)
            fresh = k.new_zeros(k.shape[0], k.shape[1], n_new, dtype=torch.float32)
            store[layer] = fresh if layer not in store else torch.cat([store[layer], fresh], dim=-1)
        self._unobserved.add(layer)
        return out

    def observe(self, layer, q, k, scale):
        self._unobserved.discard(layer)
        scores = self.score(layer, q, k, scale)
        if scores is not None:
            self.evict(layer, scores)

    def evict(self, layer: int, scores: torch.Tensor) -> None:
        """Keep, per (batch, KV head), the protected tokens and the best-scoring others up to `capacity()`."""
        keys = self.keys[layer]
        B, H, N, D = keys.shape
        capacity = self.capacity()
        if N <= capacity:
            return
        if scores.shape != (B, H, N):
            raise ValueError(f"{type(self).__name__}.score must return (B, H_kv, N) = {(B, H, N)}, got {tuple(scores.shape)}")
        first, last = self.protected(capacity)
        scores = scores.float().clone()
        scores[..., :first] = float("inf")  # held tokens are in text order per head: sinks first,
        scores[..., N - last:] = float("inf")  # the newest last
        index = scores.topk(capacity, dim=-1).indices.sort(dim=-1).values  # (B, H_kv, capacity), text order
        self.keys[layer] = keys.gather(2, index[..., None].expand(-1, -1, -1, D))
        self.values[layer] = self.values[layer].gather(2, index[..., None].expand(-1, -1, -1, D))
        self.text_positions[layer] = self.text_positions[layer].expand(B, H, N).gather(2, index)
        for name in self.per_token_state:
            store = getattr(self, name)
            store[layer] = store[layer].gather(2, index)


class RecentCache(ScoredCache):
    """The newest `budget` tokens, after the first `sinks`: window attention (sinks=0) and StreamingLLM
    (Xiao et al. 2023, sinks=4) as a scoring rule (score = text position), so that, like every scored
    policy and unlike `SinkCache`, a chunk of new tokens still sees the whole budget before eviction."""

    def score(self, layer, q, k, scale):
        held = self.keys[layer].shape[2]
        return torch.arange(held, dtype=torch.float32, device=k.device).expand(k.shape[0], k.shape[1], held)


def _group_mean(x: torch.Tensor, n_kv_heads: int) -> torch.Tensor:
    """(B, H, ...) per query head -> (B, H_kv, ...): the mean over each KV head's group of query heads."""
    return x.view(x.shape[0], n_kv_heads, x.shape[1] // n_kv_heads, *x.shape[2:]).mean(2)


def attention_column_sums(q: torch.Tensor, k: torch.Tensor, scale: float, *, block: int = 256) -> torch.Tensor:
    """(B, H_kv, N) Σ_i softmax(q_i·Kᵀ·scale)_j over the n causal queries, mean over each group's query heads.

    q (B, H, n, D) are the last n of the N keys k (B, H_kv, N, D) (end-aligned causal). Computed
    in blocks of `block` queries, each against only the keys it may see: O(block · N) memory.
    """
    n, N = q.shape[2], k.shape[2]
    total = q.new_zeros(q.shape[0], q.shape[1], N, dtype=torch.float32)
    for start in range(0, n, block):
        end = min(start + block, n)
        seen = N - n + end  # keys visible to the block's last query
        p = attention_probs(q[:, :, start:end], k[:, :, :seen], causal=True, scale=scale)
        total[..., :seen] += p.sum(dim=2)
    return _group_mean(total, k.shape[1])


def last_query_weights(q: torch.Tensor, k: torch.Tensor, scale: float, n_last: int = 1) -> torch.Tensor:
    """(B, H, n_last, N) attention weights of the last `n_last` queries (end-aligned causal)."""
    return attention_probs(q[:, :, -n_last:], k, causal=True, scale=scale)


class H2OCache(ScoredCache):
    """H2O (Zhang et al. 2023, Alg. 1): keep the heavy hitters, the tokens with the largest attention
    accumulated over every query so far (score_j += Σ_i A_ij, per head), plus a recent window
    (half of the budget by default, as in the paper)."""

    per_token_state = ("accumulated",)

    def __init__(self, budget, *, window=0.5, sinks=0, positions="text"):
        super().__init__(budget, window=window, sinks=sinks, positions=positions)

    def score(self, layer, q, k, scale):
        self.accumulated[layer] += attention_column_sums(q, k, scale)
        return self.accumulated[layer]


class TOVACache(ScoredCache):
    """TOVA (Oren et al. 2024, eq. 3): keep the tokens the newest query attends to most (per KV head,
    mean over its query heads); the scores are not accumulated, every step rates afresh."""

    def score(self, layer, q, k, scale):
        return _group_mean(last_query_weights(q, k, scale)[:, :, 0], k.shape[1])


class SnapKVCache(ScoredCache):
    """SnapKV (Li et al. 2024, eqs. 1-2): at the end of the prompt, the last `window` queries (the
    observation window, which holds the question: a query-aware policy) vote for the prefix keys;
    votes are summed, max-pooled over `kernel` neighbouring tokens (keeping clusters whole), and the
    top ones kept with the window. Only the prompt is compressed; later tokens are appended."""

    def __init__(self, budget, *, window: int = 32, kernel: int = 7, sinks=0, positions="text"):
        _check_int("window", window, 1)
        if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
            raise ValueError(f"kernel must be an odd int >= 1, got {kernel!r}")
        super().__init__(budget, window=window, sinks=sinks, positions=positions)
        self.kernel, self.compressed = kernel, set()

    def score(self, layer, q, k, scale):
        if layer in self.compressed:
            return None
        self.compressed.add(layer)
        votes = _group_mean(last_query_weights(q, k, scale, min(self.window, q.shape[2])).sum(2), k.shape[1])
        B, H, N = votes.shape
        pooled = F.max_pool1d(votes.view(B * H, 1, N), self.kernel, stride=1, padding=self.kernel // 2)
        return pooled.view(B, H, N)


class KeyNormCache(ScoredCache):
    """Key norm (Devoto et al. 2024): keys with a LOW L2 norm draw high attention, so keep the lowest
    ‖k‖ (RoPE rotates, it does not change norms). Needs no attention weights at all."""

    def score(self, layer, q, k, scale):
        return -k.float().norm(dim=-1)


@contextmanager
def attach(model, cache: KVCache):
    """Inside the block, every layer of `model` shows its attention to `cache` (`cache.attention`)."""
    layers = [block.self_attn for block in model.layers]
    saved = [a.attn_fn for a in layers]
    try:
        for i, a in enumerate(layers):
            a.attn_fn = observed_attention(cache, i, saved[i])
        yield cache
    finally:
        for a, fn in zip(layers, saved):
            a.attn_fn = fn


def observed_attention(cache: KVCache, layer: int, attn_fn=sdpa_attention):
    """An attention function (q, k, v, *, causal, scale) that goes through `cache.attention(layer, ...)`.

    `attn_fn` computes the output; the cache then observes the queries and keys (scoring policies)
    or replaces the attention (Quest). Install it with `attach(model, cache)`.
    """

    def attend(q, k, v, *, causal: bool = False, scale: float | None = None):
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        return cache.attention(layer, q, k, v, causal=causal, scale=scale, attn_fn=attn_fn)

    return attend
