"""Length generalisation: does a RoPE model work past the length it was trained on?

Every experiment measures next-token perplexity as a function of position, with the RoPE
scaling of `lectlib.positions` switched on by `scaled_rope` and off again afterwards:

1. `rope_buckets`: SmolLM2-135M (trained to 8192 positions) over one long span of real text,
   perplexity per bucket of positions under plain RoPE, PI, NTK, dynamic NTK and YaRN with no
   fine-tuning: the key figure of the PI and YaRN papers. A 16k-token forward takes many minutes
   on a CPU, so `python -m lectlib.lengths buckets` records it in data/results/rope_buckets.json.
2. `perplexity_by_position` on the tiny KJV Llama of `lectlib.tiny` (trained at 128 tokens), before
   and after a short fine-tune at a longer length (`finetune_tiny`).
3. PoSE-style skipped positions (Zhu et al. 2023) on SmolLM2: a short window whose second part
   carries position ids shifted by `offset`, so its tokens sit at distances > 8192 from the first
   part while the input stays a few hundred tokens (`pose_sweep`, `pose_passkey`). This measures what
   RoPE sees (unseen relative distances, unseen absolute angles, dynamic NTK reacting to the largest
   position id), not what only a full-length run shows (attention spread over thousands of tokens).
"""

import argparse
import datetime
import json
import math
import platform
import time
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from . import data, tiny
from .llama import Llama
from .positions import ROPE_TYPES, rope_scaling
from .train import train

RESULTS = data.DATA / "results"
ROPE_BUCKETS = RESULTS / "rope_buckets.json"
METHOD_NAMES = {"default": "plain RoPE", "linear": "PI", "ntk": "NTK-aware", "dynamic": "dynamic NTK", "yarn": "YaRN"}


def set_scaling(model: Llama, method: str, factor: float, original: int | None = None) -> Llama:
    """Switch `model` to RoPE scaling `method` (one of positions.ROPE_TYPES) in place.

    `original` is the trained length L the scaling stretches from (the model's max_positions when None).
    """
    if not factor >= 1:
        raise ValueError(f"factor (the context extension s) must be >= 1, got {factor}")
    original = model.config.max_positions if original is None else original
    if not isinstance(original, int) or original <= 0:
        raise ValueError(f"original (the trained length) must be a positive int, got {original!r}")
    model.config.rope_scaling = rope_scaling(method, factor, original)
    return model


@contextmanager
def scaled_rope(model: Llama, method: str, factor: float, original: int | None = None):
    """`with scaled_rope(model, "yarn", 2.0, 8192):` runs the block with that scaling, then restores
    the model's own `rope_scaling`, even if the block raises."""
    saved = model.config.rope_scaling
    try:
        yield set_scaling(model, method, factor, original)
    finally:
        model.config.rope_scaling = saved


@torch.no_grad()
def nll_by_position(model: Llama, windows: torch.Tensor, positions: torch.Tensor | None = None,
                    batch: int = 8, head_chunk: int = 2048) -> torch.Tensor:
    """(N,) mean next-token NLL at each position over the windows (n, N + 1), one forward pass per batch.

    The output head runs `head_chunk` positions at a time: SmolLM2's logits for 16k tokens would be 3 GiB.
    """
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be (n, N + 1) token ids with N >= 1, got {tuple(windows.shape)}")
    total = torch.zeros(windows.shape[1] - 1)
    device = next(model.parameters()).device
    for rows in windows.to(device).split(batch):
        hidden = model.hidden_states(rows[:, :-1], positions=positions)  # (b, N, dim)
        for start in range(0, hidden.shape[1], head_chunk):
            logits = model.lm_head(hidden[:, start:start + head_chunk]).float()  # (b, chunk, V)
            targets = rows[:, 1 + start:1 + start + logits.shape[1]]
            total[start:start + logits.shape[1]] += F.cross_entropy(logits.transpose(1, 2), targets,
                                                                    reduction="none").sum(0).cpu()
    return total / len(windows)


