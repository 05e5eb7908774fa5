"""How much memory long context costs: KV-cache and state calculators with real model presets.

The KV cache holds one key and one value vector per token, per layer, per KV head:

    bytes = 2 · n_layers · n_kv_heads · head_dim · bytes_per_element · seq_len · batch_size

Multi-head attention has n_kv_heads = n_heads; grouped-query attention (GQA) shares each
KV head among n_heads / n_kv_heads query heads and shrinks the cache by that factor. State
space layers (Mamba) keep a state of constant size instead: d_inner · (d_state + d_conv - 1)
numbers per layer, whatever the context length. A hybrid (Jamba) pays the KV cache only on
its attention layers. Sizes are in bytes; `format_bytes` prints binary units (KiB, MiB, GiB),
the units in which the lecture's "2.5 MB per token" and the Jamba paper's "128 GB" are exact.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a model that decide its cache memory.

    attention_layers: layers with a KV cache (all of them in a Transformer).
    ssm_layers, d_inner, d_state, d_conv: Mamba layers and their state sizes (0 if none).
    params_billions: parameter count, for the memory of the weights.
    """

    name: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    params_billions: float
    attention_layers: int | None = None
    ssm_layers: int = 0
    d_inner: int = 0
    d_state: int = 0
    d_conv: int = 0
    context_length: int = 0

    @property
    def kv_layers(self) -> int:
        return self.n_layers if self.attention_layers is None else self.attention_layers


PRESETS: dict[str, ModelShape] = {
    m.name: m
    for m in [
        ModelShape("GPT-2 (124M)", 12, 12, 12, 64, 0.124, context_length=1024),
        ModelShape("SmolLM2-135M", 30, 9, 3, 64, 0.135, context_length=8192),
        ModelShape("Llama-2-7B", 32, 32, 32, 128, 6.7, context_length=4096),
        ModelShape("Llama-2-70B (MHA-equivalent)", 80, 64, 64, 128, 69.0, context_length=4096),
        ModelShape("Llama-2-70B", 80, 64, 8, 128, 69.0, context_length=4096),
        ModelShape("Mistral-7B", 32, 32, 8, 128, 7.2, context_length=32768),
        ModelShape("Mixtral-8x7B", 32, 32, 8, 128, 46.7, context_length=32768),
        ModelShape("Llama-3.1-8B", 32, 32, 8, 128, 8.0, context_length=131072),
        ModelShape("Llama-3.1-70B", 80, 64, 8, 128, 70.6, context_length=131072),
        ModelShape("Mamba-2.8B", 64, 0, 0, 0, 2.8, attention_layers=0, ssm_layers=64,
                   d_inner=5120, d_state=16, d_conv=4),
        # Jamba (Lieber et al. 2024): 32 layers, one attention layer in eight, the rest Mamba.
        ModelShape("Jamba (52B, 12B active)", 32, 32, 8, 128, 52.0, attention_layers=4, ssm_layers=28,
                   d_inner=8192, d_state=16, d_conv=4, context_length=262144),
    ]
}

# Context windows of well-known models when they were released (tokens), as the lectures list them.
CONTEXT_WINDOWS: list[tuple[str, int, int]] = [
    ("GPT-2", 2019, 1024),
    ("GPT-3", 2020, 2048),
    ("Llama-1", 2023, 2048),
    ("Llama-2", 2023, 4096),
    ("GPT-4 (8K)", 2023, 8192),  # at launch; a 32K variant (gpt-4-32k) was sold beside it
    ("Claude-2", 2023, 100_000),
    ("GPT-4 Turbo", 2023, 128_000),
    ("Llama-3", 2024, 8192),
    ("Llama-3.1", 2024, 131_072),
    ("Gemini-1.5 Pro", 2024, 1_000_000),
    ("Llama-4 Scout", 2025, 10_000_000),
]


def _check_positive(**values) -> None:
    """ValueError naming the first value that is not a non-negative int."""
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")


def kv_cache_bytes(*, n_layers: int, n_kv_heads: int, head_dim: int, seq_len: int,
                   batch_size: int = 1, bytes_per_element: int = 2) -> int:
    """Bytes of a KV cache: 2 (K and V) · layers · KV heads · head_dim · bytes · tokens · batch.

    Shown in chapter 0."""
    _check_positive(n_layers=n_layers, n_kv_heads=n_kv_heads, head_dim=head_dim, seq_len=seq_len,
                    batch_size=batch_size, bytes_per_element=bytes_per_element)
    return 2 * n_layers * n_kv_heads * head_dim * bytes_per_element * seq_len * batch_size


def attention_scores_bytes(*, seq_len: int, n_heads: int, batch_size: int = 1, bytes_per_element: int = 2) -> int:
    """Bytes of the score matrix S = QKᵀ that naive attention materializes: batch · heads · N² · bytes."""
    _check_positive(seq_len=seq_len, n_heads=n_heads, batch_size=batch_size, bytes_per_element=bytes_per_element)
    return batch_size * n_heads * seq_len * seq_len * bytes_per_element


def preset(model: "str | ModelShape") -> ModelShape:
    """A ModelShape from its preset name (or itself)."""
    if isinstance(model, ModelShape):
        return model
    if model not in PRESETS:
        raise ValueError(f"model {model!r} is not a preset; known: {sorted(PRESETS)}")
    return PRESETS[model]


def model_kv_cache_bytes(model: "str | ModelShape", seq_len: int, batch_size: int = 1,
                         bytes_per_element: int = 2) -> int:
    """KV-cache bytes of a preset: only its attention layers keep keys and values."""
    shape = preset(model)
    return kv_cache_bytes(n_layers=shape.kv_layers, n_kv_heads=shape.n_kv_heads, head_dim=shape.head_dim,
                          seq_len=seq_len, batch_size=batch_size, bytes_per_element=bytes_per_element)


def ssm_state_bytes(model: "str | ModelShape", batch_size: int = 1, bytes_per_element: int = 2) -> int:
    """Bytes of the recurrent state of the Mamba layers: SSM state plus the causal-conv window."""
    _check_positive(batch_size=batch_size, bytes_per_element=bytes_per_element)
    shape = preset(model)
    per_layer = shape.d_inner * (shape.d_state + max(shape.d_conv - 1, 0))
    return shape.ssm_layers * per_layer * bytes_per_element * batch_size


def cache_bytes(model: "str | ModelShape", seq_len: int, batch_size: int = 1, bytes_per_element: int = 2) -> int:
    """Everything a model keeps per sequence while generating: KV cache plus SSM state."""
    return (model_kv_cache_bytes(model, seq_len, batch_size, bytes_per_element)
            + ssm_state_bytes(model, batch_size, bytes_per_element))


def weight_bytes(model: "str | ModelShape", bytes_per_element: int = 2) -> int:
    """Bytes of the weights at `bytes_per_element` per parameter (0.5 for 4-bit weights)."""
    if isinstance(bytes_per_element, bool) or not isinstance(bytes_per_element, (int, float)) or not bytes_per_element >= 0:
        raise ValueError(f"bytes_per_element must be a non-negative number, got {bytes_per_element!r}")
    return int(preset(model).params_billions * 1e9 * bytes_per_element)


def format_bytes(n: float) -> str:
    """Binary units: 2621440 -> '2.5 MiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.4g} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
