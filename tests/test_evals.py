"""Retrieval evaluations: prompt builders, scoring, and what SmolLM2-135M actually does.

Model facts asserted here were measured on SmolLM2-135M-Instruct (lectlib.models.load(), fp32, CPU)
with the default prompts (no chat template); the chapter states them from the same harness.
"""

import json
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lectlib import evals
from lectlib.kv import KVCache


@pytest.fixture(scope="module")
def tokenizer(smollm):
    return smollm[1]


# ---- passkey prompt ------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(length=st.integers(120, 3000), depth=st.floats(0, 1), seed=st.integers(0, 10_000))
def test_passkey_prompt_length_and_depth(smollm, length, depth, seed):
    tokenizer = smollm[1]
    ids, answer = evals.passkey_prompt(tokenizer, length, depth, seed=seed)
    assert ids.dtype == torch.int64 and ids.shape[0] == 1
    assert length - 6 <= ids.shape[1] <= length  # whole filler sentences: within one sentence (<= 6 tokens)
    assert re.fullmatch(r"[1-9]\d{4}", answer)
    text = tokenizer.decode(ids[0].tolist())
    assert text.endswith("What is the pass key? The pass key is")
    assert text.count(answer) == 2  # both mentions inside the one key sentence
    # depth: the fraction of the filler's characters before the key sentence (independent of tokens)
    body = text[len(evals.PASSKEY_INTRO):text.index("\n\nWhat is the pass key?")]
    key = " " + evals.PASSKEY_KEY.format(passkey=answer)
    before, after = body.split(key)
    measured = len(before) / (len(before) + len(after))
    assert abs(measured - depth) <= 25 / (len(before) + len(after)) + 1e-9  # within one filler sentence


def test_passkey_prompt_deterministic_and_given_key(tokenizer):
    a, key_a = evals.passkey_prompt(tokenizer, 300, 0.5, seed=3)
    b, key_b = evals.passkey_prompt(tokenizer, 300, 0.5, seed=3)
    c, key_c = evals.passkey_prompt(tokenizer, 300, 0.5, seed=4)
    assert torch.equal(a, b) and key_a == key_b and key_a != key_c
    ids, answer = evals.passkey_prompt(tokenizer, 300, 0.0, 12345)
    assert answer == "12345" and "pass key is 12345. Remember it." in tokenizer.decode(ids[0].tolist())
    chat, _ = evals.passkey_prompt(tokenizer, 300, 0.5, seed=3, chat=True)
    assert abs(chat.shape[1] - 300) <= 6
    assert tokenizer.decode(chat[0].tolist()).startswith("<|im_start|>system")


def test_passkey_prompt_rejects_bad_arguments(tokenizer):
    with pytest.raises(ValueError, match="depth"):
        evals.passkey_prompt(tokenizer, 300, 1.5, 1)
    with pytest.raises(ValueError, match="length"):
        evals.passkey_prompt(tokenizer, 0, 0.5, 1)
    with pytest.raises(ValueError, match="at least"):
        evals.passkey_prompt(tokenizer, 50, 0.5, 1)  # shorter than intro + key + question
    with pytest.raises(ValueError, match="passkey"):
        evals.passkey_prompt(tokenizer, 300, 0.5, "abc")


@pytest.mark.parametrize("generated, correct", [
    ("68301", True), ("68301. The pass key is", True), (" 68301.", True), ("the key 68301", True),
    ("6830", False), ("683010", False), ("68302", False), ("a key that unlocks", False), ("", False),
    ("12 then 68301", False),  # the first number is the answer
])
def test_passkey_correct(generated, correct):
    assert evals.passkey_correct(generated, "68301") is correct


# ---- needle in a haystack ------------------------------------------------------------------