def eval_windows(stream: torch.Tensor, seq_len: int, n: int) -> torch.Tensor:
    """(n, seq_len + 1) evenly spaced windows of `stream` (deterministic)."""
    if len(stream) < seq_len + 2 or n <= 0:
        raise ValueError(f"need n > 0 windows of {seq_len} + 1 tokens inside a stream of {len(stream)}, got n={n}")
    starts = torch.linspace(0, len(stream) - seq_len - 2, n).long()
    return torch.stack([stream[s:s + seq_len + 1] for s in starts.tolist()])


def binned_perplexity(nll: torch.Tensor, bin_size: int) -> list[float]:
    """Perplexity exp(mean NLL) over consecutive bins of `bin_size` positions."""
    if bin_size <= 0:
        raise ValueError(f"bin_size must be positive, got {bin_size}")
    return [math.exp(chunk.mean().item()) for chunk in nll.split(bin_size)]


def perplexity_by_position(model: Llama, windows: torch.Tensor, *, factor: float, original: int | None = None,
                           methods=ROPE_TYPES, bin_size: int = 32, batch: int = 8, progress: bool = False):
    """{method: perplexity per bin of `bin_size` positions} over windows (n, N + 1) read in one pass each.

    Each method stretches RoPE by `factor` from the trained length `original` (the model's own by
    default); dynamic NTK therefore scales for the window's whole length N at every position.
    """
    from tqdm.auto import tqdm

    result = {}
    for method in tqdm(methods, desc="RoPE scalings", disable=not progress):
        with scaled_rope(model, method, factor, original):
            result[method] = binned_perplexity(nll_by_position(model, windows, batch=batch), bin_size)
    return result


def finetune_tiny(model: Llama, stream: torch.Tensor, *, method: str, factor: float, seq_len: int, steps: int,
                  batch: int = 8, lr: float = 1e-3, seed: int = 1) -> list[float]:
    """Fine-tune every weight of the tiny model at `seq_len` tokens with RoPE scaling `method` (as the PI and
    YaRN papers do); the scaling stays switched on afterwards."""
    set_scaling(model, method, factor, tiny.TRAIN_LEN)
    return train(model, tiny.batches(stream, seq_len, batch, seed), steps=steps, lr=lr, warmup=min(10, steps),
                 seed=seed, desc=f"fine-tune {METHOD_NAMES[method]} at {seq_len}")


# ---------------------------------------------------------------------------------------------
# The PI / YaRN figure on SmolLM2, recorded by a command.

def rope_buckets_record(model: Llama, tokenizer, *, length: int, bin_size: int = 256, factor: float | None = None,
                        methods=ROPE_TYPES, progress: bool = True) -> dict:
    """Perplexity by position of `length` tokens of `data.unseen_span` under every RoPE scaling, no fine-tuning.

    factor defaults to length / L (the smallest stretch that covers the span; 1 inside L). Returns a
    record: settings, the span, and per method the mean NLL per bin of `bin_size` positions and seconds.
    """
    if length <= 0 or bin_size <= 0:
        raise ValueError(f"length and bin_size must be positive, got length={length}, bin_size={bin_size}")
    trained = model.config.max_positions
    factor = max(1.0, length / trained) if factor is None else factor
    ids = data.unseen_span(tokenizer, length + 1)
    record = {"span": data.UNSEEN_SPAN, "span_start_token": data.heading_start(tokenizer, data.UNSEEN_SPAN),
              "length": length, "bin_size": bin_size, "factor": factor, "trained_length": trained,
              "nll_per_bin": {}, "seconds": {}}
    for method in methods:
        start = time.perf_counter()
        with scaled_rope(model, method, factor, trained):
            nll = nll_by_position(model, ids, batch=1)
        record["nll_per_bin"][method] = [chunk.mean().item() for chunk in nll.split(bin_size)]
        record["seconds"][method] = round(time.perf_counter() - start, 1)
        if progress:
            print(f"{METHOD_NAMES[method]}: {record['seconds'][method]:.0f} s", flush=True)
    return record


