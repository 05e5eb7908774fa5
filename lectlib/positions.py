"""Rotary position embeddings (RoPE, Su et al. 2021, eq. 34) and the ways to stretch them.

Dimension pair (i, i + D/2) of a query or key at position m is rotated by the angle m·θ_i with
θ_i = base^(-2i/D) (the Llama "rotate half" layout). The dot product of a query rotated to m and
a key rotated to n then depends only on m - n: attention sees relative positions.

A model trained on sequences of length L has only seen angles m·θ_i with m < L. To run it on
s·L tokens, the scalings change the frequencies θ_i (never the weights):

- linear / position interpolation (PI, Chen et al. 2023): θ_i / s, i.e. positions m -> m / s;
- NTK-aware (bloc97 2023): a larger base, base·s^(D/(D-2)); fast dimensions barely change,
  the slowest one is divided by exactly s;
- dynamic NTK (emozilla 2023): NTK-aware with the scale recomputed from the current length,
  s' = s·n/L - (s - 1) for n > L, and plain RoPE for n <= L;
- YaRN (Peng et al. 2023, eq. 17-20): per dimension, interpolate when its wavelength is long
  compared with L, extrapolate when it is short, a linear ramp between; plus an attention
  temperature √(1/t) = 0.1·ln s + 1 that multiplies cos and sin (so q·k by its square).

`rope_parameters` turns a Hugging Face style `rope_scaling` dict into (inv_freq, attention_factor);
transformers' `ROPE_INIT_FUNCTIONS` compute the same numbers (the tests' oracle).
"""

import math
import numbers

import torch

ROPE_TYPES = ("default", "linear", "ntk", "dynamic", "yarn")


def _check_number(name: str, value, *, above: float) -> None:
    """ValueError naming `name` unless `value` is a finite real number greater than `above` (nan fails)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > above):
        raise ValueError(f"{name} must be a finite number > {above}, got {value!r}")


def _check_length(name: str, value) -> None:
    """ValueError naming `name` unless `value` is a positive int (a number of positions)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} (a number of positions) must be a positive int, got {value!r}")


