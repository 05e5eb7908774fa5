"""Evaluating long context: perplexity, and retrieval tests that show whether a model uses it.

Perplexity over a window is exp of the mean next-token cross-entropy,
    PPL = exp(-(1/(N-1)) Σ_t log p(x_t | x_<t)),
the model's average surprise per token; lower is better. It rewards local fluency, so the
retrieval tests ask for one specific distant fact instead:
- passkey retrieval (Mohtashami & Jaggi 2023): a number hidden in filler;
- needle in a haystack (Kamradt 2023): a sentence hidden in a real long text (lectlib.data);
- key-value retrieval from "Lost in the Middle" (Liu et al. 2023): one UUID pair among N;
- passage retrieval from LongBench (Bai et al. 2023), small: which numbered paragraph a quotation is from.

Retrieval is scored apart from the answer's format. A free greedy answer mixes two things: whether
the model found the fact and whether it chooses to write it (after "The pass key is" SmolLM2 often
writes " the pass key that is used to..."). So every task builds a `Probe`: the prompt, a fixed
answer prefix that ends exactly where the answer's tokens start (" " before a passkey's digits,
" You should" before the needle's " eat a sandwich..."), and the answer's tokens. `score_probe`
reads the prompt once and reports
- `retrieved`: the answer (each keyword of it) is the greedy continuation, teacher-forced: the
  grids' `accuracy` column;
- `logprob`: Σ log p(answer tokens | prompt, prefix), a graded score that moves before accuracy does;
- the free greedy answer, scored by the task's string rule: the grids' `free` column.
Grid rows hold the mean over trials (keys, haystacks, JSON objects) with its min/max.

Scoring another method (a KV-cache policy, an attention variant, scaled RoPE) with the harness:
    rows = evals.passkey_accuracy(model, tokenizer, [1024, 4096], [0.0, 0.5, 1.0], trials=5,
                                  cache_factory=lambda: MyCache(budget=256), prefill_chunk=128)
    rows = evals.needle_accuracy(model, tokenizer, ..., cache_factory=..., prefill_chunk=...)
`cache_factory()` makes a fresh lectlib KVCache (subclass) per prompt; `prefill_chunk` feeds the
prompt in chunks so the policy evicts while reading it; the answer is always fed one token at a
time, as in decoding. An attention variant goes in the model itself (lectlib's Llama's
`attn_fn` per layer, or any Hugging Face causal LM); `position_offset` shifts the prompt's
positions. One prompt at a time: `score_probe(model, tokenizer, passkey_probe(tokenizer, 4096, 0.5,
seed=1), cache=MyCache(...), positions=...)`. Compare methods on `accuracy` and `logprob` at the
same seeds; `free` only says whether the answer also comes out in the expected form.
Grids too slow for a CPU chapter are recorded by `python -m lectlib.evals record passkey|needle`
into data/results/evals_<task>.json.
"""

import copy
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .kv import KVCache

RESULTS = Path(__file__).resolve().parent.parent / "data" / "results"  # recorded grids (see `record`)


def _logits(model, input_ids, cache):
    """Logits from lectlib's Llama or a Hugging Face causal LM."""
    out = model(input_ids, cache=cache) if cache is not None else model(input_ids)
    return out.logits if hasattr(out, "logits") else out


