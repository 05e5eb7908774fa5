"""A Jamba-style hybrid (Lieber et al. 2024): attention and Mamba layers interleaved, with MoE.

Each layer is pre-norm residual, a mixer then a feed-forward:

    h = x + Mixer(RMSNorm(x))      Mixer = attention (one layer in `attn_period`) or Mamba (the rest)
    x = h + FFN(RMSNorm(h))        FFN   = top-k mixture of experts (one layer in `moe_period`) or MLP

Jamba v0.1 uses 32 layers, one attention layer in eight (1:7), MoE every other layer with 16
experts of which 2 are active per token, and no positional encoding (the Mamba layers carry the
order). While generating, only the attention layers keep a KV cache; Mamba layers keep their
constant-size state. At 256K tokens in 16 bits that is 4 GiB where Llama-2-7B needs 128 GiB
(Jamba, Table 1); `JambaConfig.shape` hands the numbers to `lectlib.memory`.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import memory
from .attention import sdpa_attention
from .kv import KVCache
from .llama import MLP, LlamaConfig, RMSNorm, check_token_ids, greedy_decode
from .ssm import MambaConfig, MambaMixer, MambaState


@dataclass
class JambaConfig:
    """The shape of a hybrid. Layer i is attention when i % attn_period == attn_offset, MoE when
    i % moe_period == moe_offset (Jamba's attn_layer_period/offset, expert_layer_period/offset)."""

    vocab_size: int = 16
    d_model: int = 64
    n_layers: int = 4
    attn_period: int = 4
    attn_offset: int = 2
    moe_period: int = 2
    moe_offset: int = 1
    n_experts: int = 4
    top_k: int = 2
    n_heads: int = 4
    n_kv_heads: int = 2
    hidden_dim: int = 128
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    norm_eps: float = 1e-6
    tie_embeddings: bool = True

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_experts", "n_heads", "n_kv_heads", "hidden_dim", "d_state",
                     "d_conv", "expand"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_heads or self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} must divide d_model={self.d_model} and be a multiple of "
                             f"n_kv_heads={self.n_kv_heads}")
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k must be in [1, n_experts={self.n_experts}], got {self.top_k}")
        for name in ("attn", "moe"):
            period, offset = getattr(self, f"{name}_period"), getattr(self, f"{name}_offset")
            if period < 1 or not 0 <= offset < period:
                raise ValueError(f"{name}_period={period} must be >= 1 and {name}_offset={offset} in [0, period)")

    @classmethod
    def jamba_v0_1(cls) -> "JambaConfig":
        """The released Jamba (52B total, 12B active parameters; Lieber et al. 2024, Sec. 3)."""
        return cls(vocab_size=65536, d_model=4096, n_layers=32, attn_period=8, attn_offset=4, moe_period=2,
                   moe_offset=1, n_experts=16, top_k=2, n_heads=32, n_kv_heads=8, hidden_dim=14336,
                   d_state=16, d_conv=4, expand=2, tie_embeddings=False)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def is_attention(self, layer: int) -> bool:
        return layer % self.attn_period == self.attn_offset

    def is_moe(self, layer: int) -> bool:
        return layer % self.moe_period == self.moe_offset

    def layout(self) -> str:
        """One letter per layer: A attention / M Mamba, upper case with MoE: e.g. 'mMmMaMmM'."""
        return "".join(("a" if self.is_attention(i) else "m").upper() if self.is_moe(i) else
                       ("a" if self.is_attention(i) else "m") for i in range(self.n_layers))

    def mamba_config(self) -> MambaConfig:
        return MambaConfig(vocab_size=self.vocab_size, d_model=self.d_model, d_state=self.d_state,
                           d_conv=self.d_conv, expand=self.expand, norm_eps=self.norm_eps)

    def mlp_config(self) -> LlamaConfig:
        return LlamaConfig(vocab_size=self.vocab_size, dim=self.d_model, hidden_dim=self.hidden_dim,
                           n_heads=self.n_heads, n_kv_heads=self.n_kv_heads, head_dim=self.head_dim)

    def shape(self, name: str = "hybrid") -> memory.ModelShape:
        """The numbers `lectlib.memory` needs (cache_bytes, ssm_state_bytes, ...)."""
        n_attention = sum(map(self.is_attention, range(self.n_layers)))
        total, _ = parameter_counts(self)
        return memory.ModelShape(name, self.n_layers, self.n_heads, self.n_kv_heads, self.head_dim, total / 1e9,
                                 attention_layers=n_attention, ssm_layers=self.n_layers - n_attention,
                                 d_inner=self.expand * self.d_model, d_state=self.d_state, d_conv=self.d_conv)


