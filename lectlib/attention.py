"""Attention functions. All take (B, H, N, D) tensors like torch SDPA. Shown in chapter 1.

Conventions shared by every function here (and by `lectlib.flash`):
- q is (B, H, N_q, D); k and v are (B, H_kv, N_k, D) with H_kv dividing H (grouped-query
  attention: query head h reads KV head h // (H / H_kv));
- `causal=True` aligns the queries to the END of the keys, so query i (of N_q) sees keys
  0 .. N_k - N_q + i; this is what decoding with a KV cache needs (torch SDPA's `is_causal`
  aligns to the start instead, so it is only used here when N_q == N_k);
- `scale` defaults to 1/sqrt(D);
- scores and softmax are computed in fp32 whatever the input dtype (fp64 stays fp64), so fp16
  scores past 65504 never overflow; the output has the input dtype;
- the online-softmax state is (m, l, o): running max of the scores, denominator
  l = Σ exp(s - m), and output o; `online_softmax_step`, `merge_attention_blocks` and the
  kernel's `flash.block_step` take and return it in that order;
- a row whose keys are all masked (or all score -inf) returns zeros: no key has any weight;
- non-finite inputs are never turned into numbers (the softmax formula's own behaviour): a row
  whose scores hold a NaN (a NaN or inf in its query or in a key it sees) or a +inf, or that
  reads a non-finite value, is NaN, and a NaN or inf in q or k spoils no other row. A non-finite
  value vector may also spoil rows that do not see it (0·NaN is NaN in P·V). `sdpa_attention`
  is torch's kernel and does what it does (on a CPU it can return a finite row for a NaN query).
"""

import math
import numbers

import torch
import torch.nn.functional as F


def check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor | None = None) -> None:
    """Raise ValueError naming the argument unless q, k (and v) have compatible (B, H, N, D) shapes."""
    named = (("q", q), ("k", k)) + ((("v", v),) if v is not None else ())
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must be (B, H, N, D), got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if v is not None and k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got k {tuple(k.shape)} and v {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree in batch (dim 0) and head_dim (dim 3)")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"k has {k.shape[1]} heads, which must divide the {q.shape[1]} heads of q (GQA)")
    if any(t.dtype != q.dtype for _, t in named):
        raise ValueError("q, k, v must share a dtype, got " + ", ".join(f"{name} {t.dtype}" for name, t in named))


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, H_kv, N, D) -> (B, H_kv * n_rep, N, D): each KV head serves n_rep query heads."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def causal_mask(n_q: int, n_k: int, device=None, *, start: int = 0, end: int | None = None) -> torch.Tensor:
    """(N_q, end - start) bool, True where query i may see key j: j <= i + (N_k - N_q) (end-aligned).

    Only the columns of keys start .. end-1 (all keys by default) are built, from indices: a block
    of keys costs O(N_q · block) memory, never the whole N_q x N_k mask.
    """
    for name, value in (("n_q", n_q), ("n_k", n_k)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    end = n_k if end is None else end
    if not 0 <= start <= end <= n_k:
        raise ValueError(f"need 0 <= start <= end <= n_k={n_k}, got start={start!r}, end={end!r}")
    i = torch.arange(n_q, device=device)[:, None]
    j = torch.arange(start, end, device=device)[None, :]
    return j <= i + (n_k - n_q)


def _prepare(q, k, v, scale, *, upcast: bool = True):
    """The one place that validates q, k, v (v may be None), repeats GQA heads and resolves the scale.

    Returns (q, k, v, scale) with k, v expanded to q's heads; with `upcast`, in the dtype scores
    are computed in: fp32 for fp16/bf16/fp32 inputs, fp64 for fp64.
    """
    check_qkv(q, k, v)
    scale = resolve_scale(scale, q.shape[-1])
    n_rep = q.shape[1] // k.shape[1]
    k = repeat_kv(k, n_rep)
    v = None if v is None else repeat_kv(v, n_rep)
    if upcast:
        dtype = torch.promote_types(q.dtype, torch.float32)
        q, k, v = q.to(dtype), k.to(dtype), None if v is None else v.to(dtype)
    return q, k, v, scale


def resolve_scale(scale, head_dim: int) -> float:
    """`scale` as a float, 1/sqrt(head_dim) when None; ValueError unless it is a finite number."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale):
        raise ValueError(f"scale must be a finite number, got {scale!r}")
    return float(scale)


def sdpa_attention(q, k, v, *, causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """torch's fused scaled_dot_product_attention with GQA and end-aligned causal masking: (B, H, N_q, D)."""
    q, k, v, scale = _prepare(q, k, v, scale, upcast=False)  # torch's kernels accumulate in fp32 themselves
    n_q, n_k = q.shape[2], k.shape[2]
    if not causal or n_q == 1 and n_k >= 1:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    if n_q == n_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_mask(n_q, n_k, q.device), scale=scale)


