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
    question = tokenizer.encode(f"\n\nQuestion: {needle.question}\nAnswer:")
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
    assert rows[0]["free"] == 1.0 and sum(r["free"] for r in rows) / len(rows) <= 0.5
    assert rows[0]["accuracy"] == 1.0 and sum(r["accuracy"] for r in rows) / len(rows) <= 0.5


# ---- grids ---------------------------------------------------------------------------------

def test_grid_rows_are_tidy_and_plot():
    def cell(a, b, t):
        return {"retrieved": a > b, "logprob": -t - a, "free": t, "answer": f"{a}/{b}/{t}", "tokens": a}

    rows = evals._run_grid(cell, {"length": [1, 2], "depth": [0.5, 1.5]}, 2, "test", False)
    cells = [(r["length"], r["depth"], r["accuracy"]) for r in rows]
    assert cells == [(1, .5, 1), (1, 1.5, 0), (2, .5, 1), (2, 1.5, 1)]
    assert rows[0]["answers"] == ["1/0.5/0", "1/0.5/1"] and rows[0]["free"] == 0.5
    assert (rows[0]["logprob"], rows[0]["logprob_min"], rows[0]["logprob_max"]) == (-1.5, -2, -1)
    assert rows[0]["logprobs"] == [-1, -2] and rows[0]["retrieved"] == [1.0, 1.0]
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


def test_passkey_1024_retrieved_at_every_depth(smollm):
    # Measured (fp32, CPU): at 1,024 tokens, depths 0 / 0.5 / 1, the key of seed 1 is the greedy
    # continuation of "... The pass key is" + " " at every depth, log p(key) -0.08 to -0.10 nats;
    # the key of seed 0 at 8,192 tokens, depth 0.5: -0.16 (data/results/evals_passkey.json).
    model, tokenizer = smollm
    rows = evals.passkey_accuracy(model, tokenizer, [1024], [0.0, 0.5, 1.0], trials=2, progress=False)
    assert [r["accuracy"] for r in rows] == [1.0, 1.0, 1.0]
    assert min(r["logprob_min"] for r in rows) > -0.5
    assert all(1018 <= r["tokens"] <= 1024 for r in rows)


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
    # Measured: both keywords of the San Francisco needle are retrieved after the prefix at 2,048 tokens.
    model, tokenizer = smollm
    rows = evals.needle_accuracy(model, tokenizer, [512], [0.5], progress=False)
    assert rows[0]["accuracy"] == 1.0  # both keywords are the greedy choice after "Answer: You should"


# ---- the retrieval scorer: forced answer prefix vs free generation ----------------------------

class _Chars:
    """A tokenizer over a fixed list of strings (token id = index); id 0 is EOS."""

    def __init__(self, vocab):
        self.vocab, self.eos_token_id = vocab, 0

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.vocab[i] for i in ids if not (skip_special_tokens and i == 0))


class _Bigram(torch.nn.Module):
    """A stub with lectlib's interface whose next-token logits depend only on the last token."""

    hidden_states = None

    def __init__(self, table):
        super().__init__()
        self.table = torch.nn.Parameter(table)  # (V, V): logits of the next token given the current one

    def forward(self, ids, cache=None, positions=None):
        return self.table[ids]  # (1, n, V)


VOCAB = ["<eos>", " ", "is", "the", "key", "1", "2", "3", "9", "."]
IS, SPACE, THE, KEY, ONE, TWO, THREE, NINE, DOT = range(1, 10)


def _bigram(next_of: dict[int, int]) -> _Bigram:
    """Each token in `next_of` prefers next_of[token] (logit 3) over the rest (logits drawn at random in [0, 1))."""
    table = torch.rand(len(VOCAB), len(VOCAB), generator=torch.Generator().manual_seed(0))
    for token, nxt in next_of.items():
        table[token, nxt] = 3.0
    return _Bigram(table)


def _probe(answer=(ONE, TWO, THREE), spans=((0, 3),)):
    # the prompt ends with "is"; the prefix " " ends where the answer "123" starts
    return evals.Probe(torch.tensor([[THE, KEY, IS]]), (SPACE,), tuple(answer), "123", spans)


