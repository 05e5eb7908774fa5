"""Exercises of the Mamba chapter: one step of the discretised recurrence, the scan's operator."""

import math

import torch

from .. import ssm
from . import expect, expect_close, exercise


def _step_case(seed: int, batch: int = 2, dim: int = 3, n: int = 4):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return dict(h=r(batch, dim, n), x=r(batch, dim), delta=torch.rand(batch, dim, generator=g, dtype=torch.float64),
                A=-torch.rand(dim, n, generator=g, dtype=torch.float64) * 3, B=r(batch, n), C=r(batch, n), D=r(dim))


def _step_by_hand(h, x, delta, A, B, C, D):
    """The equations with scalar loops: h' = exp(Δ a) h + Δ b x, y = Σ c h' + D x."""
    h_new, y = torch.empty_like(h), torch.empty_like(x)
    for b in range(h.shape[0]):
        for d in range(h.shape[1]):
            for i in range(h.shape[2]):
                h_new[b, d, i] = math.exp(delta[b, d] * A[d, i]) * h[b, d, i] + delta[b, d] * B[b, i] * x[b, d]
            y[b, d] = (h_new[b, d] * C[b]).sum() + (0.0 if D is None else D[d] * x[b, d])
    return y, h_new


@exercise("ssm_recurrence_step", reference=ssm.selective_scan_step)
def _(candidate):
    for seed, with_d in ((0, True), (1, False)):
        case = _step_case(seed)
        if not with_d:
            case["D"] = None
        got = candidate(**case)
        expect(isinstance(got, tuple) and len(got) == 2, "return the tuple (y, h)")
        want_y, want_h = _step_by_hand(**case)
        what = "with the skip D" if with_d else "with D=None (no skip term)"
        expect_close(got[1], want_h, f"{what}: the new state h = exp(Δ A) ⊙ h + (Δ x) B", rtol=1e-6, atol=1e-9)
        expect_close(got[0], want_y, f"{what}: the output y = C · h_new + D x (read the NEW state)", rtol=1e-6,
                     atol=1e-9)
    case = _step_case(2)
    case["delta"], case["A"] = torch.full_like(case["delta"], 50.0), case["A"] - 1.0  # exp(Δ A) < e^-50
    y, h = candidate(**case)
    expect_close(h, 50.0 * case["x"][..., None] * case["B"][:, None, :],
                 "a large step Δ must forget the old state (exp(Δ A) → 0)", rtol=1e-6, atol=1e-9)


@exercise("scan_combine", reference=ssm.scan_combine)
def _(candidate):
    g = torch.Generator().manual_seed(0)
    steps = [(torch.rand(3, generator=g, dtype=torch.float64) + 0.5, torch.randn(3, generator=g, dtype=torch.float64))
             for _ in range(8)]
    h = torch.zeros(3, dtype=torch.float64)
    states = []
    for a, b in steps:
        h = a * h + b
        states.append(h)
    a, b = candidate(steps[0], steps[1])
    expect_close(b, states[1], "combining step 1 then step 2 must give the map h ↦ a₂(a₁h + b₁) + b₂ "
                               "(with h = 0 its b is h₂; check which pair is applied first)", rtol=1e-9)
    expect_close(a, steps[0][0] * steps[1][0], "the combined multiplier is a₁·a₂", rtol=1e-9)
    # A tree of combinations, as a parallel scan groups them, must give the last state of the loop.
    level = steps
    while len(level) > 1:
        level = [candidate(level[i], level[i + 1]) for i in range(0, len(level), 2)]
    expect_close(level[0][1], states[-1], "combining 8 steps pairwise, in a tree (associativity)", rtol=1e-9)
