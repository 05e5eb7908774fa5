"""RoPE and its scalings against transformers' own RoPE initialisation and Llama (independent oracles)."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from lectlib import positions as P
from lectlib.llama import Llama, LlamaConfig

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402


def hf_config(head_dim=32, base=10000.0, max_positions=128, rope=None, **shape):
    rope = dict(rope or {"rope_type": "default"}, rope_theta=base)
    kwargs = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=head_dim,
                  max_position_embeddings=max_positions, rope_parameters=rope, tie_word_embeddings=True,
                  rms_norm_eps=1e-5)
    kwargs.update(shape)
    return transformers.LlamaConfig(**kwargs)


# ---- RoPE itself ---------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(m=st.integers(0, 5000), n=st.integers(0, 5000), shift=st.integers(0, 20000),
       half=st.sampled_from([2, 8, 32]), seed=st.integers(0, 2**16))
def test_rope_dot_product_depends_only_on_distance(m, n, shift, half, seed):
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, 1, 1, 1, 2 * half, generator=g, dtype=torch.float64)
    inv = P.rope_inv_freq(2 * half).double()
    def score(a, b):
        qa = P.apply_rope(q, torch.tensor([a]), inv)
        kb = P.apply_rope(k, torch.tensor([b]), inv)
        return (qa * kb).sum()
    # angles are computed in fp32 like in transformers, so large positions lose a little precision
    assert torch.allclose(score(m, n), score(m + shift, n + shift), atol=5e-3 * (1 + q.norm() * k.norm()))


def test_rope_is_a_rotation_by_m_theta_per_pair():
    """Pair (i, i + D/2) turns by m·θ_i as a 2-D rotation: a naive complex-number oracle."""
    torch.manual_seed(0)
    d, n = 16, 7
    x = torch.randn(1, 2, n, d, dtype=torch.float64)
    inv = P.rope_inv_freq(d, 500.0).double()
    got = P.apply_rope(x, torch.arange(n), inv)
    z = torch.complex(x[..., : d // 2], x[..., d // 2:]) * torch.exp(1j * torch.arange(n)[:, None] * inv)
    assert torch.allclose(got, torch.cat([z.real, z.imag], -1), atol=1e-6)
    assert torch.allclose(got.norm(dim=-1), x.norm(dim=-1))  # rotations keep the norm


def test_rope_validates_inputs():
    with pytest.raises(ValueError, match="head_dim"):
        P.rope_inv_freq(7)
    with pytest.raises(ValueError, match=r"\(B, H, N, D\)"):
        P.apply_rope(torch.zeros(3, 4, 8), torch.arange(4), P.rope_inv_freq(8))
    with pytest.raises(ValueError, match="inv_freq"):
        P.apply_rope(torch.zeros(1, 1, 4, 8), torch.arange(4), P.rope_inv_freq(16))
    with pytest.raises(ValueError, match="rope_type"):
        P.rope_parameters(8, 10000.0, {"rope_type": "magic", "factor": 2.0}, 10)
    with pytest.raises(ValueError, match="factor"):
        P.linear_inv_freq(8, 10000.0, 0.5)
    with pytest.raises(ValueError, match="original_max_position_embeddings"):
        P.rope_parameters(8, 10000.0, {"rope_type": "yarn", "factor": 2.0}, 10)


# ---- each scaling equals transformers' RoPE initialisation --------------------------------------

@settings(max_examples=30, deadline=None)
@given(head_dim=st.sampled_from([16, 32, 64, 128]), base=st.sampled_from([10000.0, 100000.0, 500000.0]),
       factor=st.sampled_from([1.0, 2.0, 4.0, 8.0, 32.0]), original=st.sampled_from([128, 2048, 8192]),
       beta=st.sampled_from([(32, 1), (16, 2)]), truncate=st.booleans())
def test_yarn_and_linear_match_transformers(head_dim, base, factor, original, beta, truncate):
    scaling = P.rope_scaling("yarn", factor, original, beta_fast=beta[0], beta_slow=beta[1], truncate=truncate)
    config = hf_config(head_dim, base, original * int(factor), scaling)
    want_inv, want_factor = ROPE_INIT_FUNCTIONS["yarn"](config, None)
    inv, attention = P.rope_parameters(head_dim, base, scaling, 10)
    assert torch.allclose(inv, want_inv, rtol=1e-6)
    assert attention == pytest.approx(want_factor)
    scaling = P.rope_scaling("linear", factor, original)
    want_inv, want_factor = ROPE_INIT_FUNCTIONS["linear"](hf_config(head_dim, base, original, scaling), None)
    inv, attention = P.rope_parameters(head_dim, base, scaling, 10)
    assert torch.allclose(inv, want_inv, rtol=1e-6) and attention == want_factor == 1.0


@settings(max_examples=30, deadline=None)
@given(head_dim=st.sampled_from([16, 64, 128]), base=st.sampled_from([10000.0, 100000.0]),
       factor=st.sampled_from([1.0, 2.0, 4.0, 8.0]), original=st.sampled_from([128, 4096]),
       ratio=st.sampled_from([0.25, 1.0, 1.5, 3.0, 16.0]))
def test_dynamic_and_static_ntk_match_transformers(head_dim, base, factor, original, ratio):
    seq_len = max(1, int(ratio * original))
    scaling = P.rope_scaling("dynamic", factor, original)
    config = hf_config(head_dim, base, original, {"rope_type": "dynamic", "factor": factor})
    want_inv, _ = ROPE_INIT_FUNCTIONS["dynamic"](config, None, seq_len=seq_len)
    inv, attention = P.rope_parameters(head_dim, base, scaling, seq_len)
    assert torch.allclose(inv, want_inv, rtol=1e-5) and attention == 1.0
    # static NTK-aware with scale s = transformers' dynamic with factor 1 evaluated at length s·L
    config = hf_config(head_dim, base, original, {"rope_type": "dynamic", "factor": 1.0})
    want_inv, _ = ROPE_INIT_FUNCTIONS["dynamic"](config, None, seq_len=int(factor * original))
    inv, _ = P.rope_parameters(head_dim, base, P.rope_scaling("ntk", factor, original), 1)
    assert torch.allclose(inv, want_inv, rtol=1e-5)


def test_scalings_keep_fast_dimensions_and_stretch_slow_ones():
    """The lecture's picture: NTK/YaRN leave high frequencies (almost) alone and divide the lowest by s."""
    d, base, s, L = 64, 10000.0, 4.0, 2048
    theta = P.rope_inv_freq(d, base)
    ntk, pi = P.ntk_inv_freq(d, base, s), P.linear_inv_freq(d, base, s)
    yarn = P.yarn_inv_freq(d, base, s, L)
    assert torch.allclose(pi, theta / s)
    assert ntk[0] == theta[0] and ntk[-1] == pytest.approx(theta[-1] / s, rel=1e-5)
    assert (ntk / theta).diff().le(1e-7).all()  # the stretch grows steadily towards slow pairs
    low, high = P.yarn_correction_range(d, base, L)
    assert torch.equal(yarn[:low], theta[:low]) and torch.allclose(yarn[high:], theta[high:] / s)
    assert P.yarn_attention_factor(s) == pytest.approx(0.1 * math.log(s) + 1)
    # wavelengths: the pairs YaRN extrapolates turn at least beta_fast = 32 times within L
    assert (L / P.wavelengths(theta[:low]) >= 32).all()
    assert (L / P.wavelengths(theta[high + 1:]) <= 1).all()