def _oracle_logprob(model, tokens):
    """Σ log p(tokens[i+1] | tokens[i]) from the stub's table, for the forced part of the sequence."""
    logp = torch.log_softmax(model.table.detach(), -1)
    return sum(float(logp[a, b]) for a, b in zip(tokens[:-1], tokens[1:]))


def test_scorer_retrieves_a_key_that_free_generation_misses():
    # after "is" the model writes "the" (format), after " " it writes 1 2 3 (retrieval)
    model = _bigram({IS: THE, THE: KEY, KEY: DOT, SPACE: ONE, ONE: TWO, TWO: THREE, THREE: DOT})
    out = evals.score_probe(model, _Chars(VOCAB), _probe(), max_new_tokens=3)
    assert out["answer"] == "thekey." and not evals.passkey_correct(out["answer"], "123")
    assert out["retrieved"] == 1.0 and out["greedy"] == [True, True, True]
    assert out["logprob"] == pytest.approx(_oracle_logprob(model, [SPACE, ONE, TWO, THREE]), abs=1e-5)


def test_scorer_rejects_a_key_that_free_generation_writes():
    # after "is" the model writes 1 2 3 (right, free), but after the prefix " " it writes 9
    model = _bigram({IS: ONE, ONE: TWO, TWO: THREE, THREE: DOT, SPACE: NINE})
    out = evals.score_probe(model, _Chars(VOCAB), _probe(), max_new_tokens=4)
    assert evals.passkey_correct(out["answer"], "123")
    assert out["retrieved"] == 0.0 and out["greedy"] == [False, True, True]
    assert out["logprob"] == pytest.approx(_oracle_logprob(model, [SPACE, ONE, TWO, THREE]), abs=1e-5)


def test_scorer_counts_each_keyword_span():
    # answer 1 2 3 with keywords [1] and [2 3]: the model gets 1 right after " " but writes 9 after 1
    model = _bigram({SPACE: ONE, ONE: NINE, TWO: THREE})
    out = evals.score_probe(model, _Chars(VOCAB), _probe(spans=((0, 1), (1, 3))), max_new_tokens=2)
    assert out["greedy"] == [True, False, True] and out["retrieved"] == 0.5


@pytest.mark.parametrize("build", ["passkey", "needle", "kv"])
def test_probe_tokens_are_the_tokens_of_the_written_answer(tokenizer, build):
    """Oracle: prompt + prefix + answer tokens == the tokenizer's tokens of the whole text written out."""
    if build == "passkey":
        probe = evals.passkey_probe(tokenizer, 200, 0.5, 68301)
        assert tokenizer.decode(probe.prefix) == " " and tokenizer.decode(probe.answer) == "68301"
        assert len(probe.answer) == 5  # one token per digit, after a lone " " token (chapter 3's prose)
    elif build == "needle":
        probe, _ = evals.needle_probe(tokenizer, 200, 0.5)
        assert tokenizer.decode(probe.prefix + probe.answer) == " You should eat a sandwich and sit in Dolores Park"
        assert [tokenizer.decode(probe.answer[a:b]).strip() for a, b in probe.spans] == ["sandwich", "Dolores Park"]
    else:
        probe = evals.kv_probe(tokenizer, 3, 1, seed=5)
        assert probe.prefix == () and probe.text == evals.uuid_pairs(3, seed=5)[1][1][:8]
    ids = probe.prompt[0].tolist() + list(probe.prefix + probe.answer)
    assert tokenizer.encode(tokenizer.decode(ids), add_special_tokens=False) == ids


def test_split_answer_needs_a_token_boundary(tokenizer):
    assert evals.split_answer(tokenizer, " ", "42") == ([tokenizer.encode(" ")[0]], tokenizer.encode("42"))
    with pytest.raises(ValueError, match="token boundary"):
        evals.split_answer(tokenizer, " You should ", "eat")  # " eat" is one token: the space belongs to it


