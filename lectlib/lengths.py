"""Length generalisation: does a RoPE model work past the length it was trained on?

Two experiments, both measuring next-token perplexity as a function of position:

1. A tiny Llama trained here on the King James Bible at a short context (128 tokens), then run
   on 4x longer windows with plain RoPE and with each scaling of `lectlib.positions`, before
   and after a short fine-tune at the longer length. Its vocabulary is the 4095 most frequent
   SmolLM2 tokens of the text plus one "other" token (98% of the text), which keeps the
   checkpoint under 3 MB. `python -m lectlib.lengths train` reproduces the shipped checkpoint;
   `--sink-token` trains its twin with a dedicated sink token in front of every sample, for
   chapter 4's question whether attention sinks are built in or learned.

2. SmolLM2-135M (trained to 8192 positions) with PoSE-style skipped positions (Zhu et al. 2023):
   a short window whose second part carries position ids shifted by `offset`, so those tokens
   sit at distances > 8192 from the first part while the whole input stays a few hundred tokens.
   This measures what RoPE sees (unseen relative distances, unseen absolute angles, and dynamic
   NTK reacting to the largest position id); it does not measure what only a full-length run
   shows: attention spread over thousands of real tokens, and the memory and time it costs.
"""

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import data
from .llama import Llama, LlamaConfig
from .positions import rope_scaling
from .train import train

CHECKPOINTS = data.DATA / "checkpoints"
TINY_CHECKPOINT = CHECKPOINTS / "kjv-tiny-128.pt"
SINK_CHECKPOINT = CHECKPOINTS / "kjv-tiny-128-sink.pt"  # the same recipe with a dedicated sink token
TRAIN_LEN = 128
VOCAB = 4096
SINK_TOKEN = VOCAB  # a dedicated sink token's id, one past the compact vocabulary
METHODS = ("default", "linear", "ntk", "dynamic", "yarn")
METHOD_NAMES = {"default": "plain RoPE", "linear": "PI", "ntk": "NTK-aware", "dynamic": "dynamic NTK", "yarn": "YaRN"}


def tokenizer():
    """SmolLM2's tokenizer (offline)."""
    from transformers import AutoTokenizer

    from .models import checkpoint_path

    return AutoTokenizer.from_pretrained(checkpoint_path())


def compact_vocab(stream: torch.Tensor, size: int = VOCAB) -> torch.Tensor:
    """(size - 1,) the most frequent token ids of `stream`, most frequent first (ties by id)."""
    ids, counts = stream.unique(return_counts=True)
    order = sorted(range(len(ids)), key=lambda i: (-int(counts[i]), int(ids[i])))
    return ids[order[: size - 1]]


def encode(stream: torch.Tensor, vocab: torch.Tensor) -> torch.Tensor:
    """Map token ids to their index in `vocab`; ids outside it become len(vocab) ("other")."""
    table = torch.full((int(max(stream.max(), vocab.max())) + 1,), len(vocab), dtype=torch.int64)
    table[vocab] = torch.arange(len(vocab))
    return table[stream]