def rope_inv_freq(head_dim: int, base: float = 10000.0) -> torch.Tensor:
    """(D/2,) the rotation frequencies θ_i = base^(-2i/D), in radians per position."""
    if isinstance(head_dim, bool) or not isinstance(head_dim, numbers.Integral) or head_dim % 2 or head_dim <= 0:
        raise ValueError(f"head_dim must be a positive even number for RoPE, got {head_dim!r}")
    _check_number("base", base, above=1)
    return 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, attention_factor: float = 1.0):
    """cos and sin of the angles m·θ_i for `positions` (..., N): each (..., N, D), halves repeated.

    `attention_factor` scales both (YaRN's temperature enters here, as in transformers).
    """
    _check_number("attention_factor", attention_factor, above=0)
    angles = positions.to(torch.float32)[..., None] * inv_freq.to(torch.float32)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) on the two halves of the last dimension.

    Shown in chapter 2."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor,
               attention_factor: float = 1.0) -> torch.Tensor:
    """Rotate x (B, H, N, D) by its positions (N,) or (B, N): x·cos + rotate_half(x)·sin.

    Shown in chapter 2."""
    if x.dim() != 4:
        raise ValueError(f"x must be (B, H, N, D), got shape {tuple(x.shape)}")
    if positions.shape[-1] != x.shape[2]:
        raise ValueError(f"positions has {positions.shape[-1]} entries for {x.shape[2]} tokens of x")
    if inv_freq.shape != (x.shape[-1] // 2,):
        raise ValueError(f"inv_freq must be ({x.shape[-1] // 2},) for head_dim {x.shape[-1]}, got {tuple(inv_freq.shape)}")
    cos, sin = rope_cos_sin(positions, inv_freq, attention_factor)
    if cos.dim() == 3:  # (B, N, D) -> (B, 1, N, D), shared by the heads
        cos, sin = cos[:, None], sin[:, None]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


def wavelengths(inv_freq: torch.Tensor) -> torch.Tensor:
    """(D/2,) positions per full turn of each dimension pair: λ_i = 2π / θ_i."""
    return 2 * math.pi / inv_freq


def _check_factor(factor: float) -> None:
    if isinstance(factor, bool) or not isinstance(factor, numbers.Real) or not (math.isfinite(factor) and factor >= 1):
        raise ValueError(f"factor (the context extension s) must be a finite number >= 1, got {factor!r}")


def linear_inv_freq(head_dim: int, base: float, factor: float) -> torch.Tensor:
    """Position interpolation: θ_i / s, the same as feeding positions m / s (Chen et al. 2023, eq. 4)."""
    _check_factor(factor)
    return rope_inv_freq(head_dim, base) / factor


def ntk_base(head_dim: int, base: float, factor: float) -> float:
    """NTK-aware base b' = b·s^(D/(D-2)): the slowest pair θ_{D/2-1} is divided by exactly s.

    Shown in chapter 2."""
    _check_factor(factor)
    if isinstance(head_dim, bool) or not isinstance(head_dim, numbers.Integral) or head_dim < 4 or head_dim % 2:
        raise ValueError(f"head_dim must be an even number >= 4 for NTK-aware scaling (b·s^(D/(D-2))), "
                         f"got {head_dim!r}")
    return base * factor ** (head_dim / (head_dim - 2))


def ntk_inv_freq(head_dim: int, base: float, factor: float) -> torch.Tensor:
    """NTK-aware scaling: plain RoPE frequencies with the base changed to `ntk_base`."""
    return rope_inv_freq(head_dim, ntk_base(head_dim, base, factor))


def dynamic_ntk_inv_freq(head_dim: int, base: float, factor: float, seq_len: int,
                         original_max_position_embeddings: int) -> torch.Tensor:
    """Dynamic NTK: NTK-aware with s' = s·n/L - (s - 1) at length n = max(seq_len, L).

    Plain RoPE up to the trained length L; beyond it the base grows with the sequence, so a
    short input is never distorted and a long one gets just enough stretching.
    """
    _check_factor(factor)
    _check_length("original_max_position_embeddings", original_max_position_embeddings)
    if isinstance(seq_len, bool) or not isinstance(seq_len, numbers.Integral) or seq_len < 0:
        raise ValueError(f"seq_len must be a non-negative int, got {seq_len!r}")
    n = max(int(seq_len), original_max_position_embeddings)
    current = factor * n / original_max_position_embeddings - (factor - 1)
    return ntk_inv_freq(head_dim, base, current)


def yarn_correction_range(head_dim: int, base: float, original_max_position_embeddings: int,
                          beta_fast: float = 32, beta_slow: float = 1, truncate: bool = True):
    """(low, high) dimension-pair indices where YaRN's ramp runs (Peng et al. 2023, eq. 17-18).

    Pair i turns r_i = L / λ_i times over the trained length L. Pairs turning more than
    beta_fast times (i < low) are left alone; pairs turning fewer than beta_slow times
    (i > high) are interpolated like PI. Solving L·θ_i / 2π = r for i gives
    i(r) = D·ln(L / (2π r)) / (2 ln base).
    """
    _check_length("original_max_position_embeddings", original_max_position_embeddings)
    _check_number("base", base, above=1)
    _check_number("beta_fast", beta_fast, above=0)
    _check_number("beta_slow", beta_slow, above=0)
    def pair_index(rotations: float) -> float:
        return head_dim * math.log(original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = pair_index(beta_fast), pair_index(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, head_dim - 1)


def yarn_ramp(head_dim: int, base: float, original_max_position_embeddings: int,
              beta_fast: float = 32, beta_slow: float = 1, truncate: bool = True) -> torch.Tensor:
    """(D/2,) γ_i in [0, 1]: 0 keeps θ_i (extrapolate), 1 uses θ_i / s (interpolate), linear between."""
    low, high = yarn_correction_range(head_dim, base, original_max_position_embeddings, beta_fast, beta_slow, truncate)
    if low == high:
        high += 0.001  # a one-point ramp would divide by zero
    return ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)


def yarn_inv_freq(head_dim: int, base: float, factor: float, original_max_position_embeddings: int,
                  beta_fast: float = 32, beta_slow: float = 1, truncate: bool = True) -> torch.Tensor:
    """YaRN's "NTK-by-parts" frequencies: θ'_i = (1 - γ_i)·θ_i + γ_i·θ_i / s.

    Shown in chapter 2."""
    _check_factor(factor)
    theta = rope_inv_freq(head_dim, base)
    ramp = yarn_ramp(head_dim, base, original_max_position_embeddings, beta_fast, beta_slow, truncate)
    return (1 - ramp) * theta + ramp * theta / factor


def yarn_attention_factor(factor: float, mscale: float = 1.0) -> float:
    """YaRN's temperature as a factor on cos and sin: √(1/t) = 0.1·mscale·ln s + 1 (1 for s <= 1)."""
    _check_number("factor", factor, above=0)
    _check_number("mscale", mscale, above=0)
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def rope_scaling(rope_type: str, factor: float, original_max_position_embeddings: int, **extra) -> dict | None:
    """A Hugging Face style `rope_scaling` dict for `LlamaConfig.rope_scaling` (None for plain RoPE)."""
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_type must be one of {ROPE_TYPES}, got {rope_type!r}")
    if rope_type == "default":
        return None
    return {"rope_type": rope_type, "factor": float(factor),
            "original_max_position_embeddings": int(original_max_position_embeddings), **extra}


def rope_parameters(head_dim: int, base: float, scaling: dict | None, seq_len: int):
    """(inv_freq (D/2,), attention_factor) for a model's RoPE settings at sequence length `seq_len`.

    `scaling` is a Hugging Face style `rope_scaling` dict, or None for plain RoPE: keys rope_type
    (or type), factor, original_max_position_embeddings (dynamic, yarn), beta_fast, beta_slow,
    attention_factor, mscale, mscale_all_dim, truncate (yarn). "ntk" (static NTK-aware) is not a
    transformers rope_type; it equals transformers' "dynamic" evaluated at n = s·L with factor 1.

    Shown in chapter 2.
    """
    rope_type = "default" if scaling is None else scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"rope_scaling {scaling!r}: unknown rope_type {rope_type!r}, expected one of {ROPE_TYPES}")
    if rope_type == "default":
        return rope_inv_freq(head_dim, base), 1.0
    if "factor" not in scaling:
        raise ValueError(f"rope_scaling {scaling!r}: {rope_type} needs a factor (the context extension s >= 1)")
    factor = scaling["factor"]
    if rope_type == "linear":
        return linear_inv_freq(head_dim, base, factor), 1.0
    if rope_type == "ntk":
        return ntk_inv_freq(head_dim, base, factor), 1.0
    if "original_max_position_embeddings" not in scaling:
        raise ValueError(f"rope_scaling {scaling!r}: {rope_type} needs original_max_position_embeddings (the trained length)")
    original = scaling["original_max_position_embeddings"]
    if isinstance(original, float) and original.is_integer():  # JSON configs may write 8192.0
        original = int(original)
    if rope_type == "dynamic":
        return dynamic_ntk_inv_freq(head_dim, base, factor, seq_len, original), 1.0
    inv_freq = yarn_inv_freq(head_dim, base, factor, original, scaling.get("beta_fast") or 32,
                             scaling.get("beta_slow") or 1, scaling.get("truncate", True))
    attention_factor = scaling.get("attention_factor")
    if attention_factor is not None:
        _check_number("attention_factor", attention_factor, above=0)
    else:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = yarn_attention_factor(factor, mscale) / yarn_attention_factor(factor, mscale_all_dim)
        else:
            attention_factor = yarn_attention_factor(factor)
    return inv_freq, float(attention_factor)