def test_score_probe_matches_transformers(smollm, smollm_hf):
    """Oracle: the answer's log-probability from one HF forward over prompt + prefix + answer."""
    (model, tokenizer), (hf, _) = smollm, smollm_hf
    probe = evals.passkey_probe(tokenizer, 150, 0.5, seed=2)
    ids = torch.tensor([probe.prompt[0].tolist() + list(probe.prefix + probe.answer)])
    with torch.no_grad():
        logp = torch.log_softmax(hf(ids).logits[0, :-1].float(), -1)
    n = len(probe.answer)
    want = logp[-n:].gather(1, ids[0, -n:, None]).sum().item()
    ours = evals.score_probe(model, tokenizer, probe, max_new_tokens=6)
    theirs = evals.score_probe(hf, tokenizer, probe, max_new_tokens=6)
    assert ours["logprob"] == pytest.approx(want, abs=1e-3) and theirs["logprob"] == pytest.approx(want, abs=1e-3)
    assert ours["greedy"] == (logp[-n:].argmax(-1) == ids[0, -n:]).tolist() == theirs["greedy"]
    assert ours["answer"] == theirs["answer"]
    top = logp[probe.prompt.shape[1] - 1].exp().topk(3)
    probs = evals.next_token_probs(model, tokenizer, probe.prompt, k=3)
    assert [t for t, _ in probs] == [tokenizer.decode([int(i)]) for i in top.indices]
    assert [p for _, p in probs] == pytest.approx(top.values.tolist(), abs=1e-4)


# ---- needles and validation ---------------------------------------------------------------------

@settings(max_examples=20, deadline=None)
@given(name=st.sampled_from(sorted(evals.NEEDLES)), length=st.integers(120, 600), depth=st.floats(0, 1),
       seed=st.integers(0, 50), chat=st.booleans())
def test_needle_answer_prefix_never_repeats_the_needle(smollm, name, length, depth, seed, chat):
    tokenizer = smollm[1]
    probe, at = evals.needle_probe(tokenizer, length, depth, name, seed=seed, chat=chat)
    needle = evals.NEEDLES[name]
    question_end = tokenizer.decode(probe.prompt[0].tolist()).rindex(needle.question) + len(needle.question)
    after_question = tokenizer.decode(probe.prompt[0].tolist() + list(probe.prefix))[question_end:]
    assert after_question.rstrip().endswith(needle.answer_prefix)
    assert not set(re.findall(r"[a-z0-9]+", after_question.lower())) & set(re.findall(r"[a-z0-9]+", needle.sentence.lower()))


@settings(max_examples=30, deadline=None)
@given(words=st.lists(st.sampled_from(["cat", "blue", "sat", "on", "the", "mat", "dog", "You", "should"]),
                      min_size=1, max_size=3))
def test_needle_rejects_a_prefix_that_shares_its_words(words):
    prefix = " ".join(words)
    shared = {w.lower() for w in words} & {"the", "cat", "sat", "on", "blue", "mat"}
    make = lambda: evals.Needle("The cat sat on the blue mat.", "Where did the cat sit?", prefix, "the blue mat",
                                ("blue mat",))
    if shared:
        with pytest.raises(ValueError, match="share no word"):
            make()
    else:
        assert make().answer_prefix == prefix


def test_needle_prompt_rejects_an_unknown_needle(tokenizer):
    with pytest.raises(ValueError, match="san_francisco") as error:
        evals.needle_prompt(tokenizer, 300, 0.5, needle="nope")
    assert "'nope'" in str(error.value) and all(name in str(error.value) for name in evals.NEEDLES)
    with pytest.raises(ValueError, match="keywords"):
        evals.Needle("The code is pineapple.", "What is the code?", "Say", "pineapple", ("mango",))


@pytest.mark.parametrize("kwargs, match", [
    ({"lengths": [0], "depths": [0.5]}, "length"), ({"lengths": [512.5], "depths": [0.5]}, "length"),
    ({"lengths": [], "depths": [0.5]}, "non-empty"), ({"lengths": [512], "depths": [1.5]}, "depth"),
    ({"lengths": [512], "depths": ["middle"]}, "depth"), ({"lengths": [512], "depths": [0.5], "trials": 0}, "trials"),
    ({"lengths": [512], "depths": [0.5], "trials": 2.5}, "trials"),
])
@pytest.mark.parametrize("grid", [evals.passkey_accuracy, evals.needle_accuracy])
def test_grids_validate_before_running(grid, kwargs, match):
    with pytest.raises(ValueError, match=match):
        grid(None, None, progress=False, **kwargs)  # no model needed: the arguments are checked first


