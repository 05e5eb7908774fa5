"""Attention variants against independent oracles: torch SDPA and the softmax formula in float64."""

import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from lectlib import profiling
from lectlib import flash
from lectlib.attention import (attention_probs, blockwise_attention, causal_mask, merge_attention_blocks, naive_attention,
                               online_softmax_attention, online_softmax_step, sdpa_attention)

VARIANTS = {
    "naive": naive_attention,
    "online": online_softmax_attention,
    "blockwise": lambda q, k, v, **kw: blockwise_attention(q, k, v, block_size=3, **kw),
}


def flash_fallback(q, k, v, **kw):
    """flash_attention where the kernel cannot run (a T4, say): it computes blockwise attention."""
    available, said = flash.kernel_available, flash._fallback_said
    flash.kernel_available, flash._fallback_said = (lambda device: (False, "no kernel in this test")), True
    try:
        return flash.flash_attention(q, k, v, **kw)
    finally:
        flash.kernel_available, flash._fallback_said = available, said


EVERY_VARIANT = {**VARIANTS, "sdpa wrapper": sdpa_attention, "flash fallback": flash_fallback}


def sdpa_oracle(q, k, v, *, causal, scale):
    """torch SDPA with K/V heads repeated by hand and an explicit end-aligned mask; NaN rows (no key) -> 0."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    n_q, n_k = q.shape[2], k.shape[2]
    mask = None
    if causal:
        mask = torch.arange(n_k)[None, :] - torch.arange(n_q)[:, None] <= n_k - n_q
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale).nan_to_num(0.0)


@st.composite
def qkv(draw, max_n=20):
    b, h_kv, rep = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 3))
    n_q, n_k, d = draw(st.integers(1, max_n)), draw(st.integers(1, max_n)), draw(st.integers(1, 9))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h_kv * rep, n_q, d, generator=g, dtype=torch.float64)
    k, v = (torch.randn(b, h_kv, n_k, d, generator=g, dtype=torch.float64) for _ in range(2))
    return q, k, v


@st.composite
def bad_qkv(draw, nonfinite=True):
    """(q, k, v, causal, scale, where): GQA, decode-length queries (N_q = 1), rows that see no key
    (causal, N_q > N_k), fp16 with scores past its 65504 limit, and a NaN or inf put `where`."""
    b, h_kv, rep = draw(st.integers(1, 2)), draw(st.integers(1, 2)), draw(st.integers(1, 3))
    n_q = draw(st.one_of(st.just(1), st.integers(1, 12)))
    n_k, d = draw(st.integers(1, 12)), draw(st.integers(1, 8))
    dtype = draw(st.sampled_from([torch.float64, torch.float32, torch.float16]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    if dtype == torch.float16:
        # Multiples of 32 up to 256 are exact in fp16 and their products exact in fp32: scores up to
        # 8·256² = 524288 that overflow fp16 and are computed exactly in fp32 (scale 1).
        q = torch.randint(-8, 9, (b, h_kv * rep, n_q, d), generator=g) * 32.0
        k = torch.randint(-8, 9, (b, h_kv, n_k, d), generator=g) * 32.0
        scale = 1.0
    else:
        q, k = torch.randn(b, h_kv * rep, n_q, d, generator=g), torch.randn(b, h_kv, n_k, d, generator=g)
        scale = draw(st.one_of(st.none(), st.floats(0.05, 4.0)))
    v = torch.randn(b, h_kv, n_k, d, generator=g)
    where = draw(st.sampled_from(["nowhere", "q nan", "k nan", "k inf", "v nan", "v inf"] if nonfinite else ["nowhere"]))
    if where != "nowhere":
        t = {"q": q, "k": k, "v": v}[where[0]]
        t[draw(st.integers(0, b - 1)), draw(st.integers(0, t.shape[1] - 1)), draw(st.integers(0, t.shape[2] - 1))] = \
            float(where[2:])
    return q.to(dtype), k.to(dtype), v.to(dtype), draw(st.booleans()), scale, where


def softmax_row_by_row(q, k, v, *, causal, scale):
    """The oracle: softmax(q_i·Kᵀ·scale)·V in fp64 for each query row over only the keys it sees (no mask,
    so a bad key cannot reach a row that does not see it); 0 for a row that sees no key or whose
    scores are all -inf."""
    rep, n_q, n_k = q.shape[1] // k.shape[1], q.shape[2], k.shape[2]
    q, k, v = q.double(), k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    out = torch.zeros_like(q)
    for i in range(n_q):
        seen = slice(0, max(0, min(n_k, i + 1 + n_k - n_q)) if causal else n_k)
        if seen.stop > 0:
            s = q[:, :, i:i + 1] @ k[:, :, seen].transpose(-1, -2) * scale
            p = torch.softmax(s, -1).masked_fill(torch.isneginf(s).all(-1, keepdim=True), 0.0)  # no key weighs
            out[:, :, i:i + 1] = p @ v[:, :, seen]
    return out


@pytest.mark.parametrize("name", EVERY_VARIANT)
@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_every_variant_follows_the_formula_on_nan_inf_fp16_gqa_and_decode(name, data):
    """The documented behaviour (lectlib.attention's docstring) against the softmax formula in fp64, row
    by row: outputs equal where finite, in the input dtype; rows that see no key are 0; a NaN or
    inf in q or k makes NaN exactly the rows that read it; a bad value vector at least those
    (0·NaN in P·V may spoil others). The SDPA wrapper is torch's kernel, which may turn a NaN
    query into a finite row: it is held to finite inputs."""
    q, k, v, causal, scale, where = data.draw(bad_qkv(nonfinite=name != "sdpa wrapper"))
    out = EVERY_VARIANT[name](q, k, v, causal=causal, scale=scale)
    expected = softmax_row_by_row(q, k, v, causal=causal, scale=scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    nan_rows, expected_nan_rows = out.isnan().any(-1), expected.isnan().any(-1)
    if where.startswith("v"):
        assert (nan_rows >= expected_nan_rows).all()
    else:
        assert torch.equal(nan_rows, expected_nan_rows)
    keep = ~nan_rows[..., None].expand_as(out)
    tol = 2e-3 if q.dtype == torch.float16 else 1e-5
    torch.testing.assert_close(out[keep].double(), expected[keep], rtol=tol, atol=tol)


def test_fp16_scores_past_65504_are_exact():
    """The issue's case: fp16 scores of order 1e5 made 15 of 16 rows of naive attention 0 and blockwise NaN."""
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randint(-8, 9, (1, 1, 16, 8), generator=g) * 32.0 for _ in range(2))
    v = torch.randn(1, 1, 16, 8, generator=g)
    assert (q @ k.transpose(-1, -2)).abs().max() > 65504
    expected = torch.softmax(q.double() @ k.double().transpose(-1, -2), -1) @ v.double()
    for name, fn in EVERY_VARIANT.items():
        out = fn(q.half(), k.half(), v.half(), scale=1.0)
        torch.testing.assert_close(out.double(), expected, rtol=1e-3, atol=1e-3, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_probabilities_are_fp32_at_least_and_outputs_keep_the_input_dtype(dtype):
    q, k, v = (torch.randn(1, 2, 5, 4, dtype=dtype) for _ in range(3))
    assert attention_probs(q, k).dtype == torch.promote_types(dtype, torch.float32)
    for name, fn in EVERY_VARIANT.items():
        assert fn(q, k, v, causal=True).dtype == dtype, name
    _, lse = blockwise_attention(q, k, v, return_lse=True)
    assert lse.dtype == torch.promote_types(dtype, torch.float32)


@pytest.mark.parametrize("n_q,n_k,start,end", [(5, 9, 0, 9), (5, 9, 3, 7), (9, 5, 2, 5), (4, 4, 4, 4), (0, 3, 0, 3)])
def test_causal_mask_columns_are_the_full_masks_columns(n_q, n_k, start, end):
    full = torch.arange(n_k)[None, :] <= torch.arange(n_q)[:, None] + (n_k - n_q)
    assert torch.equal(causal_mask(n_q, n_k, start=start, end=end), full[:, start:end])


@pytest.mark.parametrize("name", VARIANTS)
@settings(max_examples=40, deadline=None)
@given(qkv=qkv(), causal=st.booleans(), scale=st.one_of(st.none(), st.floats(0.05, 4.0)))
def test_variant_equals_sdpa(name, qkv, causal, scale):
    q, k, v = qkv
    out = VARIANTS[name](q, k, v, causal=causal, scale=scale)
    torch.testing.assert_close(out, sdpa_oracle(q, k, v, causal=causal, scale=scale), rtol=1e-9, atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(qkv=qkv(max_n=40), causal=st.booleans(), block_size=st.integers(1, 50))
def test_blockwise_any_block_size_and_its_log_sum_exp(qkv, causal, block_size):
    q, k, v = qkv
    out, lse = blockwise_attention(q, k, v, causal=causal, block_size=block_size, return_lse=True)
    torch.testing.assert_close(out, naive_attention(q, k, v, causal=causal), rtol=1e-9, atol=1e-9)
    s = (q @ k.repeat_interleave(q.shape[1] // k.shape[1], 1).transpose(-1, -2)) / math.sqrt(q.shape[-1])
    if causal:
        s = s.masked_fill(torch.arange(k.shape[2])[None, :] - torch.arange(q.shape[2])[:, None] > k.shape[2] - q.shape[2],
                          float("-inf"))
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", VARIANTS)
def test_large_logits_that_overflow_a_naive_exp(name):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(1, 2, 9, 8, generator=g) * 100  # scores of order 1e4
    k, v = torch.randn(1, 2, 11, 8, generator=g) * 100, torch.randn(1, 2, 11, 8, generator=g)
    s = q @ k.transpose(-1, -2) / math.sqrt(8)
    assert s.abs().max() > 1e4 and torch.isinf(torch.exp(s)).any()  # softmax without its max fails here
    expected = torch.softmax(s.double(), -1) @ v.double()
    torch.testing.assert_close(VARIANTS[name](q, k, v).double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", VARIANTS)
def test_queries_that_see_no_key_return_zeros(name):
    # Causal with 7 queries and 4 keys, end-aligned: the first 3 queries precede every key.
    q, k, v = torch.randn(1, 1, 7, 5), torch.randn(1, 1, 4, 5), torch.randn(1, 1, 4, 5)
    out = VARIANTS[name](q, k, v, causal=True)
    assert torch.equal(out[:, :, :3], torch.zeros(1, 1, 3, 5))
    assert torch.isfinite(out).all() and out[:, :, 3:].abs().sum() > 0


@pytest.mark.parametrize("name", VARIANTS)
def test_gqa_equals_repeated_heads(name):
    q, k, v = torch.randn(2, 6, 5, 4), torch.randn(2, 2, 8, 4), torch.randn(2, 2, 8, 4)
    fn = VARIANTS[name]
    torch.testing.assert_close(fn(q, k, v, causal=True),
                               fn(q, k.repeat_interleave(3, 1), v.repeat_interleave(3, 1), causal=True))
    # Head h reads KV head h // 3: swapping the KV heads changes the first three query heads.
    assert not torch.allclose(fn(q, k.flip(1), v.flip(1))[:, :3], fn(q, k, v)[:, :3])


@pytest.mark.parametrize("name", VARIANTS)
def test_inputs_are_validated(name):
    fn = VARIANTS[name]
    q = torch.randn(1, 4, 3, 8)
    with pytest.raises(ValueError, match="q must be"):
        fn(q[0], q, q)
    with pytest.raises(ValueError, match="must divide"):
        fn(q, torch.randn(1, 3, 3, 8), torch.randn(1, 3, 3, 8))
    with pytest.raises(ValueError, match="head_dim"):
        fn(q, torch.randn(1, 4, 3, 7), torch.randn(1, 4, 3, 7))


def test_block_size_is_validated():
    q = torch.randn(1, 1, 3, 4)
    with pytest.raises(ValueError, match="block_size"):
        blockwise_attention(q, q, q, block_size=0)


def test_online_softmax_step_keeps_max_denominator_and_output():
    g = torch.Generator().manual_seed(2)
    s, v = torch.randn(3, 10, generator=g, dtype=torch.float64) * 30, torch.randn(3, 10, 4, generator=g, dtype=torch.float64)
    s[0, :4] = float("-inf")  # masked keys first: the state must stay empty, not nan
    m, l, o = torch.full((3,), float("-inf"), dtype=torch.float64), torch.zeros(3, dtype=torch.float64), torch.zeros(3, 4, dtype=torch.float64)
    for j in range(10):
        m, l, o = online_softmax_step(m, l, o, s[:, j], v[:, j])
        seen = s[:, : j + 1]
        torch.testing.assert_close(m, seen.amax(-1))
        torch.testing.assert_close(l, torch.exp(seen - seen.amax(-1, keepdim=True)).sum(-1).nan_to_num(0.0))
        torch.testing.assert_close(o, torch.einsum("rj,rjd->rd", torch.softmax(seen, -1), v[:, : j + 1]).nan_to_num(0.0))


def test_merge_attention_blocks_equals_attention_over_the_union():
    g = torch.Generator().manual_seed(3)
    s, v = torch.randn(2, 12, generator=g, dtype=torch.float64) * 50, torch.randn(2, 12, 3, generator=g, dtype=torch.float64)

    def part(lo, hi):
        """The state (m, l, o) of keys lo .. hi-1."""
        x = s[:, lo:hi]
        if hi == lo:
            return torch.full((2,), float("-inf"), dtype=x.dtype), torch.zeros(2, dtype=x.dtype), torch.zeros(2, 3, dtype=x.dtype)
        m = x.amax(-1)
        return m, torch.exp(x - m[:, None]).sum(-1), torch.einsum("rj,rjd->rd", torch.softmax(x, -1), v[:, lo:hi])

    whole = part(0, 12)
    for cut in (0, 1, 5, 12):  # an empty part is the identity
        merged = merge_attention_blocks(*part(0, cut), *part(cut, 12))
        for got, want in zip(merged, whole):
            torch.testing.assert_close(got, want)


class PeakTensorBytes(TorchDispatchMode):
    """Peak bytes of the tensors that torch ops create while the mode is on, each freed when torch frees
    its storage (views and in-place results add nothing): an exact allocation count, without the
    profiler's cost per event. Tensors that existed before (the inputs) are not counted."""

    def __init__(self):
        super().__init__()
        self.held = self.peak = 0

    def _free(self, nbytes):
        self.held -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for ret, t in zip(func._schema.returns, out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor) and ret.alias_info is None:
                storage = t.untyped_storage()
                self.held += storage.nbytes()
                self.peak = max(self.peak, self.held)
                weakref.finalize(storage, self._free, storage.nbytes())
        return out


PEAK_CASES = {  # variant: (three lengths, each double the last; how the peak grows per doubling)
    "naive": ([128, 256, 512], 4),
    "online": ([64, 128, 256], 2),
    "blockwise": ([512, 1024, 2048], 2),
}


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("name", PEAK_CASES)
def test_peak_memory_is_linear_except_for_naive_attention(name, causal, one_thread):
    """Peak bytes of the tensors each variant allocates (fp32, one head, D=16, blocks of 32 keys).
    Naive attention holds the N x N scores; the others O(N · block) even when causal: only each
    block's columns of the mask are built (the whole mask made both grow faster than 2x)."""
    lengths, growth = PEAK_CASES[name]
    fn = {"blockwise": lambda q, k, v, **kw: blockwise_attention(q, k, v, block_size=32, **kw)}.get(name, VARIANTS[name])
    peaks = []
    for n in lengths:
        q, k, v = (torch.randn(1, 1, n, 16) for _ in range(3))
        with PeakTensorBytes() as counted:
            fn(q, k, v, causal=causal)
        assert counted.held == 0  # every temporary was freed: the count is complete
        peaks.append(counted.peak)
    ratios = [b / a for a, b in zip(peaks, peaks[1:])]
    assert all(0.9 * growth < r < 1.1 * growth for r in ratios), (peaks, ratios)
    n = lengths[-1]
    if name == "naive":
        assert peaks[-1] >= 3 * n * n * 4  # fp32 scores, probabilities and the mask or exp
    else:
        assert peaks[-1] < n * n * 4 / 2  # less than half of one fp32 N x N score matrix

