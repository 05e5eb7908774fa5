"""Rotary position embeddings (RoPE, Su et al. 2021, eq. 34) in the Llama "rotate half" layout.

Dimension pair (i, i + D/2) of a query or key at position m is rotated by the angle m·θ_i with
θ_i = base^(-2i/D). The dot product of a query rotated to m and a key rotated to n then depends
only on m - n: attention sees relative positions.
"""

import torch


def rope_inv_freq(head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """(D/2,) the rotation frequencies θ_i = base^(-2i/D), in radians per position."""
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for RoPE, got {head_dim}")
    return 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float = 1.0):
    """cos and sin of the angles m·θ_i for `positions` (..., N): each (..., N, D), halves repeated.

    `attention_factor` scales both (YaRN's temperature enters here, as in transformers).
    """
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(torch.float32)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
               attention_factor: float = 1.0) -> torch.Tensor:
    """Rotate x (B, H, N, D) by its positions (N,) or (B, N): x·cos + rotate_half(x)·sin."""
    if x.dim() != 4:
        raise ValueError(f"x must be (B, H, N, D), got shape {tuple(x.shape)}")
    if positions.shape[-1] != x.shape[2]:
        raise ValueError(f"positions has {positions.shape[-1]} entries for {x.shape[2]} tokens of x")
    cos, sin = rope_cos_sin(positions, inv_freq, attention_factor)
    if cos.dim() == 3:  # (B, N, D) -> (B, 1, N, D), shared by the heads
        cos, sin = cos[:, None], sin[:, None]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


def rope_parameters(head_dim: int, base: float, scaling: dict | None, seq_len: int):
    """(inv_freq (D/2,), attention_factor) for a model's RoPE settings at sequence length `seq_len`.

    `scaling` is a Hugging Face style `rope_scaling` dict, or None for plain RoPE.
    """
    if scaling is None or scaling.get("rope_type", scaling.get("type")) == "default":
        return rope_inv_freq(head_dim, base), 1.0
    raise ValueError(f"rope_scaling {scaling!r}: unknown rope_type")