def test_position_effects_call_a_difference_only_beyond_two_standard_errors():
    def rows(accs, n):
        return [{"pairs": 6, "position": p, "accuracy": a, "retrieved": [a] * n} for p, a in enumerate(accs)]

    # the numbers (4 trials): 1.00 / 0.50 / 0.25 / 0 / 0 / 0.25 is primacy, not a U
    effects = evals.position_effects(rows([1.0, 0.5, 0.25, 0.0, 0.0, 0.25], 4))
    assert effects["middle"] == pytest.approx(0.1875) and effects["se"] == pytest.approx((1 / 16 + 1 / 64) ** 0.5)
    assert effects["primacy"] and not effects["recency"]
    assert not evals.position_effects(rows([1.0, 0.5, 0.25, 0.0, 0.0, 0.25], 1))["primacy"]  # one trial: noise
    assert evals.position_effects(rows([1.0, 0.0, 0.0, 1.0], 20)) == {
        "first": 1.0, "middle": 0.0, "last": 1.0, "se": pytest.approx((0.25 / 20 + 0.25 / 40) ** 0.5),
        "primacy": True, "recency": True}
    with pytest.raises(ValueError, match="pairs"):
        evals.position_effects(rows([1, 0, 1], 2) + [{"pairs": 9, "position": 0, "accuracy": 1, "retrieved": [1]}])


GRID_LENGTHS, GRID_DEPTHS = [1024, 2048, 4096, 8192], [0.0, 0.25, 0.5, 0.75, 1.0]


def _full_grid(record: dict) -> dict:
    """The record's cells by (length, depth), asserting the book's grid: 4 lengths x 5 depths x 5 trials."""
    assert {"machine", "device", "date", "versions", "settings", "model"} <= set(record)
    assert record["settings"]["trials"] == 5
    cells = {(r["length"], r["depth"]): r for r in record["rows"]}
    assert len(cells) == len(record["rows"]) and set(cells) == {(n, d) for n in GRID_LENGTHS for d in GRID_DEPTHS}
    assert all(len(r["retrieved"]) == len(r["logprobs"]) == 5 for r in record["rows"])
    return cells


def test_recorded_passkey_fails_only_at_8k_depth_0():
    """Chapter 3 states it from data/results/evals_passkey.json (python -m lectlib.evals record passkey): every key
    retrieved up to 4,096 tokens and at 8,192 for depths 0.25-1; at 8,192 tokens with the key first (depth 0), none,
    with log p(key) near -13 and the free answer a sentence about the pass key."""
    cells = _full_grid(evals.load_record("passkey"))
    failed = {cell for cell, r in cells.items() if r["accuracy"] < 1.0}
    assert failed == {(8192, 0.0)}
    assert all(8186 <= cells[8192, d]["tokens"] <= 8192 for d in GRID_DEPTHS)
    miss = cells[8192, 0.0]
    assert miss["accuracy"] == 0.0 and -15 < miss["logprob"] < -11
    assert all(a.startswith("the pass key.") for a in miss["answers"])
    assert all(r["logprob_min"] > -0.5 for cell, r in cells.items() if cell not in failed)
    with pytest.raises(ValueError, match="record"):
        evals.load_record("passkey", path="/nonexistent/evals_passkey.json")


def test_recorded_needle_fails_at_8k_depth_0():
    """data/results/evals_needle.json (python -m lectlib.evals record needle), as chapter 3 states it: every keyword
    retrieved up to 2,048 tokens; at 8,192 tokens none at depth 0 (log p about -39), all at depths 0.75 and 1; the
    free answer scores at most 0.2 in every cell (the free answer is mostly empty)."""
    cells = _full_grid(evals.load_record("needle"))
    assert all(r["tokens"] == r["length"] for r in cells.values())
    assert all(r["accuracy"] == 1.0 for (n, _), r in cells.items() if n <= 2048)
    assert [cells[4096, d]["accuracy"] for d in GRID_DEPTHS] == pytest.approx([0.9, 0.8, 1.0, 1.0, 1.0])
    assert [cells[8192, d]["accuracy"] for d in GRID_DEPTHS] == pytest.approx([0.0, 0.9, 0.6, 1.0, 1.0])
    assert cells[8192, 0.0]["logprob"] < -35
    assert all(r["free"] <= 0.2 for r in cells.values())
