"""FlashAttention in Triton, forward and backward (Dao et al. 2022; FlashAttention-2, Dao 2023).

`flash_attention(q, k, v, *, causal, scale)` takes (B, H, N, D) tensors like torch SDPA, with
GQA (k, v with fewer heads dividing H) and causal masking aligned to the end of the keys.

The forward kernel gives each program one block of BLOCK_M queries. It keeps the queries, a
running max m, denominator l and unnormalized output acc on chip, and streams the keys and
values through in blocks of BLOCK_N (`block_step`, the online-softmax update a block at a
time). It writes the output and the log-sum-exp of each row, nothing of size N². The backward
recomputes the probabilities from the log-sum-exp instead of storing them: one kernel
accumulates dK, dV over the query blocks of each key block, another dQ over the key blocks of
each query block, so no two programs write the same memory.

Known optimisations (the FlashAttention-2 paper and Triton's fused-attention tutorial), and which
this kernel uses:
- used: exp2 with log2(e) folded into the scale (`LOG2E`; exp2 is the GPU's native instruction),
  a base-2 log-sum-exp kept for the backward;
- used: causal attention split into stages: key blocks entirely below the diagonal run without a
  mask, only the blocks that cross it (or the end of the keys) pay for one, and blocks above it
  are skipped (half the work of a full pass);
- used: block sizes, warps and software-pipelining stages autotuned per shape (`FORWARD_CONFIGS`,
  `BACKWARD_CONFIGS`; BLOCK_M = 128 with 8 warps first, for D = 128);
- used: fp32 accumulators and running statistics whatever the input dtype;
- not used: tensor descriptors (TMA) and warp specialisation on sm90, a fused single-kernel
  backward with atomics, and FP8. `python -m lectlib.bench attention --device-run` measures what the
  kernel reaches against SDPA's FlashAttention backend on the GPU it runs on.

Where it runs: compiled on GPUs that Triton supports (sm80+: A100, L4, H100); under Triton's
interpreter (TRITON_INTERPRET=1, set as lectlib is imported when no CUDA GPU is present) on
CPU, where it is slow but exact; elsewhere (Colab's T4 is sm75, too old for these
kernels) `flash_attention` says so once and computes `attention.blockwise_attention` instead.
Both follow `lectlib.attention`'s conventions: fp32 scores and softmax, zeros for rows that see
no key, NaN where an input is not finite. Shown in chapter 1.
"""

import torch

from . import attention, runtime

INTERPRET = runtime.use_triton_interpreter()

import triton  # noqa: E402  (the interpreter must be chosen before the kernels are defined)
import triton.language as tl  # noqa: E402
from triton.compiler.errors import CompilationError  # noqa: E402
from triton.runtime.errors import OutOfResources  # noqa: E402

LOG2E = 1.4426950408889634  # exp(x) = exp2(x·log2 e): folded into the scale, exp2 is the fast instruction