# ---- the whole model equals transformers' Llama with the same rope_scaling -----------------------

@pytest.mark.parametrize("rope", [
    {"rope_type": "default"},
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "dynamic", "factor": 4.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
])
def test_llama_with_scaling_matches_transformers(rope):
    torch.manual_seed(0)
    original = 32
    config = hf_config(16, 10000.0, original * (4 if rope["rope_type"] == "yarn" else 1), rope)
    hf = transformers.LlamaForCausalLM(config).eval()
    ours_config = LlamaConfig.from_hf(config)
    if ours_config.rope_scaling is not None:
        ours_config.rope_scaling.setdefault("original_max_position_embeddings", original)
    ours = Llama(ours_config).eval()
    missing = ours.load_state_dict({k.removeprefix("model."): v for k, v in hf.state_dict().items()}, strict=False)
    assert not missing.missing_keys
    ids = torch.randint(0, 97, (1, 100))  # 100 > 32 trained positions, so every scaling is active
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids)
    assert torch.allclose(got, want, atol=1e-4)
    if rope["rope_type"] != "default":  # and the scaling matters: plain RoPE gives other logits
        plain = Llama(LlamaConfig(**{**ours_config.__dict__, "rope_scaling": None})).eval()
        plain.load_state_dict(ours.state_dict())
        with torch.no_grad():
            assert not torch.allclose(plain(ids), want, atol=1e-3)