def bucket_perplexity(nll_per_bin: list[float], bin_size: int, bucket: int) -> list[float]:
    """Perplexity per bucket of `bucket` positions from mean NLLs per bin of `bin_size` (bucket a multiple of it)."""
    if bucket % bin_size:
        raise ValueError(f"bucket={bucket} must be a multiple of bin_size={bin_size}")
    per = bucket // bin_size
    return [math.exp(sum(nll_per_bin[i:i + per]) / len(nll_per_bin[i:i + per])) for i in range(0, len(nll_per_bin), per)]


def load_record(path=ROPE_BUCKETS) -> dict:
    """A record written by `python -m lectlib.lengths buckets`."""
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `python -m lectlib.lengths buckets` to record it")
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------
# Skipped positions (PoSE) on SmolLM2.

def pose_positions(n: int, jump_at: int, offset: int) -> torch.Tensor:
    """(n,) positions 0..jump_at-1, then jump_at + offset onward: PoSE's skip of `offset` ids."""
    if not 0 < jump_at < n or offset < 0:
        raise ValueError(f"need 0 < jump_at < n and offset >= 0, got n={n}, jump_at={jump_at}, offset={offset}")
    pos = torch.arange(n)
    return torch.where(pos < jump_at, pos, pos + offset)


def pose_sweep(model: Llama, windows: torch.Tensor, *, jump_at: int, offsets, original: int, factor: float,
               methods=ROPE_TYPES) -> dict[str, list[float]]:
    """{method: [perplexity of the tokens after the jump, per offset]} with skipped positions.

    The tokens after the jump attend to the first `jump_at` tokens at distances offset + 1 ..
    offset + n; the largest position id, offset + n - 1, is what dynamic NTK scales for.
    """
    n = windows.shape[1] - 1
    result = {}
    for method in methods:
        with scaled_rope(model, method, factor, original):
            result[method] = [math.exp(nll_by_position(model, windows, pose_positions(n, jump_at, o), batch=2)[jump_at:]
                                       .mean().item()) for o in offsets]
    return result


def split_answer(tokenizer, answer: str) -> tuple[list[int], list[int]]:
    """(forced prefix, key tokens) of " " + answer in the tokenizer's own spelling.

    SmolLM2 writes " 68301" as a lone space token, then one token per digit: the space is the
    prefix that ends where the key starts, the digits are what retrieval must produce.
    """
    ids = tokenizer.encode(" " + answer, add_special_tokens=False)
    n_space = 0
    while n_space < len(ids) - 1 and not tokenizer.decode(ids[:n_space + 1]).strip():
        n_space += 1
    return ids[:n_space], ids[n_space:]


@torch.no_grad()
def forced_key_score(model: Llama, prompt_ids: torch.Tensor, prefix: list[int], key: list[int],
                     positions: torch.Tensor | None = None) -> tuple[float, bool]:
    """(log-probability of `key`, whether greedy decoding writes it) after prompt (1, N) + forced `prefix`.

    Teacher forcing: one forward over prompt + prefix + key[:-1]; the key is retrieved by greedy
    decoding exactly when each key token is the argmax at its place. `positions` (N,) places the
    prompt; the forced tokens continue from positions[-1] + 1.
    """
    if prompt_ids.dim() != 2 or prompt_ids.shape[0] != 1 or prompt_ids.shape[1] == 0:
        raise ValueError(f"prompt_ids must be (1, N) with N >= 1, got {tuple(prompt_ids.shape)}")
    if not key:
        raise ValueError("key must hold at least one token")
    prompt_ids = prompt_ids.to(next(model.parameters()).device)
    forced = torch.tensor(prefix + key, dtype=prompt_ids.dtype, device=prompt_ids.device)[None]
    ids = torch.cat([prompt_ids, forced[:, :-1]], dim=1)
    if positions is not None:
        tail = positions[-1] + 1 + torch.arange(forced.shape[1] - 1, device=positions.device)
        positions = torch.cat([positions, tail])
    logits = model(ids, positions=positions)[0, -len(key):].float()  # (K, V): the predictions of the key tokens
    targets = torch.tensor(key, device=logits.device)
    logprob = logits.log_softmax(-1).gather(1, targets[:, None]).sum().item()
    return logprob, bool((logits.argmax(-1) == targets).all())


