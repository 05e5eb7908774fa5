"""The Triton FlashAttention kernel against naive attention and SDPA (under the interpreter on CPU: small sizes)."""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lectlib import attention, flash

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cuda" and not flash.kernel_available(DEVICE)[0]:  # on CPU the interpreter must run them
    pytest.skip(f"the kernel cannot run here: {flash.kernel_available(DEVICE)[1]}", allow_module_level=True)


def make(b, h, h_kv, n_q, n_k, d, *, seed=0, dtype=torch.float32, grad=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, n_q, d, generator=g)
    k, v = (torch.randn(b, h_kv, n_k, d, generator=g) for _ in range(2))
    return [t.to(DEVICE, dtype).requires_grad_(grad) for t in (q, k, v)]


def reference(q, k, v, *, causal, scale=None):
    """Naive attention in float64: the oracle for values and, through autograd, gradients."""
    return attention.naive_attention(q.double(), k.double(), v.double(), causal=causal, scale=scale)


@settings(max_examples=25, deadline=None)
@given(n_q=st.integers(1, 40), n_k=st.integers(1, 40), d=st.sampled_from([16, 24, 32, 64, 128]),
       h_kv=st.integers(1, 2),
       rep=st.sampled_from([1, 2]), causal=st.booleans(), seed=st.integers(0, 2**16))
def test_forward_and_gradients_equal_naive_attention(n_q, n_k, d, h_kv, rep, causal, seed):
    q, k, v = make(1, h_kv * rep, h_kv, n_q, n_k, d, seed=seed, grad=True)
    out = flash.flash_attention(q, k, v, causal=causal)
    expected = reference(q, k, v, causal=causal)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), grad_out)
    want = torch.autograd.grad(expected, (q, k, v), grad_out.double())
    for name, g, w in zip("qkv", got, want):
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-4, atol=1e-4, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("causal", [False, True])
def test_equals_sdpa(causal):
    q, k, v = make(2, 2, 2, 37, 37, 16, seed=1)
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=0.3)
    torch.testing.assert_close(flash.flash_attention(q, k, v, causal=causal, scale=0.3), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 2e-3), (torch.bfloat16, 2e-2)])
def test_half_precision(dtype, tol):
    q, k, v = make(1, 2, 1, 33, 21, 32, seed=2, dtype=dtype)
    out = flash.flash_attention(q, k, v, causal=True)
    assert out.dtype == dtype
    torch.testing.assert_close(out.double(), reference(q, k, v, causal=True), rtol=tol, atol=tol)


def test_large_logits():
    q, k, v = make(1, 1, 1, 20, 20, 16, seed=3)
    q, k = q * 100, k * 100  # scores of order 1e4: exp overflows without the running max
    assert torch.isinf(torch.exp(q @ k.transpose(-1, -2) / 4)).any()
    torch.testing.assert_close(flash.flash_attention(q, k, v).double(), reference(q, k, v, causal=False),
                               rtol=1e-4, atol=1e-5)


def test_queries_that_see_no_key_return_zeros_and_no_gradient():
    q, k, v = make(1, 1, 1, 30, 10, 16, seed=4, grad=True)  # causal, end-aligned: queries 0..19 see no key
    out = flash.flash_attention(q, k, v, causal=True)
    assert torch.equal(out[:, :, :20].detach(), torch.zeros(1, 1, 20, 16)) and out[:, :, 20:].abs().sum() > 0
    out.sum().backward()
    assert torch.equal(q.grad[:, :, :20], torch.zeros(1, 1, 20, 16)) and torch.isfinite(k.grad).all()


