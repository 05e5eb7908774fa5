"""lectlib's from-scratch Llama against transformers' LlamaForCausalLM (the oracle)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import LlamaConfig as HFLlamaConfig
from transformers import LlamaForCausalLM

from lectlib.kv import KVCache
from lectlib.llama import Llama, LlamaConfig

PROMPT = "In the beginning God created the heaven and the earth. And the earth was without form"


def test_one_pass_logits_equal_transformers(smollm, smollm_hf):
    model, tok = smollm
    hf, _ = smollm_hf
    ids = tok(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (model(ids) - hf(ids).logits).abs().max().item()
    assert diff < 1e-4


def test_token_by_token_with_cache_equals_transformers(smollm, smollm_hf):
    model, tok = smollm
    hf, _ = smollm_hf
    ids = tok(PROMPT, return_tensors="pt").input_ids
    cache = KVCache()
    with torch.no_grad():
        stepped = torch.cat([model(ids[:, i:i + 1], cache=cache) for i in range(ids.shape[1])], dim=1)
        reference = hf(ids).logits
    assert len(cache) == ids.shape[1] and cache.seen == ids.shape[1]
    assert (stepped - reference).abs().max().item() < 1e-4


def test_greedy_generation_gives_transformers_tokens(smollm, smollm_hf):
    model, tok = smollm
    hf, _ = smollm_hf
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    ours = model.generate(ids, 16)
    theirs = hf.generate(ids, max_new_tokens=16, do_sample=False)[:, ids.shape[1]:]
    assert ours.tolist() == theirs.tolist()


def test_prefill_then_decode_equals_one_pass(smollm):
    model, tok = smollm
    ids = tok(PROMPT, return_tensors="pt").input_ids
    cache = KVCache()
    with torch.no_grad():
        first = model(ids[:, :7], cache=cache)
        rest = model(ids[:, 7:], cache=cache)
        whole = model(ids)
    assert torch.allclose(torch.cat([first, rest], dim=1), whole, atol=1e-4)


def _random_pair(n_heads, n_kv_heads, head_dim, layers, vocab, seed):
    hf_config = HFLlamaConfig(vocab_size=vocab, hidden_size=n_heads * head_dim, intermediate_size=48,
                              num_hidden_layers=layers, num_attention_heads=n_heads, num_key_value_heads=n_kv_heads,
                              head_dim=head_dim, rms_norm_eps=1e-5, max_position_embeddings=256,
                              tie_word_embeddings=True, rope_theta=500.0)
    torch.manual_seed(seed)
    hf = LlamaForCausalLM(hf_config).eval()
    ours = Llama(LlamaConfig.from_hf(hf.config))
    ours.load_state_dict({k.removeprefix("model."): v for k, v in hf.state_dict().items()})
    return ours.eval(), hf


@settings(max_examples=12, deadline=None)
@given(kv=st.sampled_from([(4, 4), (4, 2), (6, 1), (6, 3)]), head_dim=st.sampled_from([8, 16]),
       n=st.integers(1, 33), seed=st.integers(0, 2**16))
def test_random_llamas_match_transformers(kv, head_dim, n, seed):
    """MHA, GQA and MQA shapes, odd lengths, random weights: same logits as transformers."""
    ours, hf = _random_pair(*kv, head_dim, layers=2, vocab=97, seed=seed)
    ids = torch.randint(0, 97, (2, n), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        assert torch.allclose(ours(ids), hf(ids).logits, atol=1e-5)


def test_config_reads_smollm2_shape(smollm):
    c = smollm[0].config
    assert (c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.rope_theta, c.max_positions) == (30, 9, 3, 64, 1e5, 8192)
    assert smollm[0].lm_head.weight is smollm[0].embed_tokens.weight  # tied embeddings


@pytest.mark.parametrize("bad, message", [
    (torch.tensor([[1, 2, 49152]]), r"\[0, 49152\)"),
    (torch.tensor([[-1, 2]]), r"\[0, 49152\)"),
    (torch.tensor([[1.0, 2.0]]), "integer token ids"),
    (torch.tensor([1, 2, 3]), r"\(batch, seq\)"),
])
def test_bad_input_ids_get_clear_errors(smollm, bad, message):
    with pytest.raises(ValueError, match=message):
        smollm[0](bad)


def test_bad_positions_get_clear_error(smollm):
    with pytest.raises(ValueError, match="positions must be"):
        smollm[0](torch.tensor([[1, 2, 3]]), positions=torch.arange(2))


def test_unreachable_hub_model_gets_clear_error(monkeypatch, tmp_path):
    from lectlib import models

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(RuntimeError, match="could not load"):
        models.load("no-such-org/no-such-model")
