"""The synthetic tasks of the Mamba paper (Sec. 4.1) that show why selectivity matters.

- Selective copying (Jing et al. 2019; Mamba Fig. 2): a few data tokens lie at random places in a
  sequence of noise tokens; at the end the model must reproduce them in order. Fixed spacing
  (the plain copying task) is solved by any LTI convolution; random spacing needs a model that
  decides per token what to keep — content-aware, "selective" — memory.
- Induction heads (Olsson et al. 2022): a trigger token appears once, followed by an answer token;
  when the trigger appears again at the end, the model must output that answer. Associative
  recall in its simplest form; trained at one length, tested at longer ones (extrapolation).
- Multi-query associative recall (MQAR; Arora et al. 2023, "Zoology"): several key-value pairs,
  then several of the keys again, each asking for its value. A model with a fixed-size state
  must hold every pair at once; attention looks the key up. The harder, many-pair version of
  induction heads, and the task where pure SSMs trail attention as the pairs grow.

Every generator returns (inputs, targets), two (B, L) int64 tensors for next-token training
(`lectlib.train.lm_loss`): targets are -100 except where the task asks a question.
"""

import argparse
import json
import time

import torch

from .jamba import Jamba, JambaConfig
from .llama import Llama, LlamaConfig
from .ssm import MambaConfig, MambaLM
from .train import train

IGNORE = -100


def _check(**values) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def selective_copying_vocab(n_tokens: int) -> int:
    """Vocabulary of `selective_copying`: 0 is noise, 1…n_tokens are data, n_tokens+1 the copy marker."""
    return n_tokens + 2


def selective_copying(batch: int, *, seq_len: int, n_memorize: int, n_tokens: int, generator=None):
    """Selective copying: (inputs, targets) of shape (batch, seq_len + n_memorize).

    inputs = seq_len tokens, all noise (0) except `n_memorize` data tokens (1…n_tokens) at random
    sorted positions, then `n_memorize` copy markers (n_tokens + 1). At the i-th marker the target
    is the i-th data token; everywhere else -100.
    """
    _check(batch=batch, seq_len=seq_len, n_memorize=n_memorize, n_tokens=n_tokens)
    if n_memorize > seq_len:
        raise ValueError(f"n_memorize={n_memorize} data tokens do not fit in seq_len={seq_len}")
    data = torch.randint(1, n_tokens + 1, (batch, n_memorize), generator=generator)
    places = torch.rand(batch, seq_len, generator=generator).argsort(1)[:, :n_memorize].sort(1).values
    context = torch.zeros(batch, seq_len, dtype=torch.long).scatter(1, places, data)
    markers = torch.full((batch, n_memorize), n_tokens + 1, dtype=torch.long)
    inputs = torch.cat([context, markers], 1)
    targets = torch.cat([torch.full((batch, seq_len), IGNORE), data], 1)
    return inputs, targets


def induction_heads_vocab(n_tokens: int) -> int:
    """Vocabulary of `induction_heads`: 0…n_tokens-1 are ordinary tokens, n_tokens the trigger."""
    return n_tokens + 1


def induction_heads(batch: int, *, seq_len: int, n_tokens: int, generator=None):
    """Induction heads: (inputs, targets) of shape (batch, seq_len).

    Random tokens (0…n_tokens-1); the trigger (n_tokens) at one random position p < seq_len - 2,
    followed by the answer at p + 1; the last input is the trigger again and its target is the
    answer (every other target is -100).
    """
    _check(batch=batch, seq_len=seq_len, n_tokens=n_tokens)
    if seq_len < 4:
        raise ValueError(f"seq_len must be at least 4, got {seq_len}")
    inputs = torch.randint(0, n_tokens, (batch, seq_len), generator=generator)
    trigger = torch.randint(0, seq_len - 3, (batch,), generator=generator)
    rows = torch.arange(batch)
    inputs[rows, trigger] = n_tokens
    inputs[:, -1] = n_tokens
    targets = torch.full((batch, seq_len), IGNORE)
    targets[:, -1] = inputs[rows, trigger + 1]
    return inputs, targets


