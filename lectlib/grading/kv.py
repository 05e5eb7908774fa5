"""Exercises of the streaming chapter: StreamingLLM's eviction rule, positions in the cache, the sink rate."""

import torch

from .. import kv, streaming
from . import exercise, expect, expect_close


def _as_list(x) -> list[int]:
    return [int(i) for i in (x.tolist() if isinstance(x, torch.Tensor) else x)]


@exercise("sink_window_keep", reference=lambda n_old, n_new, sinks, window:
          kv.SinkCache(sinks, window).keep(0, n_old, n_new))
def _(candidate):
    got = _as_list(candidate(10, 1, 2, 6))
    expect(got != list(range(5, 10)), "keep the sinks: tokens 0 and 1 must survive every eviction")
    expect(got != [0, 1] + list(range(4, 10)), "the new token takes one of the window's places: the window counts it, "
           "so keep only window - 1 = 5 old recent tokens")
    expect(got == [0, 1, 5, 6, 7, 8, 9], f"10 old tokens, 1 new, 2 sinks, window 6: keep [0, 1, 5, 6, 7, 8, 9], got {got}")
    expect(_as_list(candidate(3, 1, 4, 8)) == [0, 1, 2], "a cache that is not full yet keeps every old token")
    expect(_as_list(candidate(20, 5, 4, 8)) == [0, 1, 2, 3, 17, 18, 19],
           "5 new tokens with window 8: 3 old recent ones still fit beside them")
    expect(_as_list(candidate(20, 12, 4, 8)) == [0, 1, 2, 3], "a chunk longer than the window: only the sinks stay")
    expect(_as_list(candidate(12, 1, 0, 4)) == [9, 10, 11], "no sinks is plain window attention")
    expect(_as_list(candidate(2, 1, 4, 3)) == [0, 1], "fewer old tokens than sinks: keep them all, none twice")


@exercise("cache_positions", reference=lambda text_positions, n_new: (torch.arange(len(text_positions)),
                                                                       torch.arange(len(text_positions))[-n_new:]))
def _(candidate):
    held = torch.tensor([0, 1, 2, 3, 996, 997, 998, 999, 1000])
    keys, queries = candidate(held, 1)
    expect_close(keys, torch.arange(9), "positions in the cache are places 0 .. N-1, not the text positions")
    expect_close(queries, torch.tensor([8]), "the new token is the last place in the cache")
    keys, queries = candidate(torch.tensor([0, 1, 5, 6, 7]), 3)
    expect_close(queries, torch.tensor([2, 3, 4]), "3 new tokens take the last 3 places")
    far = candidate(torch.tensor([0, 1, 2, 3] + list(range(10**6 - 4, 10**6 + 1))), 1)
    near = candidate(torch.tensor([0, 1, 2, 3] + list(range(96, 101))), 1)
    expect_close(far[1] - far[0][0], near[1] - near[0][0], "the query-to-sink distance must not grow with the stream")


@exercise("sink_rate", reference=streaming.sink_rate)
def _(candidate):
    torch.manual_seed(0)
    n = 8
    w = torch.softmax(torch.randn(4, 3, n, n).masked_fill(torch.ones(n, n).triu(1).bool(), float("-inf")), -1)
    w[0, 0] = torch.eye(n)  # a head that attends only to itself: token 0 gets 1 from query 0 and 0 from the others
    w[1, :, :, :] = 0
    w[1, :, :, 0] = 1.0  # layer 1: three pure sinks on token 0
    expect_close(candidate(w, 0, 0.3), streaming.sink_rate(w, 0, 0.3), "token 0, ε = 0.3 over 12 heads", atol=1e-6)
    w2 = torch.zeros(1, 2, 4, 4)
    w2[0, :, :, :] = torch.tensor([[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0.2, 0.4, 0.4, 0], [0.1, 0.3, 0.25, 0.35]])
    expect_close(candidate(w2, 1, 0.3), 1.0, "token 1: average over the queries that see it (t >= 1), "
                 "(0.5 + 0.4 + 0.3) / 3 = 0.4 > 0.3, not over every query (1.2 / 4 = 0.3)", atol=1e-6)
    expect_close(candidate(w2, 1, 0.45), 0.0, "ε = 0.45: no head exceeds it", atol=1e-6)
    expect_close(candidate(w2, 3, 0.3), 1.0, "the last token is seen by one query only", atol=1e-6)
