"""The KV-compression experiments: one leaderboard, the tokens each policy keeps, and what it costs.

Protocol (as in NVIDIA kvpress): a prompt is read whole (full attention at prefill), the cache
compresses it to a budget, and the continuation is scored through the compressed cache:
- perplexity: a context of King James text (never Genesis 1), then the next `continuation`
  tokens, fed in one chunk, whose next-token NLLs are averaged;
- retrieval (passkey, needle, key-value): the prompt INCLUDING the question is compressed (so a
  query-aware policy like SnapKV sees the question, as in kvpress), then the answer prefix and
  the answer are fed teacher-forced; retrieved = every answer token is the greedy choice.
The prefill is the same for every policy, so it runs once per prompt (`prefill_record`) and each
policy replays it (`compress`): the cache gets the same update/attention calls the model makes.

Command: `python -m lectlib.compression leaderboard` writes data/results/kv_leaderboard.json
(`--scale ci` for a small live run); `cost` writes data/results/kv_cost.json.
"""

import argparse
import json
import math
import time
from pathlib import Path

import torch

from . import kv, runtime
from .kvquant import QuantizedCache
from .quest import QuestCache

RESULTS = Path(__file__).resolve().parents[1] / "data" / "results"
BUDGET_METHODS = ("window", "sinks+window", "H2O", "TOVA", "SnapKV", "key-norm", "Quest")


def make_cache(method: str, budget: float, n_tokens: int) -> kv.KVCache:
    """The cache of `method` at `budget` (a ratio of the n_tokens of the prompt); keys keep text positions.

    Quest's budget is the share of pages each query reads (it holds everything); "KIVI-2" and
    "KIVI-4" (and "-r0": no full-precision residual) ignore the budget.
    """
    if not 0 < budget <= 1:
        raise ValueError(f"budget must be a ratio in (0, 1], got {budget}")
    tokens = max(1, round(budget * n_tokens))
    if method == "full":
        return kv.KVCache()
    if method == "window":
        return kv.RecentCache(budget)
    if method == "sinks+window":
        return kv.RecentCache(budget, sinks=4)
    if method == "H2O":
        return kv.H2OCache(budget)
    if method == "TOVA":
        return kv.TOVACache(budget)
    if method == "SnapKV":
        return kv.SnapKVCache(budget, window=min(16, tokens))
    if method == "key-norm":
        return kv.KeyNormCache(budget)
    if method == "Quest":
        return QuestCache(max(1, round(budget * n_tokens / 16)), page_size=16)
    if method.startswith("KIVI-"):
        bits, _, residual = method[5:].partition("-r")
        return QuantizedCache(int(bits), group_size=32, residual=int(residual or 32))
    raise ValueError(f"method must be 'full', one of {BUDGET_METHODS} or 'KIVI-<bits>[-r<residual>]', got {method!r}")


class _Recorder(kv.KVCache):
    """The full cache, which also keeps every layer's rotated queries and keys."""

    def __init__(self):
        super().__init__()
        self.rotated: dict[int, tuple[torch.Tensor, torch.Tensor, float]] = {}

    def observe(self, layer, q, k, scale):
        self.rotated[layer] = (q, k, scale)


@torch.no_grad()
def prefill_record(model, input_ids: torch.Tensor) -> dict:
    """Read `input_ids` (1, N) once with the full cache: per layer the un-rotated k, v, the rotated q, k,
    and the last position's logits (the first prediction after the prompt, the same for every policy)."""
    recorder = _Recorder()
    with kv.attach(model, recorder):
        logits = model(input_ids, cache=recorder)[:, -1].float()
    return {"keys": recorder.keys, "values": recorder.values, "rotated": recorder.rotated,
            "positions": recorder.text_positions[0], "last_logits": logits}


def _skip_output(q, k, v, *, causal, scale):
    return None  # the prompt's outputs are the full cache's: replaying needs only the cache's side effects


@torch.no_grad()
def compress(cache: kv.KVCache, record: dict) -> kv.KVCache:
    """Feed `cache` the prompt of `record` as the model would (update, then attention, per layer)."""
    for layer in sorted(record["keys"]):
        cache.update(layer, record["keys"][layer], record["values"][layer], record["positions"])
        q, k_rot, scale = record["rotated"][layer]
        cache.attention(layer, q, k_rot, record["values"][layer], causal=True, scale=scale, attn_fn=_skip_output)
    return cache


@torch.no_grad()
def continuation_logprobs(model, record: dict, cache: kv.KVCache, ids: list[int]) -> torch.Tensor:
    """(len(ids), vocab) log-probabilities of each token of `ids` fed after the compressed prompt."""
    with kv.attach(model, cache):
        device = record["last_logits"].device
        logits = model(torch.tensor([ids[:-1]], device=device), cache=cache)[0].float() if len(ids) > 1 else None
    rows = record["last_logits"] if logits is None else torch.cat([record["last_logits"], logits])
    return torch.log_softmax(rows, dim=-1)


