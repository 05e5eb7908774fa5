"""The long text: the King James Bible (public domain, Debian's bible-kjv-text), about 1M tokens.

The lectures' example of "give the LLM a whole book". `text()` is the whole of it, one verse a
line under book-and-chapter headings; `tokens(tokenizer)` is its token stream (computed once
per tokenizer and kept in the cache directory); `window(tokenizer, n, start)` is a slice of it
ready for a model.
"""

import functools
import gzip
import hashlib
import os
import pickle
from pathlib import Path

import torch

DATA = Path(__file__).resolve().parents[1] / "data"
KJV = DATA / "kjv.txt.gz"


@functools.lru_cache(maxsize=1)
def text() -> str:
    """The whole King James Bible as one string (4.2M characters)."""
    if not KJV.exists():
        raise FileNotFoundError(f"{KJV} is missing: lectlib reads the text from the repository's data/ folder")
    with gzip.open(KJV, "rt", encoding="utf-8") as f:
        return f.read()


def _tokenizer_key(tokenizer) -> str:
    probe = tokenizer.encode("In the beginning God created the heaven and the earth.")
    ident = f"{type(tokenizer).__name__}:{len(tokenizer)}:{probe}"
    return hashlib.sha1(ident.encode()).hexdigest()[:12]


_TOKENS: dict[str, torch.Tensor] = {}


def tokens(tokenizer) -> torch.Tensor:
    """(T,) int64 token ids of the whole text, cached on disk per tokenizer."""
    from .models import cache_dir

    key = _tokenizer_key(tokenizer)
    if key not in _TOKENS:
        path = cache_dir() / f"kjv-tokens-{key}.pt"
        try:  # weights_only: a planted pickle cannot run code; a damaged file is re-encoded
            _TOKENS[key] = torch.load(path, weights_only=True)
        except (OSError, RuntimeError, EOFError, pickle.UnpicklingError):
            ids = torch.tensor(tokenizer.encode(text()), dtype=torch.int64)
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f"{path.name}.{os.getpid()}.partial")  # concurrent writers never mix
            torch.save(ids, partial)
            os.replace(partial, path)
            _TOKENS[key] = ids
    return _TOKENS[key]


def window(tokenizer, n: int, start: int = 0) -> torch.Tensor:
    """(1, n) token ids: tokens start .. start + n of the text."""
    stream = tokens(tokenizer)
    if n <= 0 or start < 0 or start + n > len(stream):
        raise ValueError(f"window [start={start}, start+n={start + n}) must lie inside the {len(stream)} tokens of the text")
    return stream[start:start + n][None]


# Genesis 1 is among the most quoted texts in English: SmolLM2 predicts it from memory (perplexity
# 3.4 on its first 1,024 tokens, against 8.0 for Leviticus 1 and 13.0 for Jeremiah 1). Experiments
# about reading long text run on Jeremiah, a long prophetic book (57,643 tokens) quoted far less.
UNSEEN_SPAN = "Jeremiah 1"


def heading_start(tokenizer, heading: str) -> int:
    """Token index in `tokens(tokenizer)` where the line `heading` ("Jeremiah 1", "Genesis 1") begins."""
    full = text()
    at = 0 if full.startswith(heading + "\n") else full.find("\n" + heading + "\n") + 1
    if at == 0 and not full.startswith(heading + "\n"):
        raise ValueError(f"heading {heading!r} is not a line of the text (expected e.g. 'Jeremiah 1')")
    key = (_tokenizer_key(tokenizer), heading)
    if key not in _STARTS:
        _STARTS[key] = len(tokenizer.encode(full[:at], add_special_tokens=False))
    return _STARTS[key]


_STARTS: dict[tuple[str, str], int] = {}


def unseen_span(tokenizer, n: int, heading: str = UNSEEN_SPAN) -> torch.Tensor:
    """(1, n) token ids from the start of `heading` on: text the model has not memorised (see UNSEEN_SPAN)."""
    return window(tokenizer, n, start=heading_start(tokenizer, heading))
