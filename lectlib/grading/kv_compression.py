"""Exercises of the KV-compression chapter: H2O's score update, Quest's page bound, per-channel quantization."""

import torch

from .. import kvquant, quest
from . import exercise, expect, expect_close


def _h2o_update(accumulated: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    return torch.cat([accumulated, accumulated.new_zeros(accumulated.shape[0], weights.shape[1])], dim=1) + weights.sum(1)


@exercise("h2o_update", reference=_h2o_update)
def _(candidate):
    acc = torch.tensor([[3.0, 1.0, 0.5]])
    w = torch.tensor([[[0.5, 0.1, 0.1, 0.3]]])  # one new token's query over the 3 old keys and itself
    got = candidate(acc, w)
    expect(tuple(got.shape) == (1, 4), f"one new token: the scores grow from 3 to 4 tokens, got shape {tuple(got.shape)}")
    expect_close(got, torch.tensor([[3.5, 1.1, 0.6, 0.3]]), "add each key's attention to its running sum; the new "
                 "token starts at 0 plus what it got from its own query", atol=1e-6)
    w2 = torch.tensor([[[0.6, 0.4, 0.0, 0.0, 0.0], [0.1, 0.1, 0.2, 0.3, 0.3]]]).repeat(2, 1, 1)
    acc2 = torch.tensor([[1.0, 1.0, 1.0], [0.0, 2.0, 0.0]])
    expect_close(candidate(acc2, w2), _h2o_update(acc2, w2), "two new tokens, two heads: sum over every new "
                 "query (dim 1), per head", atol=1e-6)


@exercise("quest_page_bound", reference=lambda q, keys, page_size:
          quest.page_bounds(q[None, None, None], keys[None, None], page_size)[0, 0, 0])
def _(candidate):
    keys = torch.tensor([[1.0, -2.0], [3.0, 0.5], [-1.0, 1.0], [0.0, 4.0], [2.0, 2.0]])
    q = torch.tensor([2.0, -1.0])
    got = candidate(q, keys, 2)
    expect(tuple(got.shape) == (3,), f"5 keys in pages of 2: 3 pages (the last partial), got shape {tuple(got.shape)}")
    # page 0: min (1, -2), max (3, 0.5): max(2·1, 2·3) + max(-1·-2, -1·0.5) = 6 + 2 = 8
    expect_close(got[0], 8.0, "page 0: Σ_i max(q_i·min_i, q_i·max_i) = max(2, 6) + max(2, -0.5) = 8; a negative "
                 "q_i picks the channel's minimum", atol=1e-5)
    expect_close(got, torch.tensor([8.0, -1.0, 2.0]), "pages 1 and 2 (the last has one key: its bound is its score)",
                 atol=1e-5)
    torch.manual_seed(0)
    q, keys = torch.randn(8), torch.randn(37, 8)
    bound = candidate(q, keys, 4)
    true_max = torch.nn.functional.pad(keys @ q, (0, 3), value=float("-inf")).view(10, 4).amax(1)
    expect(bool((bound >= true_max - 1e-5).all()), "the bound must be at least every key's score on its page")


@exercise("quantize_per_channel", reference=lambda x, bits:
          kvquant.fake_quantize(x[None, None], bits, axis="channel", group_size=x.shape[0])[0, 0])
def _(candidate):
    x = torch.tensor([[0.0, 10.0], [1.0, -10.0], [2.0, 1.0], [3.0, 5.0]])
    got = candidate(x, 2)
    expect(tuple(got.shape) == (4, 2), f"the dequantized tensor has x's shape, got {tuple(got.shape)}")
    expect_close(got[:, 0], torch.tensor([0.0, 1.0, 2.0, 3.0]), "channel 0 spans [0, 3]: 2 bits give the levels "
                 "0, 1, 2, 3 exactly (one range per channel, not per token)", atol=1e-5)
    expect_close(got[:, 1], torch.tensor([10.0, -10.0, 10 / 3, 10 / 3]), "channel 1 spans [-10, 10]: levels "
                 "-10, -10/3, 10/3, 10; round to the nearest", atol=1e-4)
    torch.manual_seed(1)
    y = torch.randn(64, 16) * torch.linspace(0.1, 10, 16)
    for bits in (2, 4):
        err = (candidate(y, bits) - y).abs()
        bound = (y.amax(0) - y.amin(0)) / (2 * (2 ** bits - 1))
        expect(bool((err <= bound + 1e-5).all()), f"{bits} bits: every error is at most half a step, (max - min) / "
               f"(2 (2^bits - 1)), per channel")