def held_bytes(cache: kv.KVCache) -> tuple[int, int]:
    """(bytes held, bytes the last step read): Quest reads fewer than it holds, every other policy reads all."""
    held = cache.nbytes()
    return held, cache.bytes_read() if isinstance(cache, QuestCache) else held


def score_prompt(model, task: str, ids: torch.Tensor, answer, methods, budgets, *, progress=None) -> list[dict]:
    """Rows {task, method, budget, bytes, bytes_read, nll | retrieved} for one prompt and every method × budget.

    task "perplexity": `answer` is the list of continuation token ids; otherwise a Probe-like
    object with prefix, answer (token ids) and spans.
    """
    record = prefill_record(model, ids.to(next(model.parameters()).device))
    n = ids.shape[1]
    full_bytes = None
    rows = []
    configs = [("full", 1.0)] + [(m, b) for m in methods if not m.startswith("KIVI") for b in budgets] + \
              [(m, 1.0) for m in methods if m.startswith("KIVI")]
    for method, budget in configs:
        start = time.perf_counter()
        cache = compress(make_cache(method, budget, n), record)
        held, read = held_bytes(cache)
        full_bytes = full_bytes or held
        row = {"task": task, "method": method, "budget": budget, "bytes": held, "bytes_read": read,
               "bytes_ratio": held / full_bytes, "read_ratio": read / full_bytes}
        if task == "perplexity":
            logp = continuation_logprobs(model, record, cache, answer)
            row["nll"] = float(-logp.gather(1, torch.tensor(answer, device=logp.device)[:, None]).mean())
        else:
            feed = list(answer.prefix) + list(answer.answer)
            logp = continuation_logprobs(model, record, cache, feed)[len(answer.prefix):]
            greedy = (logp.argmax(-1) == torch.tensor(answer.answer, device=logp.device)).tolist()
            row["retrieved"] = sum(all(greedy[a:b]) for a, b in answer.spans) / len(answer.spans)
        if isinstance(cache, QuestCache):  # bytes read while scoring the continuation
            row["bytes_read"] = cache.bytes_read()
            row["read_ratio"] = row["bytes_read"] / full_bytes
        row["seconds"] = time.perf_counter() - start
        rows.append(row)
        if progress:
            progress(row)
    return rows


def perplexity_prompts(tokenizer, *, context: int, continuation: int, count: int):
    """`count` (ids (1, context), continuation ids) pairs spread over the King James text after Genesis 1."""
    from . import data

    stream = data.tokens(tokenizer)
    starts = torch.linspace(0.1 * len(stream), 0.9 * len(stream) - context - continuation, count).long().tolist()
    return [(stream[s:s + context][None], stream[s + context:s + context + continuation].tolist()) for s in starts]


def retrieval_prompts(tokenizer, *, length: int, count: int, seed: int = 0):
    """(task, ids, probe) triples: passkey and needle at `count` depths, key-value at `count` positions."""
    from . import evals

    pairs = max(2, (length - 100) // 70)  # a line "key": "value" of two UUIDs is about 70 tokens
    out = []
    for i in range(count):
        depth = (i + 0.5) / count
        probe = evals.passkey_probe(tokenizer, length, depth, seed=seed + i)
        out.append(("passkey", probe.prompt, probe))
        probe, _ = evals.needle_probe(tokenizer, length, depth, seed=seed + i)
        out.append(("needle", probe.prompt, probe))
        probe = evals.kv_probe(tokenizer, pairs, min(pairs - 1, int(depth * pairs)), seed=seed + i)
        out.append(("key-value", probe.prompt, probe))
    return out


SETTINGS = {
    "ci": {"context": 256, "continuation": 32, "count": 1, "budgets": [0.1, 0.3], "length": 256},
    "book": {"context": 512, "continuation": 64, "count": 2, "budgets": [0.05, 0.2, 0.5], "length": 512},
    "gpu": {"context": 4096, "continuation": 64, "count": 8, "budgets": [0.05, 0.1, 0.2, 0.35, 0.5], "length": 4096},
}
METHODS = BUDGET_METHODS + ("KIVI-2", "KIVI-4", "KIVI-2-r0", "KIVI-4-r0")


def leaderboard(model, tokenizer, *, scale: str, tasks=("perplexity", "passkey", "needle", "key-value"),
                path: Path | None = None, log=print) -> dict:
    """Every method × budget on the scale's prompts; writes the record to `path` after each prompt."""
    from .bench import environment

    s = SETTINGS[scale]
    record = {"name": "kv_leaderboard", "environment": environment(), "scale": scale, "settings": s,
              "model": "SmolLM2-135M-Instruct", "methods": list(METHODS), "rows": []}
    if path and path.exists():
        old = json.loads(path.read_text())
        if old.get("scale") == scale:
            record["rows"] = [r for r in old["rows"] if r["task"] not in tasks]
    text = [("perplexity", ids, cont) for ids, cont in
            perplexity_prompts(tokenizer, context=s["context"], continuation=s["continuation"], count=s["count"])]
    retrieval = retrieval_prompts(tokenizer, length=s["length"], count=s["count"]) if set(tasks) - {"perplexity"} else []
    prompts = [p for i in range(s["count"]) for p in [text[i]] + retrieval[3 * i:3 * i + 3] if p[0] in tasks]
    start = time.perf_counter()
    for i, (task, ids, answer) in enumerate(prompts):
        rows = score_prompt(model, task, ids, answer, METHODS, s["budgets"])
        for r in rows:
            r["prompt"] = i
        record["rows"] += rows
        record["seconds"] = time.perf_counter() - start
        log(f"[{time.perf_counter() - start:7.0f} s] prompt {i + 1}/{len(prompts)} ({task}, {ids.shape[1]} tokens) done")
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(record, indent=0))
    return record


