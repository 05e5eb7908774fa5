"""DuoAttention (Xiao et al. 2024, "DuoAttention: Efficient Long-Context LLM Inference with
Retrieval and Streaming Heads"): only some KV heads need the whole context.

A gate α ∈ [0, 1] per (layer, KV head) mixes two attentions computed from the same q, k, v
(the paper's eq. 1):

    out = α · full_attention(q, k, v) + (1 - α) · sink_window_attention(q, k, v)

The model stays frozen; α is trained on synthetic passkey data so that the final hidden states
of the answer tokens match the full model's, with an L1 penalty pushing α to 0 (eq. 2-3):

    L = mean_answer ‖h_full - h_gated‖² / dim  +  λ · mean |α|

Then α is binarised (a threshold or a target share of retrieval heads): retrieval heads keep a
full KV cache, streaming heads keep only `sinks` + `window` tokens (`DuoAttentionCache`).

Parts: `gated_attention` and `gates_installed` (training-time attention), `passkey_sample`
(training data from the King James text), `train_gates`, `retrieval_heads` (binarisation),
`save_gates` / `load_gates` (the shipped file), `duo_cache_bytes` (the memory formula),
`needle_attention_ranking` (a simple attention-based ranking to compare with). The command
`python -m lectlib.duo train|experiments` makes the shipped gates and data/results/duo_*.json.
"""

import json
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import runtime
from .attention import attention_probs, repeat_kv, sdpa_attention
from .kv import KVCache, SinkCache
from .positions import rope_parameters
from .streaming import _attention_swapped, sink_window_attention

DATA = Path(__file__).resolve().parents[1] / "data"
GATES_FILE = DATA / "duo" / "smollm2_gates.json"
SINKS, WINDOW = 16, 112  # a streaming head holds 128 tokens (the paper: 64 + 256 at 32k+ contexts)


def _check_gates(gates: torch.Tensor, n_layers: int, n_kv_heads: int) -> None:
    if not isinstance(gates, torch.Tensor) or tuple(gates.shape) != (n_layers, n_kv_heads):
        shape = tuple(gates.shape) if isinstance(gates, torch.Tensor) else type(gates).__name__
        raise ValueError(f"gates must be a ({n_layers}, {n_kv_heads}) tensor (layers, KV heads), got {shape}")


# ---------------------------------------------------------------------------------------------
# The gated attention used for training.

