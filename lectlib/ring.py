"""Ring attention (Liu et al. 2023, "Ring Attention with Blockwise Transformers for Near-Infinite Context").

P processes each hold one block of the sequence's queries, keys and values. In P steps every
process attends its queries to the K/V block it holds, merges the result into its running output
with the online-softmax merge (`lectlib.attention.merge_attention_blocks`), and passes that K/V
block to the next process on the ring while receiving the previous one's; the send is started
before the block's computation, so communication overlaps it. No process ever holds more than two
K/V blocks, so the longest context grows with P.

- `ring_attention(q, k, v, *, causal, scale, group, layout)`: forward and backward (a custom
  autograd.Function whose backward runs the ring again, passing dK and dV along with K and V);
  call it inside an initialised process group (gloo on CPU, NCCL on GPUs).
- layouts: "contiguous" (rank r holds tokens r·N/P .. (r+1)·N/P - 1) or, for causal attention,
  "zigzag" (the sequence cut into 2P chunks, rank r holds chunks r and 2P-1-r, so every rank has
  the same amount of unmasked work at every step); `shard`/`unshard` cut and rejoin sequences.
- `spawn(fn, world_size)` runs fn(rank, world_size, *args) in P local processes with a process
  group on a free localhost port (what a notebook calls); `python -m lectlib.ring` under
  `torchrun --nproc-per-node P` checks the ring against single-process attention.
- the calculator: bytes each device sends per step and per call, the smallest block that hides
  communication behind computation, and the longest context per device count.

PyTorch's own context parallelism (`torch.distributed.tensor.experimental.context_parallel`)
shards SDPA the same way but runs only with the CUDA flash/efficient SDPA kernels; on a machine
with several GPUs it is the oracle to compare this ring with.
"""

import io
import math
import os
import socket
import time
import traceback
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from .attention import merge_attention_blocks, repeat_kv
from .memory import kv_cache_bytes, preset, weight_bytes

LAYOUTS = ("contiguous", "zigzag")


# ---------------------------------------------------------------------------------------------
# Layouts: which tokens each rank holds.

def _check_layout(layout, world_size, n):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    parts = world_size * (2 if layout == "zigzag" else 1)
    if n % parts:
        raise ValueError(f"world_size={world_size} with layout={layout!r} cuts the sequence into {parts} equal parts, "
                         f"which {n} tokens do not allow")


def layout_positions(n: int, rank: int, world_size: int, layout: str = "contiguous") -> torch.Tensor:
    """(n // world_size,) the sequence positions rank `rank` holds of a sequence of n tokens."""
    _check_layout(layout, world_size, n)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must lie in [0, {world_size}), got {rank}")
    if layout == "contiguous":
        block = n // world_size
        return torch.arange(rank * block, (rank + 1) * block)
    chunk = n // (2 * world_size)
    return torch.cat([torch.arange(rank * chunk, (rank + 1) * chunk),
                      torch.arange((2 * world_size - 1 - rank) * chunk, (2 * world_size - rank) * chunk)])


def shard(x: torch.Tensor, world_size: int, layout: str = "contiguous", dim: int = 2) -> list[torch.Tensor]:
    """Cut x along `dim` (the sequence; 2 for (B, H, N, D)) into the blocks ranks 0..P-1 hold."""
    n = x.shape[dim]
    return [x.index_select(dim, layout_positions(n, r, world_size, layout).to(x.device)) for r in range(world_size)]


def unshard(blocks: list[torch.Tensor], layout: str = "contiguous", dim: int = 2) -> torch.Tensor:
    """Rejoin the blocks of ranks 0..P-1 into the sequence (the inverse of `shard`)."""
    world_size = len(blocks)
    n = sum(b.shape[dim] for b in blocks)
    order = torch.cat([layout_positions(n, r, world_size, layout) for r in range(world_size)])
    return torch.cat(blocks, dim).index_select(dim, torch.argsort(order).to(blocks[0].device))


# ---------------------------------------------------------------------------------------------
# One block of the ring: queries against the K/V block held at this step.

