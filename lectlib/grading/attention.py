"""Exercises of the attention chapter: online softmax, the block-update rule, the kernel's inner loop."""

import torch

from .. import attention
from . import ExerciseFailure, expect, expect_close, exercise

NEG_INF = float("-inf")


def _row(seed: int, n: int = 12, d: int = 4, spread: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g, dtype=torch.float64) * spread, torch.randn(n, d, generator=g, dtype=torch.float64)


def _softmax_state(s, v):
    """The online-softmax state (m, l, o) of scores s (n,) with values v (n, d): max, denominator, output; empty -> (-inf, 0, 0)."""
    m = s.max()
    if m == NEG_INF:
        return m, torch.tensor(0.0, dtype=s.dtype), torch.zeros(v.shape[1], dtype=s.dtype)
    e = torch.exp(s - m)
    return m, e.sum(), (e / e.sum()) @ v


@exercise("online_softmax_step", reference=attention.online_softmax_step)
def _(candidate):
    cases = {"scores around 1": _row(0), "scores of order 1e4 (exp overflows without the running max)": _row(1, spread=1e4)}
    s, v = _row(2)
    s[:3] = NEG_INF
    cases["the first three keys masked (score -inf): the state must stay empty, not nan"] = (s, v)
    for what, (s, v) in cases.items():
        m, l, o = torch.tensor(NEG_INF, dtype=s.dtype), torch.tensor(0.0, dtype=s.dtype), torch.zeros(v.shape[1], dtype=s.dtype)
        for j in range(len(s)):
            m, l, o = candidate(m, l, o, s[j], v[j])
            want_m, want_l, want_o = _softmax_state(s[: j + 1], v[: j + 1])
            expect_close(m, want_m, f"{what}: the running max after key {j}")
            expect_close(l, want_l, f"{what}: the denominator Σ exp(s - m) after key {j}", rtol=1e-6)
            expect_close(o, want_o, f"{what}: the output after key {j}", rtol=1e-6, atol=1e-9)


@exercise("merge_attention_blocks", reference=attention.merge_attention_blocks)
def _(candidate):
    for what, spread in (("scores around 1", 1.0), ("scores of order 1e3", 1e3)):
        s, v = _row(3, n=10, spread=spread)
        whole = _softmax_state(s, v)
        for cut in (3, 7):
            merged = candidate(*_softmax_state(s[:cut], v[:cut]), *_softmax_state(s[cut:], v[cut:]))
            expect(isinstance(merged, tuple) and len(merged) == 3, "return the tuple (m, l, o)")
            for got, want, name in zip(merged, whole, ("m", "l", "o")):
                expect_close(got, want, f"{what}, keys split after {cut}: the merged {name}", rtol=1e-6, atol=1e-9)
    s, v = _row(4, n=6)
    state = _softmax_state(s, v)
    empty = (torch.tensor(NEG_INF, dtype=s.dtype), torch.tensor(0.0, dtype=s.dtype), torch.zeros(4, dtype=s.dtype))
    merged = candidate(*state, *empty)
    expect_close(merged[2], state[2], "merging with an empty part (m = -inf, l = 0) must change nothing, and not give nan")
    merged = candidate(*empty, *empty)
    expect_close(merged[2], torch.zeros(4), "two empty parts: the output stays 0, not nan")


def _kernel_with_step(step):
    """The kernel with `step` as its inner loop, as a function (q, k, v, causal) -> O (B, H, N, D) on the CPU.

    The learner's step returns Triton tensors, which the grader cannot record; the kernel's output is data.
    """
    flash = _flash()
    ok, why = flash.kernel_available(torch.device("cpu"))
    device = torch.device("cpu")
    if not ok:
        if not (torch.cuda.is_available() and flash.kernel_available(torch.device("cuda"))[0]):
            raise ExerciseFailure(f"this check runs the kernel, which cannot run here: {why}")
        import triton

        device, step = torch.device("cuda"), triton.jit(step)

    def output(q, k, v, causal):
        try:
            return flash.forward(q.to(device), k.to(device), v.to(device), causal=causal, step=step)[0].cpu()
        except Exception as error:
            # The interpreter wraps what the step raised; unwrap an unsolved exercise.
            cause = error
            while cause is not None and not isinstance(cause, NotImplementedError):
                cause = cause.__cause__ or cause.__context__
            raise cause or error

    return output


@exercise("flash_block_step", reference=lambda *args: _flash().block_step(*args), points=2, observe=_kernel_with_step)
def _(kernel):
    g = torch.Generator().manual_seed(5)
    cases = [("40 queries x 40 keys", 40, 40, 1.0, False),
             ("causal, 25 queries x 10 keys: the first 15 queries see no key", 25, 10, 1.0, True),
             ("scores of order 1e4", 20, 33, 100.0, False)]
    for what, n_q, n_k, spread, causal in cases:
        q = torch.randn(1, 1, n_q, 16, generator=g) * spread
        k = torch.randn(1, 1, n_k, 16, generator=g) * spread
        v = torch.randn(1, 1, n_k, 16, generator=g)
        expect_close(kernel(q, k, v, causal), attention.naive_attention(q, k, v, causal=causal),
                     f"{what}: the kernel's output with your inner loop", rtol=1e-4, atol=1e-5)


def _flash():
    from .. import flash  # imports Triton: only when this exercise runs

    return flash