def test_causal_skips_the_blocks_above_the_diagonal():
    """Count the inner-loop steps: causal attention visits the blocks on and below the diagonal only."""
    calls = []

    def counting_step(m_i, l_i, acc, s, v):
        calls.append(1)
        return flash.block_step(m_i, l_i, acc, s, v)

    n, d = 64, 16
    block_m, block_n = (flash.INTERPRETER_CONFIG.kwargs[b] for b in ("BLOCK_M", "BLOCK_N"))
    q, k, v = make(1, 1, 1, n, n, d, seed=5)
    for causal in (False, True):
        calls.clear()
        out, _ = flash.forward(q, k, v, causal=causal, step=counting_step)
        torch.testing.assert_close(out.double(), reference(q, k, v, causal=causal), rtol=1e-4, atol=1e-5)
        visited = len(calls)
        if not causal:
            assert visited == (n // block_m) * (n // block_n)
    full, rows = (n // block_m) * (n // block_n), n // block_m
    assert visited == (full + rows) // 2 if block_m == block_n else visited < full


def test_a_wrong_inner_loop_is_caught():
    """Forgetting to rescale the running sums when the max grows gives wrong outputs."""
    import triton.language as tl

    def no_rescale(m_i, l_i, acc, s, v):
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        return m_new, l_i + tl.sum(p, 1), acc + tl.dot(p.to(v.dtype), v)

    q, k, v = make(1, 1, 1, 40, 40, 16, seed=6)
    out, _ = flash.forward(q, k, v, step=no_rescale)
    assert (out.double() - reference(q, k, v, causal=False)).abs().max() > 0.05


def test_fallback_says_why_once_and_stays_correct(monkeypatch, capsys):
    monkeypatch.setattr(flash, "kernel_available", lambda device: (False, "Tesla T4 is sm75"))
    monkeypatch.setattr(flash, "_fallback_said", False)
    q, k, v = make(1, 2, 1, 9, 9, 16, seed=7, grad=True)
    out = flash.flash_attention(q, k, v, causal=True)
    flash.flash_attention(q, k, v, causal=True)
    said = capsys.readouterr().out
    assert said.count("Tesla T4 is sm75") == 1 and "blockwise_attention" in said
    torch.testing.assert_close(out.double(), reference(q, k, v, causal=True), rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


def test_inputs_are_validated():
    q, k, v = make(1, 2, 2, 4, 4, 16)
    with pytest.raises(ValueError, match="must divide"):
        flash.flash_attention(q, k[:, :1].expand(1, 3, 4, 16), v[:, :1].expand(1, 3, 4, 16))
    with pytest.raises(ValueError, match="head_dim"):
        flash.flash_attention(q[..., :8], k, v)
    wide = torch.zeros(1, 1, 2, 512)
    with pytest.raises(ValueError, match="head_dim 512"):
        flash.flash_attention(wide, wide, wide)


def test_lazy_export_from_attention():
    assert attention.flash_attention is flash.flash_attention
    assert math.isclose(flash.LOG2E, 1 / math.log(2))


def test_a_kernel_that_cannot_be_built_falls_back(monkeypatch, capsys):
    def out_of_resources(*args, **kwargs):
        raise flash.OutOfResources(required=300_000, limit=101_376, name="shared memory")

    monkeypatch.setattr(flash.FlashAttention, "apply", out_of_resources)
    monkeypatch.setattr(flash, "_fallback_said", False)
    q, k, v = make(1, 1, 1, 9, 9, 16, seed=8)
    out = flash.flash_attention(q, k, v)
    assert "OutOfResources" in capsys.readouterr().out
    torch.testing.assert_close(out.double(), reference(q, k, v, causal=False), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is for machines without a CUDA GPU")
def test_triton_imported_before_lectlib_gets_a_clear_message_not_a_crash():
    """Triton imported before TRITON_INTERPRET=1 builds its library for the compiler, and interpreted kernels
    that call `tl.max` fail deep inside: the scan kernel must say why, flash_attention say why and fall back."""
    code = ("import triton, torch\nfrom lectlib import attention, flash, ssm_triton\nq = torch.randn(1, 1, 8, 16)\n"
            "try:\n    x = torch.randn(1, 4, 2)\n"
            "    ssm_triton.selective_scan_triton(x, x, torch.randn(2, 3), torch.randn(1, 4, 3), torch.randn(1, 4, 3))\n"
            "except RuntimeError as error:\n    print(error)\n"
            "print(flash.kernel_available(q.device))\n"
            "try:\n    flash.forward(q, q, q)\nexcept RuntimeError as error:\n    print(error)\n"
            "print((flash.flash_attention(q, q, q) - attention.naive_attention(q, q, q)).abs().max().item())")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.startswith("selective_scan_triton: Triton was imported before TRITON_INTERPRET=1")
    assert "flash.forward cannot run the Triton kernel here: Triton was imported before TRITON_INTERPRET=1" in out
    assert "blockwise_attention instead" in out and float(out.strip().splitlines()[-1]) < 1e-5


@pytest.mark.parametrize("where", ["q nan", "k nan", "k inf", "v nan"])
def test_nan_and_inf_follow_the_attention_conventions(where):
    """lectlib.attention's documented behaviour in the kernel: a row that reads a NaN or inf is NaN
    (for q and k, only those rows), rows that see no key are 0; causal, 12 queries x 9 keys."""
    q, k, v = make(1, 2, 1, 12, 9, 16, seed=9)
    t = {"q": q, "k": k, "v": v}[where[0]]
    t[0, 0, 5 if where[0] == "q" else 4] = float(where[2:])  # query row 5, or key 4 (seen by rows 7..11)
    out = flash.flash_attention(q, k, v, causal=True)
    nan_rows = out.isnan().any(-1)[0]
    expected = torch.zeros(2, 12, dtype=torch.bool)
    if where[0] == "q":
        expected[0, 5] = True
    else:
        expected[:, 7:] = True
    if where == "v nan":  # 0·NaN in P·V may spoil rows that do not see it, as documented
        assert (nan_rows >= expected).all()
    else:
        assert torch.equal(nan_rows, expected)
        assert torch.equal(out[0, :, :3], torch.zeros(2, 3, 16, device=out.device))  # rows 0..2 see no key


def test_fp16_scores_past_65504_are_exact():
    """fp16 inputs whose scores reach 5e5 (exact in fp32, far past fp16's 65504)."""
    g = torch.Generator().manual_seed(10)
    q, k = ((torch.randint(-8, 9, (1, 1, 20, 16), generator=g) * 32.0).to(DEVICE, torch.float16) for _ in range(2))
    v = torch.randn(1, 1, 20, 16, generator=g).to(DEVICE, torch.float16)
    assert (q.float() @ k.float().transpose(-1, -2)).abs().max() > 65504
    expected = torch.softmax(q.double() @ k.double().transpose(-1, -2), -1) @ v.double()
    torch.testing.assert_close(flash.flash_attention(q, k, v, scale=1.0).double(), expected, rtol=1e-3, atol=1e-3)
