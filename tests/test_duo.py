"""DuoAttention: the gated attention, the gate training, binarisation, the shipped gates and the cache."""

import pytest
import torch

from lectlib import duo, streaming
from lectlib import tiny as tiny_llama
from lectlib.llama import Llama, LlamaConfig

TINY = LlamaConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, hidden_dim=64)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Llama(TINY).eval()


def _hidden(model, ids, gates, **kw):
    with torch.no_grad(), duo.gates_installed(model, gates, **kw):
        return model.hidden_states(ids)


@pytest.mark.parametrize("n", [7, 45, 70])
def test_gate_one_everywhere_is_the_full_model(tiny, n):
    ids = torch.randint(0, TINY.vocab_size, (1, n))
    with torch.no_grad():
        full = tiny.hidden_states(ids)
    torch.testing.assert_close(_hidden(tiny, ids, torch.ones(2, 2), sinks=2, window=5, block=16), full,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("sinks,window", [(2, 5), (0, 9), (4, 12)])
def test_gate_zero_everywhere_is_sink_window_streaming(tiny, sinks, window):
    """Oracle: the streaming chapter's token-by-token SinkCache (text positions)."""
    ids = torch.randint(0, TINY.vocab_size, (1, 61))
    from lectlib import kv

    nlls = streaming.stream(tiny, ids, kv.SinkCache(sinks, window, positions="text"), progress=False).nlls
    hidden = _hidden(tiny, ids, torch.zeros(2, 2), sinks=sinks, window=window, block=16)[0, :-1]
    gated = torch.nn.functional.cross_entropy(tiny.lm_head(hidden), ids[0, 1:], reduction="none")
    torch.testing.assert_close(gated, nlls, atol=1e-5, rtol=1e-5)


def test_gates_mix_per_kv_head(tiny):
    """A gate of 1 on KV head 0 and 0 on head 1 is, per query head, full or streaming attention."""
    from lectlib.attention import sdpa_attention
    from lectlib.positions import rope_parameters

    torch.manual_seed(1)
    q, k, v = torch.randn(1, 4, 30, 8), torch.randn(1, 2, 30, 8), torch.randn(1, 2, 30, 8)
    inv_freq, _ = rope_parameters(8, 10000.0, None, 30)
    gates = torch.tensor([[1.0, 0.0], [0.25, 0.75]])
    got = duo.gated_attention(gates, 0, sinks=2, window=6, inv_freq=inv_freq, block=8)(q, k, v, causal=True)
    full = sdpa_attention(q, k, v, causal=True)
    stream = streaming.sink_window_attention(sinks=2, window=6, inv_freq=inv_freq, positions="text")(q, k, v, causal=True)
    torch.testing.assert_close(got[:, :2], full[:, :2], atol=1e-6, rtol=1e-5)  # query heads 0, 1 share KV head 0
    torch.testing.assert_close(got[:, 2:], stream[:, 2:], atol=1e-6, rtol=1e-5)
    mixed = duo.gated_attention(gates, 1, sinks=2, window=6, inv_freq=inv_freq, block=8)(q, k, v, causal=True)
    torch.testing.assert_close(mixed[:, 2:], 0.75 * full[:, 2:] + 0.25 * stream[:, 2:], atol=1e-6, rtol=1e-5)


def test_a_few_steps_lower_the_distillation_loss():
    """On a fixed batch, 6 Adam steps of α from 0.5 lower ‖h_full - h_gated‖² (no L1 pull)."""
    torch.manual_seed(0)
    model = tiny_llama.init_weights(Llama(TINY), std=0.3).eval()
    g = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(2):
        ids = torch.randint(0, TINY.vocab_size, (1, 48), generator=g)
        answer = torch.zeros(48, dtype=torch.bool)
        answer[-6:] = True
        samples.append(duo.PasskeySample(ids, answer))

    def loss(gates):
        with torch.no_grad():
            return sum(duo.distillation_loss(model, gates, s, model.hidden_states(s.input_ids)[0, s.answer],
                                             sinks=2, window=4).item() for s in samples)

    start = torch.full((2, 2), 0.5)
    trained, log = duo.train_gates(model, None, steps=6, length=48, lr=0.05, l1=0.0, sinks=2, window=4,
                                   gates=start, samples=samples, progress=False)
    assert loss(trained) < 0.8 * loss(start)
    assert not any(p.requires_grad is False for p in model.parameters())  # the model is handed back unfrozen
    assert trained.min() >= 0 and trained.max() <= 1


def test_retrieval_heads_by_share_and_threshold():
    gates = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.95, 0.3]])
    assert duo.retrieval_heads(gates, share=0.5).tolist() == [[True, False, True], [False, True, False]]
    assert duo.retrieval_heads(gates, share=0.0).sum() == 0
    assert duo.retrieval_heads(gates, share=1.0).all()
    assert duo.retrieval_heads(gates, threshold=0.4).tolist() == [[True, False, True], [False, True, False]]


