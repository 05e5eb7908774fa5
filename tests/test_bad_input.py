"""Bad input, one table per module: each call raises a ValueError that names the argument, or gives the
documented result. Cases from the issue "Correctness under bad input and faults" and their neighbours."""

import math

import pytest
import torch

from lectlib import attention, flash, jamba, llama, memory, positions, ssm, streaming

NAN = float("nan")
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}


def tiny_llama():
    torch.manual_seed(0)
    return llama.Llama(llama.LlamaConfig(vocab_size=32, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=8,
                                         hidden_dim=32, max_positions=64))


def tiny_mamba():
    torch.manual_seed(0)
    return ssm.MambaLM(ssm.MambaConfig(vocab_size=16, d_model=16, n_layers=1))


def tiny_jamba():
    torch.manual_seed(0)
    return jamba.Jamba(jamba.JambaConfig(d_model=16, n_layers=2, attn_period=2, attn_offset=1, n_heads=2, n_kv_heads=1,
                                         hidden_dim=32))


NO_TOKENS = torch.zeros(1, 0, dtype=torch.long)
OUT_OF_VOCABULARY = torch.tensor([[1, 2, 99]])
Q, Q16 = torch.randn(1, 2, 3, 8), torch.randn(1, 2, 3, 16)

RAISES = {
    "memory": [
        (lambda: memory.ssm_state_bytes("Mamba-2.8B", batch_size=-3), "batch_size"),
        (lambda: memory.ssm_state_bytes("Mamba-2.8B", bytes_per_element=-1), "bytes_per_element"),
        (lambda: memory.weight_bytes("Llama-2-7B", -2), "bytes_per_element"),
        (lambda: memory.cache_bytes("Llama-2-7B", seq_len=-1), "seq_len"),
        (lambda: memory.model_kv_cache_bytes("Llama-2-7B", 10, batch_size=-1), "batch_size"),
    ],
    "positions": [
        (lambda: positions.rope_inv_freq(64, base=NAN), "base"),
        (lambda: positions.rope_inv_freq(64, base=float("inf")), "base"),
        (lambda: positions.rope_inv_freq(7), "head_dim"),
        (lambda: positions.rope_cos_sin(torch.arange(4), positions.rope_inv_freq(8), attention_factor=-1),
         "attention_factor"),
        (lambda: positions.rope_parameters(64, 1e4, {**YARN, "attention_factor": -1}, 100), "attention_factor"),
        (lambda: positions.ntk_inv_freq(2, 1e4, 2.0), "head_dim"),
        (lambda: positions.ntk_base(2, 1e4, 2.0), "head_dim"),
        (lambda: positions.dynamic_ntk_inv_freq(64, 1e4, 2.0, 100, 0), "original_max_position_embeddings"),
        (lambda: positions.rope_parameters(64, 1e4, {"rope_type": "dynamic", "factor": 2.0,
                                                      "original_max_position_embeddings": 0}, 100),
         "original_max_position_embeddings"),
        (lambda: positions.yarn_inv_freq(64, 1e4, 4.0, 0), "original_max_position_embeddings"),
        (lambda: positions.yarn_inv_freq(64, 1e4, 4.0, -512), "original_max_position_embeddings"),
        (lambda: positions.rope_parameters(64, 1e4, {**YARN, "original_max_position_embeddings": 0}, 100),
         "original_max_position_embeddings"),
        (lambda: positions.rope_parameters(64, 1e4, {"rope_type": "linear"}, 100), "factor"),
        (lambda: positions.rope_parameters(64, 1e4, {**YARN, "factor": NAN}, 100), "factor"),
        (lambda: positions.linear_inv_freq(64, 1e4, 0.5), "factor"),
        (lambda: positions.yarn_attention_factor(4.0, mscale=-1), "mscale"),
    ],
    "attention": [
        (lambda: attention.causal_mask(-1, 3), "n_q"),
        (lambda: attention.causal_mask(3, 2.5), "n_k"),
        (lambda: attention.causal_mask(3, 5, start=4, end=2), "start"),
        (lambda: attention.naive_attention(Q, Q, Q, scale=NAN), "scale"),
        (lambda: attention.blockwise_attention(Q, Q, Q, scale="big"), "scale"),
        (lambda: attention.blockwise_attention(Q, Q, Q, block_size=0), "block_size"),
        (lambda: attention.online_softmax_attention(Q, Q[:, :0], Q[:, :0]), "heads"),
        (lambda: attention.attention_probs(Q, Q.half()), "dtype"),
        (lambda: attention.sdpa_attention(Q, Q, Q[..., :4]), "same shape"),
        (lambda: flash.flash_attention(Q16, Q16, Q16, scale=NAN), "scale"),
    ],
    "llama": [
        (lambda: llama.LlamaConfig(n_kv_heads=0), "n_kv_heads"),
        (lambda: llama.LlamaConfig(n_heads=0), "n_heads"),
        (lambda: tiny_llama()(NO_TOKENS), "at least one token"),
        (lambda: tiny_llama()(OUT_OF_VOCABULARY), r"input_ids must lie in \[0, 32\)"),
        (lambda: tiny_llama().generate(torch.tensor([[1, 2]]), -1), "max_new_tokens"),
        (lambda: tiny_llama().generate(NO_TOKENS, 3), "at least one token"),
    ],
    "ssm": [
        (lambda: ssm.MambaConfig(d_state=0), "d_state"),
        (lambda: tiny_mamba()(NO_TOKENS), "at least one token"),
        (lambda: tiny_mamba()(OUT_OF_VOCABULARY), r"input_ids must lie in \[0, 16\)"),
        (lambda: tiny_mamba().step_sizes(NO_TOKENS), "at least one token"),
        (lambda: tiny_mamba().generate(torch.tensor([[1]]), 2.5), "max_new_tokens"),
    ],
    "jamba": [
        (lambda: jamba.JambaConfig(n_kv_heads=0), "n_kv_heads"),
        (lambda: jamba.JambaConfig(n_experts=0), "n_experts"),
        (lambda: tiny_jamba()(NO_TOKENS), "at least one token"),
        (lambda: tiny_jamba()(OUT_OF_VOCABULARY), r"input_ids must lie in \[0, 16\)"),
    ],
    "streaming": [
        (lambda: streaming.sink_window_attention(sinks=-1, window=4, inv_freq=positions.rope_inv_freq(8)), "sinks"),
        (lambda: streaming.sink_window_attention(sinks=1, window=0, inv_freq=positions.rope_inv_freq(8)), "window"),
        (lambda: streaming.uniform_mass(16), "first_query"),
        (lambda: streaming.uniform_mass(10, first_query=-1), "first_query"),
    ],
}