def kjv_stream(vocab: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(compact token stream of the whole text, vocab): the tiny model's data."""
    stream = data.tokens(tokenizer())
    vocab = compact_vocab(stream) if vocab is None else vocab
    return encode(stream, vocab), vocab


def split(stream: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out): the first 95% of the text and the last 5% (the end of Revelation and before)."""
    cut = int(len(stream) * 0.95)
    return stream[:cut], stream[cut:]


def tiny_config(**overrides) -> LlamaConfig:
    """A 1.3M-parameter Llama: 4 layers, width 128, 4 query heads of 32 sharing 2 KV heads, RoPE base 10000."""
    shape = dict(vocab_size=VOCAB, dim=128, n_layers=4, n_heads=4, n_kv_heads=2, head_dim=32, hidden_dim=384,
                 rope_theta=10000.0, max_positions=TRAIN_LEN, tie_embeddings=True)
    return LlamaConfig(**{**shape, **overrides})


def batches(stream: torch.Tensor, seq_len: int, batch: int, seed: int = 0):
    """next_batch(step) -> (inputs, targets), each (batch, seq_len): random windows of `stream`."""
    if len(stream) <= seq_len + 1:
        raise ValueError(f"stream of {len(stream)} tokens is too short for windows of {seq_len} + 1")

    def next_batch(step: int):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        starts = torch.randint(0, len(stream) - seq_len - 1, (batch,), generator=g)
        rows = torch.stack([stream[s:s + seq_len + 1] for s in starts.tolist()])
        return rows[:, :-1], rows[:, 1:]

    return next_batch


def sink_prefixed(ids: torch.Tensor) -> torch.Tensor:
    """(B, N) token ids -> (B, N) [SINK_TOKEN, ids_0 .. ids_{N-2}]: the sink in front, the length kept."""
    return torch.cat([torch.full_like(ids[:, :1], SINK_TOKEN), ids[:, :-1]], dim=1)


def with_sink_token(next_batch):
    """Prepend a dedicated sink token to every sample (Xiao et al. 2023, §3.3), keeping its length.

    next_batch(step) -> (inputs, targets) (B, N) becomes inputs [SINK, w_0 .. w_{N-2}] and
    targets w_0 .. w_{N-1}: the sink always sits at position 0 and is never predicted.
    """

    def sink_batch(step: int):
        inputs, _ = next_batch(step)
        return sink_prefixed(inputs), inputs

    return sink_batch


def eval_windows(stream: torch.Tensor, seq_len: int, n: int) -> torch.Tensor:
    """(n, seq_len + 1) evenly spaced windows of the held-out stream (deterministic)."""
    starts = torch.linspace(0, len(stream) - seq_len - 2, n).long()
    return torch.stack([stream[s:s + seq_len + 1] for s in starts.tolist()])


def init_weights(model: Llama, std: float = 0.02) -> Llama:
    """GPT-2 style initialisation N(0, std²) for every linear and embedding (nn.Embedding's N(0, 1) with tied
    output weights would start from logits of size ~√dim)."""
    for module in model.modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(module.weight, std=std)
    return model


def train_tiny(*, steps: int = 1500, batch: int = 16, lr: float = 3e-3, seed: int = 0, sink_token: bool = False):
    """Train the tiny model from zero at TRAIN_LEN tokens: (model, vocab, losses).

    `sink_token` prepends SINK_TOKEN to every sample (`with_sink_token`) and adds it to the vocabulary.
    """
    stream, vocab = kjv_stream()
    train_part, _ = split(stream)
    torch.manual_seed(seed)
    model = init_weights(Llama(tiny_config(vocab_size=VOCAB + sink_token)))
    next_batch = batches(train_part, TRAIN_LEN, batch, seed)
    if sink_token:
        next_batch = with_sink_token(next_batch)
    losses = train(model, next_batch, steps=steps, lr=lr, warmup=50, weight_decay=0.01, seed=seed,
                   desc=f"tiny Llama at {TRAIN_LEN} tokens{' with a sink token' if sink_token else ''}")
    return model, vocab, losses


def save_tiny(model: Llama, vocab: torch.Tensor, losses, path: Path = TINY_CHECKPOINT) -> None:
    """Weights in fp16 (tied lm_head stored once), the vocabulary and the loss curve."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.half() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    torch.save({"state": state, "vocab": vocab.int(), "losses": torch.tensor(losses), "train_len": TRAIN_LEN}, path)


def load_tiny(path: Path = TINY_CHECKPOINT):
    """(model fp32 eval, vocab, training losses) from a shipped checkpoint (TINY_CHECKPOINT or SINK_CHECKPOINT)."""
    if not Path(path).exists():
        flag = " --sink-token" if Path(path).name == SINK_CHECKPOINT.name else ""
        raise FileNotFoundError(f"{path} is missing: run `python -m lectlib.lengths train{flag}` to make it")
    saved = torch.load(path)
    state = {k: v.float() for k, v in saved["state"].items()}
    state["lm_head.weight"] = state["embed_tokens.weight"]
    model = Llama(tiny_config(vocab_size=state["embed_tokens.weight"].shape[0]))
    model.load_state_dict(state)
    return model.eval(), saved["vocab"].long(), saved["losses"].tolist()


def set_scaling(model: Llama, method: str, factor: float, original: int | None = None) -> Llama:
    """Switch `model` to RoPE scaling `method` ("default", "linear", "ntk", "dynamic", "yarn") in place."""
    model.config.rope_scaling = rope_scaling(method, factor, original or model.config.max_positions)
    return model


@torch.no_grad()
def nll_by_position(model: Llama, windows: torch.Tensor, positions: torch.Tensor | None = None,
                    batch: int = 8) -> torch.Tensor:
    """(N,) mean next-token NLL at each position over the windows (n, N + 1), one forward pass per batch."""
    total = torch.zeros(windows.shape[1] - 1)
    for rows in windows.split(batch):
        logits = model(rows[:, :-1], positions=positions).float()
        total += F.cross_entropy(logits.transpose(1, 2), rows[:, 1:], reduction="none").sum(0)
    return total / len(windows)


def binned_perplexity(nll: torch.Tensor, bin_size: int) -> list[float]:
    """Perplexity exp(mean NLL) over consecutive bins of `bin_size` positions."""
    return [math.exp(chunk.mean().item()) for chunk in nll.split(bin_size)]


def sweep_tiny(model: Llama, windows: torch.Tensor, *, factor: float, methods=METHODS, bin_size: int = 32):
    """{method: perplexity per position bin} for the tiny model on windows longer than TRAIN_LEN."""
    saved = model.config.rope_scaling
    result = {}
    for method in methods:
        set_scaling(model, method, factor, TRAIN_LEN)
        result[method] = binned_perplexity(nll_by_position(model, windows), bin_size)
    model.config.rope_scaling = saved
    return result


def finetune_tiny(model: Llama, stream: torch.Tensor, *, method: str, factor: float, seq_len: int, steps: int,
                  batch: int = 8, lr: float = 1e-3, seed: int = 1) -> list[float]:
    """Fine-tune every weight of `model` at `seq_len` tokens with RoPE scaling `method` (as PI/YaRN papers do)."""
    set_scaling(model, method, factor, TRAIN_LEN)
    return train(model, batches(stream, seq_len, batch, seed), steps=steps, lr=lr, warmup=min(10, steps),
                 seed=seed, desc=f"fine-tune {METHOD_NAMES[method]} at {seq_len}")


def pose_positions(n: int, jump_at: int, offset: int) -> torch.Tensor:
    """(n,) positions 0..jump_at-1, then jump_at + offset onward: PoSE's skip of `offset` ids."""
    if not 0 < jump_at < n or offset < 0:
        raise ValueError(f"need 0 < jump_at < n and offset >= 0, got n={n}, jump_at={jump_at}, offset={offset}")
    pos = torch.arange(n)
    return torch.where(pos < jump_at, pos, pos + offset)


def pose_sweep(model: Llama, windows: torch.Tensor, *, jump_at: int, offsets, original: int, factor: float,
               methods=METHODS) -> dict[str, list[float]]:
    """{method: [perplexity of the tokens after the jump, per offset]} with skipped positions.

    The tokens after the jump attend to the first `jump_at` tokens at distances offset + 1 ..
    offset + n; the largest position id, offset + n - 1, is what dynamic NTK scales for.
    """
    saved = model.config.rope_scaling
    n = windows.shape[1] - 1
    result = {}
    for method in methods:
        set_scaling(model, method, factor, original)
        result[method] = [math.exp(nll_by_position(model, windows, pose_positions(n, jump_at, o), batch=2)[jump_at:]
                                   .mean().item()) for o in offsets]
    model.config.rope_scaling = saved
    return result


def pose_passkey(model: Llama, tokenizer, *, length: int, offsets, original: int, factor: float,
                 methods=METHODS, trials: int = 5, depth: float = 0.25, seed: int = 0) -> dict[str, list[float]]:
    """{method: [passkey accuracy per offset]} with skipped positions.

    Each prompt (`lectlib.evals.passkey_prompt`) hides a passkey at `depth` of about `length` tokens,
    in the first half; the second half, the question included, carries position ids shifted by
    `offset`, so the answer lies more than `offset` positions before the question.
    """
    from . import evals

    prompts = [evals.passkey_prompt(tokenizer, length, depth, seed=seed + t) for t in range(trials)]
    saved = model.config.rope_scaling
    result = {}
    for method in methods:
        set_scaling(model, method, factor, original)
        row = []
        for offset in offsets:
            hits = 0
            for ids, answer in prompts:
                n = ids.shape[1]
                reply = evals.generate_answer(model, tokenizer, ids, max_new_tokens=8,
                                              positions=pose_positions(n, n // 2, offset))
                hits += evals.passkey_correct(reply, answer)
            row.append(hits / trials)
        result[method] = row
    model.config.rope_scaling = saved
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lectlib.lengths", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["train"], help=f"train: make {TINY_CHECKPOINT.relative_to(data.DATA.parent)}")
    parser.add_argument("--sink-token", action="store_true",
                        help=f"prepend a sink token to every sample; saves {SINK_CHECKPOINT.name} instead")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, vocab, losses = train_tiny(steps=args.steps, sink_token=args.sink_token)
    path = SINK_CHECKPOINT if args.sink_token else TINY_CHECKPOINT
    save_tiny(model, vocab, losses, path)
    print(f"saved {path} ({path.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
