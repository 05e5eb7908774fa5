"""Exercises of chapter 3: building a passkey prompt and scoring a needle-in-a-haystack grid."""

import functools
import re

from .. import evals
from . import ExerciseFailure, exercise, expect, expect_close


@functools.lru_cache(maxsize=1)
def _tokenizer():
    from transformers import AutoTokenizer

    from ..models import checkpoint_path

    return AutoTokenizer.from_pretrained(checkpoint_path())


@exercise("passkey_prompt", reference=evals.passkey_prompt)
def _(candidate):
    tokenizer = _tokenizer()
    for length, depth, key in [(300, 0.0, 11111), (300, 0.5, 48213), (600, 0.25, 90210), (600, 1.0, 70001)]:
        out = candidate(tokenizer, length, depth, key)
        expect(isinstance(out, tuple) and len(out) == 2, "return a tuple (input_ids, answer)")
        ids, answer = out
        expect(getattr(ids, "dim", lambda: 0)() == 2 and ids.shape[0] == 1, "input_ids must be a (1, N) tensor")
        expect(str(ids.dtype) == "torch.int64", f"input_ids must be int64 (torch.long), got {ids.dtype}")
        expect(answer == str(key), f"the answer must be the passkey as a string, {str(key)!r}; got {answer!r}")
        expect(length - 6 <= ids.shape[1] <= length,
               f"length={length}: the prompt must have between {length - 6} and {length} tokens, got {ids.shape[1]}")
        text = tokenizer.decode(ids[0].tolist())
        expect(text.rstrip().endswith(evals.PASSKEY_QUESTION),
               f"the prompt must end with the question {evals.PASSKEY_QUESTION!r}")
        key_sentence = evals.PASSKEY_KEY.format(passkey=key)
        expect(text.count(key_sentence) == 1, f"the key sentence {key_sentence!r} must appear exactly once")
        expect(text.startswith(evals.PASSKEY_INTRO), "the prompt must start with PASSKEY_INTRO")
        start, end = len(evals.PASSKEY_INTRO), text.index(evals.PASSKEY_QUESTION)
        body = text[start:end]
        before, after = body.split(key_sentence)
        filler = re.sub(r"\s+", "", before + after)
        expect(set(re.findall(r"[^.]+\.", filler)) <= {re.sub(r"\s+", "", s) for s in evals.PASSKEY_FILLER},
               "between the intro and the question there must be only filler sentences and the key sentence")
        measured = len(before) / max(1, len(before) + len(after))
        expect(abs(measured - depth) <= 0.06,
               f"depth={depth}: the key must sit at that fraction of the filler, found it at {measured:.2f}")


def _needle_heatmap_reference(rows, keywords):
    """z[i][j]: mean keyword score of the answers at depth ys[i] and length xs[j] (both sorted)."""
    return evals.grid_matrix(evals.rescore(rows, lambda answer: evals.needle_score(answer, keywords)), value="free")[0]


@exercise("needle_heatmap", reference=_needle_heatmap_reference)
def _(candidate):
    keywords = ("sandwich", "Dolores Park")
    good = "eat a sandwich and sit in Dolores Park on a sunny day."
    rows = [
        {"length": 1024, "depth": 0.0, "answers": [good, "visit the Golden Gate"]},
        {"length": 512, "depth": 0.0, "answers": [good, good]},
        {"length": 512, "depth": 0.5, "answers": ["eat a SANDWICH", "sit in dolores park"]},
        {"length": 1024, "depth": 0.5, "answers": ["go to Dolores Park", "nothing at all"]},
        {"length": 2048, "depth": 0.5, "answers": [good]},
        {"length": 2048, "depth": 0.0, "answers": ["the Golden Gate Bridge"]},
    ]
    z = candidate(rows, keywords)
    try:
        z = [[float(v) for v in row] for row in z]
    except TypeError as error:
        raise ExerciseFailure("return a list of rows (one per depth), each a list of numbers "
                              "(one per length)") from error
    expect(len(z) == 2 and all(len(r) == 3 for r in z),
           f"two depths x three lengths: expected a 2 x 3 matrix (a row per depth), got rows of {[len(r) for r in z]}")
    expect_close(z[0], [1.0, 0.5, 0.0], "depth 0 (first row), lengths 512, 1024, 2048 (sorted): the mean score of "
                 "each cell's answers")
    expect_close(z[1], [0.5, 0.25, 1.0],
                 "depth 0.5: each answer scores the fraction of keywords it contains, case-insensitively")