def summary(rows: list[dict]) -> list[dict]:
    """One row per (method, budget): mean bytes ratio, perplexity (exp of the mean NLL) and each retrieval accuracy."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["budget"]), []).append(r)
    out = []
    for (method, budget), rs in groups.items():
        row = {"method": method, "budget": budget,
               "bytes_ratio": sum(r["bytes_ratio"] for r in rs) / len(rs),
               "read_ratio": sum(r["read_ratio"] for r in rs) / len(rs)}
        nll = [r["nll"] for r in rs if "nll" in r]
        if nll:
            row["perplexity"] = math.exp(sum(nll) / len(nll))
        for task in ("passkey", "needle", "key-value"):
            got = [r["retrieved"] for r in rs if r["task"] == task]
            if got:
                row[task] = sum(got) / len(got)
        out.append(row)
    return out


@torch.no_grad()
def cost(model, tokenizer, *, lengths, methods=("full",) + BUDGET_METHODS + ("KIVI-2",), budget: float = 0.2,
         steps: int = 8, log=print) -> list[dict]:
    """Rows {method, length, bytes, seconds_per_token}: decode `steps` tokens after a KJV prompt of each length
    compressed to `budget`; the median step time (synchronized on a GPU)."""
    from . import data

    device = next(model.parameters()).device
    rows = []
    for length in lengths:
        ids = data.window(tokenizer, length, start=200_000).to(device)
        record = prefill_record(model, ids)
        for method in methods:
            cache = compress(make_cache(method, 1.0 if method == "full" else budget, length), record)
            token = record["last_logits"].argmax(-1, keepdim=True)
            times = []
            with kv.attach(model, cache):
                for _ in range(steps):
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    token = model(token, cache=cache)[:, -1].argmax(-1, keepdim=True)
                    if device.type == "cuda":
                        torch.cuda.synchronize()
                    times.append(time.perf_counter() - start)
            held, read = held_bytes(cache)
            rows.append({"method": method, "length": length, "budget": budget, "bytes": held, "bytes_read": read,
                         "seconds_per_token": sorted(times)[len(times) // 2]})
            log(f"cost {method} at {length} tokens: {rows[-1]['seconds_per_token'] * 1e3:.1f} ms/token, {held / 2**20:.1f} MiB")
    return rows


COST_LENGTHS = {"ci": [128, 256], "book": [512, 1024, 2048], "gpu": [1024, 4096, 8192]}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lectlib.compression", description=__doc__.splitlines()[0])
    parser.add_argument("experiment", choices=["leaderboard", "cost"])
    parser.add_argument("--scale", default=runtime.scale(), choices=list(SETTINGS))
    parser.add_argument("--tasks", default="perplexity,passkey,needle,key-value")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    from .models import load

    torch.set_grad_enabled(False)
    model, tokenizer = load(device=runtime.device())
    if args.experiment == "cost":
        from .bench import environment

        rows = cost(model, tokenizer, lengths=COST_LENGTHS[args.scale])
        path = args.out or RESULTS / "kv_cost.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"name": "kv_cost", "environment": environment(), "scale": args.scale,
                                    "model": "SmolLM2-135M-Instruct", "rows": rows}, indent=0))
        return
    path = args.out or RESULTS / "kv_leaderboard.json"
    record = leaderboard(model, tokenizer, scale=args.scale, tasks=tuple(args.tasks.split(",")), path=path)
    from .bench import table

    rows = summary(record["rows"])
    columns = ["method", "budget", "bytes_ratio", "read_ratio"] + \
              [c for c in ("perplexity", "passkey", "needle", "key-value") if c in rows[0]]
    print(table(rows, columns))


if __name__ == "__main__":
    main()
