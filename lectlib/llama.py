"""A Llama from scratch (Touvron et al. 2023): RMSNorm, RoPE, grouped-query attention, SwiGLU.

    h = x + Attention(RMSNorm(x))          per layer, with rotary positions and GQA
    x = h + W_down(SiLU(W_gate h) ⊙ W_up h)  (SwiGLU, Shazeer 2020)
    logits = RMSNorm(x) · Eᵀ               (tied embeddings)

Two things are pluggable because later chapters swap them:
- the attention function (`attn_fn(q, k, v, *, causal, scale)`, (B, H, N, D) like torch SDPA),
  per layer through `Attention.attn_fn` or for every layer with `Llama.set_attention`;
- the KV cache (`lectlib.kv.KVCache` and its policies), passed to `forward`.
Parameter names follow Hugging Face's LlamaForCausalLM, so its state dict loads as it is.
"""

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .attention import sdpa_attention
from .kv import KVCache
from .positions import apply_rope, rope_parameters


@dataclass
class LlamaConfig:
    """The shape of a Llama. Defaults are SmolLM2-135M's."""

    vocab_size: int = 49152
    dim: int = 576
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3
    head_dim: int = 64
    hidden_dim: int = 1536
    norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    max_positions: int = 8192
    tie_embeddings: bool = True
    rope_scaling: dict | None = field(default=None)

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "head_dim", "hidden_dim",
                     "max_positions"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")

    @classmethod
    def from_hf(cls, hf) -> "LlamaConfig":
        """From a transformers LlamaConfig (rope settings from `rope_parameters` or the older fields)."""
        rope = dict(getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {})
        theta = rope.pop("rope_theta", getattr(hf, "rope_theta", 10000.0))
        scaling = rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None
        if scaling is not None:  # transformers takes the trained length from the config when the dict omits it
            scaling.setdefault("original_max_position_embeddings", hf.max_position_embeddings)
        return cls(vocab_size=hf.vocab_size, dim=hf.hidden_size, n_layers=hf.num_hidden_layers,
                   n_heads=hf.num_attention_heads, n_kv_heads=hf.num_key_value_heads,
                   head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
                   hidden_dim=hf.intermediate_size, norm_eps=hf.rms_norm_eps, rope_theta=theta,
                   max_positions=hf.max_position_embeddings, tie_embeddings=hf.tie_word_embeddings,
                   rope_scaling=scaling)