# ---- the exercises reject plausible mistakes ------------------------------------------------------

def _fails(name, candidate):
    from lectlib.grading import ExerciseFailure, run_check
    with pytest.raises(ExerciseFailure):
        run_check(name, candidate)


def test_exercise_checks_catch_plausible_mistakes():
    def interleaved(x, pos, inv):  # adjacent pairs (2i, 2i+1): the GPT-NeoX/Meta layout mix-up
        x2 = torch.stack([-x[..., 1::2], x[..., ::2]], -1).flatten(-2)
        ang = pos[:, None].float() * inv.repeat_interleave(2)
        return x * ang.cos() + x2 * ang.sin()
    _fails("rope_apply", interleaved)
    _fails("rope_apply", lambda x, pos, inv: P.apply_rope(x, torch.arange(x.shape[2]), inv))  # ignores positions
    _fails("rope_apply", lambda x, pos, inv: x * P.rope_cos_sin(pos, inv)[0] - P.rotate_half(x) * P.rope_cos_sin(pos, inv)[1])
    _fails("rope_position_interpolation", lambda d, b, s: P.rope_inv_freq(d, b) * s)
    _fails("rope_position_interpolation", lambda d, b, s: P.rope_inv_freq(d, b * s))
    _fails("rope_ntk_base", lambda d, b, s: b * s)
    _fails("rope_ntk_base", lambda d, b, s: b * s ** ((d - 2) / d))


# ---- the tiny KJV Llama (lectlib.tiny) and the length experiments (lectlib.lengths) ---------------

import builtins  # noqa: E402
import pickle  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from lectlib import lengths, tiny  # noqa: E402


def test_pose_positions_and_compact_vocab():
    assert lengths.pose_positions(6, 2, 100).tolist() == [0, 1, 102, 103, 104, 105]
    with pytest.raises(ValueError, match="jump_at"):
        lengths.pose_positions(6, 6, 1)
    stream = torch.tensor([5, 5, 5, 9, 9, 2, 7, 7, 7, 7])
    vocab = tiny.compact_vocab(stream, size=3)
    assert vocab.tolist() == [7, 5] and tiny.encode(stream, vocab).tolist() == [1, 1, 1, 2, 2, 2, 0, 0, 0, 0]


def test_sink_token_batches_shift_the_sample_right_by_one():
    stream = torch.arange(100)
    inputs, targets = tiny.batches(stream, 8, 3, seed=5)(7)
    sink_inputs, sink_targets = tiny.with_sink_token(tiny.batches(stream, 8, 3, seed=5))(7)
    assert sink_inputs.shape == inputs.shape and torch.equal(sink_targets, inputs)
    assert (sink_inputs[:, 0] == tiny.SINK_TOKEN).all() and torch.equal(sink_inputs[:, 1:], inputs[:, :-1])