@pytest.mark.parametrize("call,argument", [pytest.param(call, argument, id=f"{module}-{i}-{argument}")
                                           for module, rows in RAISES.items() for i, (call, argument) in enumerate(rows)])
def test_bad_input_raises_a_value_error_naming_the_argument(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()


RESULTS = {  # name: (call, check of its result): the documented answers to edge cases
    "llama generate(max_new_tokens=0) is (B, 0)": (lambda: tiny_llama().generate(torch.tensor([[1, 2], [3, 4]]), 0),
                                                  lambda out: out.shape == (2, 0) and out.dtype == torch.long),
    "mamba generate(max_new_tokens=0) is (B, 0)": (lambda: tiny_mamba().generate(torch.tensor([[1, 2]]), 0),
                                                  lambda out: out.shape == (1, 0)),
    "jamba generate(max_new_tokens=0) is (B, 0)": (lambda: tiny_jamba().generate(torch.tensor([[1, 2]]), 0),
                                                  lambda out: out.shape == (1, 0)),
    "uniform_mass over one query t = 16 is 1/17": (lambda: streaming.uniform_mass(17),
                                                   lambda out: math.isclose(out, 1 / 17)),
    "memory of zero tokens is 0 bytes": (lambda: memory.cache_bytes("Llama-2-7B", 0), lambda out: out == 0),
    "dynamic NTK at the trained length is plain RoPE": (
        lambda: positions.dynamic_ntk_inv_freq(64, 1e4, 4.0, 100, 512),
        lambda out: torch.equal(out, positions.rope_inv_freq(64, 1e4))),
    "a rope_scaling trained length written 512.0 is 512": (
        lambda: positions.rope_parameters(64, 1e4, {**YARN, "original_max_position_embeddings": 512.0}, 100)[0],
        lambda out: torch.equal(out, positions.rope_parameters(64, 1e4, YARN, 100)[0])),
    "attention of queries that see no key is 0": (
        lambda: attention.blockwise_attention(torch.randn(1, 1, 4, 8), torch.randn(1, 1, 2, 8), torch.randn(1, 1, 2, 8),
                                              causal=True),
        lambda out: torch.equal(out[:, :, :2], torch.zeros(1, 1, 2, 8))),
}


@pytest.mark.parametrize("name", RESULTS)
def test_edge_cases_give_the_documented_result(name):
    call, check = RESULTS[name]
    assert check(call())


def test_flash_forward_says_why_the_kernel_cannot_run(monkeypatch):
    """Called directly (as the chapter's exercise check does), the kernel launcher says why it cannot
    run rather than failing inside Triton; the subprocess case of Triton imported first is in test_flash."""
    monkeypatch.setattr(flash, "kernel_available", lambda device: (False, "Triton was imported before TRITON_INTERPRET=1"))
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(RuntimeError, match="flash.forward cannot run the Triton kernel here: Triton was imported"):
        flash.forward(q, q, q)


def test_a_planted_pickle_in_the_token_cache_is_not_run(tmp_path, monkeypatch):
    """The token cache is read with torch.load(weights_only=True): a file that would run code on
    unpickling is refused (and the tokens are encoded anew) instead of executed."""
    from lectlib import data

    class Tokenizer:
        def encode(self, text):
            return [len(text) % 7]

        def __len__(self):
            return 7

    class Planted:
        def __reduce__(self):
            return (open, (str(tmp_path / "pwned"), "w"))

    monkeypatch.setenv("LECTLIB_CACHE", str(tmp_path))
    monkeypatch.setattr(data, "_TOKENS", {})
    path = tmp_path / f"kjv-tokens-{data._tokenizer_key(Tokenizer())}.pt"
    torch.save({"ids": Planted()}, path)
    ids = data.tokens(Tokenizer())
    assert not (tmp_path / "pwned").exists()
    assert ids.tolist() == [len(data.text()) % 7]
    assert torch.equal(torch.load(path, weights_only=True), ids)  # rewritten as plain tensor data
