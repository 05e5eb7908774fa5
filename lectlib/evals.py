"""Evaluating long context: perplexity, and retrieval tests that show whether a model uses it.

Perplexity over a window is exp of the mean next-token cross-entropy,
    PPL = exp(-(1/(N-1)) Σ_t log p(x_t | x_<t)),
the model's average surprise per token; lower is better. It rewards local fluency, so the
retrieval tests ask for one specific distant fact instead:
- passkey retrieval (Mohtashami & Jaggi 2023): a number hidden in filler;
- needle in a haystack (Kamradt 2023): a sentence hidden in a real long text (lectlib.data);
- key-value retrieval from "Lost in the Middle" (Liu et al. 2023): one UUID pair among N;
- passage retrieval from LongBench (Bai et al. 2023), small: which numbered paragraph a quotation is from.
Each has a prompt builder, a deterministic scorer and a grid runner returning tidy rows. The
model is lectlib's Llama or a Hugging Face causal LM; `cache_factory`, `prefill_chunk` and
`position_offset` let later chapters run the same tests on compressed caches and scaled RoPE.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kv import KVCache


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
# Generation shared by every retrieval task: one greedy answer from lectlib's Llama or a HF model.

def _is_lectlib(model) -> bool:
    return isinstance(model, torch.nn.Module) and hasattr(model, "hidden_states")


def _check_ids(input_ids) -> None:
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"input_ids must be a (1, N) tensor, got {shape}")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids must hold at least one token, got (1, 0)")


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
    _check_ids(input_ids)
    if max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
    n = input_ids.shape[1]
    if positions is not None and (positions.dim() != 1 or positions.shape[0] != n):
        raise ValueError(f"positions must be ({n},), one per prompt token, got {tuple(positions.shape)}")
    if prefill_chunk is not None and prefill_chunk <= 0:
        raise ValueError(f"prefill_chunk must be positive or None, got {prefill_chunk}")
    device = next(model.parameters()).device
    input_ids = input_ids.to(device)
    positions = torch.arange(n, device=device) if positions is None else positions.to(device)
    lectlib = _is_lectlib(model)
    cache = KVCache() if lectlib and cache is None else cache

    def step(ids, pos):
        nonlocal cache
        if lectlib:
            return model(ids, cache=cache, positions=pos)[:, -1]
        out = model(ids, position_ids=pos[None], past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        return out.logits[:, -1]

    chunk = prefill_chunk or n
    for start in range(0, n, chunk):
        logits = step(input_ids[:, start:start + chunk], positions[start:start + chunk])
    next_pos = int(positions[-1]) + 1
    new: list[int] = []
    for i in range(max_new_tokens):
        token = int(logits[0].argmax())
        if token == tokenizer.eos_token_id:
            break
        new.append(token)
        if stop and stop in tokenizer.decode(new, skip_special_tokens=True).lstrip() or i == max_new_tokens - 1:
            break
        logits = step(torch.tensor([[token]], device=device), torch.tensor([next_pos + i], device=device))
    text = tokenizer.decode(new, skip_special_tokens=True).strip()
    return text.split(stop)[0].strip() if stop else text


# ---------------------------------------------------------------------------------------------
# Passkey retrieval (Mohtashami & Jaggi 2023, "Landmark Attention"): a number hidden in filler.

PASSKEY_INTRO = ("There is an important info hidden inside a lot of irrelevant text. "
                 "Find it and memorize it. I will quiz you about the important information there.")
PASSKEY_FILLER = ("The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.",
                  "There and back again.")
PASSKEY_KEY = "The pass key is {passkey}. Remember it. {passkey} is the pass key."
PASSKEY_QUESTION = "What is the pass key? The pass key is"


def _check_length_depth(length: int, depth: float) -> None:
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must lie in [0, 1] (0 = start of the context, 1 = its end), got {depth}")
    if length <= 0:
        raise ValueError(f"length must be a positive number of tokens, got {length}")


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
    _check_length_depth(length, depth)
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


def passkey_correct(generated: str, answer: str) -> bool:
    """Exact match: the first number in the model's answer is the passkey."""
    import re

    found = re.search(r"\d+", generated)
    return found is not None and found.group() == answer


# ---------------------------------------------------------------------------------------------
# Grids: every task is a cell function (length, depth, trial) -> (score, answer, n_tokens).

def _run_grid(cell, grid: dict[str, list], trials: int, desc: str, progress: bool) -> list[dict]:
    """Tidy rows, one per combination of `grid`'s two axes: {<axis>: value, ..., accuracy, tokens, seconds, answers}.

    `cell(a, b, trial) -> (score in [0, 1], generated text, prompt tokens)`; accuracy is the mean score.
    """
    import time

    from tqdm.auto import tqdm

    if trials <= 0:
        raise ValueError(f"trials must be positive, got {trials}")
    (name_a, values_a), (name_b, values_b) = grid.items()
    if not values_a or not values_b:
        raise ValueError(f"{name_a} and {name_b} must be non-empty, got {values_a} and {values_b}")
    rows = []
    bar = tqdm(total=len(values_a) * len(values_b) * trials, desc=desc, disable=not progress)
    for a in values_a:
        for b in values_b:
            start = time.perf_counter()
            scores, answers, n_tokens = [], [], 0
            for trial in range(trials):
                score, answer, n_tokens = cell(a, b, trial)
                scores.append(float(score))
                answers.append(answer)
                bar.update()
            rows.append({name_a: a, name_b: b, "accuracy": sum(scores) / trials, "tokens": n_tokens,
                         "seconds": time.perf_counter() - start, "answers": answers})
    bar.close()
    return rows