@settings(max_examples=15, deadline=None)
@given(length=st.integers(200, 2500), depth=st.floats(0, 1), seed=st.integers(0, 50))
def test_needle_prompt_length_and_boundary(smollm, length, depth, seed):
    tokenizer = smollm[1]
    ids, needle, at = evals.needle_prompt(tokenizer, length, depth, seed=seed)
    assert ids.shape == (1, length)
    sentence = tokenizer.encode(" " + needle.sentence)
    assert ids[0, at:at + len(sentence)].tolist() == sentence
    question = tokenizer.encode(f"\n\nQuestion: {needle.question}\nAnswer: {needle.answer_prefix}")
    hay = ids[0, :at].tolist() + ids[0, at + len(sentence):length - len(question)].tolist()
    assert tokenizer.decode(hay).count("San Francisco") == 0
    # oracle: decode every prefix of the haystack and keep those that end a sentence
    ends = [i for i in range(1, len(hay) + 1) if tokenizer.decode(hay[:i]).endswith((".", "?", "!"))]
    nearest = min(abs(b - depth * len(hay)) for b in [0, len(hay)] + ends)
    assert abs(at - depth * len(hay)) == nearest
    assert at in (0, len(hay)) or at in ends


def test_needle_score():
    keys = evals.NEEDLES["san_francisco"].keywords
    assert evals.needle_score("eat a sandwich and sit in Dolores Park on a sunny day.", keys) == 1.0
    assert evals.needle_score("to eat a SANDWICH at the pier", keys) == 0.5
    assert evals.needle_score("to visit the Golden Gate Bridge", keys) == 0.0
    with pytest.raises(ValueError, match="keywords"):
        evals.needle_score("x", "sandwich")


# ---- key-value retrieval -------------------------------------------------------------------

def test_kv_prompt_holds_the_pairs(tokenizer):
    ids, value = evals.kv_prompt(tokenizer, 7, 4, seed=2)
    text = tokenizer.decode(ids[0].tolist())
    data = json.loads(text[text.index("{"):text.index("}") + 1])
    pairs = evals.uuid_pairs(7, seed=2)
    assert list(data.items()) == pairs and len(set(data)) == 7
    assert value == pairs[4][1]
    assert text.endswith(f'Key: "{pairs[4][0]}"\nCorresponding value: "')
    assert all(re.fullmatch(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}", u)
               for pair in pairs for u in pair)
    with pytest.raises(ValueError, match="position"):
        evals.kv_prompt(tokenizer, 7, 7)


def test_kv_correct():
    value = "97941b09-9848-4b4d-8219-e6a58b515e58"
    assert evals.kv_correct(value, value) and evals.kv_correct("97941b09-98", value)
    assert not evals.kv_correct("97941b0", value) and not evals.kv_correct("bdd83c46-3a57", value)
    assert evals.kv_correct(value, value, match_chars=None)
    assert not evals.kv_correct("97941b09-9848", value, match_chars=None)


# ---- passage retrieval (LongBench, small) ----------------------------------------------------

def test_passage_prompt_quotes_the_asked_paragraph(tokenizer):
    ids, answer = evals.passage_prompt(tokenizer, 5, 3, seed=1)
    text = tokenizer.decode(ids[0].tolist())
    paragraphs = evals.kjv_paragraphs(5, seed=1)
    assert answer == "4" and len({" ".join(p) for p in paragraphs}) == 5
    for i, p in enumerate(paragraphs):
        assert f"Paragraph {i + 1}: {' '.join(p)}" in text
    quote = text.split("The following is a quotation.\n\n")[1].split("\n\n")[0]
    assert quote in " ".join(paragraphs[3]) and all(quote not in " ".join(p) for p in paragraphs[:3] + paragraphs[4:])
    assert text.endswith("The answer is: Paragraph")
    with pytest.raises(ValueError, match="position"):
        evals.passage_prompt(tokenizer, 5, 5)


def test_count_position_grid_defaults_and_checks():
    assert evals._count_position_grid("pairs", 9, None) == {"pairs": [9], "position": [0, 2, 4, 6, 8]}
    with pytest.raises(ValueError, match="position 3 for 3 pairs"):
        evals._count_position_grid("pairs", [5, 3], [0, 3])


