"""The KV cache and its policies: what they keep, what attention sees, what they cost."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lectlib import kv
from lectlib.attention import sdpa_attention
from lectlib.llama import Llama, LlamaConfig

TINY = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64)


def tiny_llama(seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(TINY).eval()


def expected_kept(seen: int, sinks: int, window: int) -> list[int]:
    """The promise of StreamingLLM's cache, written independently: first `sinks` and last `window` positions."""
    return sorted(set(range(min(sinks, seen))) | set(range(max(0, seen - window), seen)))


def feed(cache, chunks, layers=2, heads=2, dim=4):
    """Push chunks of tokens whose keys/values encode their text position; return what each update saw."""
    seen, views = 0, []
    for n in chunks:
        pos = torch.arange(seen, seen + n)
        k = pos.float().view(1, 1, n, 1).expand(1, heads, n, dim).clone()
        for layer in range(layers):
            views.append((layer, seen, n, cache.update(layer, k, -k, pos)))
        seen += n
    return seen, views


@settings(max_examples=60, deadline=None)
@given(sinks=st.integers(0, 5), window=st.integers(1, 9), chunks=st.lists(st.integers(1, 12), min_size=1, max_size=8),
       mode=st.sampled_from(kv.POSITION_MODES))
def test_sink_cache_keeps_exactly_sinks_and_recent(sinks, window, chunks, mode):
    cache = kv.SinkCache(sinks, window, positions=mode)
    seen = 0
    for n in chunks:
        pos = torch.arange(seen, seen + n)
        k = pos.float().view(1, 1, n, 1).expand(1, 2, n, 4).clone()
        keys, values, key_pos, query_pos = cache.update(0, k, -k, pos)
        # what the new queries saw: the kept old tokens (sinks, then the recent ones that fit) and the new ones
        old = expected_kept(seen, sinks, max(window - n, 0)) if seen else []
        saw = old + list(range(seen, seen + n))
        assert keys[0, 0, :, 0].long().tolist() == saw
        assert torch.equal(values, -keys)
        want_pos = torch.tensor(saw) if mode == "text" else torch.arange(len(saw))
        assert torch.equal(key_pos, want_pos) and torch.equal(query_pos, want_pos[-n:])
        seen += n
        # what it holds afterwards: exactly the promise, in text order, keys moved with their positions
        assert cache.text_positions[0].tolist() == expected_kept(seen, sinks, window)
        assert cache.keys[0][0, 0, :, 0].long().tolist() == expected_kept(seen, sinks, window)
        assert len(cache) == min(seen, sinks + window) and cache.seen == seen


def test_token_by_token_attends_to_capacity_tokens():
    cache = kv.SinkCache(4, 12)
    _, views = feed(cache, [1] * 40, layers=1)
    sizes = [out[0].shape[2] for _, _, _, out in views]
    assert sizes == list(range(1, 17)) + [16] * 24
    layer, seen, n, (keys, _, key_pos, query_pos) = views[-1]
    assert keys[0, 0, :, 0].long().tolist() == [0, 1, 2, 3] + list(range(28, 40))
    assert key_pos.tolist() == list(range(16)) and query_pos.tolist() == [15]  # cache positions: the query sits at 15


def test_window_cache_is_sink_cache_without_sinks():
    a, b = kv.WindowCache(7), kv.SinkCache(0, 7)
    feed(a, [3, 1, 5, 1, 1, 9, 2])
    feed(b, [3, 1, 5, 1, 1, 9, 2])
    for layer in (0, 1):
        assert torch.equal(a.keys[layer], b.keys[layer])
        assert a.text_positions[layer].tolist() == list(range(15, 22))


def test_full_cache_keeps_everything():
    cache = kv.KVCache()
    seen, _ = feed(cache, [5, 1, 1, 7])
    assert cache.text_positions[1].tolist() == list(range(seen)) and len(cache) == seen


def test_nbytes_counts_keys_and_values_and_stays_flat_when_full():
    cache = kv.SinkCache(2, 6)
    sizes = []
    for step in range(20):
        feed_one = torch.zeros(1, 3, 1, 8, dtype=torch.float16)
        for layer in range(4):
            cache.update(layer, feed_one, feed_one, torch.tensor([step]))
        sizes.append(cache.nbytes())
    per_token = 4 * 2 * 3 * 8 * 2  # layers · (K and V) · heads · head_dim · bytes
    assert sizes == [per_token * min(s + 1, 8) for s in range(20)]