def _length_depth_grid(lengths, depths) -> dict[str, list]:
    lengths, depths = list(lengths), list(depths)
    for length in lengths:
        for depth in depths:
            _check_length_depth(length, depth)
    return {"length": lengths, "depth": depths}


def _answer(model, tokenizer, ids, *, cache_factory, position_offset: int, prefill_chunk: int | None,
            max_new_tokens: int, stop: str | None = "\n") -> str:
    positions = None if not position_offset else torch.arange(position_offset, position_offset + ids.shape[1])
    cache = cache_factory() if cache_factory is not None else None
    return generate_answer(model, tokenizer, ids, max_new_tokens=max_new_tokens, cache=cache, positions=positions,
                           stop=stop, prefill_chunk=prefill_chunk)


def passkey_accuracy(model, tokenizer, lengths, depths, *, trials: int = 3, seed: int = 0, chat: bool = False,
                     cache_factory=None, position_offset: int = 0, prefill_chunk: int | None = None,
                     max_new_tokens: int = 8,
                     progress: bool = True) -> list[dict]:
    """Passkey accuracy over the grid lengths x depths: one tidy row per cell.

    Trial t of every cell hides the key drawn from seed `seed * 1000 + t`, so cells are compared
    on the same keys. `cache_factory()` makes a fresh KV cache per prompt for lectlib's Llama (a
    compression policy); `position_offset` shifts the prompt's positions (RoPE-scaling chapters).
    Rows: {length, depth, accuracy, tokens (of the last prompt), seconds, answers (generated)}.
    """
    def cell(length, depth, trial):
        ids, answer = passkey_prompt(tokenizer, length, depth, seed=seed * 1000 + trial, chat=chat)
        generated = _answer(model, tokenizer, ids, cache_factory=cache_factory, position_offset=position_offset,
                            prefill_chunk=prefill_chunk, max_new_tokens=max_new_tokens)
        return passkey_correct(generated, answer), generated, ids.shape[1]

    return _run_grid(cell, _length_depth_grid(lengths, depths), trials, "passkey", progress)


# ---------------------------------------------------------------------------------------------
# Needle in a haystack (Kamradt 2023): a sentence at a depth of a long real document.

@dataclass(frozen=True)
class Needle:
    """A fact to hide, the question that asks for it, the answer's opening words and the words that score it."""

    sentence: str
    question: str
    answer_prefix: str
    keywords: tuple[str, ...]