def check_token_ids(input_ids, vocab_size: int) -> None:
    """ValueError unless input_ids is a (batch, seq) integer tensor of at least one token, each in
    [0, vocab_size): the input check of every language model here (Llama, Mamba, Jamba)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a (batch, seq) tensor of token ids, got {shape}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must hold integer token ids (int64), got dtype {input_ids.dtype}")
    if input_ids.numel() == 0:
        raise ValueError(f"input_ids must hold at least one token, got shape {tuple(input_ids.shape)}")
    if input_ids.min() < 0 or input_ids.max() >= vocab_size:
        raise ValueError(f"input_ids must lie in [0, {vocab_size}), "
                         f"got values in [{input_ids.min().item()}, {input_ids.max().item()}]")


class RMSNorm(nn.Module):
    """x / sqrt(mean(x²) + eps) · w (Zhang & Sennrich 2019), computed in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention with rotary positions; keys and values go through the cache."""

    def __init__(self, config: LlamaConfig, layer: int):
        super().__init__()
        self.layer, self.config = layer, config
        d, hd = config.dim, config.head_dim
        self.q_proj = nn.Linear(d, config.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, config.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, config.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(config.n_heads * hd, d, bias=False)
        self.attn_fn = sdpa_attention

    def forward(self, x, positions, rope, cache: KVCache | None):
        """(B, N, dim) -> (B, N, dim): project, rotate q and k by their positions, attend through the cache.

        Shown in chapter 0."""
        B, N, _ = x.shape
        hd = self.config.head_dim
        q = self.q_proj(x).view(B, N, -1, hd).transpose(1, 2)  # (B, H, N, hd)
        k = self.k_proj(x).view(B, N, -1, hd).transpose(1, 2)  # (B, H_kv, N, hd)
        v = self.v_proj(x).view(B, N, -1, hd).transpose(1, 2)  # (B, H_kv, N, hd)
        if cache is None:
            key_pos = query_pos = positions
        else:  # the cache stores un-rotated keys and says which positions to rotate by
            k, v, key_pos, query_pos = cache.update(self.layer, k, v, positions)
        inv_freq, factor = rope
        q = apply_rope(q, query_pos, inv_freq, factor)
        k = apply_rope(k, key_pos, inv_freq, factor)
        o = self.attn_fn(q, k, v, causal=True, scale=1.0 / math.sqrt(hd))  # (B, H, N, hd)
        return self.o_proj(o.transpose(1, 2).reshape(B, N, -1))


class MLP(nn.Module):
    """SwiGLU feed-forward: W_down(SiLU(W_gate x) ⊙ W_up x)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.up_proj = nn.Linear(config.dim, config.hidden_dim, bias=False)
        self.down_proj = nn.Linear(config.hidden_dim, config.dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: LlamaConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, positions, rope, cache):
        x = x + self.self_attn(self.input_layernorm(x), positions, rope, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    """A decoder-only Llama; `forward(input_ids)` returns next-token logits (B, N, vocab)."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def set_attention(self, attn_fn, layers=None) -> None:
        """Use `attn_fn` in the given layers (all by default)."""
        for i in range(self.config.n_layers) if layers is None else layers:
            self.layers[i].self_attn.attn_fn = attn_fn

    def _check_input(self, input_ids: torch.Tensor, positions) -> None:
        check_token_ids(input_ids, self.config.vocab_size)
        if positions is not None and (positions.dim() != 1 or positions.shape[0] != input_ids.shape[1]):
            raise ValueError(f"positions must be ({input_ids.shape[1]},), one per token, got {tuple(positions.shape)}")

    def hidden_states(self, input_ids, *, cache: KVCache | None = None, positions=None) -> torch.Tensor:
        """(B, N, dim) final hidden states, after the last RMSNorm."""
        self._check_input(input_ids, positions)
        n = input_ids.shape[1]
        if positions is None:
            start = 0 if cache is None else cache.seen
            positions = torch.arange(start, start + n, device=input_ids.device)
        positions = positions.to(input_ids.device)
        c = self.config
        longest = int(positions.max()) + 1
        rope = rope_parameters(c.head_dim, c.rope_theta, c.rope_scaling, longest)
        rope = (rope[0].to(input_ids.device), rope[1])
        x = self.embed_tokens(input_ids)
        for block in self.layers:
            x = block(x, positions, rope, cache)
        return self.norm(x)

    def forward(self, input_ids, *, cache: KVCache | None = None, positions=None) -> torch.Tensor:
        """(B, N, vocab) logits. `positions` (N,) overrides the default 0..N-1 (after the cache)."""
        return self.lm_head(self.hidden_states(input_ids, cache=cache, positions=positions))

    def generate(self, input_ids, max_new_tokens: int, *, cache: KVCache | None = None,
                 eos_token_id: int | None = None) -> torch.Tensor:
        """Greedy decoding with a KV cache: (B, N) prompt -> (B, max_new_tokens) new tokens."""
        cache = KVCache() if cache is None else cache
        return greedy_decode(lambda ids: self(ids, cache=cache), input_ids, max_new_tokens, eos_token_id=eos_token_id)


@torch.no_grad()
def greedy_decode(step, input_ids: torch.Tensor, max_new_tokens: int, *, eos_token_id: int | None = None) -> torch.Tensor:
    """Greedy decoding through `step`, which maps new tokens (B, n) to logits (B, n, vocab) and keeps
    its own state (a KV cache, SSM states): (B, N) prompt -> (B, <= max_new_tokens) new tokens.
    max_new_tokens=0 gives (B, 0) without running the model."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be a non-negative int, got {max_new_tokens!r}")
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a (batch, seq) tensor of token ids, got {shape}")
    if max_new_tokens == 0:
        return input_ids.new_empty((input_ids.shape[0], 0))
    logits = step(input_ids)[:, -1]
    new = []
    for _ in range(max_new_tokens):
        token = logits.argmax(-1, keepdim=True)  # (B, 1)
        new.append(token)
        if eos_token_id is not None and bool((token == eos_token_id).all()):
            break
        logits = step(token)[:, -1]
    return torch.cat(new, dim=1)
