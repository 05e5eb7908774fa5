"""LongLoRA (Chen et al. 2024): shifted sparse attention (S²-Attn) plus LoRA with trainable embeddings and norms.

S²-Attn (section 3.2). The N tokens are cut into groups of G and every head attends only
inside its group, costing N·G instead of N². With fixed groups no information crosses a group
border, so half of the heads work on the sequence rolled by G/2 tokens: their groups straddle
the borders of the others. In code (the paper's Algorithm 1):

    shift the second half of the heads by -G/2 along the sequence,
    reshape (B, H, N, D) -> (B·N/G, H, G, D) and attend inside each group,
    roll the second half of the heads back by +G/2.

Caveat, shown in the chapter and the tests: the roll wraps around. The last group of the
shifted heads holds the last G/2 tokens followed by the first G/2, so under a causal mask the
first G/2 tokens attend to the LAST G/2 tokens of the sequence: a peek at the future. LongLoRA
uses S²-Attn only to fine-tune; at inference the model runs full attention.

LoRA (Hu et al. 2021): a frozen weight W gets a trainable low-rank update,
    y = W x + (α / r)·B A x,   A (r, d_in) random, B (d_out, r) zero,
so training starts from the pretrained model. LongLoRA's "+" also trains the embeddings and
the norms, which the paper finds necessary for long context (Table 2).
"""

import math
import time

import torch
from torch import nn

from .attention import causal_mask, check_qkv, repeat_kv, sdpa_attention
from .train import train


def s2_shift(x: torch.Tensor, group_size: int, *, back: bool = False) -> torch.Tensor:
    """Roll heads H//2 .. H-1 of x (B, H, N, D) by -G/2 along the sequence (by +G/2 with back=True).

    After the roll, token t of a shifted head sits at index (t - G/2) mod N.
    """
    if x.dim() != 4:
        raise ValueError(f"x must be (B, H, N, D), got shape {tuple(x.shape)}")
    h, shift = x.shape[1] // 2, group_size // 2 if back else -(group_size // 2)
    return torch.cat([x[:, :h], x[:, h:].roll(shift, dims=2)], dim=1)