NEEDLES = {
    "san_francisco": Needle("The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park "
                            "on a sunny day.",
                            "What is the best thing to do in San Francisco?",
                            "The best thing to do in San Francisco is", ("sandwich", "Dolores Park")),
    "soup": Needle("The secret ingredient of grandmother's soup is smoked paprika.",
                   "What is the secret ingredient of grandmother's soup?",
                   "The secret ingredient of grandmother's soup is", ("smoked paprika",)),
    "vault": Needle("The code word that opens the old vault is pineapple.",
                    "What is the code word that opens the old vault?",
                    "The code word that opens the old vault is", ("pineapple",)),
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


def needle_prompt(tokenizer, length: int, depth: float, needle: Needle | str = "san_francisco", *, seed: int = 0,
                  chat: bool = False) -> tuple[torch.Tensor, Needle, int]:
    """The haystack prompt of exactly `length` tokens with the needle sentence at the boundary nearest `depth`.

    The haystack is a seeded slice of the King James Bible (lectlib.data); the question and the
    answer's first words ("...San Francisco is") take a buffer at the end, the haystack fills the
    rest. `depth` is the needle's place as a fraction of the haystack: it goes in at the sentence
    boundary nearest depth * haystack tokens (0 = before the first token, 1 = after the last).
    Returns (input_ids (1, length) int64, the needle, the token index where the needle starts).
    """
    from . import data

    _check_length_depth(length, depth)
    needle = NEEDLES[needle] if isinstance(needle, str) else needle
    head, tail = _chat_parts(tokenizer, chat)
    sentence = _encode(tokenizer, " " + needle.sentence)
    if chat:
        question = (_encode(tokenizer, "\n\nQuestion: " + needle.question) + tail
                    + _encode(tokenizer, needle.answer_prefix))
    else:
        question = _encode(tokenizer, f"\n\nQuestion: {needle.question}\nAnswer: {needle.answer_prefix}")
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


def needle_accuracy(model, tokenizer, lengths, depths, *, needle: Needle | str = "san_francisco", trials: int = 1,
                    seed: int = 0, chat: bool = False, cache_factory=None, position_offset: int = 0,
                    prefill_chunk: int | None = None, max_new_tokens: int = 12, progress: bool = True) -> list[dict]:
    """Needle-in-a-haystack score (keyword fraction) over lengths x depths: one tidy row per cell.

    Trial t of every cell uses the haystack drawn from seed `seed * 1000 + t`; `cache_factory`
    `position_offset` and `prefill_chunk` as in `passkey_accuracy`.
    """
    def cell(length, depth, trial):
        ids, found, _ = needle_prompt(tokenizer, length, depth, needle, seed=seed * 1000 + trial, chat=chat)
        generated = _answer(model, tokenizer, ids, cache_factory=cache_factory, position_offset=position_offset,
                            prefill_chunk=prefill_chunk, max_new_tokens=max_new_tokens)
        return needle_score(generated, found.keywords), generated, ids.shape[1]

    return _run_grid(cell, _length_depth_grid(lengths, depths), trials, "needle", progress)


def grid_matrix(rows: list[dict], *, x: str = "length", y: str = "depth", value: str = "accuracy"):
    """(z, xs, ys) from tidy rows for a heatmap: z[i][j] is `value` at y = ys[i], x = xs[j]."""
    xs = sorted({r[x] for r in rows})
    ys = sorted({r[y] for r in rows})
    cells = {(r[x], r[y]): r[value] for r in rows}
    z = [[cells.get((a, b)) for a in xs] for b in ys]
    return z, xs, ys


def accuracy_heatmap(rows: list[dict], *, title: str = "", x: str = "length", y: str = "depth"):
    """The plotly heatmap of a length x depth grid (hover shows each cell's accuracy)."""
    from . import viz

    z, xs, ys = grid_matrix(rows, x=x, y=y)
    return viz.heatmap_figure(z, x=[str(v) for v in xs], y=[f"{v:.0%}" if y == "depth" else str(v) for v in ys],
                              title=title, x_title=f"context {x} (tokens)" if x == "length" else x,
                              y_title=f"needle {y}" if y == "depth" else y, colorscale="RdYlGn", zmin=0, zmax=1,
                              text_format="%{z:.2f}")


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


def kv_accuracy(model, tokenizer, n_pairs, positions=None, *, trials: int = 3, seed: int = 0, chat: bool = False,
                match_chars: int | None = 8, cache_factory=None, position_offset: int = 0,
                prefill_chunk: int | None = None,
                progress: bool = True) -> list[dict]:
    """Accuracy of key-value retrieval by the asked key's position: rows {pairs, position, accuracy, ...}.

    Scored by `kv_correct` (exact match of the first `match_chars` characters of the value).

    `n_pairs` is a number or a list of them; `positions` (indices, each below every n_pairs)
    defaults to five evenly spaced ones from first to last. Trial t of every cell uses the pairs
    drawn from seed `seed * 1000 + t` (the same JSON for every position, as in the paper).
    """
    def cell(n, position, trial):
        ids, value = kv_prompt(tokenizer, n, position, seed=seed * 1000 + trial, chat=chat)
        target = value if match_chars is None else value[:match_chars]
        generated = _answer(model, tokenizer, ids, cache_factory=cache_factory, position_offset=position_offset,
                            prefill_chunk=prefill_chunk, max_new_tokens=len(_encode(tokenizer, target)) + 1, stop='"')
        return kv_correct(generated, value, match_chars=match_chars), generated, ids.shape[1]

    return _run_grid(cell, _count_position_grid("pairs", n_pairs, positions), trials, "kv retrieval", progress)


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
                     prefill_chunk: int | None = None, progress: bool = True) -> list[dict]:
    """PassageRetrieval accuracy by the quoted paragraph's position: rows {passages, position, accuracy, ...}.

    Scored by exact match of the first number the model writes (`passkey_correct`); chance is
    1 / n_passages. Trial t of every cell uses the paragraphs drawn from seed `seed * 1000 + t`.
    """
    def cell(n, position, trial):
        ids, answer = passage_prompt(tokenizer, n, position, verses=verses, seed=seed * 1000 + trial, chat=chat)
        generated = _answer(model, tokenizer, ids, cache_factory=cache_factory, position_offset=position_offset,
                            prefill_chunk=prefill_chunk, max_new_tokens=3)
        return passkey_correct(generated, answer), generated, ids.shape[1]

    return _run_grid(cell, _count_position_grid("passages", n_passages, positions), trials, "passage retrieval",
                     progress)


def rescore(rows: list[dict], score) -> list[dict]:
    """The rows with `accuracy` recomputed as the mean of `score(answer)` over each row's answers.

    Generation is the slow part of a grid; scoring is cheap, so a grid's saved answers can be
    scored again under another rule (strict vs lenient) without running the model.
    """
    out = []
    for row in rows:
        if not row.get("answers"):
            raise ValueError(f"each row needs its generated 'answers' to rescore, got {row}")
        out.append({**row, "accuracy": sum(float(score(a)) for a in row["answers"]) / len(row["answers"])})
    return out