@torch.no_grad()
def token_nlls(model, input_ids: torch.Tensor, *, chunk: int = 512, cache: KVCache | None = None) -> torch.Tensor:
    """(N-1,) negative log-likelihood of each token given all before it.

    The window is fed in chunks of `chunk` tokens through a KV cache, so the logits of only
    one chunk are in memory at once; with the full cache this equals one forward pass.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be (1, N), got {tuple(input_ids.shape)}")
    if input_ids.shape[1] < 2:
        raise ValueError(f"perplexity needs at least 2 tokens, got {input_ids.shape[1]}")
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    n = input_ids.shape[1]
    is_lectlib = isinstance(model, torch.nn.Module) and hasattr(model, "hidden_states")
    if not is_lectlib and n > chunk:
        chunk = n  # a Hugging Face model gets the window in one pass
    cache = KVCache() if is_lectlib and cache is None else cache
    nlls = []
    for start in range(0, n, chunk):
        piece = input_ids[:, start:start + chunk]
        logits = _logits(model, piece, cache)[0].float()  # (n_piece, V)
        targets = input_ids[0, start + 1:start + 1 + piece.shape[1]]
        nlls.append(F.cross_entropy(logits[:len(targets)], targets, reduction="none"))
    return torch.cat(nlls)


def perplexity(model, input_ids: torch.Tensor, *, chunk: int = 512, cache: KVCache | None = None) -> float:
    """exp(mean next-token NLL) of `input_ids` (1, N) under `model`."""
    return math.exp(token_nlls(model, input_ids, chunk=chunk, cache=cache).mean().item())


# ---------------------------------------------------------------------------------------------
# Reading a prompt and answering it: greedy generation (free) and teacher forcing (retrieval).
# Both run on lectlib's Llama (through a KV cache, the hook for compression policies) or on a
# Hugging Face causal LM (through its own cache).

def _is_lectlib(model) -> bool:
    return isinstance(model, torch.nn.Module) and hasattr(model, "hidden_states")


def _check_ids(input_ids) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a (1, N) tensor, got {shape}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids must hold at least one token, got (1, 0)")


def _forward(model, ids: torch.Tensor, positions: torch.Tensor, cache):
    """(logits (n, V) of the n tokens `ids` (1, n) at `positions` (n,), the cache after them)."""
    if _is_lectlib(model):
        return model(ids, cache=cache, positions=positions)[0], cache
    out = model(ids, position_ids=positions[None], past_key_values=cache, use_cache=True)
    return out.logits[0], out.past_key_values


@torch.no_grad()
def _read(model, input_ids, *, cache, positions, prefill_chunk):
    """Prefill: (logits (V,) after the last prompt token, the cache, the next position)."""
    _check_ids(input_ids)
    n = input_ids.shape[1]
    if positions is not None and (positions.dim() != 1 or positions.shape[0] != n):
        raise ValueError(f"positions must be ({n},), one per prompt token, got {tuple(positions.shape)}")
    if prefill_chunk is not None and prefill_chunk <= 0:
        raise ValueError(f"prefill_chunk must be positive or None, got {prefill_chunk}")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    positions = torch.arange(n, device=device) if positions is None else positions.to(device)
    cache = KVCache() if _is_lectlib(model) and cache is None else cache
    chunk = prefill_chunk or n
    for start in range(0, n, chunk):
        logits, cache = _forward(model, input_ids[:, start:start + chunk], positions[start:start + chunk], cache)
    return logits[-1], cache, int(positions[-1]) + 1


@torch.no_grad()
def _greedy(model, tokenizer, logits, cache, next_pos: int, max_new_tokens: int, stop: str | None) -> str:
    """Greedy tokens from `logits` (V,) on, decoded, until EOS, `stop` or `max_new_tokens`."""
    device = logits.device
    new: list[int] = []
    for i in range(max_new_tokens):
        token = int(logits.argmax())
        if token == tokenizer.eos_token_id:
            break
        new.append(token)
        if stop and stop in tokenizer.decode(new, skip_special_tokens=True).lstrip() or i == max_new_tokens - 1:
            break
        logits, cache = _forward(model, torch.tensor([[token]], device=device),
                                 torch.tensor([next_pos + i], device=device), cache)
        logits = logits[-1]
    text = tokenizer.decode(new, skip_special_tokens=True).strip()
    return text.split(stop)[0].strip() if stop else text


@torch.no_grad()
def _forced(model, logits, cache, next_pos: int, tokens: list[int]) -> torch.Tensor:
    """(len(tokens), V) log-probabilities predicting each of `tokens`, each fed in turn (teacher forcing).

    `logits` (V,) predict the first token; the tokens go in one at a time, as in decoding, so a
    cache policy sees the same calls as when it generates.
    """
    device = logits.device
    rows = [logits]
    for i, token in enumerate(tokens[:-1]):
        step, cache = _forward(model, torch.tensor([[token]], device=device),
                               torch.tensor([next_pos + i], device=device), cache)
        rows.append(step[-1])
    return torch.log_softmax(torch.stack(rows).float(), dim=-1)


@torch.no_grad()
def generate_answer(model, tokenizer, input_ids: torch.Tensor, *, max_new_tokens: int = 12,
                    cache: KVCache | None = None, positions: torch.Tensor | None = None,
                    stop: str | None = "\n", prefill_chunk: int | None = None) -> str:
    """Greedy continuation of the prompt `input_ids` (1, N), decoded, until EOS, `stop` or `max_new_tokens`.

    `model` is lectlib's Llama (its KV cache `cache`, a fresh full `KVCache` by default, lets a
    caller evaluate a compression policy) or a Hugging Face causal LM (its own cache). With
    `positions` (N,) the prompt sits at those positions and the answer continues from
    positions[-1] + 1, so a chapter can place a prompt beyond the trained context.
    `prefill_chunk` feeds the prompt that many tokens at a time, so a cache that evicts does so
    while reading the prompt too (as a streaming model would), not only while answering.
    """
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    logits, cache, next_pos = _read(model, input_ids, cache=cache, positions=positions, prefill_chunk=prefill_chunk)
    return _greedy(model, tokenizer, logits, cache, next_pos, max_new_tokens, stop)


@dataclass(frozen=True)
class Probe:
    """One retrieval question, split so that retrieval is scored apart from the answer's format.

    prompt: (1, N) int64, ends where a free answer starts ("... What is the pass key? The pass key is");
    prefix: token ids of the fixed answer prefix that follow the prompt and end exactly where the
        answer starts (SmolLM2 writes " 68301" as " " then five digits, so the passkey's prefix is (" ",));
    answer: token ids of the answer (the five digits); text: the answer as a string;
    spans: (start, end) slices of `answer` that must each be retrieved (keywords), all of it by default.
    """

    prompt: torch.Tensor
    prefix: tuple[int, ...]
    answer: tuple[int, ...]
    text: str
    spans: tuple[tuple[int, int], ...]


def split_answer(tokenizer, prefix: str, answer: str) -> tuple[list[int], list[int]]:
    """(prefix ids, answer ids): the tokens of prefix + answer, cut where the answer starts.

    Tokenizing the two together gives the tokens a model would write; the cut must fall on a
    token boundary (else the prefix's last token already holds part of the answer).
    """
    ids = _encode(tokenizer, prefix + answer)
    for k in range(len(ids) + 1):
        if tokenizer.decode(ids[:k]) == prefix:
            if k == len(ids):
                break
            return ids[:k], ids[k:]
    raise ValueError(f"answer {answer!r} does not start on a token boundary after the prefix {prefix!r} "
                     f"(tokens {[tokenizer.decode([i]) for i in ids]})")


def make_probe(tokenizer, prompt: torch.Tensor, prefix: str, answer: str, keywords=None) -> Probe:
    """The Probe asking `prompt` (1, N) for `answer` after the answer prefix `prefix` (text).

    `keywords` (substrings of the answer, default: the whole answer) are the parts scored as
    retrieved or not; each must cover whole tokens of the answer.
    """
    _check_ids(prompt)
    prefix_ids, answer_ids = split_answer(tokenizer, prefix, answer)
    spans = []
    for word in keywords or (answer,):
        spans.append(_token_span(tokenizer, prefix_ids, answer_ids, prefix + answer, word))
    return Probe(prompt, tuple(prefix_ids), tuple(answer_ids), answer, tuple(spans))


def _token_span(tokenizer, prefix_ids, answer_ids, full: str, word: str) -> tuple[int, int]:
    """(start, end) such that answer_ids[start:end] decodes to `word` (with its leading space if any)."""
    for start in range(len(answer_ids)):
        for end in range(start + 1, len(answer_ids) + 1):
            if tokenizer.decode(answer_ids[start:end]).strip() == word:
                return start, end
    raise ValueError(f"keyword {word!r} is not whole tokens of the answer {full!r}")


@torch.no_grad()
def score_probe(model, tokenizer, probe: Probe, *, cache: KVCache | None = None,
                positions: torch.Tensor | None = None, prefill_chunk: int | None = None,
                max_new_tokens: int = 12, stop: str | None = "\n") -> dict:
    """Retrieval and free-generation scores of one Probe: {retrieved, logprob, greedy, answer}.

    The prompt is read once (through `cache`, `positions`, `prefill_chunk` as in generate_answer);
    then, on a copy of the cache, the answer prefix and the answer are fed teacher-forced:
    - logprob: Σ log p(answer token | prompt, prefix, answer tokens before it), nats;
    - greedy: per answer token, whether it is the most likely next token (a list of bools);
    - retrieved: the fraction of `probe.spans` whose tokens are all greedy-correct (1 or 0 for
      a passkey: greedy decoding after the prefix writes exactly the key);
    - answer: the free greedy continuation of the prompt alone, for a task's own string scorer.
    """
    logits, cache, next_pos = _read(model, probe.prompt, cache=cache, positions=positions,
                                    prefill_chunk=prefill_chunk)
    forked = copy.deepcopy(cache)
    logp = _forced(model, logits, forked, next_pos, list(probe.prefix + probe.answer))[len(probe.prefix):]
    target = torch.tensor(probe.answer, device=logp.device)
    greedy = (logp.argmax(-1) == target).tolist()
    retrieved = sum(all(greedy[a:b]) for a, b in probe.spans) / len(probe.spans)
    return {"retrieved": retrieved, "logprob": float(logp.gather(1, target[:, None]).sum()),
            "greedy": greedy, "answer": _greedy(model, tokenizer, logits, cache, next_pos, max_new_tokens, stop)}


# ---------------------------------------------------------------------------------------------
# Passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention"): a number hidden in filler.

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. "
                 "Find it and memorize it. I will quiz you about the important information there.")
PASSKEY_FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                  "There and back again.")
PASSKEY_KEY = "The pass key is {passkey}. Remember it. {passkey} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"


def _check_length(length) -> None:
    if isinstance(length, bool) or not isinstance(length, int) or length <= 0:
        raise ValueError(f"length must be a positive number of tokens, got {length!r}")


def _check_depth(depth) -> None:
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) or not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1] (0 = start of the context, 1 = its end), got {depth!r}")


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def _chat_parts(tokenizer, chat: bool) -> tuple[list[int], list[int]]:
    """Token ids before the user's message and between it and the answer (empty without chat)."""
    if not chat:
        return [], []
    marker = "\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                         add_generation_prompt=True)
    before, after = text.split(marker)
    return _encode(tokenizer, before), _encode(tokenizer, after)


def _fill(tokenizer, sentences, n_tokens: int) -> list[list[int]]:
    """Whole filler sentences, cycled, whose tokens add up to at most `n_tokens` (one list per sentence)."""
    pieces = [_encode(tokenizer, " " + s) for s in sentences]
    out, total, i = [], 0, 0
    while total + len(pieces[i % len(pieces)]) <= n_tokens:
        out.append(pieces[i % len(pieces)])
        total += len(out[-1])
        i += 1
    return out


def _random_passkey(seed: int) -> str:
    return str(int(torch.randint(10_000, 100_000, (1,), generator=torch.Generator().manual_seed(seed))))


def passkey_prompt(tokenizer, length: int, depth: float, passkey: int | str | None = None, *, seed: int = 0,
                   chat: bool = False) -> tuple[torch.Tensor, str]:
    """The passkey prompt of about `length` tokens with the key sentence at relative `depth`.

    Layout: intro, filler sentences, the key sentence "The pass key is 68301. ...", more filler,
    then the question "What is the pass key? The pass key is" that the model completes.
    `depth` in [0, 1] is the fraction of the filler placed before the key; whole filler sentences
    only, so the prompt is within one filler sentence (about 6 tokens) of `length`.
    `passkey` None draws a five-digit key from `seed`; `chat` wraps the prompt in the tokenizer's
    chat template (for instruct models; the question then ends the assistant's turn).
    Returns (input_ids (1, N) int64, answer string).
    """
    _check_length(length)
    _check_depth(depth)
    answer = _random_passkey(seed) if passkey is None else str(passkey)
    if not answer.isdigit():
        raise ValueError(f"passkey must be a number, got {passkey!r}")
    head, tail = _chat_parts(tokenizer, chat)
    intro = _encode(tokenizer, PASSKEY_INTRO)
    key = _encode(tokenizer, " " + PASSKEY_KEY.format(passkey=answer))
    if chat:
        question = _encode(tokenizer, "\n\nWhat is the pass key?") + tail + _encode(tokenizer, "The pass key is")
    else:
        question = _encode(tokenizer, "\n\n" + PASSKEY_QUESTION)
    fixed = len(head) + len(intro) + len(key) + len(question)
    if length < fixed:
        raise ValueError(f"length must be at least {fixed} tokens (intro, key and question), got {length}")
    filler = _fill(tokenizer, PASSKEY_FILLER, length - fixed)
    split = round(depth * len(filler))
    before = [t for piece in filler[:split] for t in piece]
    after = [t for piece in filler[split:] for t in piece]
    ids = head + intro + before + key + after + question
    return torch.tensor([ids], dtype=torch.int64), answer


def passkey_probe(tokenizer, length: int, depth: float, passkey: int | str | None = None, *, seed: int = 0,
                  chat: bool = False) -> Probe:
    """The passkey prompt (`passkey_prompt`) as a Probe: answer prefix " ", answer the key's digits."""
    ids, answer = passkey_prompt(tokenizer, length, depth, passkey, seed=seed, chat=chat)
    return make_probe(tokenizer, ids, " ", answer)


def passkey_correct(generated: str, answer: str) -> bool:
    """Exact match: the first number in the model's answer is the passkey."""
    import re

    found = re.search(r"\d+", generated)
    return found is not None and found.group() == answer


# ---------------------------------------------------------------------------------------------
# Grids: every task is a cell function (a, b, trial) -> scores of one probe; rows hold the mean
# and the spread over trials.

def _check_trials(trials) -> None:
    if isinstance(trials, bool) or not isinstance(trials, int) or trials <= 0:
        raise ValueError(f"trials must be a positive integer, got {trials!r}")


def _run_grid(cell, grid: dict[str, list], trials: int, desc: str, progress: bool, on_row=None) -> list[dict]:
    """Tidy rows, one per combination of `grid`'s two axes.

    `cell(a, b, trial) -> {retrieved, logprob, free, answer, tokens}` (scores of one probe). A row:
    {<axis a>, <axis b>, accuracy (mean retrieved), accuracy_min, accuracy_max, logprob (mean),
    logprob_min, logprob_max, free (mean free-generation score), tokens (of the last prompt),
    seconds, answers (free generations), retrieved and logprobs (one per trial)}.
    `on_row(rows)` is called after each row (a recording saves its progress there).
    """
    from tqdm.auto import tqdm

    _check_trials(trials)
    (name_a, values_a), (name_b, values_b) = grid.items()
    if not values_a or not values_b:
        raise ValueError(f"{name_a} and {name_b} must be non-empty, got {values_a} and {values_b}")
    rows = []
    bar = tqdm(total=len(values_a) * len(values_b) * trials, desc=desc, disable=not progress)
    for a in values_a:
        for b in values_b:
            start = time.perf_counter()
            scores = []
            for trial in range(trials):
                scores.append(cell(a, b, trial))
                bar.update()
            retrieved = [float(s["retrieved"]) for s in scores]
            logprobs = [float(s["logprob"]) for s in scores]
            rows.append({name_a: a, name_b: b, "accuracy": sum(retrieved) / trials,
                         "accuracy_min": min(retrieved), "accuracy_max": max(retrieved),
                         "logprob": sum(logprobs) / trials, "logprob_min": min(logprobs),
                         "logprob_max": max(logprobs), "free": sum(float(s["free"]) for s in scores) / trials,
                         "tokens": scores[-1]["tokens"], "seconds": time.perf_counter() - start,
                         "answers": [s["answer"] for s in scores], "retrieved": retrieved, "logprobs": logprobs})
            if on_row is not None:
                on_row(rows)
    bar.close()
    return rows


def _length_depth_grid(lengths, depths) -> dict[str, list]:
    lengths, depths = [lengths] if isinstance(lengths, int) else list(lengths), list(depths)
    if not lengths or not depths:
        raise ValueError(f"lengths and depths must be non-empty, got lengths={lengths}, depths={depths}")
    for length in lengths:
        _check_length(length)
    for depth in depths:
        _check_depth(depth)
    return {"length": lengths, "depth": depths}


def _score_cell(model, tokenizer, probe: Probe, free_score, *, cache_factory, position_offset: int,
                prefill_chunk: int | None, max_new_tokens: int, stop: str | None = "\n") -> dict:
    """score_probe on a fresh cache from `cache_factory`, with `free_score(answer)` as `free`."""
    n = probe.prompt.shape[1]
    positions = None if not position_offset else torch.arange(position_offset, position_offset + n)
    cache = cache_factory() if cache_factory is not None else None
    out = score_probe(model, tokenizer, probe, cache=cache, positions=positions, prefill_chunk=prefill_chunk,
                      max_new_tokens=max_new_tokens, stop=stop)
    return {**out, "free": float(free_score(out["answer"])), "tokens": n}


def passkey_accuracy(model, tokenizer, lengths, depths, *, trials: int = 3, seed: int = 0, chat: bool = False,
                     cache_factory=None, position_offset: int = 0, prefill_chunk: int | None = None,
                     max_new_tokens: int = 8, progress: bool = True, on_row=None) -> list[dict]:
    """Passkey retrieval over the grid lengths x depths: one tidy row per cell (see `_run_grid`).

    `accuracy` is retrieval: the key is the greedy continuation of the prompt plus the answer
    prefix " " (`score_probe`); `logprob` the key's log-probability there; `free` the old
    score, the first number of the free greedy answer (`passkey_correct`), which also measures
    whether the model chooses to answer with a number. Trial t of every cell hides the key
    drawn from seed `seed * 1000 + t`, so cells are compared on the same keys.
    `cache_factory()` makes a fresh KV cache per prompt for lectlib's Llama (a compression
    policy); `position_offset` shifts the prompt's positions (RoPE-scaling chapters).
    """
    def cell(length, depth, trial):
        probe = passkey_probe(tokenizer, length, depth, seed=seed * 1000 + trial, chat=chat)
        return _score_cell(model, tokenizer, probe, lambda a: passkey_correct(a, probe.text),
                           cache_factory=cache_factory, position_offset=position_offset,
                           prefill_chunk=prefill_chunk, max_new_tokens=max_new_tokens)

    return _run_grid(cell, _length_depth_grid(lengths, depths), trials, "passkey", progress, on_row)


# ---------------------------------------------------------------------------------------------
# Needle in a haystack (Kamradt 2023): a sentence at a depth of a long real document.

def _words(text: str) -> set[str]:
    import re

    return set(re.findall(r"[a-z0-9]+", text.lower()))


@dataclass(frozen=True)
class Needle:
    """A fact to hide, the question that asks for it, and its answer.

    The model's answer is scored after "Answer: " + `answer_prefix`, a fixed opening that shares
    no word with the needle (so it does not hand the model the needle's words to copy), then
    `answer`, the words of the needle that answer the question; `keywords` are the parts of the
    answer that must be retrieved (each scored 0 or 1, the score is their mean).
    """

    sentence: str
    question: str
    answer_prefix: str
    answer: str
    keywords: tuple[str, ...]

    def __post_init__(self):
        shared = _words(self.answer_prefix) & _words(self.sentence)
        if shared:
            raise ValueError(f"answer_prefix {self.answer_prefix!r} must share no word with the needle, "
                             f"shares {sorted(shared)}")
        if self.answer not in self.sentence:
            raise ValueError(f"answer {self.answer!r} must be words of the needle {self.sentence!r}")
        if isinstance(self.keywords, str) or not self.keywords or any(k not in self.answer for k in self.keywords):
            raise ValueError(f"keywords must be a non-empty tuple of parts of the answer {self.answer!r}, "
                             f"got {self.keywords!r}")


NEEDLES = {
    "san_francisco": Needle("The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park "
                            "on a sunny day.",
                            "What is the best thing to do in San Francisco?",
                            "You should", "eat a sandwich and sit in Dolores Park", ("sandwich", "Dolores Park")),
    "soup": Needle("The secret ingredient of grandmother's soup is smoked paprika.",
                   "What is the secret ingredient of grandmother's soup?",
                   "She uses", "smoked paprika", ("smoked paprika",)),
    "vault": Needle("The code word that opens the old vault is pineapple.",
                    "What is the code word that opens the old vault?",
                    "Password:", "pineapple", ("pineapple",)),
}


def needle_score(generated: str, keywords) -> float:
    """Deterministic string match: the fraction of `keywords` found in the answer (case-insensitive)."""
    if isinstance(keywords, str) or not keywords:
        raise ValueError(f"keywords must be a non-empty sequence of strings, got {keywords!r}")
    text = generated.lower()
    return sum(word.lower() in text for word in keywords) / len(keywords)


def sentence_boundaries(tokenizer, ids) -> list[int]:
    """Indices i in 1..len(ids) where a sentence ends just before token i (the token i-1 ends in . ? or !)."""
    return [i + 1 for i, t in enumerate(ids) if tokenizer.decode([t]).endswith((".", "?", "!"))]


def _haystack_start(tokenizer, n: int, seed: int) -> int:
    """A seeded start in the text's token stream, moved to the start of a line (a verse)."""
    from . import data

    stream = data.tokens(tokenizer)
    if n + 1000 > len(stream):
        raise ValueError(f"length {n} exceeds the {len(stream)} tokens of the text")
    start = int(torch.randint(0, len(stream) - n - 1000, (1,), generator=torch.Generator().manual_seed(seed)))
    newline = _encode(tokenizer, "\n")[0]
    while int(stream[start]) != newline:
        start += 1
    return start + 1


def _needle(needle) -> Needle:
    if isinstance(needle, Needle):
        return needle
    if needle not in NEEDLES:
        raise ValueError(f"needle must be a Needle or one of {sorted(NEEDLES)}, got {needle!r}")
    return NEEDLES[needle]


def needle_prompt(tokenizer, length: int, depth: float, needle: Needle | str = "san_francisco", *, seed: int = 0,
                  chat: bool = False) -> tuple[torch.Tensor, Needle, int]:
    """The haystack prompt of exactly `length` tokens with the needle sentence at the boundary nearest `depth`.

    The haystack is a seeded slice of the King James Bible (lectlib.data); the question
    ("\n\nQuestion: ...\nAnswer:") takes a buffer at the end, the haystack fills the rest.
    `depth` is the needle's place as a fraction of the haystack: it goes in at the sentence
    boundary nearest depth * haystack tokens (0 = before the first token, 1 = after the last).
    `needle` is a Needle or the name of one in NEEDLES.
    Returns (input_ids (1, length) int64, the needle, the token index where the needle starts).
    """
    from . import data

    _check_length(length)
    _check_depth(depth)
    needle = _needle(needle)
    head, tail = _chat_parts(tokenizer, chat)
    sentence = _encode(tokenizer, " " + needle.sentence)
    if chat:
        question = _encode(tokenizer, "\n\nQuestion: " + needle.question) + tail + _encode(tokenizer, "Answer:")
    else:
        question = _encode(tokenizer, f"\n\nQuestion: {needle.question}\nAnswer:")
    n_hay = length - len(head) - len(sentence) - len(question)
    if n_hay < 1:
        raise ValueError(f"length {length} leaves no room for a haystack (the needle and question take "
                         f"{length - n_hay} tokens)")
    start = _haystack_start(tokenizer, n_hay, seed)
    hay = data.tokens(tokenizer)[start:start + n_hay].tolist()
    boundaries = [0] + sentence_boundaries(tokenizer, hay) + [n_hay]
    at = min(boundaries, key=lambda b: (abs(b - depth * n_hay), b))
    ids = head + hay[:at] + sentence + hay[at:] + question
    return torch.tensor([ids], dtype=torch.int64), needle, len(head) + at


def needle_probe(tokenizer, length: int, depth: float, needle: Needle | str = "san_francisco", *, seed: int = 0,
                 chat: bool = False) -> tuple[Probe, int]:
    """(the needle prompt as a Probe, the needle's token index): prefix " " + answer_prefix, answer " " + answer.

    The answer's leading space starts its first token (" eat"), so the prefix ends on a token boundary.
    """
    ids, found, at = needle_prompt(tokenizer, length, depth, needle, seed=seed, chat=chat)
    return make_probe(tokenizer, ids, " " + found.answer_prefix, " " + found.answer, found.keywords), at


def needle_accuracy(model, tokenizer, lengths, depths, *, needle: Needle | str = "san_francisco", trials: int = 1,
                    seed: int = 0, chat: bool = False, cache_factory=None, position_offset: int = 0,
                    prefill_chunk: int | None = None, max_new_tokens: int = 24, progress: bool = True,
                    on_row=None) -> list[dict]:
    """Needle-in-a-haystack scores over lengths x depths: one tidy row per cell (see `_run_grid`).

    `accuracy` is retrieval: the fraction of the needle's keywords that are greedy-correct with
    the answer teacher-forced after "Answer: " + answer_prefix; `logprob` the answer's
    log-probability there; `free` the keyword fraction in the free answer after "Answer:"
    (`needle_score`). Trial t of every cell uses the haystack drawn from seed `seed * 1000 + t`;
    `cache_factory`, `position_offset` and `prefill_chunk` as in `passkey_accuracy`.
    """
    found = _needle(needle)

    def cell(length, depth, trial):
        probe, _ = needle_probe(tokenizer, length, depth, found, seed=seed * 1000 + trial, chat=chat)
        return _score_cell(model, tokenizer, probe, lambda a: needle_score(a, found.keywords),
                           cache_factory=cache_factory, position_offset=position_offset,
                           prefill_chunk=prefill_chunk, max_new_tokens=max_new_tokens)

    return _run_grid(cell, _length_depth_grid(lengths, depths), trials, "needle", progress, on_row)


def grid_matrix(rows: list[dict], *, x: str = "length", y: str = "depth", value: str = "accuracy"):
    """(z, xs, ys) from tidy rows for a heatmap: z[i][j] is `value` at y = ys[i], x = xs[j]."""
    xs = sorted({r[x] for r in rows})
    ys = sorted({r[y] for r in rows})
    cells = {(r[x], r[y]): r[value] for r in rows}
    z = [[cells.get((a, b)) for a in xs] for b in ys]
    return z, xs, ys


def accuracy_heatmap(rows: list[dict], *, title: str = "", x: str = "length", y: str = "depth", value: str = "accuracy"):
    """The plotly heatmap of a length x depth grid's `value` column in [0, 1] (hover shows each cell)."""
    from . import viz

    z, xs, ys = grid_matrix(rows, x=x, y=y, value=value)
    return viz.heatmap_figure(z, x=[str(v) for v in xs], y=[f"{v:.0%}" if y == "depth" else str(v) for v in ys],
                              title=title, x_title=f"context {x} (tokens)" if x == "length" else x,
                              y_title=f"needle {y}" if y == "depth" else y, colorscale="RdYlGn", zmin=0, zmax=1,
                              text_format="%{z:.2f}")


@torch.no_grad()
def next_token_probs(model, tokenizer, input_ids: torch.Tensor, *, k: int = 5) -> list[tuple[str, float]]:
    """The `k` most likely next tokens after the prompt `input_ids` (1, N), decoded, with their probabilities."""
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    logits, _, _ = _read(model, input_ids, cache=None, positions=None, prefill_chunk=None)
    probs = torch.softmax(logits.float(), -1)
    top = probs.topk(k)
    return [(tokenizer.decode([int(i)]), float(p)) for p, i in zip(top.values, top.indices)]


def load_record(task: str, path=None) -> dict:
    """The recorded grid of `task` (data/results/evals_<task>.json, made by `python -m lectlib.evals record`)."""
    path = RESULTS / f"evals_{task}.json" if path is None else Path(path)
    if not path.exists():
        raise ValueError(f"no record at {path}: run `python -m lectlib.evals record {task}` first")
    return json.loads(path.read_text())


# ---------------------------------------------------------------------------------------------
# Key-value retrieval, "Lost in the Middle" (Liu et al. 2023, section 3): find one key's value
# among N random UUID pairs; accuracy against the key's position traces a U.

KV_INSTRUCTION = "Extract the value corresponding to the specified key in the JSON object below."


def uuid_pairs(n_pairs: int, *, seed: int = 0) -> list[tuple[str, str]]:
    """`n_pairs` (key, value) pairs of random version-4 UUID strings, from `seed`."""
    import uuid

    if n_pairs <= 0:
        raise ValueError(f"n_pairs must be positive, got {n_pairs}")
    g = torch.Generator().manual_seed(seed)

    def draw() -> str:
        bits = torch.randint(0, 2**16, (8,), generator=g).tolist()
        return str(uuid.UUID(int=sum(b << (16 * i) for i, b in enumerate(bits)), version=4))

    return [(draw(), draw()) for _ in range(n_pairs)]


def kv_prompt(tokenizer, n_pairs: int, position: int, *, seed: int = 0, chat: bool = False) -> tuple[torch.Tensor, str]:
    """The JSON key-value retrieval prompt asking for the key at index `position` of `n_pairs` pairs.

    Returns (input_ids (1, N) int64, the value string). The prompt ends with the value's opening
    quote, so a model answers with the value and closes the quote.
    """
    import json

    if not 0 <= position < n_pairs:
        raise ValueError(f"position must index one of the {n_pairs} pairs, got {position}")
    pairs = uuid_pairs(n_pairs, seed=seed)
    data_json = "{" + ",\n ".join(f"{json.dumps(k)}: {json.dumps(v)}" for k, v in pairs) + "}"
    key, value = pairs[position]
    body = f"{KV_INSTRUCTION}\n\nJSON data:\n{data_json}\n\nKey: {json.dumps(key)}"
    head, tail = _chat_parts(tokenizer, chat)
    opening = 'Corresponding value: "'
    answer = tail + _encode(tokenizer, opening) if chat else _encode(tokenizer, "\n" + opening)
    ids = head + _encode(tokenizer, body) + answer
    return torch.tensor([ids], dtype=torch.int64), value


def kv_correct(generated: str, value: str, *, match_chars: int | None = 8) -> bool:
    """Exact match of the value's first `match_chars` characters (None: the whole value).

    The first UUID group (8 hex digits) already tells 4 billion values apart, and a model that
    starts the right value rarely ends it wrong; matching it needs 6 generated tokens, not 35.
    """
    if match_chars is None:
        return generated == value
    if match_chars <= 0:
        raise ValueError(f"match_chars must be positive or None, got {match_chars}")
    return generated[:match_chars] == value[:match_chars]


def kv_probe(tokenizer, n_pairs: int, position: int, *, seed: int = 0, chat: bool = False,
             match_chars: int | None = 8) -> Probe:
    """The key-value prompt (`kv_prompt`, which ends with the value's opening quote) as a Probe:
    no further prefix, the answer the value's first `match_chars` characters (None: all of it)."""
    if match_chars is not None and match_chars <= 0:
        raise ValueError(f"match_chars must be positive or None, got {match_chars}")
    ids, value = kv_prompt(tokenizer, n_pairs, position, seed=seed, chat=chat)
    return make_probe(tokenizer, ids, "", value if match_chars is None else value[:match_chars])


def kv_accuracy(model, tokenizer, n_pairs, positions=None, *, trials: int = 3, seed: int = 0, chat: bool = False,
                match_chars: int | None = 8, cache_factory=None, position_offset: int = 0,
                prefill_chunk: int | None = None, progress: bool = True, on_row=None) -> list[dict]:
    """Key-value retrieval by the asked key's position: rows {pairs, position, accuracy, ...} (see `_run_grid`).

    `accuracy` is retrieval: the value's first `match_chars` characters are the greedy
    continuation of the prompt (which ends with the opening quote); `logprob` their
    log-probability; `free` the free answer scored by `kv_correct`.
    `n_pairs` is a number or a list of them; `positions` (indices, each below every n_pairs)
    defaults to five evenly spaced ones from first to last. Trial t of every cell uses the pairs
    drawn from seed `seed * 1000 + t` (the same JSON for every position, as in the paper).
    """
    def cell(n, position, trial):
        probe = kv_probe(tokenizer, n, position, seed=seed * 1000 + trial, chat=chat, match_chars=match_chars)
        # probe.text is the value's first match_chars characters: kv_correct compares only those
        return _score_cell(model, tokenizer, probe, lambda a: kv_correct(a, probe.text, match_chars=match_chars),
                           cache_factory=cache_factory, position_offset=position_offset,
                           prefill_chunk=prefill_chunk, max_new_tokens=len(probe.answer) + 1, stop='"')

    return _run_grid(cell, _count_position_grid("pairs", n_pairs, positions), trials, "kv retrieval", progress, on_row)


def _count_position_grid(name: str, counts, positions) -> dict[str, list]:
    """{name: counts, "position": positions}; positions default to five evenly spaced from first to last."""
    counts = [counts] if isinstance(counts, int) else list(counts)
    if not counts or min(counts) <= 0:
        raise ValueError(f"{name} must be a positive number or a list of them, got {counts}")
    if positions is None:
        last = min(counts) - 1
        positions = sorted({round(i * last / 4) for i in range(5)})
    positions = list(positions)
    for n in counts:
        for p in positions:
            if not 0 <= p < n:
                raise ValueError(f"positions must index {name} of every count, got position {p} for {n} {name}")
    return {name: counts, "position": positions}


def position_effects(rows: list[dict], *, count: str = "pairs") -> dict:
    """Primacy and recency from the rows of one count (e.g. kv_accuracy at one number of pairs).

    Returns {first, middle (the mean of the positions strictly between), last, se, primacy,
    recency}: accuracies over the rows' trials; `se` the standard error of an end's accuracy
    minus the middle's, binomial at the worst case p = 0.5; primacy (recency) is True when the
    first (last) position beats the middle by more than 2 se. "U-shaped" is both together.
    """
    counts = {r[count] for r in rows}
    if len(counts) != 1:
        raise ValueError(f"rows must share one {count} value, got {sorted(counts)}")
    by_pos = {r["position"]: r for r in rows}
    positions = sorted(by_pos)
    if len(positions) < 3:
        raise ValueError(f"need at least 3 positions (first, middle, last), got {positions}")
    middle = [by_pos[p] for p in positions[1:-1]]
    first, last = by_pos[positions[0]]["accuracy"], by_pos[positions[-1]]["accuracy"]
    mid = sum(r["accuracy"] for r in middle) / len(middle)
    n = len(by_pos[positions[0]]["retrieved"])  # trials per position
    se = math.sqrt(0.25 / n + 0.25 / (n * len(middle)))
    return {"first": first, "middle": mid, "last": last, "se": se,
            "primacy": first - mid > 2 * se, "recency": last - mid > 2 * se}


# ---------------------------------------------------------------------------------------------
# LongBench's PassageRetrieval (Bai et al. 2023), small: which of n numbered paragraphs a
# quotation comes from. LongBench quotes a model-written abstract; here the quotation is one
# verse of the paragraph, verbatim, so the task is a lookup by exact overlap.

PASSAGE_INSTRUCTION = ("Here are {n} paragraphs from the King James Bible, along with a quotation. "
                       "Please determine which paragraph the quotation is from.")
PASSAGE_QUESTION = ("Please enter the number of the paragraph that the quotation is from. "
                    'The answer format must be like "Paragraph 1", "Paragraph 2", etc.')


def kjv_paragraphs(n: int, *, verses: int = 3, seed: int = 0) -> list[list[str]]:
    """`n` paragraphs of `verses` consecutive verses each (verse numbers removed), from `n` distinct
    chapters of the King James Bible chosen by `seed`."""
    from . import data

    if n <= 0 or verses <= 0:
        raise ValueError(f"n and verses must be positive, got n={n}, verses={verses}")
    chapters = [[line.split(" ", 1)[1] for line in block.splitlines() if line[:1].isdigit()]
                for block in data.text().split("\n\n")]
    chapters = [c for c in chapters if len(c) >= verses]
    g = torch.Generator().manual_seed(seed)
    picked = torch.randperm(len(chapters), generator=g)[:n].tolist()
    out = []
    for c in picked:
        first = int(torch.randint(0, len(chapters[c]) - verses + 1, (1,), generator=g))
        out.append(chapters[c][first:first + verses])
    return out


def passage_prompt(tokenizer, n_passages: int, position: int, *, verses: int = 3, seed: int = 0,
                   chat: bool = False) -> tuple[torch.Tensor, str]:
    """The PassageRetrieval prompt: n numbered paragraphs, a verse quoted from the one at index
    `position`, and the question. Returns (input_ids (1, N) int64, the answer's number as a string).
    The prompt ends with "The answer is: Paragraph", so a model answers with the number."""
    if not 0 <= position < n_passages:
        raise ValueError(f"position must index one of the {n_passages} paragraphs, got {position}")
    paragraphs = kjv_paragraphs(n_passages, verses=verses, seed=seed)
    quote = paragraphs[position][verses // 2]
    body = (PASSAGE_INSTRUCTION.format(n=n_passages) + "\n\n"
            + "\n\n".join(f"Paragraph {i + 1}: {' '.join(p)}" for i, p in enumerate(paragraphs))
            + f"\n\nThe following is a quotation.\n\n{quote}\n\n{PASSAGE_QUESTION}")
    head, tail = _chat_parts(tokenizer, chat)
    answer = tail + _encode(tokenizer, "The answer is: Paragraph") if chat else _encode(tokenizer, "\n\nThe answer is: Paragraph")
    ids = head + _encode(tokenizer, body) + answer
    return torch.tensor([ids], dtype=torch.int64), str(position + 1)


def passage_accuracy(model, tokenizer, n_passages, positions=None, *, verses: int = 3, trials: int = 3,
                     seed: int = 0, chat: bool = False, cache_factory=None, position_offset: int = 0,
                     prefill_chunk: int | None = None, progress: bool = True, on_row=None) -> list[dict]:
    """PassageRetrieval by the quoted paragraph's position: rows {passages, position, accuracy, ...}.

    `accuracy`: the paragraph's number is the greedy continuation of "... Paragraph" + " ";
    `free`: the first number of the free answer is right (`passkey_correct`). Chance is
    1 / n_passages. Trial t of every cell uses the paragraphs drawn from seed `seed * 1000 + t`.
    """
    def cell(n, position, trial):
        ids, answer = passage_prompt(tokenizer, n, position, verses=verses, seed=seed * 1000 + trial, chat=chat)
        return _score_cell(model, tokenizer, make_probe(tokenizer, ids, " ", answer),
                           lambda a: passkey_correct(a, answer), cache_factory=cache_factory,
                           position_offset=position_offset, prefill_chunk=prefill_chunk, max_new_tokens=3)

    return _run_grid(cell, _count_position_grid("passages", n_passages, positions), trials, "passage retrieval",
                     progress, on_row)


def rescore(rows: list[dict], score) -> list[dict]:
    """The rows with `free` recomputed as the mean of `score(answer)` over each row's free answers.

    Generation is the slow part of a grid; scoring is cheap, so a grid's saved answers can be
    scored again under another rule (strict vs lenient) without running the model.
    """
    out = []
    for row in rows:
        if not row.get("answers"):
            raise ValueError(f"each row needs its generated 'answers' to rescore, got {row}")
        out.append({**row, "free": sum(float(score(a)) for a in row["answers"]) / len(row["answers"])})
    return out


# ---------------------------------------------------------------------------------------------
# Recording: grids too slow for a chapter on a CPU are run once by a command and saved, with the
# machine, date, versions and settings; the chapter plots the record at the book scale.

RECORDED_TASKS = {"passkey": passkey_accuracy, "needle": needle_accuracy}


def record(task: str, lengths, depths, *, trials: int, seed: int = 0, threads: int | None = None, path=None) -> dict:
    """Run `task`'s grid on SmolLM2 and merge its rows into data/results/evals_<task>.json.

    Cells already in the file (same length and depth) are replaced; the file is rewritten after
    every cell, so an interrupted recording keeps what it measured. Trials and seed must match
    the file's. Returns the record {task, model, machine, date, versions, settings, rows}.
    """
    import os
    import platform

    import transformers

    from . import models

    if task not in RECORDED_TASKS:
        raise ValueError(f"task must be one of {sorted(RECORDED_TASKS)}, got {task!r}")
    _check_trials(trials)
    grid = _length_depth_grid(lengths, depths)
    path = RESULTS / f"evals_{task}.json" if path is None else Path(path)
    settings = {"trials": trials, "seed": seed, "chat": False, "scorer": "forced answer prefix (score_probe)"}
    rec = json.loads(path.read_text()) if path.exists() else {"task": task, "settings": settings, "rows": []}
    if rec["settings"] != settings:
        raise ValueError(f"{path} holds settings {rec['settings']}, this recording {settings}: use another path")
    if threads is not None:
        torch.set_num_threads(threads)
    from . import runtime
    from .bench import environment

    model, tokenizer = models.load(device=runtime.device())
    new_cells = {(length, depth) for length in grid["length"] for depth in grid["depth"]}
    kept = [r for r in rec["rows"] if (r["length"], r["depth"]) not in new_cells]
    rec.update(model=models.DEFAULT_MODEL, machine=f"{platform.machine()} {platform.processor() or ''}".strip()
               + f", {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads", device=environment()["device"],
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
               versions={"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__})

    def save(rows):
        rec["rows"] = sorted(kept + rows, key=lambda r: (r["length"], r["depth"]))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(rec, indent=1))

    RECORDED_TASKS[task](model, tokenizer, grid["length"], grid["depth"], trials=trials, seed=seed, on_row=save)
    return rec


def main(argv=None) -> None:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m lectlib.evals", description="Record a retrieval grid "
                                     "(passkey or needle) of SmolLM2 into data/results/evals_<task>.json.")
    parser.add_argument("command", choices=["record"])
    parser.add_argument("task", choices=sorted(RECORDED_TASKS))
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--depths", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    parser.add_argument("--trials", type=int, default=5, help="keys (passkey) or haystacks (needle) per cell")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="default data/results/evals_<task>.json")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    rec = record(args.task, args.lengths, args.depths, trials=args.trials, seed=args.seed, threads=args.threads,
                 path=args.out)
    print(f"{len(rec['rows'])} cells in {args.out or RESULTS / f'evals_{args.task}.json'} "
          f"({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
