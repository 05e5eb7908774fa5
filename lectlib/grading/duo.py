"""Exercises of the DuoAttention chapter: the gated mix of two attentions, and the memory of a share of retrieval heads."""

import torch

from .. import duo
from . import exercise, expect, expect_close


@exercise("gated_mix", reference=duo.gated_mix)
def _(candidate):
    torch.manual_seed(0)
    full, stream = torch.randn(2, 6, 5, 4), torch.randn(2, 6, 5, 4)
    expect_close(candidate(full, stream, torch.ones(3)), full, "gate 1 everywhere is full attention")
    expect_close(candidate(full, stream, torch.zeros(3)), stream, "gate 0 everywhere is sink + window attention")
    gate = torch.tensor([1.0, 0.0, 0.25])
    got = candidate(full, stream, gate)
    expect(got.shape == full.shape, f"the output has the shape of the inputs {tuple(full.shape)}, got {tuple(got.shape)}")
    tiled = stream + gate.repeat(2).view(1, -1, 1, 1) * (full - stream)
    expect(not torch.allclose(got, tiled), "query heads 0 and 1 share KV head 0 (repeat_interleave, as repeat_kv): "
           "query head h takes gate[h // 2], not gate[h % 3]")
    expect_close(got[:, :2], full[:, :2], "query heads 0, 1 belong to KV head 0, whose gate is 1")
    expect_close(got[:, 2:4], stream[:, 2:4], "query heads 2, 3 belong to KV head 1, whose gate is 0")
    expect_close(got[:, 4:], 0.25 * full[:, 4:] + 0.75 * stream[:, 4:], "α · full + (1 - α) · stream with α = 0.25")


@exercise("duo_memory", reference=duo.duo_cache_bytes)
def _(candidate):
    smol = dict(n_layers=30, n_kv_heads=3, head_dim=64, sinks=16, window=112, bytes_per_value=2)
    full = 2 * 30 * 3 * 64 * 2 * 4096
    expect_close(candidate(n_tokens=4096, share=1.0, **smol), full, "share 1: every head keeps all 4096 tokens")
    expect_close(candidate(n_tokens=4096, share=0.0, **smol), full * 128 / 4096,
                 "share 0: every head keeps sinks + window = 128 tokens")
    expect_close(candidate(n_tokens=4096, share=0.25, **smol), 2 * 64 * 2 * (22 * 4096 + 68 * 128),
                 "25% of 90 heads is round(22.5) = 22 retrieval heads (Python rounds half to even); the other 68 keep 128")
    expect_close(candidate(n_tokens=100, share=0.0, **smol), 2 * 90 * 64 * 2 * 100,
                 "a stream shorter than sinks + window: streaming heads hold every token too")