def test_smollm_answers_paragraph_1_whatever_is_asked(smollm):
    """Chapter 3, section 5. Measured with 4 paragraphs, 2 trials per position: every answer is
    "1" (accuracy 1.0 at position 0, 0.0 elsewhere); with 8 paragraphs and with the chat template too."""
    model, tokenizer = smollm
    rows = evals.passage_accuracy(model, tokenizer, 4, range(4), trials=2, progress=False)
    answers = [a for r in rows for a in r["answers"]]
    assert sum(a.startswith("1") for a in answers) >= 0.75 * len(answers)
    assert rows[0]["accuracy"] == 1.0 and sum(r["accuracy"] for r in rows) / len(rows) <= 0.5


# ---- grids ---------------------------------------------------------------------------------

def test_grid_rows_are_tidy_and_plot():
    rows = evals._run_grid(lambda a, b, t: (a > b, f"{a}/{b}/{t}", a), {"length": [1, 2], "depth": [0.5, 1.5]},
                           2, "test", False)
    cells = [(r["length"], r["depth"], r["accuracy"]) for r in rows]
    assert cells == [(1, .5, 1), (1, 1.5, 0), (2, .5, 1), (2, 1.5, 1)]
    assert rows[0]["answers"] == ["1/0.5/0", "1/0.5/1"]
    z, xs, ys = evals.grid_matrix(rows)
    assert xs == [1, 2] and ys == [0.5, 1.5] and z == [[1, 1], [0, 1]]
    fig = evals.accuracy_heatmap([{"length": 256, "depth": d, "accuracy": d} for d in (0, 0.5, 1)])
    assert list(fig.data[0].z) == [[0], [0.5], [1]] and "%{z}" in fig.data[0].hovertemplate


# ---- the real model ------------------------------------------------------------------------

def test_generate_answer_matches_transformers(smollm, smollm_hf):
    (model, tokenizer), (hf, _) = smollm, smollm_hf
    ids, answer = evals.passkey_prompt(tokenizer, 140, 0.3, seed=1)
    ours = evals.generate_answer(model, tokenizer, ids, max_new_tokens=6)
    assert ours == evals.generate_answer(hf, tokenizer, ids, max_new_tokens=6)
    assert evals.passkey_correct(ours, answer)
    shifted = torch.arange(1000, 1000 + ids.shape[1])  # the prompt placed at positions 1000.., the answer after it
    assert (evals.generate_answer(model, tokenizer, ids, max_new_tokens=6, positions=shifted)
            == evals.generate_answer(hf, tokenizer, ids, max_new_tokens=6, positions=shifted))


def test_passkey_512_retrieved_except_at_the_very_end(smollm):
    # Measured: at 512 tokens the key is found at depths 0 to 0.75 (4/4 keys each), but when it
    # sits right before the question (depth 1) the model answers with words (0/4).
    model, tokenizer = smollm
    rows = evals.passkey_accuracy(model, tokenizer, [512], [0.0, 0.5, 1.0], trials=2, progress=False)
    by_depth = {r["depth"]: r["accuracy"] for r in rows}
    assert by_depth[0.0] == 1.0 and by_depth[0.5] == 1.0
    assert by_depth[1.0] == 0.0
    assert all(500 <= r["tokens"] <= 512 for r in rows)


def test_cache_factory_reaches_the_model(smollm):
    # A cache that keeps only the last 64 tokens, fed the prompt 32 tokens at a time, forgets a key at the start.
    model, tokenizer = smollm

    class Recent(KVCache):
        def keep(self, layer, n_old, n_new):
            return torch.arange(max(0, n_old - 64), n_old)

    full = evals.passkey_accuracy(model, tokenizer, [256], [0.0], trials=1, progress=False)
    recent = evals.passkey_accuracy(model, tokenizer, [256], [0.0], trials=1, progress=False,
                                     cache_factory=Recent, prefill_chunk=32)
    assert full[0]["accuracy"] == 1.0 and recent[0]["accuracy"] == 0.0


def test_needle_512_found(smollm):
    # Measured: the San Francisco needle is recalled word for word at 512 and 1024 tokens, every depth.
    model, tokenizer = smollm
    rows = evals.needle_accuracy(model, tokenizer, [512], [0.5], progress=False)
    assert rows[0]["accuracy"] == 1.0 and "Dolores Park" in rows[0]["answers"][0]
