"""Exercises of the sparse and ring attention chapter: one chunk's sliding-window mask, one ring step."""

import math

import torch

from .. import ring, sparse
from . import expect, expect_close, exercise


@exercise("sliding_chunk_mask", reference=sparse.sliding_chunk_mask)
def _(candidate):
    n = 23
    for window in (1, 4, 7):
        whole = sparse.pattern_mask("sliding", n, window=window)
        for start in range(0, n, window):
            end, lo = min(n, start + window), max(0, start - window + 1)
            got = candidate(start, end, lo, window)
            what = f"window {window}, queries {start}..{end - 1}, keys {lo}..{end - 1}"
            expect(isinstance(got, torch.Tensor) and got.dtype == torch.bool, f"{what}: return a bool tensor")
            expect(tuple(got.shape) == (end - start, end - lo), f"{what}: expected shape {(end - start, end - lo)}, got {tuple(got.shape)}")
            expect(torch.equal(got, whole[start:end, lo:end]),
                   f"{what}: the band differs from the sliding-window mask (query i sees keys i - window + 1 .. i)")


def _full_state(q, k, v, scale):
    s = (q @ k.transpose(-1, -2)) * scale
    return s.amax(-1), torch.exp(s - s.amax(-1, keepdim=True)).sum(-1), torch.softmax(s, -1) @ v


@exercise("ring_step", reference=lambda m, l, o, q, k, v, scale: ring.fold_block(m, l, o, q, k, v, scale=scale))
def _(candidate):
    g = torch.Generator().manual_seed(0)
    for spread in (1.0, 30.0):
        q = torch.randn(1, 2, 6, 8, generator=g, dtype=torch.float64) * spread
        k, v = (torch.randn(1, 2, 12, 8, generator=g, dtype=torch.float64) for _ in range(2))
        scale = 1 / math.sqrt(8)
        want_m, want_l, want_o = _full_state(q, k, v, scale)
        for first in range(3):  # each rank starts from its own block: the order must not matter
            m, l, o = torch.full(q.shape[:-1], float("-inf"), dtype=q.dtype), torch.zeros(q.shape[:-1], dtype=q.dtype), torch.zeros_like(q)
            for step in range(3):
                b = (first - step) % 3
                out = candidate(m, l, o, q, k[:, :, 4 * b:4 * b + 4], v[:, :, 4 * b:4 * b + 4], scale)
                expect(isinstance(out, tuple) and len(out) == 3, "return the new state (m, l, o)")
                m, l, o = out
            what = f"scores of spread {spread}, starting at block {first}"
            expect_close(m, want_m, f"{what}: the running max m after three steps", rtol=1e-9)
            expect_close(l, want_l, f"{what}: the denominator l = Σ exp(s - m) after three steps", rtol=1e-9)
            expect_close(o, want_o, f"{what}: the output after three steps", rtol=1e-9, atol=1e-12)