def test_sink_token_checkpoint_has_the_extra_token_and_learned(tmp_path):
    model, vocab, losses = tiny.load_tiny(tiny.SINK_CHECKPOINT)
    assert model.config.vocab_size == tiny.VOCAB + 1 == tiny.SINK_TOKEN + 1 and len(vocab) == tiny.VOCAB - 1
    assert sum(losses[-50:]) / 50 < 0.5 * sum(losses[:50]) / 50
    with pytest.raises(FileNotFoundError, match="lectlib.tiny train --sink-token"):
        tiny.load_tiny(tmp_path / tiny.SINK_CHECKPOINT.name)


class _Planted:
    """A pickle that runs code when unpickled: what a tampered checkpoint could hold."""

    def __reduce__(self):
        return exec, ("import builtins; builtins._lectlib_planted = True",)


def test_checkpoints_load_without_running_pickled_code(tmp_path):
    path = tmp_path / "planted.pt"
    torch.save({"state": {}, "payload": _Planted()}, path)
    with pytest.raises(pickle.UnpicklingError):
        tiny.load_tiny(path)
    assert not hasattr(builtins, "_lectlib_planted")
    model, _, _ = tiny.load_tiny()  # the shipped checkpoints hold tensors and numbers only
    assert model.config.max_positions == tiny.TRAIN_LEN


def test_set_scaling_rejects_bad_settings_and_scaled_rope_restores():
    model = Llama(tiny.tiny_config(n_layers=1))
    for kwargs, word in ((dict(method="yarn", factor=4, original=0), "original"),
                         (dict(method="dynamic", factor=4, original=-5), "original"),
                         (dict(method="linear", factor=0.5), "factor"),
                         (dict(method="linear", factor=float("nan")), "factor"),
                         (dict(method="rope", factor=2), "rope_type")):
        with pytest.raises(ValueError, match=word):
            lengths.set_scaling(model, **kwargs)
    assert model.config.rope_scaling is None
    lengths.set_scaling(model, "yarn", 4)  # original defaults to the model's trained length
    assert model.config.rope_scaling["original_max_position_embeddings"] == tiny.TRAIN_LEN
    model.config.rope_scaling = None
    with pytest.raises(RuntimeError):
        with lengths.scaled_rope(model, "ntk", 2.0) as scaled:
            assert scaled.config.rope_scaling["rope_type"] == "ntk"
            raise RuntimeError("the block fails")
    assert model.config.rope_scaling is None


@pytest.fixture(scope="module")
def tiny_model():
    model, vocab, losses = tiny.load_tiny()
    stream, _ = tiny.kjv_stream(vocab)
    return model, tiny.split(stream)[1], losses


def test_nll_by_position_equals_full_logits_and_buckets_average_bins(tiny_model):
    model, held_out, _ = tiny_model
    windows = lengths.eval_windows(held_out, 50, 3)
    with torch.no_grad():
        logits = model(windows[:, :-1])
    oracle = F.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none").mean(0)
    torch.testing.assert_close(lengths.nll_by_position(model, windows, batch=2, head_chunk=7), oracle,
                               rtol=1e-5, atol=1e-5)
    nll = [1.0, 2.0, 3.0, 5.0, 8.0]
    assert lengths.bucket_perplexity(nll, 16, 32) == pytest.approx([math.exp(1.5), math.exp(4.0), math.exp(8.0)])
    assert lengths.binned_perplexity(torch.tensor(nll), 2) == pytest.approx([math.exp(1.5), math.exp(4.0), math.exp(8.0)])
    with pytest.raises(ValueError, match="multiple"):
        lengths.bucket_perplexity(nll, 16, 40)


