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
the new ones fit.
"""

import torch

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

    def nbytes(self) -> int:
        """Bytes held by the keys and values of every layer."""
        return sum(t.numel() * t.element_size() for store in (self.keys, self.values) for t in store.values())
