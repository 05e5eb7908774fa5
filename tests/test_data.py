"""The long text and perplexity over it."""

import math

import pytest
import torch

from lectlib import data, evals


def test_text_is_the_whole_kjv():
    text = data.text()
    assert text.startswith("Genesis 1\n\n1 In the beginning God created the heaven and the earth.")
    assert text.rstrip().endswith("The grace of our Lord Jesus Christ be with you all. Amen.")
    assert text.count("\n\n") >= 1189  # one heading per chapter


def test_token_stream_is_long_enough_to_stream_100k_tokens(smollm):
    _, tok = smollm
    stream = data.tokens(tok)
    assert stream.dtype == torch.int64 and len(stream) > 1_000_000
    assert tok.decode(stream[:6]).startswith("Genesis 1")
    assert data.window(tok, 50, start=1000).tolist() == [stream[1000:1050].tolist()]


def test_window_outside_the_text_is_refused(smollm):
    _, tok = smollm
    with pytest.raises(ValueError, match="window"):
        data.window(tok, 10, start=len(data.tokens(tok)) - 5)


def test_perplexity_equals_transformers_loss(smollm, smollm_hf):
    """Chunked through the cache, lectlib's perplexity equals exp of transformers' own LM loss."""
    model, tok = smollm
    hf, _ = smollm_hf
    ids = data.window(tok, 300, start=50_000)
    with torch.no_grad():
        reference = math.exp(hf(ids, labels=ids).loss.item())
    assert evals.perplexity(model, ids, chunk=128) == pytest.approx(reference, rel=1e-4)
    assert evals.perplexity(hf, ids) == pytest.approx(reference, rel=1e-4)


def test_perplexity_of_the_model_on_the_text(smollm):
    """Measured: 1024 tokens from token 200,000 give 10.6; the same tokens shuffled give about 820."""
    model, tok = smollm
    ids = data.window(tok, 1024, start=200_000)
    ppl = evals.perplexity(model, ids)
    shuffled = evals.perplexity(model, ids[:, torch.randperm(ids.shape[1], generator=torch.Generator().manual_seed(0))])
    assert 4 < ppl < 20
    assert shuffled > 10 * ppl


def test_perplexity_validates_input(smollm):
    with pytest.raises(ValueError, match="at least 2 tokens"):
        evals.perplexity(smollm[0], torch.tensor([[5]]))
    with pytest.raises(ValueError, match=r"\(1, N\)"):
        evals.perplexity(smollm[0], torch.tensor([[5, 6], [7, 8]]))


class _Planted:
    def __reduce__(self):
        return exec, ("import builtins; builtins._lectlib_planted_tokens = True",)


class _FakeTokenizer:
    """Just enough of a tokenizer for the token cache's key."""

    def __len__(self):
        return 7

    def encode(self, text, **kwargs):
        return [len(word) for word in text.split()]


def test_token_cache_refuses_a_planted_pickle(tmp_path, monkeypatch):
    import builtins

    monkeypatch.setenv("LECTLIB_CACHE", str(tmp_path))
    tok = _FakeTokenizer()
    torch.save(_Planted(), tmp_path / f"kjv-tokens-{data._tokenizer_key(tok)}.pt")
    ids = data.tokens(tok)  # the planted file is refused by weights_only and the text re-encoded
    assert not hasattr(builtins, "_lectlib_planted_tokens")
    assert ids.dtype == torch.int64 and len(ids) > 0


def test_unseen_span_is_jeremiah_from_its_first_verse(smollm):
    _, tok = smollm
    assert data.heading_start(tok, "Genesis 1") == 0
    span = data.unseen_span(tok, 12)
    assert tok.decode(span[0]).strip().startswith("Jeremiah 1\n\n1 The words of")
    assert torch.equal(span, data.window(tok, 12, start=data.heading_start(tok, data.UNSEEN_SPAN)))
    with pytest.raises(ValueError, match="'Jeremiah 99'"):
        data.heading_start(tok, "Jeremiah 99")