def attention_probs(q, k, *, causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """softmax(QKᵀ·scale), the one place attention weights are computed: (B, H, N_q, N_k), fp32 (fp64 for fp64).

    q is (B, H, N_q, D) and k (B, H_kv, N_k, D) (GQA heads are repeated). Scores and softmax are
    computed in fp32 whatever the input dtype, so fp16 scores past 65504 do not overflow. A row
    whose keys are all masked (all scores -inf) returns zeros; a row with a NaN score stays NaN.
    """
    q, k, _, scale = _prepare(q, k, None, scale)
    s = (q @ k.transpose(-1, -2)) * scale  # (B, H, N_q, N_k)
    if causal:
        s = s.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device), float("-inf"))
    p = torch.softmax(s, dim=-1)
    # softmax of an all -inf row is 0/0: such a row sees no key and gets no weight (a NaN row stays NaN).
    return p.masked_fill(torch.isneginf(s).all(dim=-1, keepdim=True), 0.0)


def naive_attention(q, k, v, *, causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """Attention as written (Vaswani et al. 2017, eq. 1): S = QKᵀ·scale, P = softmax(S), O = PV.

    Materializes the (B, H, N_q, N_k) score matrix: O(N²) memory. Returns (B, H, N_q, D) in the
    input dtype, computed in fp32. A row whose keys are all masked returns zeros.

    Shown in chapters 0 and 1.
    """
    dtype = getattr(q, "dtype", None)  # the output is returned in the input dtype
    q, k, v, scale = _prepare(q, k, v, scale)
    p = attention_probs(q, k, causal=causal, scale=scale)  # (B, H, N_q, N_k)
    return (p @ v).to(dtype)


def online_softmax_step(m, l, o, s, v):
    """One step of the online-softmax recurrence (Milakov & Gimelshein 2018; the lectures' form).

    State (m, l, o) after keys 1..i-1: running max m, denominator l = Σ exp(s_j - m), normalized
    output o = Σ softmax_j v_j. A new score s with value vector v gives, with m' = max(m, s):

        l' = l·exp(m - m') + exp(s - m')
        o' = (o·l·exp(m - m') + v·exp(s - m')) / l'

    Shapes: m, l, s (...,); o, v (..., D). The state starts at m = -inf, l = 0, o = 0. A key with
    s = -inf (masked) changes nothing; while every key so far is masked the output stays 0.
    Returns (m', l', o').

    Shown in chapter 1.
    """
    m_new = torch.maximum(m, s)
    # Subtracting a max of -inf would give -inf - (-inf) = nan; all weights are 0 then anyway.
    m_ref = m_new.masked_fill(m_new == float("-inf"), 0.0)
    decay, e = torch.exp(m - m_ref), torch.exp(s - m_ref)
    l_new = l * decay + e
    o_new = (o * (l * decay)[..., None] + v * e[..., None]) / l_new.clamp_min(torch.finfo(l.dtype).tiny)[..., None]
    return m_new, l_new, o_new


def online_softmax_attention(q, k, v, *, causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """Attention in one pass over the keys with the online-softmax recurrence: (B, H, N_q, D).

    Reads key j, scores every query against it, and folds it into the running state (m, l, o)
    of `online_softmax_step`; no N_q x N_k matrix exists, not even the causal mask (one column
    of it per key). One key per step, so it is slow: it is written to be read, and
    `blockwise_attention` is the same idea a block at a time.

    Shown in chapter 1.
    """
    dtype = getattr(q, "dtype", None)  # the output is returned in the input dtype
    q, k, v, scale = _prepare(q, k, v, scale)
    n_q, n_k = q.shape[2], k.shape[2]
    m = torch.full(q.shape[:-1], float("-inf"), dtype=q.dtype, device=q.device)
    l = torch.zeros_like(m)
    o = torch.zeros_like(q)
    for j in range(n_k):
        s = (q * k[:, :, j, None, :]).sum(-1) * scale  # (B, H, N_q): every query against key j
        if causal:
            s = s.masked_fill(~causal_mask(n_q, n_k, q.device, start=j, end=j + 1)[:, 0], float("-inf"))
        m, l, o = online_softmax_step(m, l, o, s, v[:, :, j, None, :])
    return o.to(dtype)


def merge_attention_blocks(m_a, l_a, o_a, m_b, l_b, o_b):
    """Combine attention over two disjoint key sets into attention over their union.

    Each part is its state (m, l, o): the max of its scores m (...,), its denominator
    l = Σ exp(s - m) (...,) and its normalized output o (..., D); m = -inf, l = 0 marks a part
    with no visible key. With m' = max(m_a, m_b), each part is rescaled from its own max to the
    common one (FlashAttention, Dao et al. 2022, Algorithm 1, lines 11-12):

        l' = exp(m_a - m')·l_a + exp(m_b - m')·l_b
        o' = (exp(m_a - m')·l_a·o_a + exp(m_b - m')·l_b·o_b) / l'

    Keeping the max apart from l (rather than one log-sum-exp m + log l) keeps the weights exact
    when scores are large: m_a - m' is a difference of two scores. Returns (m', l', o').

    Shown in chapter 1.
    """
    m = torch.maximum(m_a, m_b)
    m_ref = m.masked_fill(m == float("-inf"), 0.0)
    w_a, w_b = torch.exp(m_a - m_ref) * l_a, torch.exp(m_b - m_ref) * l_b
    l = w_a + w_b
    o = (w_a[..., None] * o_a + w_b[..., None] * o_b) / l.clamp_min(torch.finfo(l.dtype).tiny)[..., None]
    return m, l, o


def blockwise_attention(q, k, v, *, causal: bool = False, scale: float | None = None, block_size: int = 128,
                        return_lse: bool = False):
    """Memory-efficient attention over blocks of `block_size` keys (Rabe & Staats 2021): (B, H, N_q, D).

    Each block's scores (B, H, N_q, block_size), and with `causal` its columns of the mask, give
    that block's state (m, l, o); blocks are folded together with `merge_attention_blocks`. Peak
    extra memory is O(N_q · block_size), linear in N, against naive attention's O(N_q · N_k).
    With `return_lse`, also returns each query's log-sum-exp of scores (B, H, N_q), fp32 (fp64
    for fp64), -inf where it sees no key.

    Shown in chapter 1.
    """
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    dtype = getattr(q, "dtype", None)  # the output is returned in the input dtype
    q, k, v, scale = _prepare(q, k, v, scale)
    n_q, n_k = q.shape[2], k.shape[2]
    o = torch.zeros_like(q)
    m = torch.full(q.shape[:-1], float("-inf"), dtype=q.dtype, device=q.device)
    l = torch.zeros_like(m)
    for start in range(0, n_k, block_size):
        end = min(start + block_size, n_k)
        s = (q @ k[:, :, start:end].transpose(-1, -2)) * scale  # (B, H, N_q, block)
        if causal:
            s = s.masked_fill(~causal_mask(n_q, n_k, q.device, start=start, end=end), float("-inf"))
        m_block = s.amax(dim=-1)
        p = torch.exp(s - m_block.masked_fill(m_block == float("-inf"), 0.0)[..., None])
        l_block = p.sum(dim=-1)
        o_block = (p @ v[:, :, start:end]) / l_block.clamp_min(torch.finfo(l.dtype).tiny)[..., None]
        m, l, o = merge_attention_blocks(m, l, o, m_block, l_block, o_block)
    o = o.to(dtype)
    return (o, m + torch.log(l)) if return_lse else o


def __getattr__(name):
    # flash_attention lives in lectlib.flash, which imports Triton: load it only when asked for.
    if name == "flash_attention":
        from .flash import flash_attention

        return flash_attention
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