def pose_passkey(model: Llama, tokenizer, *, length: int, offsets, original: int, factor: float,
                 methods=ROPE_TYPES, trials: int = 5, depth: float = 0.25, seed: int = 0) -> dict[str, dict]:
    """{method: {"accuracy": [...], "logprob": [...]}} per offset: passkey retrieval with skipped positions.

    Each prompt (`lectlib.evals.passkey_prompt`) hides a passkey at `depth` of about `length` tokens,
    in the first half; the second half, the question included, carries position ids shifted by
    `offset`, so the answer lies more than `offset` positions before the question. The key is scored
    after the forced prefix that ends where it starts (`split_answer`), not by free generation, whose
    first token may be a word ("the") rather than the key: accuracy is the share of prompts whose key
    greedy decoding writes, logprob the mean log-probability of the key's tokens.
    """
    from . import evals

    prompts = [evals.passkey_prompt(tokenizer, length, depth, seed=seed + t) for t in range(trials)]
    result = {}
    for method in methods:
        accuracy, logprob = [], []
        with scaled_rope(model, method, factor, original):
            for offset in offsets:
                scores = []
                for ids, answer in prompts:
                    n = ids.shape[1]
                    prefix, key = split_answer(tokenizer, answer)
                    scores.append(forced_key_score(model, ids, prefix, key, pose_positions(n, n // 2, offset)))
                accuracy.append(sum(hit for _, hit in scores) / trials)
                logprob.append(sum(lp for lp, _ in scores) / trials)
        result[method] = {"accuracy": accuracy, "logprob": logprob}
    return result


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lectlib.lengths", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["buckets"],
                        help=f"buckets: record SmolLM2's perplexity by position into {ROPE_BUCKETS.relative_to(data.DATA.parent)}")
    parser.add_argument("--length", type=int, default=16384, help="tokens of the span read in one pass")
    parser.add_argument("--bin-size", type=int, default=256)
    parser.add_argument("--factor", type=float, default=None, help="RoPE stretch s (default: length / 8192)")
    parser.add_argument("--methods", nargs="+", default=list(ROPE_TYPES), choices=ROPE_TYPES)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROPE_BUCKETS))
    args = parser.parse_args(argv)
    from pathlib import Path

    from . import models, runtime
    from .bench import environment

    torch.set_num_threads(args.threads)
    model, tokenizer = models.load(device=runtime.device())
    start = time.perf_counter()
    record = {"machine": f"{platform.machine()} {platform.processor() or ''} {torch.get_num_threads()} threads".strip(),
              "device": environment()["device"],
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "versions": {"torch": torch.__version__, "python": platform.python_version()},
              "model": "SmolLM2-135M-Instruct (lectlib.models.load, fp32)",
              "command": "python -m lectlib.lengths buckets " + " ".join((argv or __import__("sys").argv[1:])[1:])}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for method in args.methods:  # written after each method, so a long run leaves what it measured
        part = rope_buckets_record(model, tokenizer, length=args.length, bin_size=args.bin_size,
                                   factor=args.factor, methods=[method])
        for key in ("nll_per_bin", "seconds"):
            part[key] = {**record.get(key, {}), **part[key]}
        record.update(part)
        record["total_seconds"] = round(time.perf_counter() - start, 1)
        out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out} in {record['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
