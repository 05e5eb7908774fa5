"""The selective scan as a Triton kernel (the idea of Mamba's hardware-aware scan, Sec. 3.3.2).

The PyTorch scans write the (B, L, D, N) states to memory; this kernel never does. Each program
owns one (batch, channel) pair: it loads Δ, x (a chunk of BLOCK_L tokens) and B, C (BLOCK_L, N)
from HBM, discretises in SRAM/registers (Ā = exp(Δ A), B̄x = Δ x B), scans the chunk in parallel
with `tl.associative_scan` and the operator of `lectlib.ssm.scan_combine`, starts the chunk from
the state the previous chunk ended with, contracts with C and writes only y (BLOCK_L,) and, at the
end, the last state (N,). Memory traffic is the inputs and outputs: O(B·L·(D + N)), not O(B·L·D·N).

The backward recomputes instead of storing, as the paper does: it runs the differentiable
PyTorch scan (`selective_scan_parallel`) again on the saved inputs and differentiates that.

Where it runs: compiled on CUDA GPUs; under Triton's interpreter (TRITON_INTERPRET=1, set as
lectlib is imported when no CUDA GPU is present) on a CPU, where it is exact but slow.
"""

import torch

from . import runtime
from .ssm import check_scan_inputs, selective_scan_parallel

INTERPRET = runtime.use_triton_interpreter()

import triton  # noqa: E402  (the interpreter must be chosen before the kernel is defined)
import triton.language as tl  # noqa: E402


@triton.jit
def _combine(a1, b1, a2, b2):
    # scan_combine: first (a1, b1), then (a2, b2).
    return a1 * a2, a2 * b1 + b2


@triton.jit
def _scan_kernel(X, DELTA, A, B, C, D, Z, H0, Y, H_LAST, L, DIM, N,
                 BLOCK_L: tl.constexpr, BLOCK_N: tl.constexpr,
                 HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_H0: tl.constexpr):
    pid_b = tl.program_id(0)
    d = tl.program_id(1)
    offs_n = tl.arange(0, BLOCK_N)
    n_ok = offs_n < N
    a = tl.load(A + d * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)  # (BLOCK_N,)
    if HAS_H0:
        h = tl.load(H0 + (pid_b * DIM + d) * N + offs_n, mask=n_ok, other=0.0).to(tl.float32)
    else:
        h = tl.zeros([BLOCK_N], tl.float32)
    skip = tl.load(D + d).to(tl.float32) if HAS_D else 0.0
    xd_base = pid_b.to(tl.int64) * L * DIM + d  # x, delta, z, y: (B, L, DIM) contiguous
    bc_base = pid_b.to(tl.int64) * L * N  # B, C: (B, L, N) contiguous
    for start in range(0, L, BLOCK_L):
        offs_l = start + tl.arange(0, BLOCK_L)
        l_ok = offs_l < L
        x = tl.load(X + xd_base + offs_l * DIM, mask=l_ok, other=0.0).to(tl.float32)
        dt = tl.load(DELTA + xd_base + offs_l * DIM, mask=l_ok, other=0.0).to(tl.float32)
        tile = bc_base + offs_l[:, None] * N + offs_n[None, :]
        tile_ok = l_ok[:, None] & n_ok[None, :]
        b_t = tl.load(B + tile, mask=tile_ok, other=0.0).to(tl.float32)
        c_t = tl.load(C + tile, mask=tile_ok, other=0.0).to(tl.float32)
        # Past the end Δ = 0: Ā = 1 and B̄x = 0, the identity step, so the last state is unchanged.
        a_bar = tl.exp(dt[:, None] * a[None, :])  # (BLOCK_L, BLOCK_N)
        bx = (dt * x)[:, None] * b_t
        a_cum, b_cum = tl.associative_scan((a_bar, bx), 0, _combine)
        states = a_cum * h[None, :] + b_cum  # the state after every token of the chunk
        y = tl.sum(states * c_t, 1) + skip * x
        if HAS_Z:
            z = tl.load(Z + xd_base + offs_l * DIM, mask=l_ok, other=0.0).to(tl.float32)
            y = y * z * tl.sigmoid(z)
        tl.store(Y + xd_base + offs_l * DIM, y.to(Y.dtype.element_ty), mask=l_ok)
        h = tl.sum(tl.where((offs_l == start + BLOCK_L - 1)[:, None], states, 0.0), 0)
    tl.store(H_LAST + (pid_b * DIM + d) * N + offs_n, h, mask=n_ok)


def _forward(x, delta, A, B, C, D, z, h0, block_l: int):
    batch, length, dim = x.shape
    n = A.shape[1]
    y = torch.empty(x.shape, device=x.device, dtype=x.dtype)  # contiguous, whatever the layout of x
    h_last = torch.empty(batch, dim, n, device=x.device, dtype=torch.float32)
    dummy = x  # stands for an absent optional argument; never read (its flag is False)
    args = [t.contiguous() if t is not None else dummy for t in (x, delta, A, B, C, D, z, h0)]
    _scan_kernel[(batch, dim)](*args, y, h_last, length, dim, n,
                               BLOCK_L=block_l, BLOCK_N=triton.next_power_of_2(n),
                               HAS_D=D is not None, HAS_Z=z is not None, HAS_H0=h0 is not None)
    return y, h_last.to(x.dtype)


class _SelectiveScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, delta, A, B, C, D, z, h0, block_l):
        ctx.save_for_backward(x, delta, A, B, C, D, z, h0)
        return _forward(x, delta, A, B, C, D, z, h0, block_l)

    @staticmethod
    def backward(ctx, grad_y, grad_h):
        inputs = [t.detach().requires_grad_(need) if t is not None else None
                  for t, need in zip(ctx.saved_tensors, ctx.needs_input_grad)]
        with torch.enable_grad():
            y, h = selective_scan_parallel(*inputs[:7], h0=inputs[7])
            wrt = [(i, t) for i, t in enumerate(inputs) if t is not None and t.requires_grad]
            grads = torch.autograd.grad((y, h), [t for _, t in wrt], (grad_y, grad_h), allow_unused=True)
        out = [None] * 9
        for (i, _), g in zip(wrt, grads):
            out[i] = g
        return tuple(out)


def selective_scan_triton(x, delta, A, B, C, D=None, z=None, *, h0=None, block_l: int = 64):
    """The selective scan by the Triton kernel: (y (B, L, D), h_L (B, D, N)); layout as lectlib.ssm.

    block_l tokens are scanned in parallel per step of the program's loop (a power of 2).
    """
    check_scan_inputs(x, delta, A, B, C, D, z, h0)
    if block_l < 1 or block_l & (block_l - 1):
        raise ValueError(f"block_l must be a power of 2, got {block_l}")
    if x.device.type == "cpu":
        problem = runtime.triton_interpreter_problem() if INTERPRET else "CPU tensors need TRITON_INTERPRET=1"
        if problem:
            raise RuntimeError(f"selective_scan_triton: {problem}")
    return _SelectiveScan.apply(x, delta, A, B, C, D, z, h0, block_l)