def _visible(pos_q, pos_k, causal):
    """The query rows and key columns with any visible pair, and their mask; None when nothing is visible.

    Rows and columns are None for "all": the full block. Computing only this sub-block is what
    makes the zig-zag layout balanced: there each off-diagonal block is half-masked in one piece.
    """
    if not causal:
        return None, None, None
    vis = pos_q[:, None] >= pos_k[None, :]
    rows, cols = vis.any(1), vis.any(0)
    if not rows.any():
        return False
    if rows.all() and cols.all():
        return None, None, (None if vis.all() else vis)
    rows, cols = rows.nonzero()[:, 0], cols.nonzero()[:, 0]
    sub = vis[rows][:, cols]
    return rows, cols, (None if sub.all() else sub)


def _take(x, index):
    return x if index is None else x.index_select(2, index)


def _block_forward(q, k, v, visible, scale):
    """The state m, l (B, H, n_q) and o (B, H, n_q, D) of q against one K/V block (rows it does not see: -inf, 0, 0)."""
    rows, cols, mask = visible
    n_rep = q.shape[1] // k.shape[1]
    qs, ks, vs = _take(q, rows), repeat_kv(_take(k, cols), n_rep), repeat_kv(_take(v, cols), n_rep)
    s = (qs @ ks.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    m = s.amax(-1)
    p = torch.exp(s - m.masked_fill(m == float("-inf"), 0.0)[..., None])
    l = p.sum(-1)
    o = (p @ vs) / l.clamp_min(torch.finfo(l.dtype).tiny)[..., None]
    if rows is None:
        return m, l, o
    o_all = q.new_zeros(q.shape).index_copy(2, rows, o)
    m_all = q.new_full(q.shape[:-1], float("-inf")).index_copy(2, rows, m)
    return m_all, q.new_zeros(q.shape[:-1]).index_copy(2, rows, l), o_all


def fold_block(m, l, o, q, k, v, *, scale: float, visible=(None, None, None)):
    """One ring step: attend q (B, H, n, D) to one K/V block (B, H_kv, n_k, D) and merge the result into the
    running state m, l (B, H, n) and o (B, H, n, D) (`merge_attention_blocks`). Returns the new (m, l, o).

    `visible` (rows, cols, mask) restricts the block for causal attention (see `_visible`).
    """
    return merge_attention_blocks(m, l, o, *_block_forward(q, k, v, visible, scale))


def _block_backward(q, k, v, do, lse, delta, visible, scale):
    """(dq, dk, dv) contributions of one K/V block (FlashAttention-2's backward, Dao 2023, Algorithm 2)."""
    rows, cols, mask = visible
    h_kv, n_rep = k.shape[1], q.shape[1] // k.shape[1]
    qs, dos, lses, deltas = _take(q, rows), _take(do, rows), _take(lse, rows), _take(delta, rows)
    ks, vs = repeat_kv(_take(k, cols), n_rep), repeat_kv(_take(v, cols), n_rep)
    s = (qs @ ks.transpose(-1, -2)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    p = torch.exp(s - lses[..., None])  # the softmax over ALL keys (lse is the full row's), restricted to this block
    dv = p.transpose(-1, -2) @ dos
    ds = p * (dos @ vs.transpose(-1, -2) - deltas[..., None])
    dq, dk = (ds @ ks) * scale, (ds.transpose(-1, -2) @ qs) * scale
    # A KV head's gradient sums over the query heads that share it (GQA).
    dk, dv = (g.unflatten(1, (h_kv, n_rep)).sum(2) for g in (dk, dv))
    if rows is not None:
        dq = q.new_zeros(q.shape).index_copy(2, rows, dq)
        dk = k.new_zeros(k.shape).index_copy(2, cols, dk)
        dv = v.new_zeros(v.shape).index_copy(2, cols, dv)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------
# The ring.

@dataclass
class RingStats:
    """What one process did in ring_attention calls: bytes it sent, and seconds computing and waiting per step."""

    bytes_sent: int = 0
    compute_seconds: list[float] = field(default_factory=list)
    wait_seconds: list[float] = field(default_factory=list)


def _neighbours(group):
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    group = group or dist.group.WORLD
    return dist.get_global_rank(group, (rank + 1) % world), dist.get_global_rank(group, (rank - 1) % world)


def _pass_on(buffer: torch.Tensor, group, stats):
    """Start sending `buffer` to the next rank and receiving the previous rank's: (requests, the incoming buffer)."""
    nxt, prv = _neighbours(group)
    incoming = torch.empty_like(buffer)
    ops = [dist.P2POp(dist.isend, buffer, nxt, group), dist.P2POp(dist.irecv, incoming, prv, group)]
    if stats is not None:
        stats.bytes_sent += buffer.numel() * buffer.element_size()
    return dist.batch_isend_irecv(ops), incoming


def _wait(requests, stats):
    start = time.perf_counter()
    for r in requests:
        r.wait()
    if stats is not None:
        stats.wait_seconds.append(time.perf_counter() - start)


def _timed(stats, fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    if stats is not None:
        stats.compute_seconds.append(time.perf_counter() - start)
    return out


def _ring_forward(q, k, v, causal, scale, group, layout, stats):
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    n = q.shape[2]
    pos_q = layout_positions(n * world, rank, world, layout).to(q.device)
    o, l = torch.zeros_like(q), q.new_zeros(q.shape[:-1])
    m = torch.full_like(l, float("-inf"))
    kv = torch.stack([k, v])  # one message per step
    for step in range(world):
        if step < world - 1:
            requests, incoming = _pass_on(kv, group, stats)  # overlaps the computation below
        source = (rank - step) % world  # whose K/V block this rank holds at this step
        visible = _visible(pos_q, layout_positions(n * world, source, world, layout).to(q.device), causal)
        if visible is not False:
            m, l, o = _timed(stats, fold_block, m, l, o, q, kv[0], kv[1], scale=scale, visible=visible)
        elif stats is not None:
            stats.compute_seconds.append(0.0)
        if step < world - 1:
            _wait(requests, stats)
            kv = incoming
    return o, m + torch.log(l)


def _ring_backward(do, q, k, v, o, lse, causal, scale, group, layout, stats):
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    n = q.shape[2]
    pos_q = layout_positions(n * world, rank, world, layout).to(q.device)
    delta = (do * o).sum(-1)  # D_i = do_i · o_i (FlashAttention-2)
    dq = torch.zeros_like(q)
    # K, V and the gradients gathered so far for them travel together; after P passes each
    # rank holds its own block again, with every rank's contribution to its dK and dV.
    buffer = torch.stack([k, v, torch.zeros_like(k), torch.zeros_like(v)])
    for step in range(world):
        source = (rank - step) % world
        visible = _visible(pos_q, layout_positions(n * world, source, world, layout).to(q.device), causal)
        if visible is not False:
            dq_b, dk_b, dv_b = _timed(stats, _block_backward, q, buffer[0], buffer[1], do, lse, delta, visible, scale)
            dq += dq_b
            buffer = torch.stack([buffer[0], buffer[1], buffer[2] + dk_b, buffer[3] + dv_b])
        if step < world - 1:
            requests, buffer = _pass_on(buffer, group, stats)
        elif world > 1:  # the last pass carries only the gradients home
            requests, buffer = _pass_on(buffer[2:].contiguous(), group, stats)
        if world > 1:
            _wait(requests, stats)
    return dq, buffer[-2], buffer[-1]


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, scale, group, layout, stats):
        o, lse = _ring_forward(q, k, v, causal, scale, group, layout, stats)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.settings = (causal, scale, group, layout, stats)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(do.contiguous(), q, k, v, o, lse, *ctx.settings)
        return dq, dk, dv, None, None, None, None, None


def ring_attention(q, k, v, *, causal: bool = False, scale: float | None = None, group=None,
                   layout: str = "contiguous", stats: RingStats | None = None) -> torch.Tensor:
    """This rank's block of attention over the whole sequence, held in blocks by the ranks of `group`: (B, H, n, D).

    q (B, H, n, D) and k, v (B, H_kv, n, D) are this rank's blocks (n = N/P tokens, placed by
    `layout`: see `shard`). Equals the rank's rows of single-process attention over the N tokens;
    differentiable (the backward runs the ring again). `stats` collects bytes sent and seconds.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group: ring_attention needs an initialised torch.distributed process group "
                         "(torchrun, or lectlib.ring.spawn)")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4 or not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point (B, H, n, D) tensor, got {getattr(t, 'shape', t)!r}")
    if k.shape != v.shape or q.shape[0] != k.shape[0] or q.shape[2:] != k.shape[2:] or q.shape[1] % k.shape[1]:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}: each rank holds the same n "
                         "positions of q, k and v, and k's heads divide q's (GQA)")
    _check_layout(layout, dist.get_world_size(group), q.shape[2] * dist.get_world_size(group))
    if layout == "zigzag" and not causal:
        raise ValueError("layout='zigzag' balances causal attention; use layout='contiguous' with causal=False")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _RingAttention.apply(q.contiguous(), k.contiguous(), v.contiguous(), causal, scale, group, layout, stats)


# ---------------------------------------------------------------------------------------------
# Processes: a spawn helper for notebooks and tests, and a torchrun entry point.

def free_port() -> int:
    """A TCP port on localhost that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, backend, fn, args, results):
    torch.set_num_threads(1)  # P processes share the machine's cores
    try:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
        out = fn(rank, world_size, *args)
        buffer = io.BytesIO()
        torch.save(out, buffer)  # bytes, not shared-memory tensors: the worker exits before they are read
        results.put((rank, buffer.getvalue(), None))
    except Exception:  # noqa: BLE001 - the parent re-raises it with the rank
        results.put((rank, None, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def spawn(fn, world_size: int, *args, backend: str | None = None, timeout: float = 300.0) -> list:
    """Run fn(rank, world_size, *args) in `world_size` processes sharing a process group; their results by rank.

    The group uses a free localhost port, gloo (or NCCL when `backend="nccl"`); each process runs
    one CPU thread. Processes are forked where that is safe (Linux, CUDA not yet initialised), so
    fn may be defined in a notebook; otherwise they are spawned and fn must be importable.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    backend = backend or "gloo"
    fork = "fork" in mp.get_all_start_methods() and not torch.cuda.is_initialized()
    ctx = mp.get_context("fork" if fork else "spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, backend, fn, args, results), daemon=True)
             for r in range(world_size)]
    for p in procs:
        p.start()
    outs, errors = {}, []
    try:
        for _ in range(world_size):
            rank, payload, error = results.get(timeout=timeout)
            if error:
                errors.append(f"rank {rank}:\n{error}")
            else:
                outs[rank] = torch.load(io.BytesIO(payload), weights_only=False)
            if errors:
                break
    finally:
        for p in procs:
            p.join(timeout=5 if errors else timeout)
            if p.is_alive():
                p.kill()
    if errors:
        raise RuntimeError("a ring process failed:\n" + "\n".join(errors))
    return [outs[r] for r in range(world_size)]


def check_against_single(rank: int, world_size: int, *, n: int = 64, heads: int = 4, kv_heads: int = 2,
                         head_dim: int = 16, causal: bool = True, layout: str = "contiguous", seed: int = 0) -> dict:
    """Run on every rank: ring attention's output and gradients against single-process attention.

    Every rank draws the same full q, k, v, keeps its block, and compares its block of the
    output and gradients with those of `lectlib.attention.naive_attention` over the whole
    sequence (fp64). Returns the largest absolute differences and the bytes this rank sent.
    """
    from .attention import naive_attention

    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, n, head_dim, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, kv_heads, n, head_dim, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, kv_heads, n, head_dim, generator=g, dtype=torch.float64, requires_grad=True)
    grad = torch.randn(1, heads, n, head_dim, generator=g, dtype=torch.float64)
    want = naive_attention(q, k, v, causal=causal)
    want_grads = torch.autograd.grad(want, (q, k, v), grad)
    local = [shard(t.detach(), world_size, layout)[rank].requires_grad_() for t in (q, k, v)]
    stats = RingStats()
    out = ring_attention(*local, causal=causal, layout=layout, stats=stats)
    got_grads = torch.autograd.grad(out, local, shard(grad, world_size, layout)[rank])
    diff = {"out": (out - shard(want.detach(), world_size, layout)[rank]).abs().max().item()}
    for name, got, w in zip(("dq", "dk", "dv"), got_grads, want_grads):
        diff[name] = (got - shard(w, world_size, layout)[rank]).abs().max().item()
    return {**diff, "bytes_sent": stats.bytes_sent}


def main(argv: list[str] | None = None) -> None:
    """torchrun --nproc-per-node P -m lectlib.ring: check ring attention against single-process attention."""
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    for causal, layout in ((False, "contiguous"), (True, "contiguous"), (True, "zigzag")):
        diff = check_against_single(rank, world, n=16 * world, causal=causal, layout=layout)
        print(f"rank {rank}/{world}, causal={causal}, layout={layout}: max |ring - single| "
              + ", ".join(f"{k} {v:.1e}" for k, v in diff.items() if k != "bytes_sent"), flush=True)
    dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------
# The calculator.

def ring_bytes_per_step(*, block_tokens: int, n_kv_heads: int, head_dim: int, batch: int = 1,
                        bytes_per_element: int = 2, backward: bool = False) -> int:
    """Bytes one device sends at one step of one layer's ring: its K and V blocks, 2·B·H_kv·c·D·bytes
    (and in the backward dK and dV as well: twice that)."""
    for name, value in (("block_tokens", block_tokens), ("n_kv_heads", n_kv_heads), ("head_dim", head_dim),
                        ("batch", batch), ("bytes_per_element", bytes_per_element)):
        _positive(name, value)
    return (4 if backward else 2) * batch * n_kv_heads * block_tokens * head_dim * bytes_per_element


def ring_bytes_sent(*, seq_len: int, world_size: int, n_kv_heads: int, head_dim: int, batch: int = 1,
                    bytes_per_element: int = 2, backward: bool = False) -> int:
    """Bytes one device sends in one ring_attention call (one layer): P - 1 K/V passes forward; the
    backward passes K, V, dK, dV P - 1 times and dK, dV once more to bring them home."""
    _check_layout("contiguous", world_size, seq_len)
    step = dict(block_tokens=seq_len // world_size, n_kv_heads=n_kv_heads, head_dim=head_dim, batch=batch,
                bytes_per_element=bytes_per_element)
    if not backward:
        return (world_size - 1) * ring_bytes_per_step(**step)
    home = ring_bytes_per_step(**step) if world_size > 1 else 0
    return (world_size - 1) * ring_bytes_per_step(**step, backward=True) + home


def overlap_block_tokens(*, flops: float, bandwidth: float, n_heads: int = 1, n_kv_heads: int = 1,
                         bytes_per_element: int = 2) -> int:
    """Smallest block c (tokens) whose attention computation hides its K/V transfer (Liu et al. 2023, Table 1).

    A step computes 4·c²·D·H FLOPs (QKᵀ and PV) and sends 2·c·D·H_kv·bytes, so it is compute-bound
    when c ≥ bytes·H_kv·flops / (2·H·bandwidth); for MHA in 16-bit this is the paper's c ≥ F/B.
    """
    if flops <= 0 or bandwidth <= 0:
        raise ValueError(f"flops and bandwidth must be positive, got {flops} and {bandwidth}")
    return math.ceil(bytes_per_element * n_kv_heads * flops / (2 * n_heads * bandwidth))


def max_context(model, *, device_bytes: float, world_sizes=(1, 8, 32, 256), bytes_per_element: int = 2) -> list[dict]:
    """Longest context per device count for a preset of `lectlib.memory` (the shape of Liu et al. 2023, Table 3).

    Each device holds the weights and, for its c = N/P tokens, the KV cache of every layer plus the
    two K/V blocks of one layer in flight (sent and received); activations of one layer are per
    block and left out. So N = P · (device_bytes - weights) / (bytes per token).
    """
    shape = preset(model)
    per_token = (kv_cache_bytes(n_layers=shape.kv_layers, n_kv_heads=shape.n_kv_heads, head_dim=shape.head_dim,
                                seq_len=1, bytes_per_element=bytes_per_element)
                 + 2 * ring_bytes_per_step(block_tokens=1, n_kv_heads=shape.n_kv_heads, head_dim=shape.head_dim,
                                           bytes_per_element=bytes_per_element))
    free = device_bytes - weight_bytes(shape, bytes_per_element)
    if free <= 0:
        raise ValueError(f"device_bytes={device_bytes:.3g} do not even hold the weights of {shape.name}")
    for p in world_sizes:
        _positive("world_sizes", p)
    return [{"model": shape.name, "devices": p, "tokens per device": int(free // per_token),
             "context": p * int(free // per_token)} for p in world_sizes]


def _positive(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


if __name__ == "__main__":
    main()
