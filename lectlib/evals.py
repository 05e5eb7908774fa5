"""Evaluating long context: perplexity first (this module grows with retrieval tasks).

Perplexity over a window is exp of the mean next-token cross-entropy,
    PPL = exp(-(1/(N-1)) Σ_t log p(x_t | x_<t)),
the model's average surprise per token; lower is better.
"""

import math

import torch
import torch.nn.functional as F

from .kv import KVCache


def _logits(model, input_ids, cache):
    """Logits from lectlib's Llama or a Hugging Face causal LM."""
    out = model(input_ids, cache=cache) if cache is not None else model(input_ids)
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def token_nlls(model, input_ids: torch.Tensor, *, chunk: int = 512, cache: KVCache | None = None) -> torch.Tensor:
    """(N-1,) negative log-likelihood of each token given all before it.

    The window is fed in chunks of `chunk` tokens through a KV cache, so the logits of only
    one chunk are in memory at once; with the full cache this equals one forward pass.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be (1, N), got {tuple(input_ids.shape)}")
    if input_ids.shape[1] < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {input_ids.shape[1]}")
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    n = input_ids.shape[1]
    is_lectlib = isinstance(model, torch.nn.Module) and hasattr(model, "hidden_states")
    if not is_lectlib and n > chunk:
        chunk = n  # a Hugging Face model gets the window in one pass
    cache = KVCache() if is_lectlib and cache is None else cache
    nlls = []
    for start in range(0, n, chunk):
        piece = input_ids[:, start:start + chunk]
        logits = _logits(model, piece, cache)[0].float()  # (n_piece, V)
        targets = input_ids[0, start + 1:start + 1 + piece.shape[1]]
        nlls.append(F.cross_entropy(logits[:len(targets)], targets, reduction="none"))
    return torch.cat(nlls)


def perplexity(model, input_ids: torch.Tensor, *, chunk: int = 512, cache: KVCache | None = None) -> float:
    """exp(mean next-token NLL) of `input_ids` (1, N) under `model`."""
    return math.exp(token_nlls(model, input_ids, chunk=chunk, cache=cache).mean().item())