def mqar_vocab(n_keys: int, n_values: int) -> int:
    """Vocabulary of `mqar`: keys are 0…n_keys-1, values n_keys…n_keys+n_values-1."""
    return n_keys + n_values


def mqar(batch: int, *, n_pairs: int, n_queries: int | None = None, n_keys: int, n_values: int, generator=None):
    """Multi-query associative recall: (inputs, targets) of shape (batch, 2·n_pairs + n_queries).

    inputs = n_pairs pairs "key value" with distinct keys (0…n_keys-1) and random values
    (n_keys…n_keys+n_values-1), then `n_queries` of those keys in random order (all of them by
    default). The target at each queried key is its value; everywhere else -100.
    """
    n_queries = n_pairs if n_queries is None else n_queries
    _check(batch=batch, n_pairs=n_pairs, n_queries=n_queries, n_keys=n_keys, n_values=n_values)
    if n_pairs > n_keys:
        raise ValueError(f"n_pairs={n_pairs} distinct keys do not fit in n_keys={n_keys}")
    if n_queries > n_pairs:
        raise ValueError(f"n_queries={n_queries} must be at most n_pairs={n_pairs} (each asks for one pair)")
    keys = torch.rand(batch, n_keys, generator=generator).argsort(1)[:, :n_pairs]
    values = torch.randint(n_keys, n_keys + n_values, (batch, n_pairs), generator=generator)
    asked = torch.rand(batch, n_pairs, generator=generator).argsort(1)[:, :n_queries]
    pairs = torch.stack([keys, values], 2).flatten(1)  # k1 v1 k2 v2 …
    inputs = torch.cat([pairs, keys.gather(1, asked)], 1)
    targets = torch.cat([torch.full((batch, 2 * n_pairs), IGNORE), values.gather(1, asked)], 1)
    return inputs, targets


@torch.no_grad()
def accuracy(model, inputs: torch.Tensor, targets: torch.Tensor, *, batch_size: int = 256) -> float:
    """Fraction of the asked positions (targets != -100) where argmax model(inputs) is the target."""
    if inputs.shape != targets.shape:
        raise ValueError(f"inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} must have one shape")
    was_training = model.training
    model.eval()
    correct = total = 0
    for start in range(0, inputs.shape[0], batch_size):
        x, y = inputs[start:start + batch_size], targets[start:start + batch_size]
        asked = y != IGNORE
        predicted = model(x).argmax(-1)
        correct += int((predicted[asked] == y[asked]).sum())
        total += int(asked.sum())
    model.train(was_training)
    return correct / max(total, 1)


def small_models(vocab_size: int, *, d_model: int = 32, n_layers: int = 2, d_state: int = 8, seed: int = 0) -> dict:
    """The three models the chapter compares, of similar size: a selective Mamba, the same Mamba
    with Δ, B, C fixed (LTI) and a Transformer (lectlib's Llama, RoPE, 4 heads)."""
    torch.manual_seed(seed)
    mamba = MambaLM(MambaConfig(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, d_state=d_state))
    torch.manual_seed(seed)
    lti = MambaLM(MambaConfig(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, d_state=d_state,
                              selective=False))
    torch.manual_seed(seed)
    attention = Llama(LlamaConfig(vocab_size=vocab_size, dim=d_model, n_layers=n_layers, n_heads=4, n_kv_heads=4,
                                  head_dim=d_model // 4, hidden_dim=2 * d_model, rope_theta=10000.0,
                                  max_positions=1 << 16))
    return {"Mamba (selective)": mamba, "LTI SSM": lti, "Transformer": attention}


