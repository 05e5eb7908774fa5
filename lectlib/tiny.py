"""The tiny KJV Llama: a 1.3M-parameter model trained here on the King James Bible at 128 tokens.

Chapter 2 needs a model whose trained length we control, chapter 4 one whose attention sinks we
control. Its vocabulary is the 4095 most frequent SmolLM2 tokens of the text plus one "other"
token (98% of the text), which keeps a checkpoint under 3 MB. `python -m lectlib.tiny train`
reproduces the shipped checkpoint; `--sink-token` trains its twin with a dedicated sink token in
front of every sample, for chapter 4's question whether attention sinks are built in or learned.
Checkpoints are loaded with `torch.load(weights_only=True)`: tensors and numbers only, so a
planted file cannot run code.
"""

import argparse
import time
from pathlib import Path

import torch

from . import data
from .llama import Llama, LlamaConfig
from .train import train

CHECKPOINTS = data.DATA / "checkpoints"
TINY_CHECKPOINT = CHECKPOINTS / "kjv-tiny-128.pt"
SINK_CHECKPOINT = CHECKPOINTS / "kjv-tiny-128-sink.pt"  # the same recipe with a dedicated sink token
TRAIN_LEN = 128
VOCAB = 4096
SINK_TOKEN = VOCAB  # a dedicated sink token's id, one past the compact vocabulary


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
    """Weights in fp16 (tied lm_head stored once), the vocabulary and the loss curve: tensors and an int only,
    so that `load_tiny` can refuse everything else."""
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.half() for k, v in model.state_dict().items() if k != "lm_head.weight"}
    torch.save({"state": state, "vocab": vocab.int(), "losses": torch.tensor(losses), "train_len": TRAIN_LEN}, path)


def load_tiny(path: Path = TINY_CHECKPOINT):
    """(model fp32 eval, vocab, training losses) from a shipped checkpoint (TINY_CHECKPOINT or SINK_CHECKPOINT).

    `weights_only=True`: a checkpoint holding anything but tensors and plain containers is refused
    (pickle.UnpicklingError) instead of being executed.
    """
    if not Path(path).exists():
        flag = " --sink-token" if Path(path).name == SINK_CHECKPOINT.name else ""
        raise FileNotFoundError(f"{path} is missing: run `python -m lectlib.tiny train{flag}` to make it")
    saved = torch.load(path, weights_only=True)
    state = {k: v.float() for k, v in saved["state"].items()}
    state["lm_head.weight"] = state["embed_tokens.weight"]
    model = Llama(tiny_config(vocab_size=state["embed_tokens.weight"].shape[0]))
    model.load_state_dict(state)
    return model.eval(), saved["vocab"].long(), saved["losses"].tolist()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lectlib.tiny", description=__doc__.split("\n")[0])
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