def block_step(m_i, l_i, acc, s, v):
    """The kernel's inner loop: fold one block of scores into the running state (m, l, acc), base 2.

    m_i, l_i (BLOCK_M,) running max and denominator; acc (BLOCK_M, BLOCK_D) the output not yet
    divided by l; s (BLOCK_M, BLOCK_N) scores already multiplied by scale·log2(e), -inf where
    masked; v (BLOCK_N, BLOCK_D) values. Returns (m_i, l_i, acc) updated:
    m' = max(m, rowmax s), p = 2^(s - m'), l' = 2^(m - m')·l + rowsum p, acc' = 2^(m - m')·acc + p v.

    Shown in chapter 1.
    """
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen only masked keys keeps m = -inf; use 0 there so that -inf - m is not nan.
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s - m_ref[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


_block_step = triton.jit(block_step)


@triton.jit
def _load_block(base, rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, UPCAST: tl.constexpr):
    """Rows `rows` of a contiguous (n_rows, HEAD_DIM) matrix, zeros past its ends."""
    x = tl.load(base + rows[:, None] * HEAD_DIM + offs_d[None, :],
                mask=(rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    # The interpreter computes bf16 wrongly; fp32 is exact there (and costs nothing on a CPU).
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _forward_blocks(q, k_base, v_base, m_i, l_i, acc, offs_m, offs_d, lo, hi, n_k, offset, qk_scale,
                    STEP: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
                    BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    """Fold the key blocks lo .. hi into the state (m_i, l_i, acc) of one query block. Shown in chapter 1."""
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_block(k_base, offs_n, n_k, offs_d, HEAD_DIM, UPCAST)
        v = _load_block(v_base, offs_n, n_k, offs_d, HEAD_DIM, UPCAST)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        # Only blocks that cross the diagonal or the end of the keys pay for the mask.
        if MASKED:
            valid = offs_n[None, :] < n_k
            if CAUSAL:
                valid = valid & (offs_n[None, :] <= offs_m[:, None] + offset)
            s = tl.where(valid, s, float("-inf"))
        m_i, l_i, acc = STEP(m_i, l_i, acc, s, v)
    return m_i, l_i, acc


@triton.jit
def _forward_kernel(Q, K, V, O, LSE, qk_scale, n_q, n_k, H, GROUP,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    CAUSAL: tl.constexpr, STEP: tl.constexpr, UPCAST: tl.constexpr):
    """One program: BLOCK_M queries of one (batch, head) against the keys they see; writes O and the lse.

    Shown in chapter 1."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    # GQA: query head h reads KV head h // GROUP of the same batch element.
    kv_bh = (pid_bh // H) * (H // GROUP) + (pid_bh % H) // GROUP
    q_base = Q + pid_bh.to(tl.int64) * n_q * HEAD_DIM
    k_base = K + kv_bh.to(tl.int64) * n_k * HEAD_DIM
    v_base = V + kv_bh.to(tl.int64) * n_k * HEAD_DIM
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_block(q_base, offs_m, n_q, offs_d, HEAD_DIM, UPCAST)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # Query i sees keys j <= i + offset (end-aligned). Keys below `lo_masked` are seen by every
    # row of this block and exist; keys from `hi` on are seen by none and are skipped.
    offset = n_k - n_q
    lo_masked = (n_k // BLOCK_N) * BLOCK_N
    hi = n_k
    if CAUSAL:
        first_row_sees = pid_m * BLOCK_M + offset + 1
        lo_masked = tl.minimum(lo_masked, tl.maximum(first_row_sees, 0) // BLOCK_N * BLOCK_N)
        hi = tl.maximum(tl.minimum(n_k, (pid_m + 1) * BLOCK_M + offset), 0)
    m_i, l_i, acc = _forward_blocks(q, k_base, v_base, m_i, l_i, acc, offs_m, offs_d, 0, lo_masked, n_k, offset,
                                    qk_scale, STEP, False, CAUSAL, HEAD_DIM, BLOCK_N, UPCAST)
    m_i, l_i, acc = _forward_blocks(q, k_base, v_base, m_i, l_i, acc, offs_m, offs_d, lo_masked, hi, n_k, offset,
                                    qk_scale, STEP, True, CAUSAL, HEAD_DIM, BLOCK_N, UPCAST)

    seen = l_i > 0
    o = acc / tl.where(seen, l_i, 1.0)[:, None]
    # Base-2 log-sum-exp for the backward; +inf where a row sees no key makes its P = 2^(s - inf) = 0.
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("inf"))
    row_ok = offs_m < n_q
    tl.store(O + pid_bh.to(tl.int64) * n_q * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :],
             o.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(LSE + pid_bh.to(tl.int64) * n_q + offs_m, lse, mask=row_ok)


@triton.jit
def _probabilities(q, k, lse, offs_m, offs_n, n_q, n_k, offset, qk_scale, CAUSAL: tl.constexpr):
    """P = 2^(S·scale·log2 e - lse) for a (queries, keys) block, 0 where masked or out of range."""
    s = tl.dot(q, tl.trans(k)) * qk_scale
    p = tl.exp2(s - lse[:, None])
    valid = (offs_m[:, None] < n_q) & (offs_n[None, :] < n_k)
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None] + offset)
    return tl.where(valid, p, 0.0)


@triton.jit
def _backward_dkdv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, qk_scale, scale, n_q, n_k, H, GROUP,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr):
    """dV = Pᵀ dO and dK = scale · dSᵀ Q for one key block of one query head, over all query blocks."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    kv_bh = (pid_bh // H) * (H // GROUP) + (pid_bh % H) // GROUP
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_block(K + kv_bh.to(tl.int64) * n_k * HEAD_DIM, offs_n, n_k, offs_d, HEAD_DIM, UPCAST)
    v = _load_block(V + kv_bh.to(tl.int64) * n_k * HEAD_DIM, offs_n, n_k, offs_d, HEAD_DIM, UPCAST)
    q_base = Q + pid_bh.to(tl.int64) * n_q * HEAD_DIM
    do_base = DO + pid_bh.to(tl.int64) * n_q * HEAD_DIM
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    offset = n_k - n_q
    lo = 0
    if CAUSAL:
        # Queries before row (first key - offset) see none of this block's keys.
        lo = tl.maximum(pid_n * BLOCK_N - offset, 0) // BLOCK_M * BLOCK_M
    for start_m in range(lo, n_q, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_block(q_base, offs_m, n_q, offs_d, HEAD_DIM, UPCAST)
        do = _load_block(do_base, offs_m, n_q, offs_d, HEAD_DIM, UPCAST)
        lse = tl.load(LSE + pid_bh.to(tl.int64) * n_q + offs_m, mask=offs_m < n_q, other=float("inf"))
        delta = tl.load(DELTA + pid_bh.to(tl.int64) * n_q + offs_m, mask=offs_m < n_q, other=0.0)
        p = _probabilities(q, k, lse, offs_m, offs_n, n_q, n_k, offset, qk_scale, CAUSAL)
        dv += tl.dot(tl.trans(p).to(do.dtype), do)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])  # softmax backward: dS = P ∘ (dP - rowsum(dO ∘ O))
        dk += tl.dot(tl.trans(ds).to(q.dtype), q)
    out = pid_bh.to(tl.int64) * n_k * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    store_mask = (offs_n[:, None] < n_k) & (offs_d[None, :] < HEAD_DIM)
    tl.store(DK + out, dk * scale, mask=store_mask)
    tl.store(DV + out, dv, mask=store_mask)


@triton.jit
def _backward_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, qk_scale, scale, n_q, n_k, H, GROUP,
                        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, UPCAST: tl.constexpr):
    """dQ = scale · dS K for one query block, over the key blocks it sees.

    Shown in chapter 1."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    kv_bh = (pid_bh // H) * (H // GROUP) + (pid_bh % H) // GROUP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_block(Q + pid_bh.to(tl.int64) * n_q * HEAD_DIM, offs_m, n_q, offs_d, HEAD_DIM, UPCAST)
    do = _load_block(DO + pid_bh.to(tl.int64) * n_q * HEAD_DIM, offs_m, n_q, offs_d, HEAD_DIM, UPCAST)
    lse = tl.load(LSE + pid_bh.to(tl.int64) * n_q + offs_m, mask=offs_m < n_q, other=float("inf"))
    delta = tl.load(DELTA + pid_bh.to(tl.int64) * n_q + offs_m, mask=offs_m < n_q, other=0.0)
    k_base = K + kv_bh.to(tl.int64) * n_k * HEAD_DIM
    v_base = V + kv_bh.to(tl.int64) * n_k * HEAD_DIM
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    offset = n_k - n_q
    hi = n_k
    if CAUSAL:
        hi = tl.maximum(tl.minimum(n_k, (pid_m + 1) * BLOCK_M + offset), 0)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_block(k_base, offs_n, n_k, offs_d, HEAD_DIM, UPCAST)
        v = _load_block(v_base, offs_n, n_k, offs_d, HEAD_DIM, UPCAST)
        p = _probabilities(q, k, lse, offs_m, offs_n, n_q, n_k, offset, qk_scale, CAUSAL)
        ds = p * (tl.dot(do, tl.trans(v)) - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
    tl.store(DQ + pid_bh.to(tl.int64) * n_q * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :], dq * scale,
             mask=(offs_m[:, None] < n_q) & (offs_d[None, :] < HEAD_DIM))


# Launch settings, autotuned on compiled GPUs: the first time a kernel meets a new (N_q, N_k, head dim,
# causal, dtype) it times every config and keeps the fastest (Triton's `autotune`). Configs that do not
# fit (too much shared memory) are skipped by the tuner. The first config of each list is the default.
# Under the interpreter one config of small blocks: more tails tested, and no GPU to time on.
FORWARD_CONFIGS = [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=w, num_stages=s)
                   for bm, bn, w, s in [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4)]]
BACKWARD_CONFIGS = [triton.Config(dict(BLOCK_M=bm, BLOCK_N=bn), num_warps=w, num_stages=s)
                    for bm, bn, w, s in [(64, 64, 8, 1), (64, 64, 4, 2), (32, 64, 4, 3)]]
INTERPRETER_CONFIG = triton.Config(dict(BLOCK_M=16, BLOCK_N=16))


def _autotuned(kernel, configs):
    return triton.autotune([INTERPRETER_CONFIG] if INTERPRET else configs, key=["n_q", "n_k", "HEAD_DIM", "CAUSAL"])(kernel)


_forward_tuned = _autotuned(_forward_kernel, FORWARD_CONFIGS)
_backward_dkdv_tuned = _autotuned(_backward_dkdv_kernel, BACKWARD_CONFIGS)
_backward_dq_tuned = _autotuned(_backward_dq_kernel, BACKWARD_CONFIGS)


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))


def _shape(q, k):
    b, h, n_q, d = q.shape
    return b, h, n_q, k.shape[2], d, h // k.shape[1]


def forward(q, k, v, *, causal: bool = False, scale: float | None = None, step=None):
    """Run the forward kernel: (O (B, H, N_q, D), base-2 log-sum-exp (B, H, N_q) fp32, +inf on empty rows).

    `step` replaces `block_step` in the inner loop (the chapter's exercise); under the
    interpreter a plain Python function using `tl` works, compiled it must be `triton.jit`ted.
    """
    attention.check_qkv(q, k, v)
    ok, why = kernel_available(q.device)
    if not ok:  # a clear reason rather than Triton's error from deep inside the launch
        raise RuntimeError(f"flash.forward cannot run the Triton kernel here: {why}")
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    b, h, n_q, n_k, d, group = _shape(q, k)
    scale = attention.resolve_scale(scale, d)
    o = torch.empty_like(q)
    lse = torch.empty((b, h, n_q), device=q.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), b * h)  # noqa: E731
    _forward_tuned[grid](q, k, v, o, lse, scale * LOG2E, n_q, n_k, h, group, HEAD_DIM=d, BLOCK_D=_block_d(d),
                         CAUSAL=causal, STEP=_block_step if step is None else step, UPCAST=INTERPRET)
    return o, lse


def backward(do, q, k, v, o, lse, *, causal: bool, scale: float):
    """Gradients (dq, dk, dv) of the forward kernel's output given dO, recomputing P from the log-sum-exp."""
    q, k, v, o, do = (t.contiguous() for t in (q, k, v, o, do))
    b, h, n_q, n_k, d, group = _shape(q, k)
    # rowsum(dO ∘ O) = rowsum(P ∘ dP): the softmax backward's correction term, one number per query.
    delta = (do.float() * o.float()).sum(-1)
    dq = torch.empty(q.shape, device=q.device, dtype=torch.float32)
    # Each query head writes its own dK, dV; the heads sharing a KV head are summed afterwards.
    dk = torch.empty((b, h, n_k, d), device=q.device, dtype=torch.float32)
    dv = torch.empty_like(dk)
    common = dict(HEAD_DIM=d, BLOCK_D=_block_d(d), CAUSAL=causal, UPCAST=INTERPRET)
    _backward_dkdv_tuned[lambda meta: (triton.cdiv(n_k, meta["BLOCK_N"]), b * h)](
        q, k, v, do, lse, delta, dk, dv, scale * LOG2E, scale, n_q, n_k, h, group, **common)
    _backward_dq_tuned[lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), b * h)](
        q, k, v, do, lse, delta, dq, scale * LOG2E, scale, n_q, n_k, h, group, **common)
    dk = dk.view(b, h // group, group, n_k, d).sum(2)
    dv = dv.view(b, h // group, group, n_k, d).sum(2)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class FlashAttention(torch.autograd.Function):
    """Autograd wrapper: saves q, k, v, O and the log-sum-exp (O(N) extra), recomputes P in the backward."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale):
        o, lse = forward(q, k, v, causal=causal, scale=scale)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.causal, ctx.scale = causal, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = backward(do, q, k, v, o, lse, causal=ctx.causal, scale=ctx.scale)
        return dq, dk, dv, None, None


_fallback_said = False


def kernel_available(device: torch.device) -> tuple[bool, str]:
    """Whether the Triton kernel can run on tensors of `device`, and if not, why."""
    if device.type == "cuda":
        if INTERPRET:
            return False, "TRITON_INTERPRET=1 is set but the tensors are on the GPU"
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            name = torch.cuda.get_device_name(device)
            return False, f"{name} is sm{major}{minor}; these Triton kernels need sm80 or newer (A100, L4, H100)"
        return True, ""
    if device.type == "cpu" and INTERPRET:
        problem = runtime.triton_interpreter_problem()
        return problem is None, problem or ""
    return False, f"no Triton kernel for {device.type} tensors (on CPU, set TRITON_INTERPRET=1 before importing)"


def flash_attention(q, k, v, *, causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """FlashAttention-2 (Dao 2023) as a Triton kernel, forward and backward: (B, H, N_q, D).

    q (B, H, N_q, D); k, v (B, H_kv, N_k, D) with H_kv dividing H (GQA); fp16, bf16 or fp32;
    D from 16 to 128; any N_q, N_k; `causal` aligns the queries to the end of the keys and skips
    the key blocks a query block cannot see. A row that sees no key returns zeros. Where the
    kernel cannot run (see `kernel_available`) or Triton cannot build it for this GPU, it prints
    why, once, and computes `attention.blockwise_attention` (same result, differentiable).
    """
    attention.check_qkv(q, k, v)
    if not 1 <= q.shape[-1] <= 256:
        raise ValueError(f"q has head_dim {q.shape[-1]}; the kernel supports 1 to 256 (tested 16 to 128)")
    scale = attention.resolve_scale(scale, q.shape[-1])
    ok, why = kernel_available(q.device)
    if ok:
        try:
            return FlashAttention.apply(q, k, v, causal, scale)
        except (CompilationError, OutOfResources) as error:  # e.g. too little shared memory for these blocks
            why = f"Triton could not build the kernel here ({type(error).__name__}: {str(error).splitlines()[0]})"
    global _fallback_said
    if not _fallback_said:
        print(f"flash_attention: {why}; using lectlib.attention.blockwise_attention instead.")
        _fallback_said = True
    return attention.blockwise_attention(q, k, v, causal=causal, scale=scale)