def recall_models(vocab_size: int, *, d_model: int = 32, d_state: int = 8, depths=(2,), hybrid: bool = True,
                  seed: int = 0) -> dict:
    """The models the MQAR experiment compares: pure Mamba stacks of each depth in `depths`, and (with
    `hybrid`) a 2-layer Jamba-style hybrid of the same width and state size (one Mamba layer, one
    attention layer without positions, an MLP after each, no MoE)."""
    models = {}
    for depth in depths:
        torch.manual_seed(seed)
        models[f"Mamba ({depth} layers)"] = MambaLM(MambaConfig(vocab_size=vocab_size, d_model=d_model,
                                                                n_layers=depth, d_state=d_state))
    if not hybrid:
        return models
    torch.manual_seed(seed)
    models["Hybrid (Mamba + attention)"] = Jamba(JambaConfig(
        vocab_size=vocab_size, d_model=d_model, n_layers=2, attn_period=2, attn_offset=1, moe_period=3,
        moe_offset=2, n_heads=4, n_kv_heads=4, hidden_dim=2 * d_model, d_state=d_state))
    return models


def mqar_sweep(models: dict, pairs, *, steps: int, n_keys: int, n_values: int, batch: int = 32, lr: float = 1e-2,
               test_size: int = 256, seed: int = 0) -> list[dict]:
    """Train each model on MQAR with the number of pairs cycling through `pairs` (one count per batch),
    then test it at every count: rows {model, parameters, n_pairs, accuracy, train_seconds}."""
    rows = []
    for name, model in models.items():
        g = torch.Generator().manual_seed(seed + 1)
        start = time.perf_counter()
        train(model, lambda step: mqar(batch, n_pairs=pairs[step % len(pairs)], n_keys=n_keys, n_values=n_values,
                                       generator=g), steps=steps, lr=lr, seed=seed, desc=name)
        seconds = time.perf_counter() - start
        for n in pairs:
            test = mqar(test_size, n_pairs=n, n_keys=n_keys, n_values=n_values,
                        generator=torch.Generator().manual_seed(10_000 + seed * 100 + n))
            rows.append(dict(model=name, parameters=sum(p.numel() for p in model.parameters()), n_pairs=n,
                             accuracy=accuracy(model, *test), train_seconds=round(seconds, 1)))
    return rows


MQAR_BOOK = dict(pairs=[2, 4, 8, 16, 32], steps=700, n_keys=32, n_values=32, depths=(2,), seeds=(0,))


def main(argv=None) -> None:
    """`python -m lectlib.synthetic mqar`: the book-scale MQAR sweep, recorded to data/results/mqar.json."""
    from .bench import RESULTS, environment

    parser = argparse.ArgumentParser(prog="python -m lectlib.synthetic", description=main.__doc__)
    parser.add_argument("command", choices=["mqar"])
    parser.add_argument("--steps", type=int, default=MQAR_BOOK["steps"])
    parser.add_argument("--pairs", type=int, nargs="+", default=MQAR_BOOK["pairs"])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(MQAR_BOOK["seeds"]))
    parser.add_argument("--depths", type=int, nargs="*", default=list(MQAR_BOOK["depths"]),
                        help="pure Mamba depths to train (none: only the hybrid)")
    parser.add_argument("--no-hybrid", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS / "mqar.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = dict(pairs=args.pairs, steps=args.steps, n_keys=MQAR_BOOK["n_keys"], n_values=MQAR_BOOK["n_values"],
                    depths=args.depths, hybrid=not args.no_hybrid, d_model=32, d_state=8, batch=32, lr=1e-2)
    start = time.perf_counter()
    rows = []
    for seed in args.seeds:
        models = recall_models(mqar_vocab(settings["n_keys"], settings["n_values"]), depths=args.depths,
                               hybrid=not args.no_hybrid, seed=seed)
        rows += [dict(seed=seed, **r) for r in mqar_sweep(models, args.pairs, steps=args.steps, n_keys=settings["n_keys"],
                                                          n_values=settings["n_values"], seed=seed)]
        print(json.dumps(rows[-len(models) * len(args.pairs):]), flush=True)
    settings["seconds"] = round(time.perf_counter() - start)
    out = {"experiment": "mqar", "environment": environment(), "settings": settings, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(f"recorded {len(rows)} rows to {args.out} in {settings['seconds']} s")


if __name__ == "__main__":
    main()
