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


def attention_probs(q, k, *, causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """softmax(QKᵀ·scale) in at least fp32, the one place every variant computes attention weights: (B, H, N_q, N_k).

    q is (B, H, N_q, D) and k (B, H_kv, N_k, D) (GQA heads are repeated). Scores and softmax are
    computed in fp32 whatever the input dtype, so fp16 scores past 65504 do not overflow. A row
    whose keys are all masked has no defined softmax and returns zeros.
    """
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor) or q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be (B, H, N, D) tensors, got {getattr(q, 'shape', q)!r} and {getattr(k, 'shape', k)!r}")
    if q.shape[1] % k.shape[1]:
        raise ValueError(f"k has {k.shape[1]} heads, which must divide the {q.shape[1]} heads of q (GQA)")
    k = repeat_kv(k, q.shape[1] // k.shape[1])
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    dtype = torch.promote_types(q.dtype, torch.float32)  # fp16/bf16 -> fp32; fp64 stays
    s = (q.to(dtype) @ k.to(dtype).transpose(-1, -2)) * scale  # (B, H, N_q, N_k)
    if causal:
        s = s.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
    p = torch.softmax(s, dim=-1)
    return p.masked_fill(s.amax(dim=-1, keepdim=True) == float("-inf"), 0.0)


def naive_attention(q, k, v, *, causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """Attention as written (Vaswani et al. 2017, eq. 1): S = QKᵀ·scale, P = softmax(S), O = PV.

    Materializes the (B, H, N_q, N_k) score matrix: O(N²) memory. Returns (B, H, N_q, D) in the
    input dtype, computed in fp32. A row whose keys are all masked returns zeros.
    """
    check_qkv(q, k, v)
    p = attention_probs(q, k, causal=causal, scale=scale)  # (B, H, N_q, N_k), fp32
    v = repeat_kv(v, q.shape[1] // k.shape[1])
    return (p @ v.to(p.dtype)).to(q.dtype)


def _prepare(q, k, v, scale):
    """Validate, expand GQA heads, and resolve the default scale: (q, k, v, scale)."""
    check_qkv(q, k, v)
    n_rep = q.shape[1] // k.shape[1]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), scale


def online_softmax_step(m, z, o, s, v):
    """One step of the online-softmax recurrence (Milakov & Gimelshein 2018; the lectures' form).

    State after keys 1..i-1: running max m, denominator z = Σ exp(s_j - m), normalized output
    o = Σ softmax_j v_j. A new score s with value vector v gives, with m' = max(m, s):

        z' = z·exp(m - m') + exp(s - m')
        o' = (o·z·exp(m - m') + v·exp(s - m')) / z'

    Shapes: m, z, s (...,); o, v (..., D). The state starts at m = -inf, z = 0, o = 0. A key with
    s = -inf (masked) changes nothing; while every key so far is masked the output stays 0.
    """
    m_new = torch.maximum(m, s)
    # Subtracting a max of -inf would give -inf - (-inf) = nan; all weights are 0 then anyway.
    m_ref = m_new.masked_fill(m_new == float("-inf"), 0.0)
    decay, e = torch.exp(m - m_ref), torch.exp(s - m_ref)
    z_new = z * decay + e
    o_new = (o * (z * decay)[..., None] + v * e[..., None]) / z_new.clamp_min(torch.finfo(z.dtype).tiny)[..., None]
    return m_new, z_new, o_new


def online_softmax_attention(q, k, v, *, causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """Attention in one pass over the keys with the online-softmax recurrence: (B, H, N_q, D).

    Reads key j, scores every query against it, and folds it into the running (max, denominator,
    output) of `online_softmax_step`; no N_q x N_k matrix exists. One key per step, so it is
    slow: it is written to be read, and `blockwise_attention` is the same idea a block at a time.
    """
    q, k, v, scale = _prepare(q, k, v, scale)
    n_q, n_k = q.shape[2], k.shape[2]
    m = torch.full(q.shape[:-1], float("-inf"), dtype=q.dtype, device=q.device)
    z = torch.zeros_like(m)
    o = torch.zeros_like(q)
    visible = causal_mask(n_q, n_k, q.device) if causal else None
    for j in range(n_k):
        s = (q * k[:, :, j, None, :]).sum(-1) * scale  # (B, H, N_q): every query against key j
        if visible is not None:
            s = s.masked_fill(~visible[:, j], float("-inf"))
        m, z, o = online_softmax_step(m, z, o, s, v[:, :, j, None, :])
    return o


def merge_attention_blocks(o_a, m_a, l_a, o_b, m_b, l_b):
    """Combine attention over two disjoint key sets into attention over their union.

    Each part is its normalized output o (..., D), the max of its scores m (...,) and its
    denominator l = Σ exp(s - m) (...,); m = -inf, l = 0 marks a part with no visible key. With
    m' = max(m_a, m_b), each part is rescaled from its own max to the common one
    (FlashAttention, Dao et al. 2022, Algorithm 1, lines 11-12):

        l' = exp(m_a - m')·l_a + exp(m_b - m')·l_b
        o' = (exp(m_a - m')·l_a·o_a + exp(m_b - m')·l_b·o_b) / l'

    Keeping the max apart from l (rather than one log-sum-exp m + log l) keeps the weights exact
    when scores are large: m_a - m' is a difference of two scores. Returns (o', m', l').
    """
    m = torch.maximum(m_a, m_b)
    m_ref = m.masked_fill(m == float("-inf"), 0.0)
    w_a, w_b = torch.exp(m_a - m_ref) * l_a, torch.exp(m_b - m_ref) * l_b
    l = w_a + w_b
    o = (w_a[..., None] * o_a + w_b[..., None] * o_b) / l.clamp_min(torch.finfo(l.dtype).tiny)[..., None]
    return o, m, l


def blockwise_attention(q, k, v, *, causal: bool = False, scale: float | None = None, block_size: int = 128,
                        return_lse: bool = False):
    """Memory-efficient attention over blocks of `block_size` keys (Rabe & Staats 2021): (B, H, N_q, D).

    Each block's scores (B, H, N_q, block_size) give that block's max, denominator and output;
    blocks are folded together with `merge_attention_blocks`. Peak extra memory is
    O(N_q · block_size), linear in N, against naive attention's O(N_q · N_k). With `return_lse`,
    also returns each query's log-sum-exp of scores (B, H, N_q) (-inf where it sees no key).
    """
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    q, k, v, scale = _prepare(q, k, v, scale)
    n_q, n_k = q.shape[2], k.shape[2]
    o = torch.zeros_like(q)
    m = torch.full(q.shape[:-1], float("-inf"), dtype=q.dtype, device=q.device)
    l = torch.zeros_like(m)
    for start in range(0, n_k, block_size):
        end = min(start + block_size, n_k)
        s = (q @ k[:, :, start:end].transpose(-1, -2)) * scale  # (B, H, N_q, block)
        if causal:
            s = s.masked_fill(~causal_mask(n_q, n_k, q.device)[:, start:end], float("-inf"))
        m_block = s.amax(dim=-1)
        p = torch.exp(s - m_block.masked_fill(m_block == float("-inf"), 0.0)[..., None])
        l_block = p.sum(dim=-1)
        o_block = (p @ v[:, :, start:end]) / l_block.clamp_min(torch.finfo(l.dtype).tiny)[..., None]
        o, m, l = merge_attention_blocks(o, m, l, o_block, m_block, l_block)
    return (o, m + torch.log(l)) if return_lse else o


def __getattr__(name):
    # flash_attention lives in lectlib.flash, which imports Triton: load it only when asked for.
    if name == "flash_attention":
        from .flash import flash_attention

        return flash_attention
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
