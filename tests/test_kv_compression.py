"""KV compression: each policy keeps what its rule says, per (layer, KV head); Quest and KIVI against oracles."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lectlib import compression, kv, kvquant, quest
from lectlib.attention import attention_probs, sdpa_attention
from lectlib.llama import Llama, LlamaConfig

TINY = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64)
C = 30.0  # a query c·(e_a + e_b) against one-hot keys puts almost all its weight on keys a and b


def one_hot_keys(n: int = 8, heads: int = 2, batch: int = 1) -> torch.Tensor:
    """(batch, heads, n, n) keys k_j = e_j."""
    return torch.eye(n).expand(batch, heads, n, n).clone()


def queries_for(favourites, n: int = 8, group: int = 2) -> torch.Tensor:
    """(B, H_kv · group, n, n) queries: every query of KV head h (both its query heads) favours favourites[b][h]."""
    q = torch.zeros(len(favourites), len(favourites[0]) * group, n, n)
    for b, per_head in enumerate(favourites):
        for h, tokens in enumerate(per_head):
            for t in tokens:
                q[b, h * group:(h + 1) * group, :, t] = C
    return q


def kept(cache, layer=0):
    """Text positions held, per (batch, KV head), as lists."""
    pos = cache.text_positions[layer]
    return pos.tolist() if pos.dim() == 3 else [[pos.tolist()] * cache.keys[layer].shape[1]]


def prefill(cache, q, k):
    """One prompt through the cache as a model does it: update, then the attention is observed."""
    n = k.shape[2]
    keys, values, _, _ = cache.update(0, k, k.clone(), torch.arange(n))
    cache.observe(0, q, keys, 1.0)
    return cache


def test_h2o_keeps_heavy_hitters_and_the_recent_window_per_kv_head():
    # head 0's queries favour tokens 1 and 4, head 1's tokens 2 and 3; batch item 1 swaps the heads
    q = queries_for([[(1, 4), (2, 3)], [(2, 3), (1, 4)]])
    cache = prefill(kv.H2OCache(4, window=2), q, one_hot_keys(batch=2))
    assert kept(cache) == [[[1, 4, 6, 7], [2, 3, 6, 7]], [[2, 3, 6, 7], [1, 4, 6, 7]]]
    # the running sums that followed the kept tokens are the naive column sums of the full attention
    full = attention_probs(q, one_hot_keys(batch=2), causal=True, scale=1.0).sum(2)  # (B, H, N)
    naive = full.view(2, 2, 2, 8).mean(2).gather(2, cache.text_positions[0])
    torch.testing.assert_close(cache.accumulated[0], naive)
    assert cache.nbytes() == 2 * 2 * 2 * 4 * 8 * 4  # K and V · batch · heads · 4 tokens · D · fp32: memory freed


def test_h2o_keeps_scoring_while_decoding():
    q = queries_for([[(1, 4), (2, 3)]])
    cache = prefill(kv.H2OCache(4, window=1), q, one_hot_keys())
    assert kept(cache) == [[[0, 1, 4, 7], [0, 2, 3, 7]]]
    for step in range(3):  # three new tokens whose queries all go to token 0 in head 0
        k = torch.zeros(1, 2, 1, 8)
        keys, _, _, _ = cache.update(0, k, k, torch.tensor([8 + step]))
        qd = torch.zeros(1, 4, 1, 8)
        qd[0, :2, 0, 0] = C
        cache.observe(0, qd, keys, 1.0)
    # head 0: token 0 gathered weight, the unattended new tokens were evicted one after the other; head 1's
    # zero queries spread 1/5 over its tokens, which leaves its heavy hitters in place
    assert kept(cache) == [[[0, 1, 4, 10], [0, 2, 3, 10]]]


def test_tova_keeps_what_the_last_query_attends_to():
    q = queries_for([[(0, 0), (0, 0)]])  # early queries look at token 0 ...
    q[:, :2, -1] = 0
    q[:, :2, -1, [1, 5]] = C  # ... but the last query of head 0 looks at 1 and 5, of head 1 at 2 and 6
    q[:, 2:, -1] = 0
    q[:, 2:, -1, [2, 6]] = C
    cache = prefill(kv.TOVACache(2), q, one_hot_keys())
    assert kept(cache) == [[[1, 5], [2, 6]]]


def test_snapkv_pools_the_observation_windows_votes():
    q = torch.zeros(1, 4, 8, 8)
    q[:, :, -2:, 4] = C  # the two observation queries vote for token 4; pooling over 3 keeps its neighbours
    cache = prefill(kv.SnapKVCache(5, window=2, kernel=3), q, one_hot_keys())
    assert kept(cache) == [[[3, 4, 5, 6, 7]] * 2]
    k = torch.zeros(1, 2, 1, 8)
    keys, _, _, _ = cache.update(0, k, k, torch.tensor([8]))
    cache.observe(0, torch.zeros(1, 4, 1, 8), keys, 1.0)
    assert kept(cache)[0][0] == [3, 4, 5, 6, 7, 8]  # only the prompt is compressed


def test_key_norm_keeps_the_smallest_keys_and_recent_keeps_sinks_and_newest():
    k = torch.tensor([5.0, 1.0, 4.0, 2.0, 3.0, 6.0])[None, None, :, None] * torch.ones(1, 2, 6, 4)
    q = torch.randn(1, 4, 6, 4)
    assert kept(prefill(kv.KeyNormCache(3), q, k)) == [[[1, 3, 4]] * 2]
    assert kept(prefill(kv.RecentCache(4, sinks=1), q, k)) == [[[0, 3, 4, 5]] * 2]
    assert kept(prefill(kv.RecentCache(0.5), q, k)) == [[[3, 4, 5]] * 2]  # a ratio of the 6 tokens seen


@pytest.mark.parametrize("n,block", [(7, 3), (1, 256), (16, 5)])
def test_attention_column_sums_match_the_full_matrix(n, block):
    torch.manual_seed(n)
    q, k = torch.randn(2, 4, n, 8), torch.randn(2, 2, n + 5, 8)
    full = attention_probs(q, k, causal=True, scale=0.4).sum(2).view(2, 2, 2, n + 5).mean(2)
    torch.testing.assert_close(kv.attention_column_sums(q, k, 0.4, block=block), full)


def tiny_llama(seed: int = 0) -> Llama:
    torch.manual_seed(seed)
    return Llama(TINY).eval()


@pytest.mark.parametrize("make", [lambda: kv.H2OCache(1.0), lambda: kv.TOVACache(64), lambda: kv.SnapKVCache(1.0, window=4),
                                  lambda: kv.KeyNormCache(1.0), lambda: kv.RecentCache(64, sinks=4),
                                  lambda: quest.QuestCache(64, page_size=4)])
def test_full_budget_reproduces_the_full_cache(make):
    model = tiny_llama()
    ids = torch.randint(0, TINY.vocab_size, (2, 21))
    with torch.no_grad():
        whole = model(ids)
        cache = make()
        with kv.attach(model, cache):
            steps = [model(ids[:, :9], cache=cache)] + [model(ids[:, i:i + 1], cache=cache) for i in range(9, 21)]
    torch.testing.assert_close(torch.cat(steps, 1), whole, atol=1e-5, rtol=1e-5)


def test_scored_cache_without_attach_refuses_to_grow():
    model, cache = tiny_llama(), kv.H2OCache(4)
    ids = torch.randint(0, TINY.vocab_size, (1, 8))
    with torch.no_grad():
        model(ids, cache=cache)
        with pytest.raises(RuntimeError, match="attach"):
            model(ids[:, :1], cache=cache)


@settings(max_examples=40, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), n=st.integers(1, 6), seed=st.integers(0, 99))
def test_pack_roundtrip_and_quantization_error_bound(bits, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** bits, (3, 8 * n), generator=g).to(torch.uint8)
    assert torch.equal(kvquant.unpack(kvquant.pack(codes, bits), bits), codes)
    assert kvquant.pack(codes, bits).numel() == codes.numel() * bits // 8
    x = torch.randn(1, 2, 4 * n, 8, generator=g) * torch.logspace(-1, 1, 8)
    for axis, dim in (("channel", 2), ("token", 3)):
        err = (kvquant.fake_quantize(x, bits, axis=axis, group_size=4) - x).abs()
        groups = x.unflatten(dim, (-1, 4))
        half_step = (groups.amax(dim + 1, keepdim=True) - groups.amin(dim + 1, keepdim=True)) / (2 * (2 ** bits - 1))
        assert (err.unflatten(dim, (-1, 4)) <= half_step + 1e-6).all()


def test_quantized_cache_stores_packed_groups_and_reads_them_back():
    torch.manual_seed(0)
    k, v = torch.randn(1, 2, 70, 16), torch.randn(1, 2, 70, 16)
    cache = kvquant.QuantizedCache(2, group_size=8, residual=16)
    keys, values, _, _ = cache.update(0, k[:, :, :60], v[:, :, :60], torch.arange(60))
    torch.testing.assert_close(keys, k[:, :, :60])  # the prompt's own queries see it in full precision
    keys, values, pos, _ = cache.update(0, k[:, :, 60:], v[:, :, 60:], torch.arange(60, 70))
    # 60 - 16 = 44 -> 40 tokens (5 groups) were quantized: keys per channel over 8 tokens, values per token
    want_k = kvquant.fake_quantize(k[:, :, :40], 2, axis="channel", group_size=8)
    want_v = kvquant.fake_quantize(v[:, :, :40], 2, axis="token", group_size=8)
    torch.testing.assert_close(keys[:, :, :40], want_k, atol=1e-2, rtol=1e-2)  # fp16 scales
    torch.testing.assert_close(values[:, :, :40], want_v, atol=1e-2, rtol=1e-2)
    assert torch.equal(keys[:, :, 40:], k[:, :, 40:]) and pos.tolist() == list(range(70))
    # after the update 30 - 16 -> 8 more tokens moved out: 48 packed, 22 in full precision
    codes = 2 * 2 * 48 * 16 * 2 // 8  # K and V · heads · tokens · D · 2 bits
    scales = 2 * 2 * 2 * (6 * 16 + 48 * 2)  # (scale, min) · fp16 · heads · (key groups · D + tokens · value groups)
    assert cache.nbytes() == codes + scales + 2 * 2 * 22 * 16 * 4  # + the fp32 residual
    assert len(cache) == 70


def test_quantization_error_shrinks_with_bits_and_smoothing_and_hadamard_are_exact():
    torch.manual_seed(0)
    k = torch.randn(1, 2, 64, 16)
    k[..., 3] *= 20  # an outlier channel
    errs = {b: (kvquant.fake_quantize(k, b, axis="token", group_size=16) - k).abs().mean() for b in (2, 4, 8)}
    assert errs[2] > 2 * errs[4] > 4 * errs[8]
    per_channel = (kvquant.fake_quantize(k, 2, axis="channel", group_size=16) - k).abs().mean()
    assert per_channel < 0.7 * errs[2]  # the outlier widens every token's range, but only its own channel's
    q = torch.randn(1, 4, 5, 16)
    lam = kvquant.smooth_scales(q, k)
    h = kvquant.hadamard(16)
    torch.testing.assert_close(h @ h.T, torch.eye(16), atol=1e-6, rtol=0)
    scores = attention_probs(q, k)
    torch.testing.assert_close(attention_probs(q * lam.repeat_interleave(2, 0), k / lam), scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attention_probs(q @ h, k @ h), scores, atol=1e-5, rtol=1e-5)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), page=st.integers(1, 9), seed=st.integers(0, 99))
def test_quest_page_bound_is_an_upper_bound(n, page, seed):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(1, 4, 2, 8, generator=g), torch.randn(1, 2, n, 8, generator=g)
    bounds = quest.page_bounds(q, k, page)  # (1, 4, 2, P)
    scores = q @ k.repeat_interleave(2, 1).transpose(-1, -2)
    pad = -(-n // page) * page - n
    true_max = torch.nn.functional.pad(scores, (0, pad), value=float("-inf")).unflatten(-1, (-1, page)).amax(-1)
    assert (bounds >= true_max - 1e-5).all()


def test_quest_reads_the_pages_with_the_best_keys():
    k = torch.zeros(1, 1, 16, 4)
    k[0, 0, 5, 0] = 3.0  # page 1 of 4 holds a key that matches the query
    q = torch.tensor([1.0, 0, 0, 0]).view(1, 1, 1, 4)
    chosen = quest.page_selection(q, k, 2, 4)[0, 0, 0]
    assert chosen.nonzero().flatten().tolist() == [4, 5, 6, 7, 12, 13, 14, 15]  # page 1 and the query's own page
    v = torch.randn(1, 1, 16, 4)
    cache = quest.QuestCache(4, page_size=4)
    cache.read_bytes, cache._prompt_read = {}, {0}
    torch.testing.assert_close(cache.attention(0, q, k, v, causal=True, scale=1.0, attn_fn=sdpa_attention),
                               sdpa_attention(q, k, v, causal=True, scale=1.0))  # every page: full attention
    cache.pages = 2
    cache.attention(0, q, k, v, causal=True, scale=1.0, attn_fn=sdpa_attention)
    assert cache.bytes_read() == (2 * 8 * 4 + 2 * 4 * 4) * 4  # K and V of 8 tokens, min and max of 4 pages


BAD = [
    (lambda: kv.H2OCache(0), "budget"), (lambda: kv.H2OCache(1.5), "budget"), (lambda: kv.TOVACache(-0.1), "budget"),
    (lambda: kv.TOVACache(True), "budget"), (lambda: kv.H2OCache(8, window=1.0), "window"),
    (lambda: kv.SnapKVCache(8, kernel=4), "kernel"), (lambda: kv.RecentCache(8, sinks=-1), "sinks"),
    (lambda: kv.WindowCache(2.5), "window"), (lambda: kvquant.QuantizedCache(3), "bits"),
    (lambda: kvquant.QuantizedCache(2, group_size=0), "group_size"), (lambda: kvquant.QuantizedCache(2, residual=-1), "residual"),
    (lambda: quest.QuestCache(0), "pages"), (lambda: quest.QuestCache(4, page_size=0), "page_size"),
    (lambda: kvquant.fake_quantize(torch.zeros(1, 1, 6, 4), 2, axis="channel", group_size=4), "group_size"),
    (lambda: kvquant.QuantizedCache(2, group_size=6).update(0, torch.zeros(1, 1, 2, 8), torch.zeros(1, 1, 2, 8),
                                                             torch.arange(2)), "group_size"),
    (lambda: kv.KVCache().update(0, torch.zeros(1, 2, 3, 4), torch.zeros(1, 2, 3, 4), torch.arange(5)), "positions"),
    (lambda: kv.KVCache().update(0, torch.zeros(1, 2, 3, 4), torch.zeros(1, 1, 3, 4), torch.arange(3)), "same shape"),
    (lambda: kv.KVCache().update(0, torch.zeros(1, 2, 0, 4), torch.zeros(1, 2, 0, 4), torch.arange(0)), "at least one"),
    (lambda: compression.make_cache("H3O", 0.2, 100), "method"),
    (lambda: quest.top_key_recall(torch.ones(1, 1, 2, 5, dtype=torch.bool), torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 8, 4), 2),
     "chosen"),
    (lambda: quest.top_key_recall(torch.ones(1, 1, 2, 8, dtype=torch.bool), torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 8, 4), 0),
     "top_k"),
]


@pytest.mark.parametrize("call,word", BAD)
def test_bad_arguments_are_named(call, word):
    with pytest.raises(ValueError, match=word):
        call()


def test_h2o_beats_a_recent_window_on_smollm(smollm):
    """On real text, at a fifth of the cache, heavy hitters + recent keep perplexity far below recent-only."""
    model, tok = smollm
    ppl = {}
    for ids, cont in compression.perplexity_prompts(tok, context=160, continuation=24, count=1):
        record = compression.prefill_record(model, ids)
        for method in ("full", "window", "H2O"):
            cache = compression.compress(compression.make_cache(method, 0.2, 160), record)
            logp = compression.continuation_logprobs(model, record, cache, cont)
            ppl[method] = math.exp(-logp.gather(1, torch.tensor(cont)[:, None]).mean().item())
    assert ppl["full"] < ppl["H2O"] < ppl["window"] / 1.5, ppl


def test_exercise_checks_reject_plausible_mistakes():
    from lectlib.grading import ExerciseFailure, run_check

    def per_token(x, bits):  # one range per token instead of per channel
        lo, hi = x.amin(1, keepdim=True), x.amax(1, keepdim=True)
        scale = (hi - lo) / (2 ** bits - 1)
        return ((x - lo) / scale).round() * scale + lo

    mistakes = {
        "h2o_update": [lambda a, w: w.sum(1),  # forgets the running sums
                       lambda a, w: torch.cat([a, a.new_zeros(a.shape[0], w.shape[1])], 1) + w.mean(1)],  # mean, not sum
        "quest_page_bound": [lambda q, k, p: torch.stack([(q * k[s:s + p].amax(0)).sum() for s in range(0, k.shape[0], p)])],
        "quantize_per_channel": [per_token],
    }
    for name, wrongs in mistakes.items():
        for wrong in wrongs:
            with pytest.raises(ExerciseFailure):
                run_check(name, wrong)


def test_recorded_leaderboard_says_what_the_chapter_says():
    """Chapter 5's claims about data/results/kv_leaderboard.json (4,096 tokens, 8 prompts per task, on a GPU)."""
    import json

    board = json.loads((compression.RESULTS / "kv_leaderboard.json").read_text())
    s = board["settings"]
    assert board["scale"] == "gpu" and s == compression.SETTINGS["gpu"]
    assert len(board["rows"]) == 4 * s["count"] * (1 + 7 * len(s["budgets"]) + 4)
    rows = compression.summary(board["rows"])

    def at(method, budget):
        return next(r for r in rows if r["method"] == method and abs(r["budget"] - budget) < 1e-9)

    full = at("full", 1.0)
    assert full["passkey"] == 1 and full["key-value"] == 0  # the model itself fails key-value at this length
    depths = [(i + 0.5) / s["count"] for i in range(s["count"])]
    for b in s["budgets"]:
        inside = sum(d > 1 - b for d in depths) / len(depths)
        for m in ("window", "sinks+window"):  # retrieval exactly when the answer is in the window
            assert at(m, b)["passkey"] == at(m, b)["needle"] == inside
        assert at("H2O", b)["passkey"] <= at("window", b)["passkey"]
    evicting = ["window", "sinks+window", "H2O", "TOVA", "SnapKV", "key-norm"]
    h2o, sinks, win = at("H2O", 0.2), at("sinks+window", 0.2), at("window", 0.2)
    assert h2o["perplexity"] == min(at(m, 0.2)["perplexity"] for m in evicting)
    assert h2o["perplexity"] < win["perplexity"] and sinks["perplexity"] < 1.05 * h2o["perplexity"]
    assert at("SnapKV", min(s["budgets"]))["passkey"] >= 0.75
    assert h2o["passkey"] < at("TOVA", 0.2)["passkey"] < at("SnapKV", 0.2)["passkey"]
    quest = at("Quest", 0.2)
    assert quest["bytes_ratio"] == 1 and 0.25 < quest["read_ratio"] < 0.45 and quest["passkey"] >= 0.75
    k4, k2 = at("KIVI-4", 1.0), at("KIVI-2", 1.0)
    assert 1 / 7 < k4["bytes_ratio"] < 1 / 5 and abs(k4["perplexity"] / full["perplexity"] - 1) < 0.02
    assert k4["passkey"] == full["passkey"] and k2["bytes_ratio"] < 0.12 and k2["passkey"] < full["passkey"]