@pytest.mark.parametrize("chunks", [[23], [1] * 23, [5, 1, 10, 7], [16, 7]])
def test_full_cache_reproduces_uncached_logits(chunks):
    model = tiny_llama()
    ids = torch.randint(0, TINY.vocab_size, (2, sum(chunks)))
    with torch.no_grad():
        whole = model(ids)
        cache, pieces, start = kv.KVCache(), [], 0
        for n in chunks:
            pieces.append(model(ids[:, start:start + n], cache=cache))
            start += n
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, atol=1e-5, rtol=1e-5)


def test_full_cache_reproduces_smollm_logits(smollm):
    model, tok = smollm
    ids = torch.tensor([tok.encode("In the beginning God created the heaven and the earth. And the earth was")])
    with torch.no_grad():
        whole = model(ids)
        cache = kv.KVCache()
        pieces = [model(ids[:, :5], cache=cache)] + [model(ids[:, i:i + 1], cache=cache) for i in range(5, ids.shape[1])]
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, atol=1e-4, rtol=1e-4)


def test_cache_positions_with_big_window_equal_the_full_cache():
    """While nothing is evicted, places in the cache are places in the text."""
    model = tiny_llama(1)
    ids = torch.randint(0, TINY.vocab_size, (1, 30))
    with torch.no_grad():
        full, sink = kv.KVCache(), kv.SinkCache(4, 100)
        a = torch.cat([model(ids[:, i:i + 1], cache=full) for i in range(30)], dim=1)
        b = torch.cat([model(ids[:, i:i + 1], cache=sink) for i in range(30)], dim=1)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_eviction_changes_what_the_model_predicts():
    """A cache that evicts must not silently keep everything: its logits differ once it is full."""
    model = tiny_llama(2)
    ids = torch.randint(0, TINY.vocab_size, (1, 40))
    with torch.no_grad():
        full, window = kv.KVCache(), kv.WindowCache(8)
        a = torch.cat([model(ids[:, i:i + 1], cache=full) for i in range(40)], dim=1)
        b = torch.cat([model(ids[:, i:i + 1], cache=window) for i in range(40)], dim=1)
    torch.testing.assert_close(a[:, :8], b[:, :8], atol=1e-5, rtol=1e-5)
    assert (a[:, 8:] - b[:, 8:]).abs().max() > 1e-3


def test_observed_attention_equals_sdpa_and_shows_queries_and_keys():
    class Recorder(kv.KVCache):
        def observe(self, layer, q, k, scale):
            self.shown = (layer, q, k, scale)

    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 3, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    cache = Recorder()
    out = kv.observed_attention(cache, 5)(q, k, v, causal=True, scale=0.3)
    torch.testing.assert_close(out, sdpa_attention(q, k, v, causal=True, scale=0.3), atol=1e-5, rtol=1e-5)
    layer, q_seen, k_seen, scale = cache.shown
    assert layer == 5 and q_seen is q and k_seen is k and scale == 0.3


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="positions"):
        kv.KVCache(positions="absolute")
    with pytest.raises(ValueError, match="sinks"):
        kv.SinkCache(-1, 4)
    with pytest.raises(ValueError, match="window"):
        kv.WindowCache(0)


def test_exercise_checks_reject_plausible_mistakes():
    from lectlib.grading import ExerciseFailure, run_check

    mistakes = {
        "sink_window_keep": [lambda o, n, s, w: list(range(max(0, o - (w - n)), o)),  # forgets the sinks
                             lambda o, n, s, w: list(range(min(s, o))) + list(range(max(s, o - w), o))],  # no room
        "cache_positions": [lambda p, n: (p, p[-n:])],  # keeps text positions
        "sink_rate": [lambda w, token, eps: (w[:, :, :, token].mean(-1) > eps).float().mean().item()],  # all queries
    }
    for name, wrongs in mistakes.items():
        for wrong in wrongs:
            with pytest.raises(ExerciseFailure):
                run_check(name, wrong)
