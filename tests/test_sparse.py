"""lectlib.sparse: every pattern against naive attention under the paper's definition of its mask,
the three sliding-window forms against each other, MoBA routing against a brute-force router."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lectlib import kv, sparse
from lectlib.attention import repeat_kv, sdpa_attention
from lectlib.llama import Llama, LlamaConfig

SETTINGS = settings(max_examples=25, deadline=None)


def masked_naive(q, k, v, mask):
    """The oracle: softmax(QKᵀ/√D) under `mask` (..., N_q, N_k) times V, in fp64; rows with no key give 0."""
    n_rep = q.shape[1] // k.shape[1]
    s = q.double() @ repeat_kv(k, n_rep).double().transpose(-1, -2) / math.sqrt(q.shape[-1])
    p = torch.softmax(s.masked_fill(~mask, float("-inf")), -1).nan_to_num(0.0)
    return p @ repeat_kv(v, n_rep).double()


def paper_mask(pattern, n_q, n_k, **p):
    """The patterns as their papers define the sets of keys of query i, one (i, j) at a time."""
    mask = torch.zeros(n_q, n_k, dtype=torch.bool)
    for row, i in enumerate(range(n_k - n_q, n_k)):
        for j in range(i + 1):
            if pattern == "sliding":  # Longformer: the window, plus global tokens
                keep = i - p["window"] < j or j < p.get("global_tokens", 0)
            elif pattern == "strided":  # Child et al. eq. 4: A1 = {t, ..., i}, t = max(0, i - l); A2 = {j: (i - j) mod l = 0}
                keep = j > i - p["stride"] or (i - j) % p["stride"] == 0
            elif pattern == "fixed":  # eq. 5: A1 = {j: floor(j/l) = floor(i/l)}, A2 = {j: j mod l in {l-c, ..., l-1}}
                keep = j // p["stride"] == i // p["stride"] or j % p["stride"] in range(p["stride"] - p["summary"], p["stride"])
            else:  # LongNet: segment of w, every r-th row/column of it, over the (w, r) pairs
                keep = any(j // w == i // w and (i - j) % r == 0 for w, r in zip(p["segments"], p["rates"]))
            mask[row, j] = keep
    return mask


@st.composite
def pattern_cases(draw):
    pattern = draw(st.sampled_from(sparse.PATTERNS))
    if pattern == "sliding":
        params = dict(window=draw(st.integers(1, 12)), global_tokens=draw(st.integers(0, 3)))
    elif pattern == "strided":
        params = dict(stride=draw(st.integers(1, 8)))
    elif pattern == "fixed":
        stride = draw(st.integers(1, 8))
        params = dict(stride=stride, summary=draw(st.integers(1, stride)))
    else:
        pairs = draw(st.lists(st.integers(1, 12).flatmap(lambda w: st.tuples(st.just(w), st.integers(1, w))),
                              min_size=1, max_size=3))
        params = dict(segments=[w for w, _ in pairs], rates=[r for _, r in pairs])
    n_k = draw(st.integers(1, 40))
    n_q = draw(st.sampled_from(sorted({1, n_k, draw(st.integers(1, n_k))})))
    kv_heads = draw(st.sampled_from([1, 2]))
    return pattern, params, n_q, n_k, kv_heads * draw(st.sampled_from([1, 3])), kv_heads


@SETTINGS
@given(pattern_cases())
def test_every_pattern_equals_naive_attention_under_the_papers_mask(case):
    pattern, params, n_q, n_k, heads, kv_heads = case
    mask = paper_mask(pattern, n_q, n_k, **params)
    assert torch.equal(sparse.pattern_mask(pattern, n_q, n_k, **params), mask)
    g = torch.Generator().manual_seed(n_k)
    q = torch.randn(2, heads, n_q, 8, generator=g)
    k, v = (torch.randn(2, kv_heads, n_k, 8, generator=g) for _ in range(2))
    got = sparse.sparse_attention(q, k, v, pattern, **params)
    torch.testing.assert_close(got.double(), masked_naive(q, k, v, mask), atol=1e-5, rtol=1e-5)


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 30), st.integers(0, 20), st.integers(1, 12), st.sampled_from([(4, 4), (4, 2), (3, 1)]))
def test_the_three_sliding_window_forms_agree(n_q, extra, window, heads):
    g = torch.Generator().manual_seed(n_q * 100 + extra)
    q = torch.randn(1, heads[0], n_q, 8, generator=g)
    k, v = (torch.randn(1, heads[1], n_q + extra, 8, generator=g) for _ in range(2))
    want = masked_naive(q, k, v, paper_mask("sliding", n_q, n_q + extra, window=window))
    for form in (sparse.sliding_window_full, sparse.sliding_window_loop, sparse.sliding_window_chunks):
        torch.testing.assert_close(form(q, k, v, window=window).double(), want, atol=1e-5, rtol=1e-5, msg=form.__name__)


def test_a_window_as_long_as_the_text_is_full_causal_attention():
    q, k, v = (torch.randn(1, 4, 33, 16) for _ in range(3))
    want = sdpa_attention(q, k, v, causal=True)
    torch.testing.assert_close(sparse.sliding_window_chunks(q, k, v, window=33), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sparse.sparse_attention(q, k, v, "strided", stride=33), want, atol=1e-5, rtol=1e-5)


def brute_force_moba(q, k, block_size, top_k):
    """Each query, one at a time: mean key of each whole earlier block, top_k - 1 of them by q·mean, and its own block."""
    b, h, n_q, _ = q.shape
    n_k = k.shape[2]
    k = repeat_kv(k, h // k.shape[1])
    mask = torch.zeros(b, h, n_q, n_k, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            for row, i in enumerate(range(n_k - n_q, n_k)):
                own = i // block_size
                scores = [(q[bi, hi, row] @ k[bi, hi, c * block_size:(c + 1) * block_size].mean(0)).item() for c in range(own)]
                chosen = sorted(range(own), key=lambda c: -scores[c])[:top_k - 1] + [own]
                for c in chosen:
                    mask[bi, hi, row, c * block_size:min((c + 1) * block_size, i + 1)] = True
    return mask


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 24), st.integers(1, 6), st.integers(1, 4), st.sampled_from([(4, 2), (2, 2)]), st.booleans())
def test_moba_routes_to_the_top_blocks_and_its_own(n_k, block_size, top_k, heads, decode):
    g = torch.Generator().manual_seed(n_k * 10 + block_size)
    n_q = 1 if decode else n_k
    q = torch.randn(1, heads[0], n_q, 8, generator=g)
    k, v = (torch.randn(1, heads[1], n_k, 8, generator=g) for _ in range(2))
    mask = sparse.moba_mask(q, k, block_size=block_size, top_k=top_k)
    assert torch.equal(mask, brute_force_moba(q, k, block_size, top_k))
    got = sparse.moba_attention(block_size=block_size, top_k=top_k, query_block=7)(q, k, v)
    torch.testing.assert_close(got.double(), masked_naive(q, k, v, mask), atol=1e-5, rtol=1e-5)
    if not decode:
        share = mask.sum().item() / (mask.shape[0] * mask.shape[1] * n_k * (n_k + 1) / 2)
        assert sparse.moba_share(n_k, block_size=block_size, top_k=top_k) == pytest.approx(share)


def brute_force_recall(mask, q, k, top_keys):
    """Per (head, query): its top_keys visible keys by q·k, sorted in Python; the share the mask holds."""
    b, h, n_q, _ = q.shape
    n_k = k.shape[2]
    k = repeat_kv(k, h // k.shape[1])
    hits = total = 0
    for hi in range(h):
        for row, i in enumerate(range(n_k - n_q, n_k)):
            scores = [(q[0, hi, row] @ k[0, hi, j]).item() for j in range(i + 1)]
            top = sorted(range(i + 1), key=lambda j: -scores[j])[:min(top_keys, n_k - n_q + 1)]
            hits += sum(bool(mask[0, hi, row, j]) for j in top)
            total += len(top)
    return hits / total


@settings(max_examples=10, deadline=None)
@given(st.integers(9, 40), st.integers(2, 6), st.integers(1, 4), st.integers(1, 6), st.booleans())
def test_moba_and_quest_recall_count_the_true_top_keys_they_keep(n_k, block_size, top_k, top_keys, decode):
    from lectlib import quest

    g = torch.Generator().manual_seed(n_k * 7 + block_size)
    n_q = 1 if decode else 5
    q = torch.randn(1, 4, n_q, 8, generator=g)
    k = torch.randn(1, 2, n_k, 8, generator=g)
    want = brute_force_recall(brute_force_moba(q, k, block_size, top_k), q, k, top_keys)
    assert sparse.moba_recall(q, k, block_size=block_size, top_k=top_k, top_keys=top_keys) == pytest.approx(want)
    pages = quest.page_selection(q, k, top_k, block_size)
    want = brute_force_recall(pages, q, k, top_keys)
    assert quest.topk_recall(q, k, top_k, block_size, top_keys) == pytest.approx(want)
    every = sparse.moba_recall(q, k, block_size=block_size, top_k=-(-n_k // block_size), top_keys=top_keys)
    assert every == 1.0


def test_moba_with_every_block_is_full_causal_attention():
    q, k, v = (torch.randn(1, 2, 30, 8) for _ in range(3))
    got = sparse.moba_attention(block_size=4, top_k=8)(q, k, v)
    torch.testing.assert_close(got, sdpa_attention(q, k, v, causal=True), atol=1e-5, rtol=1e-5)


def test_patterns_plug_into_llama_and_decoding_with_a_cache_matches_the_full_forward():
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64)).eval()
    ids = torch.randint(0, 64, (1, 30))
    for fn in (sparse.pattern_attention("dilated", segments=[4, 16], rates=[1, 4]),
               sparse.pattern_attention("sliding", window=5, global_tokens=1),
               sparse.moba_attention(block_size=4, top_k=2)):
        model.set_attention(fn)
        with torch.no_grad():
            full = model(ids)
            cache = kv.KVCache()
            steps = [model(ids[:, :20], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(20, 30)]
        torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)
        model.set_attention(sdpa_attention)
        with torch.no_grad():
            assert not torch.allclose(model(ids), full, atol=1e-3)  # the pattern changed something


def test_keys_share_counts_the_kept_causal_pairs():
    assert sparse.keys_share(sparse.pattern_mask("sliding", 4, window=1)) == pytest.approx(4 / 10)
    assert sparse.keys_share(sparse.pattern_mask("sliding", 100, window=100)) == 1.0


@pytest.mark.parametrize("call, argument", [
    (lambda: sparse.pattern_mask("banded", 8, window=2), "pattern"),
    (lambda: sparse.pattern_mask("sliding", 8, window=0), "window"),
    (lambda: sparse.pattern_mask("sliding", 8, window=2, global_tokens=-1), "global_tokens"),
    (lambda: sparse.pattern_mask("sliding", 8, stride=2), "parameters"),
    (lambda: sparse.pattern_mask("strided", 8, stride=0), "stride"),
    (lambda: sparse.pattern_mask("fixed", 8, stride=4, summary=5), "summary"),
    (lambda: sparse.pattern_mask("dilated", 8, segments=[4, 8], rates=[1]), "rates"),
    (lambda: sparse.pattern_mask("dilated", 8, segments=[4], rates=[8]), "rates"),
    (lambda: sparse.pattern_mask("dilated", 8, segments=[0], rates=[1]), "segments"),
    (lambda: sparse.pattern_mask("sliding", 8, 4, window=2), "n_k"),
    (lambda: sparse.sliding_window_chunks(*(torch.randn(1, 1, 4, 2) for _ in range(3)), window=-1), "window"),
    (lambda: sparse.sparse_attention(*(torch.randn(1, 1, 4, 2) for _ in range(3)), "strided", stride=2, causal=False), "causal"),
    (lambda: sparse.moba_attention(block_size=0, top_k=2), "block_size"),
    (lambda: sparse.moba_attention(block_size=4, top_k=0), "top_k"),
    (lambda: sparse.moba_recall(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 8, 4), block_size=4, top_k=2, top_keys=0), "top_keys"),
    (lambda: sparse.moba_recall(torch.randn(1, 1, 2, 4), torch.randn(1, 1, 8, 4), block_size=0, top_k=2, top_keys=2), "block_size"),
])
def test_bad_arguments_raise_value_error_naming_them(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()