def s2_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, group_size: int,
                 causal: bool = True, scale: float | None = None) -> torch.Tensor:
    """Shifted sparse attention on (B, H, N, D) q and (B, H_kv, N, D) k, v: (B, H, N, D).

    Heads 0 .. H//2 - 1 attend within groups [jG, (j+1)G); heads H//2 .. H - 1 within the groups
    shifted by G/2 (with the wrap-around of the module docstring). A query shorter than the keys
    (decoding with a cache) gets full attention, as LongLoRA does at inference.
    """
    check_qkv(q, k, v)
    n = q.shape[2]
    if q.shape[2] != k.shape[2]:
        return sdpa_attention(q, k, v, causal=causal, scale=scale)
    if group_size <= 0 or group_size % 2 or n % group_size:
        raise ValueError(f"group_size must be even and divide the sequence length {n}, got {group_size}")
    b, h, _, d = q.shape
    n_rep = h // k.shape[1]
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)

    def to_groups(x):  # (B, H, N, D) -> (B·N/G, H, G, D)
        x = s2_shift(x, group_size)
        return x.view(b, h, n // group_size, group_size, d).transpose(1, 2).reshape(-1, h, group_size, d)

    o = sdpa_attention(to_groups(q), to_groups(k), to_groups(v), causal=causal, scale=scale)
    o = o.view(b, n // group_size, h, group_size, d).transpose(1, 2).reshape(b, h, n, d)
    return s2_shift(o, group_size, back=True)


def s2_attn(group_size: int):
    """An `attn_fn(q, k, v, *, causal, scale)` for `Llama.set_attention` running S²-Attn with groups of `group_size`."""
    if group_size <= 0 or group_size % 2:
        raise ValueError(f"group_size must be a positive even number, got {group_size}")

    def attn_fn(q, k, v, *, causal=True, scale=None):
        return s2_attention(q, k, v, group_size=group_size, causal=causal, scale=scale)

    attn_fn.group_size = group_size
    return attn_fn


def s2_attention_mask(n: int, group_size: int, n_heads: int, *, causal: bool = True) -> torch.Tensor:
    """(H, N, N) bool: which key j query i sees in each head under S²-Attn, in the original token order.

    Shifted heads see token j from token i when both fall in the same group after the roll,
    i.e. (i - G/2) mod N and (j - G/2) mod N share a group, and (causal) j comes no later
    in the ROLLED order: that is where the wrap-around lets early tokens see the last ones.
    """
    if group_size <= 0 or group_size % 2 or n % group_size:
        raise ValueError(f"group_size must be even and divide n={n}, got {group_size}")
    idx = torch.arange(n)
    masks = []
    for rolled in (idx, (idx - group_size // 2) % n):
        same = (rolled[:, None] // group_size) == (rolled[None, :] // group_size)
        masks.append(same & (rolled[None, :] <= rolled[:, None]) if causal else same)
    return torch.stack([masks[0]] * (n_heads // 2) + [masks[1]] * (n_heads - n_heads // 2))


def future_peeks(mask: torch.Tensor) -> int:
    """How many (query, key) pairs of an (..., N, N) mask let a query see a later key."""
    return int((mask & ~causal_mask(mask.shape[-2], mask.shape[-1])).sum())


class LoRALinear(nn.Module):
    """y = W x + (α/r)·B A x with W frozen (Hu et al. 2021, eq. 3); B starts at zero, so y = W x at first."""

    def __init__(self, base: nn.Linear, r: int = 8, alpha: float = 16.0):
        super().__init__()
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}")
        self.base = base
        self.base.weight.requires_grad_(False)
        self.r, self.scaling = r, alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # the nn.Linear initialisation, as in LoRA's code

    @property
    def weight(self) -> torch.Tensor:
        """The merged weight W + (α/r)·B A (what the layer computes, as one matrix)."""
        return self.base.weight + self.scaling * self.lora_B @ self.lora_A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * (x @ self.lora_A.t()) @ self.lora_B.t()


def add_lora(model: nn.Module, *, r: int = 8, alpha: float = 16.0,
             targets=("q_proj", "k_proj", "v_proj", "o_proj"), train_embeddings: bool = True,
             train_norms: bool = True) -> list[nn.Parameter]:
    """Freeze `model`, wrap the `targets` linears of every attention in LoRA; returns the trainable parameters.

    train_embeddings / train_norms give LongLoRA's LoRA+ (embeddings and every RMSNorm weight train too).
    """
    for p in model.parameters():
        p.requires_grad_(False)
    for module in list(model.modules()):
        for name in targets:
            child = getattr(module, name, None)
            if isinstance(child, nn.Linear):
                setattr(module, name, LoRALinear(child, r, alpha))
    for name, p in model.named_parameters():
        is_norm = name.endswith("norm.weight")
        if "lora_" in name or (train_norms and is_norm) or (train_embeddings and "embed_tokens" in name):
            p.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; tied weights count once."""
    seen = {id(p): p for p in model.parameters()}.values()
    return sum(p.numel() for p in seen if p.requires_grad), sum(p.numel() for p in seen)


def lora_parameter_count(d_in: int, d_out: int, r: int) -> int:
    """Parameters of one LoRA adapter on a (d_out, d_in) weight: r·(d_in + d_out)."""
    return r * (d_in + d_out)


def longlora_finetune(model: nn.Module, next_batch, *, steps: int, group_size: int | None, r: int = 8,
                      alpha: float = 16.0, lr: float = 2e-3, seed: int = 0) -> dict:
    """LongLoRA's recipe on `model` in place: LoRA+ adapters, S²-Attn with `group_size` while training
    (None: full attention, the baseline), full attention restored afterwards for inference.

    Returns {"losses", "seconds" (training wall time), "trainable", "total"}.
    """
    params = add_lora(model, r=r, alpha=alpha)
    trainable, total = count_parameters(model)
    model.set_attention(sdpa_attention if group_size is None else s2_attn(group_size))
    what = "full attention" if group_size is None else f"S²-Attn, groups of {group_size}"
    start = time.perf_counter()
    losses = train(model, next_batch, steps=steps, lr=lr, params=params, seed=seed, warmup=min(10, steps),
                   desc=f"LoRA+ fine-tune, {what}")
    seconds = time.perf_counter() - start
    model.set_attention(sdpa_attention)
    return {"losses": losses, "seconds": seconds, "trainable": trainable, "total": total}