@pytest.mark.parametrize("kwargs,name", [({"share": 1.5}, "share"), ({"share": -0.1}, "share"),
                                         ({"threshold": 2.0}, "threshold"), ({}, "share"),
                                         ({"share": 0.5, "threshold": 0.5}, "threshold")])
def test_bad_share_or_threshold_raises(kwargs, name):
    with pytest.raises(ValueError, match=name):
        duo.retrieval_heads(torch.rand(3, 2), **kwargs)


def test_bad_shapes_raise(tiny):
    with pytest.raises(ValueError, match="gates"):
        with duo.gates_installed(tiny, torch.ones(3, 2)):
            pass
    with pytest.raises(ValueError, match="gates"):
        duo.retrieval_heads(torch.rand(6))
    with pytest.raises(ValueError, match="share"):
        duo.duo_cache_bytes(n_layers=2, n_kv_heads=2, head_dim=8, n_tokens=10, share=2.0)


def test_memory_formula_counts_heads():
    """30 layers x 3 KV heads, D = 64, fp16: 25% retrieval heads at 4096 tokens."""
    got = duo.duo_cache_bytes(n_layers=30, n_kv_heads=3, head_dim=64, n_tokens=4096, share=0.25, sinks=16, window=112)
    r = round(0.25 * 90)
    assert got == 2 * 64 * 2 * (r * 4096 + (90 - r) * 128)
    assert duo.duo_cache_bytes(n_layers=30, n_kv_heads=3, head_dim=64, n_tokens=100, share=0.0) == 2 * 64 * 2 * 90 * 100


def test_shipped_gates_load_and_select_the_share():
    gates, meta = duo.load_gates()
    assert gates.shape == (30, 3)
    assert 0 <= gates.min() and gates.max() <= 1
    assert meta["settings"]["steps"] >= 1 and "command" in meta
    for share in (0.125, 0.25, 0.5):
        heads = duo.retrieval_heads(gates, share=share)
        assert heads.sum() == round(share * 90)
        assert gates[heads].min() >= gates[~heads].max()


def _records():
    import json

    gates, meta = duo.load_gates()
    log = json.loads(duo.GATES_FILE.with_name(duo.GATES_FILE.stem + "_log.json").read_text())
    ranking = json.loads((duo.DATA / "results" / "duo_ranking.json").read_text())
    shares = json.loads((duo.DATA / "results" / "duo_shares.json").read_text())
    return gates, meta, log, ranking, shares


def test_shipped_gates_log_and_records_agree_with_the_chapter():
    """What chapter 6 says of the shipped gates, their training log and the ranking and share records."""
    gates, meta, log, ranking, shares = _records()
    # the log belongs to these gates: same command and steps; it starts from the full model
    assert log["command"] == meta["command"] and log["steps_done"] == meta["steps_done"] == len(log["step"])
    assert meta["settings"]["length"] == 4096 and meta["device"]
    assert log["l1"][0] == pytest.approx(1.0) and log["distill"][0] < 1e-6
    # the mean gate settles within a few dozen steps and the distillation loss stays small after
    late = len(log["step"]) // 2
    assert log["l1"][20] < 0.8 and max(log["l1"][late:]) - min(log["l1"][late:]) < 0.05
    assert 0 < max(log["distill"][late:]) < 0.02
    # the gate map: most gates high, most of the others near 0, whole layers let go, first third highest
    assert (gates > 0.5).float().mean() > 0.6
    assert (gates < 0.1).sum() > (gates <= 0.5).sum() / 2
    assert any((gates[l] < 0.5).all() for l in range(30))
    thirds = [gates[i:i + 10].mean() for i in (0, 10, 20)]
    assert thirds[0] == max(thirds)
    # the ranking: recorded at the gates' length; partial agreement, top quarters about twice chance, half shared
    mass = torch.tensor(ranking["attention_mass"])
    assert ranking["length"] == meta["settings"]["length"]
    assert 0.3 < duo.rank_correlation(gates, mass) < 0.9
    shared = int((duo.retrieval_heads(gates, share=0.25) & duo.retrieval_heads(mass, share=0.25)).sum())
    assert 1.5 * 22 * 22 / 90 < shared < 22
    # the share sweep: recorded with these gates, 2 prompts per task; bytes grow with the share
    assert shares["gates"].endswith(duo.GATES_FILE.name) and shares["count"] == 2
    assert shares["date"] >= meta["date"] and ranking["date"] >= meta["date"]  # made after these gates were
    got = sorted({r["share"] for r in shares["rows"]})
    assert got[0] == 0.0 and set(got) <= set(duo.SHARES)
    for task in ("passkey", "needle", "key-value", "perplexity"):
        rows = sorted((r for r in shares["rows"] if r["task"] == task), key=lambda r: r["share"])
        assert [r["share"] for r in rows] == got
        assert all(a["bytes"] < b["bytes"] for a, b in zip(rows, rows[1:]))
        assert all(0 <= r["score"] <= 1 for r in rows) or task == "perplexity"


