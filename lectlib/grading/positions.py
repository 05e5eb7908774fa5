"""Exercises of the positions chapter: RoPE, position interpolation, NTK's base, the S²-Attn shift."""

import torch

from .. import longlora, positions
from . import expect, expect_close, exercise


def _naive_rope(x: torch.Tensor, pos: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Pair (i, i + D/2) as the complex number x_i + j·x_{i+D/2}, multiplied by e^{j·m·θ_i}."""
    d = x.shape[-1] // 2
    z = torch.complex(x[..., :d].double(), x[..., d:].double()) * torch.exp(1j * pos.double()[:, None] * inv_freq.double())
    return torch.cat([z.real, z.imag], -1)


@exercise("rope_apply", reference=lambda x, pos, inv_freq: positions.apply_rope(x, pos, inv_freq))
def _(candidate):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 8)
    inv = positions.rope_inv_freq(8, 100.0)
    pos = torch.tensor([0, 1, 2, 3, 4])
    out = candidate(x.clone(), pos, inv)
    expect(isinstance(out, torch.Tensor) and out.shape == x.shape, f"return a tensor of shape {tuple(x.shape)}")
    expect_close(out[:, :, 0], x[:, :, 0], "position 0 is not rotated at all", atol=1e-5)
    expect_close(out.norm(dim=-1), x.norm(dim=-1), "a rotation keeps every vector's length", rtol=1e-4, atol=1e-5)
    expect_close(out, _naive_rope(x, pos, inv), "pair (i, i + D/2) turns by m·θ_i (the 'rotate half' layout, "
                 "not adjacent pairs (2i, 2i+1))", atol=1e-4)
    far = torch.tensor([7, 100, 3, 2048, 5])
    expect_close(candidate(x.clone(), far, inv), _naive_rope(x, far, inv),
                 "rotate by the given positions, not by the index 0..N-1", atol=1e-3)


@exercise("rope_position_interpolation", reference=positions.linear_inv_freq)
def _(candidate):
    expect_close(candidate(8, 10000.0, 1.0), positions.rope_inv_freq(8, 10000.0), "factor 1 is plain RoPE")
    theta = 10000.0 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    expect_close(candidate(64, 10000.0, 4.0), theta / 4, "factor 4: every frequency 4x slower, so position 4m "
                 "gets the angle position m had", rtol=1e-5)
    expect_close(candidate(16, 500.0, 2.5)[-1], 500.0 ** (-14 / 16) / 2.5, "head_dim 16, base 500, factor 2.5: "
                 "the slowest pair", rtol=1e-5)


@exercise("rope_ntk_base", reference=positions.ntk_base)
def _(candidate):
    expect_close(candidate(128, 10000.0, 1.0), 10000.0, "factor 1 keeps the base")
    expect_close(candidate(128, 10000.0, 4.0), 10000.0 * 4 ** (128 / 126), "head_dim 128, base 10^4, s = 4: "
                 "b·s^(D/(D-2)), not b·s", rtol=1e-6)
    b = candidate(64, 500000.0, 8.0)
    slowest_before, slowest_after = 500000.0 ** (-62 / 64), b ** (-62 / 64)
    expect_close(slowest_before / slowest_after, 8.0, "the new base must slow the lowest frequency "
                 "(pair D/2 - 1) by exactly s", rtol=1e-6)


@exercise("s2_shift", reference=lambda x, group_size: longlora.s2_shift(x, group_size))
def _(candidate):
    x = torch.arange(2 * 4 * 8, dtype=torch.float32).view(1, 4, 8, 2)
    out = candidate(x.clone(), 4)
    expect(isinstance(out, torch.Tensor) and out.shape == x.shape, f"return a tensor of shape {tuple(x.shape)}")
    expect_close(out[:, :2], x[:, :2], "heads 0 .. H/2 - 1 are not shifted")
    expect_close(out[0, 2:, 0], x[0, 2:, 2], "shifted heads: token G/2 = 2 comes first (roll by -G/2 along the "
                 "sequence, dim 2)")
    expect_close(out[0, 2:, -2:], x[0, 2:, :2], "the roll wraps: the first G/2 tokens end up last")
    odd = torch.randn(2, 5, 12, 3)
    expect_close(candidate(odd.clone(), 6), longlora.s2_shift(odd, 6), "5 heads: heads 2, 3, 4 (H // 2 onward) shift")