def gated_mix(full: torch.Tensor, stream: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """α · full + (1 - α) · stream (DuoAttention eq. 1), α = `gate` (H_kv,) shared by each KV head's query heads.

    full, stream: (B, H, N, D) outputs of full and of sink + window attention; query head h
    belongs to KV head h // (H / H_kv), as in `repeat_kv`.
    """
    if full.shape != stream.shape or full.dim() != 4:
        raise ValueError(f"full and stream must be equal (B, H, N, D) tensors, got {tuple(full.shape)} and {tuple(stream.shape)}")
    if gate.dim() != 1 or full.shape[1] % gate.shape[0]:
        raise ValueError(f"gate must be (H_kv,) with H_kv dividing the {full.shape[1]} heads, got {tuple(gate.shape)}")
    alpha = repeat_kv(gate.view(1, -1, 1, 1), full.shape[1] // gate.shape[0]).to(full)  # (1, H, 1, 1)
    return stream + alpha * (full - stream)


def gated_attention(gates: torch.Tensor, layer: int, *, sinks: int, window: int, inv_freq: torch.Tensor,
                    block: int = 256):
    """An attention function (q, k, v, *, causal, scale) for layer `layer` (DuoAttention eq. 1):
    gates[layer] (H_kv,) mixes full causal attention with sink + window attention, per KV head.

    q (B, H, N, D) and k, v (B, H_kv, N, D) arrive rotated by their text positions. The streaming
    branch is `lectlib.streaming.sink_window_attention` with text positions (the deployed cache
    keeps every head's positions in the text), computed block by block: no N×N matrix.
    `gates` is read at every call, so a trained `nn.Parameter` receives its gradient.
    """
    if sinks < 0 or window < 1:
        raise ValueError(f"need sinks >= 0 and window >= 1, got sinks={sinks}, window={window}")
    streaming = sink_window_attention(sinks=sinks, window=window, inv_freq=inv_freq, positions="text", block=block)

    def attend(q, k, v, *, causal=True, scale=None):
        if not causal:
            raise ValueError("gated_attention is causal: call it with causal=True")
        if gates.shape[1] != k.shape[1]:
            raise ValueError(f"gates must have one column per KV head ({k.shape[1]}), got {tuple(gates.shape)}")
        full = sdpa_attention(q, k, v, causal=True, scale=scale)
        return gated_mix(full, streaming(q, k, v, causal=True, scale=scale), gates[layer])

    return attend


@contextmanager
def gates_installed(model, gates: torch.Tensor, *, sinks: int = SINKS, window: int = WINDOW, block: int = 256):
    """Inside the `with` block, every layer of `model` runs `gated_attention` with `gates` (L, H_kv)."""
    c = model.config
    _check_gates(gates, c.n_layers, c.n_kv_heads)
    inv_freq, _ = rope_parameters(c.head_dim, c.rope_theta, c.rope_scaling, c.max_positions)
    with _attention_swapped(model, lambda layer: gated_attention(gates, layer, sinks=sinks, window=window,
                                                                 inv_freq=inv_freq, block=block)):
        yield model


# ---------------------------------------------------------------------------------------------
# Training data: passkeys hidden at random depths of the King James text, then recited.

@dataclass
class PasskeySample:
    """input_ids (1, N); answer (N,) bool: the positions whose hidden states are distilled
    (the recited keys and the token before them, which predicts the first)."""

    input_ids: torch.Tensor
    answer: torch.Tensor


def passkey_sample(tokenizer, length: int, *, n_keys: int = 5, seed: int = 0) -> PasskeySample:
    """A King James passage of about `length` tokens with `n_keys` five-digit pass keys at random
    depths, ending "The pass keys are 12345, 67890, ..." (the paper's synthetic data, small).

    The passage starts at a random place of the text (from `seed`); the keys sit between tokens at
    random depths in [0.05, 0.9] of the passage.
    """
    from .data import tokens

    if n_keys < 1:
        raise ValueError(f"n_keys must be >= 1, got {n_keys}")
    g = torch.Generator().manual_seed(seed)
    keys = [str(int(x)) for x in torch.randint(10_000, 100_000, (n_keys,), generator=g)]
    enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
    key_ids = [enc(f" The pass key is {key}. Remember it.") for key in keys]
    question = enc("\n\nThe pass keys are")
    answer = enc(" " + ", ".join(keys) + ".")
    n_text = length - sum(map(len, key_ids)) - len(question) - len(answer)
    if n_text < 8 * n_keys:
        raise ValueError(f"length must leave room for text between {n_keys} keys, got {length}")
    stream = tokens(tokenizer)
    start = int(torch.randint(0, len(stream) - n_text, (1,), generator=g))
    text = stream[start:start + n_text].tolist()
    cuts = sorted(int(x) for x in (torch.rand(n_keys, generator=g) * 0.85 + 0.05) * n_text)
    ids, last = [], 0
    for cut, piece in zip(cuts, key_ids):
        ids += text[last:cut] + piece
        last = cut
    ids += text[last:] + question + answer
    mask = torch.zeros(len(ids), dtype=torch.bool)
    mask[-len(answer) - 1:-1] = True  # hidden states that predict the answer tokens
    return PasskeySample(torch.tensor([ids]), mask)


# ---------------------------------------------------------------------------------------------
# Training: the model frozen, only α learns.

def distillation_loss(model, gates: torch.Tensor, sample: PasskeySample, target: torch.Tensor, *,
                      sinks: int = SINKS, window: int = WINDOW) -> torch.Tensor:
    """mean over answer positions of ‖h_full - h_gated‖² / dim (DuoAttention eq. 2); `target` is the
    full model's (n_answer, dim) final hidden states at `sample.answer`."""
    with gates_installed(model, gates, sinks=sinks, window=window):
        hidden = model.hidden_states(sample.input_ids)[0, sample.answer]
    return (hidden.float() - target.float()).pow(2).mean()


@dataclass
class TrainLog:
    step: list[int]
    distill: list[float]
    l1: list[float]
    seconds: list[float]


def train_gates(model, tokenizer, *, steps: int, length: int, n_keys: int = 5, lr: float = 0.02,
                l1: float = 0.05, sinks: int = SINKS, window: int = WINDOW, seed: int = 0, gates=None,
                samples=None, seconds: float | None = None, progress: bool = True, log_every: int = 1, on_log=None):
    """Train the gates α (L, H_kv) of a frozen `model` with Adam (DuoAttention §3.2); returns (gates, TrainLog).

    Each step draws a fresh `passkey_sample` of `length` tokens (seed + step), or cycles through
    `samples` when given (a fixed batch). α starts at 1 (every head full), is clamped to [0, 1]
    after each step, and the loss is `distillation_loss` + `l1` · mean |α|. `seconds` stops the
    loop after the step that passes that much time (a CPU budget); `on_log(gates, log)` is called
    at every logged step (the command saves the gates there).
    """
    from tqdm.auto import tqdm

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if l1 < 0:
        raise ValueError(f"l1 must be >= 0, got {l1}")
    c = model.config
    gates = nn.Parameter(torch.ones(c.n_layers, c.n_kv_heads) if gates is None else gates.detach().clone().float())
    _check_gates(gates, c.n_layers, c.n_kv_heads)
    frozen = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.Adam([gates], lr=lr)
    log, begin = TrainLog([], [], [], []), time.perf_counter()
    device = next(model.parameters()).device
    try:
        for step in tqdm(range(steps), desc="gates", disable=not progress):
            sample = samples[step % len(samples)] if samples else passkey_sample(tokenizer, length, n_keys=n_keys,
                                                                                 seed=seed * 100_003 + step)
            sample = PasskeySample(sample.input_ids.to(device), sample.answer.to(device))
            with torch.no_grad():
                target = model.hidden_states(sample.input_ids)[0, sample.answer]
            distill = distillation_loss(model, gates, sample, target, sinks=sinks, window=window)
            penalty = gates.abs().mean()
            optimizer.zero_grad()
            (distill + l1 * penalty).backward()
            optimizer.step()
            with torch.no_grad():
                gates.clamp_(0.0, 1.0)
            out_of_time = seconds is not None and time.perf_counter() - begin > seconds
            if step % log_every == 0 or step == steps - 1 or out_of_time:
                log.step.append(step)
                log.distill.append(distill.item())
                log.l1.append(penalty.item())
                log.seconds.append(time.perf_counter() - begin)
                if on_log is not None:
                    on_log(gates.detach(), log)
            if out_of_time:
                break
    finally:
        for p, flag in zip(model.parameters(), frozen):
            p.requires_grad_(flag)
    return gates.detach(), log


# ---------------------------------------------------------------------------------------------
# Binarisation, the shipped file and the memory formula.

def retrieval_heads(gates: torch.Tensor, *, share: float | None = None, threshold: float | None = None) -> torch.Tensor:
    """(L, H_kv) bool: True for retrieval heads (full cache), False for streaming heads.

    Exactly one of `share` (the fraction of heads kept full: the round(share · L · H_kv) largest
    gates, ties broken by position) or `threshold` (gates > threshold) is given.
    """
    if not isinstance(gates, torch.Tensor) or gates.dim() != 2:
        raise ValueError(f"gates must be a (layers, KV heads) tensor, got {getattr(gates, 'shape', gates)!r}")
    if (share is None) == (threshold is None):
        raise ValueError(f"give exactly one of share or threshold, got share={share}, threshold={threshold}")
    if threshold is not None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must lie in [0, 1] (gates are clamped there), got {threshold}")
        return gates > threshold
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must lie in [0, 1] (the fraction of retrieval heads), got {share}")
    n = round(share * gates.numel())
    order = torch.sort(gates.flatten(), descending=True, stable=True).indices
    keep = torch.zeros(gates.numel(), dtype=torch.bool)
    keep[order[:n]] = True
    return keep.view_as(gates)


def duo_cache_bytes(*, n_layers: int, n_kv_heads: int, head_dim: int, n_tokens: int, share: float,
                    sinks: int = SINKS, window: int = WINDOW, bytes_per_value: int = 2) -> int:
    """Bytes of keys and values a DuoAttention cache holds after `n_tokens` tokens (N):

        2 · D · b · (R · N + S · min(N, sinks + window))

    with R = round(share · L · H_kv) retrieval heads holding every token, S = L · H_kv - R
    streaming heads holding at most sinks + window, head size D and b bytes per number.
    """
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"share must lie in [0, 1] (the fraction of retrieval heads), got {share}")
    if n_tokens < 0:
        raise ValueError(f"n_tokens must be >= 0, got {n_tokens}")
    heads = n_layers * n_kv_heads
    r = round(share * heads)
    return 2 * head_dim * bytes_per_value * (r * n_tokens + (heads - r) * min(n_tokens, sinks + window))


def save_gates(gates: torch.Tensor, path: Path, **meta) -> None:
    """Write gates (L, H_kv) and `meta` (command, steps, settings) as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"gates": [[round(float(x), 6) for x in row] for row in gates], **meta}, indent=1))


def load_gates(path: Path = GATES_FILE) -> tuple[torch.Tensor, dict]:
    """(gates (L, H_kv) float32, the rest of the file: settings and how it was made)."""
    record = json.loads(Path(path).read_text())
    gates = torch.tensor(record.pop("gates"), dtype=torch.float32)
    if gates.dim() != 2:
        raise ValueError(f"{path}: gates must be a (layers, KV heads) table, got shape {tuple(gates.shape)}")
    return gates, record


# ---------------------------------------------------------------------------------------------
# Deployment: a full cache for retrieval heads, sinks + window for streaming heads.

class DuoAttentionCache(KVCache):
    """DuoAttention's cache (Xiao et al. 2024, §3.3): per (layer, KV head), a retrieval head keeps
    every token, a streaming head the first `sinks` and the `window` most recent.

    `retrieval` (L, H_kv) bool says which is which (`retrieval_heads`). The tokens live in two
    caches, `full` (the retrieval heads of each layer) and `streaming` (a `SinkCache`), so
    `nbytes()` counts what is really held: 2 · D · b · (R · N + S · min(N, sinks + window)).
    Positions are the text's, as in training. `update` hands the attention one rectangle
    (B, H_kv, N, D) in which streaming heads are padded; `attention` reads each head's own tokens
    and gives streaming heads the band of `gated_attention` (query t sees the sinks and t-window+1..t),
    so a model must run inside `with kv.attach(model, cache):`. The padding is NaN, so attention
    that reads the rectangle whole (a model run without `attach`) gives NaN logits, not quietly
    wrong ones.
    """

    def __init__(self, retrieval: torch.Tensor, *, sinks: int = SINKS, window: int = WINDOW):
        if not isinstance(retrieval, torch.Tensor) or retrieval.dim() != 2 or retrieval.dtype != torch.bool:
            raise ValueError(f"retrieval must be a (layers, KV heads) bool tensor, got {getattr(retrieval, 'shape', retrieval)!r}"
                             f" of dtype {getattr(retrieval, 'dtype', None)}")
        super().__init__(positions="text")
        self.retrieval = retrieval
        self.full = KVCache(positions="text")
        self.streaming = SinkCache(sinks, window, positions="text")
        self.sinks, self.window = sinks, window
        self._seen_by: dict[int, tuple] = {}  # layer -> (key positions, query positions) of the streaming heads' next attention

    def __len__(self) -> int:
        """Tokens held by a retrieval head (every token seen)."""
        return self.seen

    def held_tokens(self, layer: int) -> torch.Tensor:
        """(H_kv,) tokens each KV head of `layer` holds now."""
        r = self.retrieval[layer]
        held = torch.zeros(len(r), dtype=torch.int64)
        if layer in self.full.keys:
            held[r] = self.full.keys[layer].shape[2]
        if layer in self.streaming.keys:
            held[~r] = self.streaming.keys[layer].shape[2]
        return held

    def update(self, layer, k, v, positions):
        self._check_update(layer, k, v, positions)
        if k.shape[1] != self.retrieval.shape[1] or layer >= self.retrieval.shape[0]:
            raise ValueError(f"k has {k.shape[1]} KV heads in layer {layer}; retrieval is {tuple(self.retrieval.shape)}")
        r = self.retrieval[layer].to(k.device)
        B, H, n, D = k.shape
        parts = []  # (heads, keys, values, positions) of each kind
        if r.any():
            parts.append((r, *self.full.update(layer, k[:, r], v[:, r], positions)[:3]))
        if (~r).any():
            parts.append((~r, *self.streaming.update(layer, k[:, ~r], v[:, ~r], positions)[:3]))
        if layer == 0:
            self.seen = int(positions[-1]) + 1
        longest = max(part[1].shape[2] for part in parts)
        keys, values = k.new_full((B, H, longest, D), float("nan")), v.new_full((B, H, longest, D), float("nan"))
        key_pos = torch.zeros(B, H, longest, dtype=positions.dtype, device=k.device)
        for heads, hk, hv, hp in parts:
            keys[:, heads, :hk.shape[2]], values[:, heads, :hk.shape[2]] = hk, hv
            key_pos[:, heads, :hk.shape[2]] = hp
        if (~r).any():  # every streaming head holds the same tokens, at text positions parts[-1][3]
            self._seen_by[layer] = (parts[-1][3], positions)
        return keys, values, key_pos, positions

    def attention(self, layer, q, k, v, *, causal, scale, attn_fn=sdpa_attention):
        r = self.retrieval[layer].to(q.device)
        n_rep = q.shape[1] // k.shape[1]
        rq = r.repeat_interleave(n_rep)
        out = torch.empty_like(q)
        if r.any():
            out[:, rq] = attn_fn(q[:, rq], k[:, r], v[:, r], causal=causal, scale=scale)
        if (~r).any():
            key_pos, query_pos = self._seen_by.pop(layer)
            query_pos, held = query_pos[:, None], len(key_pos)
            band = (key_pos <= query_pos) & ((key_pos < self.sinks) | (key_pos > query_pos - self.window))  # (n, held)
            ks, vs = (repeat_kv(t[:, ~r, :held], n_rep) for t in (k, v))
            out[:, ~rq] = F.scaled_dot_product_attention(q[:, ~rq], ks, vs, attn_mask=band, scale=scale)
        return out

    def nbytes(self) -> int:
        return self.full.nbytes() + self.streaming.nbytes()


# ---------------------------------------------------------------------------------------------
# A simple ranking to compare with: the attention mass each head puts on the needle.

def _span(ids: list[int], piece: list[int]) -> range:
    for i in range(len(ids) - len(piece) + 1):
        if ids[i:i + len(piece)] == piece:
            return range(i, i + len(piece))
    raise ValueError("the needle's tokens were not found in the prompt")


@torch.no_grad()
def needle_attention_ranking(model, tokenizer, *, length: int, depths=(0.1, 0.3, 0.5, 0.7, 0.9), seed: int = 0,
                             last: int = 8) -> torch.Tensor:
    """(L, H_kv): mean attention mass the `last` queries of passkey prompts put on the pass key's
    tokens, averaged over the query heads of each KV head and over prompts at `depths`.

    Computes only the last queries' weights (`attention_probs` on (B, H, last, N)), not N×N.
    """
    from .evals import passkey_prompt

    c = model.config
    mass = torch.zeros(c.n_layers, c.n_kv_heads)

    def recorder(span):
        def make(layer):
            def attend(q, k, v, *, causal=True, scale=None):
                p = attention_probs(q[:, :, -last:], k, causal=True, scale=scale)  # (1, H, last, N)
                on_key = p[0, :, :, span.start:span.stop].sum(-1).mean(-1)  # (H,)
                mass[layer] += on_key.view(c.n_kv_heads, -1).mean(-1).cpu()
                return sdpa_attention(q, k, v, causal=causal, scale=scale)
            return attend
        return make

    for i, depth in enumerate(depths):
        ids, answer = passkey_prompt(tokenizer, length, depth, seed=seed * 1000 + i)
        span = _span(ids[0].tolist(), tokenizer.encode(" " + answer, add_special_tokens=False))
        with _attention_swapped(model, recorder(span)):
            model(ids.to(next(model.parameters()).device))
    return mass / len(depths)


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's ρ between two equally shaped tables (Pearson correlation of their ranks)."""
    from scipy.stats import spearmanr

    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return float(spearmanr(a.flatten().cpu().numpy(), b.flatten().cpu().numpy()).statistic)


# ---------------------------------------------------------------------------------------------
# Experiments: retrieval and perplexity against the share of retrieval heads, and decoding cost.

SHARES = (0.0, 0.125, 0.25, 0.5, 0.75, 1.0)


@torch.no_grad()
def retrieved(model, probe, cache) -> tuple[float, int]:
    """(retrieved, bytes held after the prompt) of an `evals.Probe` read through `cache`.

    As `evals.score_probe`: the prompt goes in whole, then the answer prefix and the answer one
    token at a time (teacher-forced, as in decoding); retrieved = the share of the probe's spans
    whose tokens are all the greedy choice. Here the model runs inside `kv.attach(model, cache)`,
    which DuoAttentionCache needs (score_probe forks the cache, and a fork is not attached).
    """
    from . import kv

    fed = list(probe.prefix + probe.answer)
    device = next(model.parameters()).device
    with kv.attach(model, cache):
        logits = [model(probe.prompt.to(device), cache=cache)[0, -1]]
        held = cache.nbytes()
        for token in fed[:-1]:
            logits.append(model(torch.tensor([[token]], device=device), cache=cache)[0, -1])
    greedy = (torch.stack(logits[len(probe.prefix):]).argmax(-1).cpu() == torch.tensor(probe.answer)).tolist()
    return sum(all(greedy[a:b]) for a, b in probe.spans) / len(probe.spans), held


@torch.no_grad()
def gated_nlls(model, input_ids: torch.Tensor, gates: torch.Tensor, *, sinks: int = SINKS,
               window: int = WINDOW) -> torch.Tensor:
    """(N-1,) next-token NLLs of `input_ids` (1, N) with `gates` (L, H_kv) installed: with 0/1 gates,
    exactly the model decoding through `DuoAttentionCache` (in one pass, as `streaming.sink_window_nlls`)."""
    from .streaming import _nlls_from_hidden

    with gates_installed(model, gates, sinks=sinks, window=window):
        hidden = model.hidden_states(input_ids)[0]
    return _nlls_from_hidden(model, hidden[:-1], input_ids[0, 1:])


def gated_perplexity(model, input_ids: torch.Tensor, gates: torch.Tensor, *, sinks: int = SINKS,
                     window: int = WINDOW) -> float:
    """exp of the mean of `gated_nlls`."""
    return math.exp(gated_nlls(model, input_ids, gates, sinks=sinks, window=window).mean().item())


def share_sweep(model, tokenizer, gates: torch.Tensor, *, length: int, count: int, context: int, continuation: int,
                shares=SHARES, sinks: int = SINKS, window: int = WINDOW, progress: bool = True, on_row=None) -> list[dict]:
    """Rows {share, task, score, bytes, full_bytes} on the KV-compression leaderboard's prompts
    (`compression.retrieval_prompts` and `perplexity_prompts`), so the two can share a plot:
    task passkey / needle / key-value (score: the mean `retrieved` of `count` prompts of `length`
    tokens; bytes: held after the prompt) or perplexity (score: over the `continuation` tokens after
    each `context`; bytes held after the context, by `duo_cache_bytes`).

    Unlike the leaderboard's policies, which compress a cache filled by full attention, streaming
    heads attend to their sinks and window while reading the prompt too (as in the paper).
    `on_row(rows)` is called after each share (a recording saves progress there).
    """
    from tqdm.auto import tqdm

    from .compression import perplexity_prompts, retrieval_prompts

    probes = retrieval_prompts(tokenizer, length=length, count=count)
    texts = perplexity_prompts(tokenizer, context=context, continuation=continuation, count=count)
    c, b = model.config, next(model.parameters()).element_size()
    cache_bytes = lambda n, share: duo_cache_bytes(n_layers=c.n_layers, n_kv_heads=c.n_kv_heads, head_dim=c.head_dim,  # noqa: E731
                                                   n_tokens=n, share=share, sinks=sinks, window=window, bytes_per_value=b)
    device = next(model.parameters()).device
    rows = []
    for share in tqdm(shares, desc="shares", disable=not progress):
        heads = retrieval_heads(gates, share=share)
        scores: dict[str, list] = {}
        for task, ids, probe in probes:
            ok, held = retrieved(model, probe, DuoAttentionCache(heads, sinks=sinks, window=window))
            scores.setdefault(task, []).append((ok, held, cache_bytes(ids.shape[1], 1.0)))
        for task, got in scores.items():
            rows.append({"share": share, "task": task, "score": sum(g[0] for g in got) / len(got),
                         "bytes": sum(g[1] for g in got) / len(got), "full_bytes": sum(g[2] for g in got) / len(got)})
        nlls = torch.cat([gated_nlls(model, torch.cat([ids, torch.tensor([cont])], 1).to(device), heads.float(), sinks=sinks,
                                     window=window)[-len(cont):].cpu() for ids, cont in texts])
        rows.append({"share": share, "task": "perplexity", "score": math.exp(nlls.mean().item()),
                     "bytes": cache_bytes(context, share), "full_bytes": cache_bytes(context, 1.0)})
        if on_row is not None:
            on_row(rows)
    return rows


@torch.no_grad()
def decode_cost(model, caches: dict, lengths, *, steps: int = 3) -> list[dict]:
    """Rows {method, tokens, seconds (per decoded token, the fastest of `steps`), bytes}: each cache
    from `caches[method]()` filled with `tokens` random keys/values, then one token decoded through it."""
    from . import kv
    from .streaming import fill, time_per_token

    rows = []
    for n in lengths:
        for method, make in caches.items():
            cache = fill(make(), model.config, n)
            with kv.attach(model, cache):
                seconds = time_per_token(model, cache, steps=steps)
            rows.append({"method": method, "tokens": n, "seconds": seconds, "bytes": cache.nbytes()})
    return rows


# ---------------------------------------------------------------------------------------------
# Commands.

def _machine() -> dict:
    import os
    import platform

    from .bench import environment

    return {"machine": platform.node(), "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "device": environment()["device"],
            "cores": os.cpu_count(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def train_command(args) -> None:
    import sys

    from .models import load

    model, tokenizer = load(device=runtime.device())
    out = Path(args.out)
    log_path = out.with_name(out.stem + "_log.json")
    command = "python -m lectlib.duo " + " ".join(sys.argv[1:])
    settings = {"steps": args.steps, "minutes": args.minutes, "length": args.length, "n_keys": args.keys, "lr": args.lr, "l1": args.l1,
                "sinks": args.sinks, "window": args.window, "seed": args.seed}

    def save(gates, log):
        meta = {"command": command, "settings": settings, "steps_done": log.step[-1] + 1,
                "seconds": round(log.seconds[-1], 1), **_machine()}
        save_gates(gates, out, model="SmolLM2-135M-Instruct", **meta)
        log_path.write_text(json.dumps({**meta, "step": log.step, "distill": log.distill, "l1": log.l1,
                                        "seconds": log.seconds}, indent=1))
        print(f"step {log.step[-1]}: distill {log.distill[-1]:.4f}, mean α {log.l1[-1]:.3f}, "
              f"{log.seconds[-1]:.0f} s", flush=True)

    train_gates(model, tokenizer, steps=args.steps, length=args.length, n_keys=args.keys, lr=args.lr, l1=args.l1,
                sinks=args.sinks, window=args.window, seed=args.seed, seconds=None if args.minutes is None else 60 * args.minutes,
                progress=False, on_log=save)


def experiments_command(args) -> None:
    from .kv import KVCache, SinkCache
    from .models import load

    model, tokenizer = load(device=runtime.device())
    gates, meta = load_gates(args.gates)
    sinks, window = meta["settings"]["sinks"], meta["settings"]["window"]
    RESULTS = DATA / "results"
    RESULTS.mkdir(parents=True, exist_ok=True)
    common = {"gates": str(Path(args.gates).relative_to(DATA.parent)) if Path(args.gates).is_absolute() else args.gates,
              "sinks": sinks, "window": window, **_machine()}
    if "ranking" in args.parts:
        begin = time.perf_counter()
        ranking = needle_attention_ranking(model, tokenizer, length=args.length)
        (RESULTS / "duo_ranking.json").write_text(json.dumps({
            "command": f"python -m lectlib.duo experiments --parts ranking --length {args.length}", "length": args.length,
            **common,
            "attention_mass": ranking.tolist(), "seconds": round(time.perf_counter() - begin, 1)}, indent=1))
        print(f"ranking: Spearman ρ with {args.gates}: {rank_correlation(gates, ranking):.3f}", flush=True)
    if "shares" in args.parts:
        begin = time.perf_counter()

        def save(rows):
            (RESULTS / "duo_shares.json").write_text(json.dumps({
                "command": f"python -m lectlib.duo experiments --parts shares --length {args.length} --count {args.count} "
                           f"--context {args.context} --continuation {args.continuation}", "length": args.length,
                "count": args.count, "context": args.context, "continuation": args.continuation, **common, "rows": rows,
                "seconds": round(time.perf_counter() - begin, 1)}, indent=1))

        share_sweep(model, tokenizer, gates, length=args.length, count=args.count, context=args.context,
                    continuation=args.continuation, sinks=sinks, window=window, on_row=save)
    if "cost" in args.parts:
        begin = time.perf_counter()
        heads = retrieval_heads(gates, share=args.share)
        caches = {"full": KVCache, "StreamingLLM": lambda: SinkCache(sinks, window, positions="text"),
                  f"DuoAttention {args.share:.0%}": lambda: DuoAttentionCache(heads, sinks=sinks, window=window)}
        rows = decode_cost(model, caches, args.cost_lengths)
        (RESULTS / "duo_cost.json").write_text(json.dumps({
            "command": "python -m lectlib.duo experiments --parts cost --cost-lengths "
                       + " ".join(map(str, args.cost_lengths)) + f" --share {args.share}", "share": args.share,
            **common, "rows": rows, "seconds": round(time.perf_counter() - begin, 1)}, indent=1))


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lectlib.duo", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train SmolLM2's gates and write them with their log")
    train.add_argument("--steps", type=int, default=100)
    train.add_argument("--length", type=int, default=1024)
    train.add_argument("--keys", type=int, default=5)
    train.add_argument("--lr", type=float, default=0.02)
    train.add_argument("--l1", type=float, default=0.05)
    train.add_argument("--sinks", type=int, default=SINKS)
    train.add_argument("--window", type=int, default=WINDOW)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--minutes", type=float, default=None, help="stop after this much time (a CPU budget)")
    train.add_argument("--out", default=str(GATES_FILE))
    experiments = sub.add_parser("experiments", help="gate map vs attention ranking, the share sweep, decoding cost")
    experiments.add_argument("--parts", nargs="+", default=["ranking", "shares", "cost"])
    experiments.add_argument("--gates", default=str(GATES_FILE))
    experiments.add_argument("--length", type=int, default=512, help="retrieval prompts (the leaderboard's book scale)")
    experiments.add_argument("--count", type=int, default=2)
    experiments.add_argument("--context", type=int, default=512, help="perplexity: context, then continuation")
    experiments.add_argument("--continuation", type=int, default=64)
    experiments.add_argument("--share", type=float, default=0.25)
    experiments.add_argument("--cost-lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    args = parser.parse_args(argv)
    if args.command == "train":
        train_command(args)
    else:
        experiments_command(args)


if __name__ == "__main__":
    main()