class MoE(nn.Module):
    """Top-k mixture of SwiGLU experts (Shazeer et al. 2017; Mixtral's routing, as in Jamba).

    The router scores the experts of each token, keeps the top_k and weights their outputs by
    the softmax of those k scores: y = Σ_{e ∈ topk} softmax(r)_e · Expert_e(x). Each expert runs
    only on the tokens routed to it. Input and output (B, L, d_model).
    """

    def __init__(self, config: JambaConfig):
        super().__init__()
        self.top_k = config.top_k
        self.router = nn.Linear(config.d_model, config.n_experts, bias=False)
        self.experts = nn.ModuleList(MLP(config.mlp_config()) for _ in range(config.n_experts))

    def route(self, x: torch.Tensor):
        """(weights, experts), both (tokens, top_k), for x (tokens, d_model)."""
        scores, chosen = self.router(x).topk(self.top_k, dim=-1)
        return torch.softmax(scores, dim=-1), chosen

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = self.route(flat)
        out = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = (chosen == e).nonzero(as_tuple=True)
            if token.numel():
                out = out.index_add(0, token, weights[token, slot, None] * expert(flat[token]))
        return out.view_as(x)


class HybridAttention(nn.Module):
    """Grouped-query causal self-attention without positional encoding (Jamba's attention layers)."""

    def __init__(self, config: JambaConfig, index: int):
        super().__init__()
        self.config, self.index = config, index  # index: among the attention layers, for the KV cache
        d, hd = config.d_model, config.head_dim
        self.q_proj = nn.Linear(d, config.n_heads * hd, bias=False)
        self.k_proj = nn.Linear(d, config.n_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(d, config.n_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(config.n_heads * hd, d, bias=False)

    def forward(self, x: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        b, n, _ = x.shape
        hd = self.config.head_dim
        q, k, v = (proj(x).view(b, n, -1, hd).transpose(1, 2) for proj in (self.q_proj, self.k_proj, self.v_proj))
        if cache is not None:  # positions are only stored: this attention has no positional encoding
            start = cache.keys[self.index].shape[2] if self.index in cache.keys else 0
            k, v, _, _ = cache.update(self.index, k, v, torch.arange(start, start + n, device=x.device))
        o = sdpa_attention(q, k, v, causal=True, scale=1.0 / math.sqrt(hd))
        return self.o_proj(o.transpose(1, 2).reshape(b, n, -1))


class HybridState:
    """What the hybrid keeps while generating: a KV cache for attention layers, SSM states for Mamba."""

    def __init__(self):
        self.kv = KVCache(positions="cache")
        self.ssm = MambaState()

    def nbytes(self) -> int:
        return self.kv.nbytes() + self.ssm.nbytes()


class HybridLayer(nn.Module):
    def __init__(self, config: JambaConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.attention = config.is_attention(layer)
        self.input_norm = RMSNorm(config.d_model, config.norm_eps)
        if self.attention:
            self.mixer = HybridAttention(config, sum(map(config.is_attention, range(layer))))
        else:
            self.mixer = MambaMixer(config.mamba_config(), layer)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.ffn = MoE(config) if config.is_moe(layer) else MLP(config.mlp_config())

    def forward(self, x: torch.Tensor, state: HybridState | None) -> torch.Tensor:
        h = self.input_norm(x)
        if self.attention:
            h = self.mixer(h, None if state is None else state.kv)
        else:
            layer_state = None
            if state is not None:
                if self.layer not in state.ssm.layers:
                    state.ssm.layers[self.layer] = self.mixer.new_state(x.shape[0], x.device, x.dtype)
                layer_state = state.ssm.layers[self.layer]
            h = self.mixer(h, layer_state)
        x = x + h
        return x + self.ffn(self.ffn_norm(x))


class Jamba(nn.Module):
    """The hybrid LM: `forward(input_ids (B, L), state=None) -> logits (B, L, vocab)`.

    With a `HybridState` it continues from it (prefill, then one token at a time).
    """

    def __init__(self, config: JambaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        nn.init.normal_(self.embed_tokens.weight, std=0.1)
        self.layers = nn.ModuleList(HybridLayer(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, state: HybridState | None = None) -> torch.Tensor:
        check_token_ids(input_ids, self.config.vocab_size)
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, state)
        if state is not None:
            state.ssm.seen += input_ids.shape[1]
        return self.lm_head(self.norm(x))

    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, *, state: HybridState | None = None):
        """Greedy decoding: (B, L) prompt -> (B, max_new_tokens) new tokens."""
        state = HybridState() if state is None else state
        return greedy_decode(lambda ids: self(ids, state), input_ids, max_new_tokens)


def parameter_counts(config: JambaConfig) -> tuple[int, int]:
    """(total, active per token) parameters, counted on a model built without memory (meta device).

    Active excludes the experts a token does not use: (n_experts - top_k) experts per MoE layer.
    """
    with torch.device("meta"):
        model = Jamba(config)
    total = sum(p.numel() for p in model.parameters())
    moe_layers = [layer.ffn for layer in model.layers if isinstance(layer.ffn, MoE)]
    per_expert = sum(p.numel() for p in moe_layers[0].experts[0].parameters()) if moe_layers else 0
    return total, total - len(moe_layers) * (config.n_experts - config.top_k) * per_expert
