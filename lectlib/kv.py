"""The KV cache and its eviction policies, behind one small interface.

A cache stores, per layer, the keys and values of the tokens it keeps, BEFORE rotary
embedding, with the text position of each token. Each step the attention layer hands it the
new tokens' keys and values; the cache evicts (by its policy), appends, and returns what the
attention should see together with the positions to rotate queries and keys by:

    keys, values, key_pos, query_pos = cache.update(layer, k, v, positions)

Positions are either the tokens' places in the text (`positions="text"`, what a model without
eviction sees) or their places in the cache (`positions="cache"`, StreamingLLM's choice, which
keeps every distance the model sees inside its trained range however long the stream).

Policies override `keep(layer, n_old, n_new)`: the indices of the old tokens to keep so that
the new ones fit. Here: the full cache (`KVCache`), window attention (`WindowCache`, the last L
tokens) and StreamingLLM (`SinkCache`, Xiao et al. 2023: the first S tokens, the "attention
sinks", and the most recent W). Policies that score tokens by the attention they draw (H2O) get
the attention weights through `observe`, called by `observed_attention`.
"""

import math

import torch

from .attention import causal_mask, check_qkv, repeat_kv

POSITION_MODES = ("text", "cache")


class KVCache:
    """Keeps every token (the full cache); subclasses evict."""

    def __init__(self, *, positions: str = "text"):
        if positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {POSITION_MODES}, got {positions!r}")
        self.position_mode = positions
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.text_positions: dict[int, torch.Tensor] = {}
        self.seen = 0  # tokens ever appended (to layer 0): the next text position

    def __len__(self) -> int:
        """Tokens held (in layer 0)."""
        return 0 if 0 not in self.keys else self.keys[0].shape[2]

    def keep(self, layer: int, n_old: int, n_new: int) -> torch.Tensor | None:
        """Indices (into the n_old stored tokens) to keep before appending n_new; None keeps all."""
        return None

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor):
        """Store new (B, H_kv, n, D) keys/values at text `positions` (n,); return what attention sees.

        Returns keys, values (B, H_kv, N, D), key positions (N,) and query positions (n,).
        """
        n_new = k.shape[2]
        if layer in self.keys:
            old_k, old_v, old_p = self.keys[layer], self.values[layer], self.text_positions[layer]
            index = self.keep(layer, old_k.shape[2], n_new)
            if index is not None:
                old_k, old_v, old_p = old_k[:, :, index], old_v[:, :, index], old_p[index]
            k, v = torch.cat([old_k, k], dim=2), torch.cat([old_v, v], dim=2)
            positions = torch.cat([old_p, positions])
        self.keys[layer], self.values[layer], self.text_positions[layer] = k, v, positions
        if layer == 0:
            self.seen = int(positions[-1]) + 1
        key_pos = positions if self.position_mode == "text" else torch.arange(len(positions), device=positions.device)
        return k, v, key_pos, key_pos[-n_new:]

    def observe(self, layer: int, weights: torch.Tensor) -> None:
        """Attention weights (B, H, n_new, N) of the last update's queries over its keys; ignored here.

        A hook for policies that evict by the attention tokens receive (H2O, Zhang et al. 2023);
        `observed_attention(cache, layer)` is an attention function that calls it.
        """

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
        if sinks < 0:
            raise ValueError(f"sinks must be >= 0, got {sinks}")
        if window < 1:
            raise ValueError(f"window must be >= 1 (the new token itself), got {window}")
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


def observed_attention(cache: KVCache, layer: int):
    """An attention function (q, k, v, *, causal, scale) that shows its weights to `cache.observe`.

    Materializes the (B, H, N_q, N_k) weights, as policies that score tokens need them; install
    it with `model.set_attention(observed_attention(cache, i), layers=[i])` for each layer i.
    """

    def attend(q, k, v, *, causal: bool = False, scale: float | None = None):
        check_qkv(q, k, v)
        n_rep = q.shape[1] // k.shape[1]
        k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        s = (q @ k.transpose(-1, -2)) * scale
        if causal:
            s = s.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
        p = torch.softmax(s, dim=-1)
        cache.observe(layer, p)
        return p @ v

    return attend