def test_shifting_every_position_changes_nothing_for_plain_rope(tiny_model):
    """Why skipped positions work: RoPE sees only differences, so one common offset is invisible."""
    model, held_out, _ = tiny_model
    ids = held_out[None, :64]
    with torch.no_grad():
        base = model(ids)
        shifted = model(ids, positions=torch.arange(64) + 3000)
        skipped = model(ids, positions=lengths.pose_positions(64, 32, 3000))
    assert torch.allclose(base, shifted, atol=2e-2)
    assert torch.allclose(base[:, :32], skipped[:, :32], atol=1e-5) and not torch.allclose(base, skipped, atol=0.5)


def test_chapter_claims_on_the_tiny_model(tiny_model):
    """The shipped checkpoint learned, plain RoPE degrades past 128 tokens, dynamic NTK is plain RoPE inside it."""
    model, held_out, losses = tiny_model
    assert sum(losses[-50:]) / 50 < 0.5 * sum(losses[:50]) / 50
    windows = lengths.eval_windows(held_out, 4 * tiny.TRAIN_LEN, 8)
    sweep = dict(factor=4.0, original=tiny.TRAIN_LEN, bin_size=tiny.TRAIN_LEN)
    ppl = lengths.perplexity_by_position(model, windows, **sweep)
    assert ppl["default"][0] < 80 and ppl["default"][-1] > 1.3 * ppl["default"][0]
    assert min(ppl["ntk"][-1], ppl["dynamic"][-1], ppl["yarn"][-1]) < ppl["default"][-1]
    assert ppl["linear"][0] > 1.1 * ppl["default"][0]  # PI changes even the short context
    short = lengths.perplexity_by_position(model, windows[:, :tiny.TRAIN_LEN + 1], **sweep)
    assert short["dynamic"] == short["default"]  # an input no longer than L: dynamic NTK is plain RoPE
    assert ppl["dynamic"][0] != ppl["default"][0]  # in a 4L window, it rescales every position
    assert model.config.rope_scaling is None  # the sweep restores the model


class _ScriptedLM(torch.nn.Module):
    """Logits that put 5 nats on a scripted next token after each place: a hand-made oracle."""

    def __init__(self, script: dict[int, int], vocab: int = 10):
        super().__init__()
        self.script, self.vocab = script, vocab
        self.device_probe = torch.nn.Parameter(torch.zeros(()))  # forced_key_score reads the device from a parameter

    def forward(self, ids, positions=None):
        logits = torch.zeros(1, ids.shape[1], self.vocab)
        for place in range(ids.shape[1]):
            logits[0, place, self.script.get(place, 0)] = 5.0
        return logits


def test_forced_key_score_scores_the_key_not_the_free_answer():
    prompt = torch.tensor([[1, 2, 3]])
    # After the prompt the model would write word 9 ("the"); after the forced space 4 it writes the key 5, 6.
    model = _ScriptedLM({2: 9, 3: 5, 4: 6})
    logprob, hit = lengths.forced_key_score(model, prompt, [4], [5, 6])
    assert hit and logprob == pytest.approx(2 * (5 - math.log(math.exp(5) + 9)))
    logprob, hit = lengths.forced_key_score(_ScriptedLM({2: 9, 3: 5, 4: 7}), prompt, [4], [5, 6])
    assert not hit and logprob == pytest.approx((5 - math.log(math.exp(5) + 9)) + (0 - math.log(math.exp(5) + 9)))
    with pytest.raises(ValueError, match="key"):
        lengths.forced_key_score(model, prompt, [4], [])


def test_split_answer_forces_smollm2s_lone_space_token():
    tokenizer = tiny.tokenizer()
    prefix, key = lengths.split_answer(tokenizer, "68301")
    assert tokenizer.decode(prefix) == " " and tokenizer.decode(key) == "68301" and len(key) == 5


