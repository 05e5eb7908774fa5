"""The KV-cache calculator against the lecture's numbers and Table 1 of the Jamba paper."""

import pytest

from lectlib import memory

KIB, MIB, GIB = 2**10, 2**20, 2**30


def test_lecture_llama2_70b_numbers():
    mha = dict(n_layers=80, n_kv_heads=64, head_dim=128)
    assert memory.kv_cache_bytes(**mha, seq_len=1) == 2.5 * MIB
    assert memory.kv_cache_bytes(**mha, seq_len=512) == 1.25 * GIB
    assert memory.kv_cache_bytes(**mha, seq_len=4096, batch_size=16) == 160 * GIB
    assert memory.model_kv_cache_bytes("Llama-2-70B", 1) == 320 * KIB


@pytest.mark.parametrize("model, gib", [("Llama-2-7B", 128), ("Mistral-7B", 32), ("Mixtral-8x7B", 32),
                                        ("Jamba (52B, 12B active)", 4)])
def test_jamba_table_1_at_256k(model, gib):
    assert memory.model_kv_cache_bytes(model, 256 * 1024) == gib * GIB


def test_ssm_state_is_constant_and_mamba_has_no_kv():
    assert memory.model_kv_cache_bytes("Mamba-2.8B", 10**6) == 0
    assert memory.cache_bytes("Mamba-2.8B", 10) == memory.cache_bytes("Mamba-2.8B", 10**6) > 0
    jamba = "Jamba (52B, 12B active)"
    assert memory.cache_bytes(jamba, 8192) - memory.model_kv_cache_bytes(jamba, 8192) == memory.ssm_state_bytes(jamba)


def test_gqa_divides_the_cache_by_the_group_size():
    assert memory.model_kv_cache_bytes("Llama-2-70B (MHA-equivalent)", 1000) == 8 * memory.model_kv_cache_bytes("Llama-2-70B", 1000)


def test_scores_are_quadratic():
    assert memory.attention_scores_bytes(seq_len=4096, n_heads=1) == 32 * MIB
    assert memory.attention_scores_bytes(seq_len=8192, n_heads=1) == 4 * memory.attention_scores_bytes(seq_len=4096, n_heads=1)


def test_format_bytes():
    assert memory.format_bytes(2.5 * MIB) == "2.5 MiB"
    assert memory.format_bytes(160 * GIB) == "160 GiB"
    assert memory.format_bytes(512) == "512 B"


@pytest.mark.parametrize("kwargs, name", [(dict(seq_len=-1), "seq_len"), (dict(seq_len=1.5), "seq_len"),
                                          (dict(seq_len=1, batch_size=True), "batch_size")])
def test_bad_arguments_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        memory.kv_cache_bytes(n_layers=1, n_kv_heads=1, head_dim=1, **kwargs)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ValueError, match="Llama-2-7B"):
        memory.model_kv_cache_bytes("GPT-5", 10)