def test_passkey_sample_marks_the_answer():
    tok = tiny_llama.tokenizer()
    s = duo.passkey_sample(tok, 300, n_keys=3, seed=4)
    assert abs(s.input_ids.shape[1] - 300) <= 2
    recited = tok.decode(s.input_ids[0, 1:][s.answer[:-1]])
    keys = [t for t in tok.decode(s.input_ids[0]).split("pass key is ")[1:]]
    assert recited.strip().rstrip(".") == ", ".join(k[:5] for k in keys)


RETRIEVAL = torch.tensor([[True, False], [False, True]])


def _decode_through_cache(model, ids, cache, prefill):
    from lectlib import kv

    logits = []
    with torch.no_grad(), kv.attach(model, cache):
        logits.append(model(ids[:, :prefill], cache=cache))
        for t in range(prefill, ids.shape[1]):
            logits.append(model(ids[:, t:t + 1], cache=cache))
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("prefill", [3, 20])
def test_cache_decodes_like_the_binary_gated_model(tiny, prefill):
    """Oracle: one forward of `gated_attention` with gates 1 on retrieval heads, 0 on streaming heads."""
    ids = torch.randint(0, TINY.vocab_size, (1, 33))
    cache = duo.DuoAttentionCache(RETRIEVAL, sinks=2, window=5)
    got = _decode_through_cache(tiny, ids, cache, prefill)
    with torch.no_grad(), duo.gates_installed(tiny, RETRIEVAL.float(), sinks=2, window=5, block=8):
        want = tiny(ids)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_cache_holds_exactly_the_promised_tokens_per_head(tiny):
    ids = torch.randint(0, TINY.vocab_size, (1, 30))
    cache = duo.DuoAttentionCache(RETRIEVAL, sinks=2, window=5)
    _decode_through_cache(tiny, ids, cache, 12)
    for layer in range(2):
        assert cache.held_tokens(layer).tolist() == [30, 7] if layer == 0 else [7, 30]
        assert cache.streaming.text_positions[layer].tolist() == [0, 1, 25, 26, 27, 28, 29]
        assert cache.full.text_positions[layer].tolist() == list(range(30))
    per_token = 2 * TINY.head_dim * 4  # key and value, fp32
    assert cache.nbytes() == per_token * (2 * 30 + 2 * 7)
    assert cache.nbytes() == duo.duo_cache_bytes(n_layers=2, n_kv_heads=2, head_dim=8, n_tokens=30, share=0.5,
                                                 sinks=2, window=5, bytes_per_value=4)


def test_cache_without_attach_is_loud_and_needs_a_bool_table(tiny):
    """Read whole by a plain attention (no `kv.attach`), the padded streaming heads give NaN, not wrong numbers."""
    cache = duo.DuoAttentionCache(RETRIEVAL, sinks=2, window=5)
    with torch.no_grad():
        tiny(torch.randint(0, TINY.vocab_size, (1, 12)), cache=cache)
        assert tiny(torch.randint(0, TINY.vocab_size, (1, 1)), cache=cache).isnan().all()
    with pytest.raises(ValueError, match="retrieval"):
        duo.DuoAttentionCache(RETRIEVAL.float())


def test_retrieved_through_a_cache_matches_the_harness(tiny):
    """Oracle: evals.score_probe on a full cache (no attach needed there)."""
    from types import SimpleNamespace

    from lectlib import evals, kv

    tokenizer = SimpleNamespace(eos_token_id=-1, decode=lambda ids, skip_special_tokens=True: "")
    prompt = torch.randint(0, TINY.vocab_size, (1, 20))
    with torch.no_grad():
        own = tiny.generate(prompt, 4)[0].tolist()
    for answer in (own[1:], [own[1], (own[2] + 1) % TINY.vocab_size, own[3]]):
        probe = evals.Probe(prompt, (own[0],), tuple(answer), "", ((0, 1), (0, len(answer))))
        want = evals.score_probe(tiny, tokenizer, probe, cache=kv.KVCache(), max_new_tokens=1, stop=None)["retrieved"]
        got, held = duo.retrieved(tiny, probe, kv.KVCache())
        assert got == want
        assert held == 2 * 2 * 2 * 8 * 20 * 4  # K and V, 2 layers x 2 KV heads x D 8 x 20 tokens, fp32
    assert got == 0.5  # the first span is right, the whole answer is not


def test_rank_correlation_is_spearman():
    a = torch.tensor([[0.1, 0.4], [0.35, 0.8]])
    assert duo.rank_correlation(a, a ** 3) == pytest.approx(1.0)
    assert duo.rank_correlation(a, -a) == pytest.approx(-1.0)
    assert duo.rank_correlation(a, torch.tensor([[1.0, 2.0], [4.0, 3.0]])) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="shape"):
        duo.rank_correlation(a, a.flatten())