def test_smollm2_with_skipped_positions_breaks_with_plain_rope_only(smollm):
    """The chapter's PoSE claim: past 8192 plain RoPE explodes, NTK-aware / dynamic NTK / YaRN stay near their value
    at distances seen in training."""
    from lectlib import data
    model, tokenizer = smollm
    windows = lengths.eval_windows(data.tokens(tokenizer)[-200_000:], 128, 1)
    ppl = lengths.pose_sweep(model, windows, jump_at=64, offsets=[4096, 24576], original=8192, factor=4.0)
    assert ppl["default"][1] > 4 * ppl["default"][0]
    for method in ("ntk", "dynamic", "yarn"):
        assert ppl[method][1] < 1.6 * ppl[method][0] and ppl[method][1] < ppl["default"][1] / 3


def test_rope_buckets_record_on_smollm2_matches_chunked_perplexity(smollm):
    """The recorder behind chapter 2's figure: its plain-RoPE NLL per bin equals evals.token_nlls (a KV-cache
    implementation) over the same span, dynamic NTK is plain RoPE inside the trained length, PI is not."""
    from lectlib import data, evals
    model, tokenizer = smollm
    rec = lengths.rope_buckets_record(model, tokenizer, length=64, bin_size=32, factor=2.0, progress=False)
    assert rec["span"] == data.UNSEEN_SPAN and rec["trained_length"] == 8192 and set(rec["nll_per_bin"]) == set(P.ROPE_TYPES)
    oracle = evals.token_nlls(model, data.unseen_span(tokenizer, 65), chunk=16)
    assert rec["nll_per_bin"]["default"] == pytest.approx([oracle[:32].mean().item(), oracle[32:].mean().item()], abs=1e-3)
    assert rec["nll_per_bin"]["dynamic"] == rec["nll_per_bin"]["default"]
    assert rec["nll_per_bin"]["linear"] != pytest.approx(rec["nll_per_bin"]["default"], abs=1e-3)
    assert model.config.rope_scaling is None


def test_rope_buckets_record_holds_five_methods_and_chapter_2s_claims():
    """data/results/rope_buckets.json (python -m lectlib.lengths buckets --length 16384), as chapter 2 states it:
    five methods over 16,384 tokens at s = 2; plain RoPE fine in the first bucket past 8,192 then above 100; PI about
    2x plain inside the trained length and flat past it; NTK-aware, dynamic NTK and YaRN within 3% of plain inside and
    no 2,048-bucket above 16.5 past it, NTK-aware the lowest past it."""
    rec = lengths.load_record()
    assert set(rec["nll_per_bin"]) == set(P.ROPE_TYPES) and rec["length"] == 16384 and rec["factor"] == 2.0
    assert all(len(nll) == rec["length"] // rec["bin_size"] for nll in rec["nll_per_bin"].values())
    b = {m: lengths.bucket_perplexity(nll, rec["bin_size"], 2048) for m, nll in rec["nll_per_bin"].items()}
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    inside = {m: mean(p[:4]) for m, p in b.items()}
    assert b["default"][4] < 17 and b["default"][-1] > 400 and min(b["default"][6:]) > 100
    assert 2.2 < inside["linear"] / inside["default"] < 2.4 and max(b["linear"][4:]) < 43
    for m in ("ntk", "dynamic", "yarn"):
        assert 1.0 <= inside[m] / inside["default"] < 1.03 and max(b[m][4:]) < 16.6
    assert min(b, key=lambda m: mean(b[m][4:])) == "ntk"


def test_passkey_with_skipped_positions_is_scored_on_the_key(smollm):
    """Without a skip SmolLM2 writes the key after the forced space (the free answer may start with a word)."""
    model, tokenizer = smollm
    result = lengths.pose_passkey(model, tokenizer, length=128, offsets=[0], original=8192, factor=4.0,
                                  methods=("default",), trials=1)
    assert result["default"]["accuracy"] == [1.0] and -5 < result["default"]["logprob"][0] <= 0
    assert model.config.rope_scaling is None
