"""Attention functions. All take (B, H, N, D) tensors like torch SDPA.

Conventions shared by every function here:
- q is (B, H, N_q, D); k and v are (B, H_kv, N_k, D) with H_kv dividing H (grouped-query
  attention: query head h reads KV head h // (H / H_kv));
- `causal=True` aligns the queries to the END of the keys, so query i (of N_q) sees keys
  0 .. N_k - N_q + i; this is what decoding with a KV cache needs (torch SDPA's `is_causal`
  aligns to the start instead, so it is only used here when N_q == N_k);
- `scale` defaults to 1/sqrt(D).
"""

import math

import torch
import torch.nn.functional as F


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """Raise ValueError naming the argument unless q, k, v have compatible (B, H, N, D) shapes."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be (B, H, N, D), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch (dim 0) and head_dim (dim 3)")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"k has {k.shape[1]} heads, which must divide the {q.shape[1]} heads of q (GQA)")
    if q.dtype != k.dtype or k.dtype != v.dtype:
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, H_kv, N, D) -> (B, H_kv * n_rep, N, D): each KV head serves n_rep query heads."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def causal_mask(n_q: int, n_k: int, device=None) -> torch.Tensor:
    """(N_q, N_k) bool, True where query i may see key j: j <= i + (N_k - N_q) (end-aligned)."""
    i = torch.arange(n_q, device=device)[:, None]
    j = torch.arange(n_k, device=device)[None, :]
    return j <= i + (n_k - n_q)


def sdpa_attention(q, k, v, *, causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """torch's fused scaled_dot_product_attention with GQA and end-aligned causal masking: (B, H, N_q, D)."""
    check_qkv(q, k, v)
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    n_q, n_k = q.shape[2], k.shape[2]
    if not causal or n_q == 1 and n_k >= 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if n_q == n_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(n_q, n_k, q.device), scale=scale)


def naive_attention(q, k, v, *, causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """Attention as written (Vaswani et al. 2017, eq. 1): S = QKᵀ·scale, P = softmax(S), O = PV.

    Materializes the (B, H, N_q, N_k) score matrix: O(N²) memory. Returns (B, H, N_q, D).
    A row whose keys are all masked has no defined softmax and returns zeros.
    """
    check_qkv(q, k, v)
    n_rep = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-1, -2)) * scale  # (B, H, N_q, N_k)
    if causal:
        s = s.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
    p = torch.softmax(s, dim=-1).nan_to_num(0.0)  # (B, H, N_q, N_k)
    return p @ v
