"""The Jamba-style hybrid: layout, MoE routing, generation state and its memory (Jamba, Table 1)."""

import pytest
import torch

from lectlib import jamba, memory

GiB = 2 ** 30


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors


@pytest.mark.parametrize("name, gib", [("Llama-2-7B", 128), ("Mistral-7B", 32), ("Mixtral-8x7B", 32),
                                       ("Jamba (52B, 12B active)", 4)])
def test_kv_cache_at_256k_reproduces_jamba_table_1(name, gib):
    assert memory.model_kv_cache_bytes(name, 262144) == gib * GiB


def test_jamba_v0_1_config_is_the_released_model():
    config = jamba.JambaConfig.jamba_v0_1()
    assert config.layout() == "mMmMaMmM" * 4  # one attention layer in eight, MoE every other layer
    total, active = jamba.parameter_counts(config)
    # 52B total, 12B active (the paper's rounding; we omit Jamba's small inner RMSNorms).
    assert abs(total / 1e9 - 52) < 1 and abs(active / 1e9 - 12) < 0.5
    shape, preset = config.shape(), memory.preset("Jamba (52B, 12B active)")
    for field in ("n_layers", "n_kv_heads", "head_dim", "kv_layers", "ssm_layers", "d_inner", "d_state", "d_conv"):
        assert getattr(shape, field) == getattr(preset, field), field
    assert memory.model_kv_cache_bytes(shape, 262144) == 4 * GiB
    # The Mamba states add a constant 28·8192·(16+3)·2 bytes ≈ 8.3 MiB, whatever the context.
    assert memory.ssm_state_bytes(shape) == 28 * 8192 * 19 * 2


def _tiny(**overrides):
    torch.manual_seed(0)
    return jamba.Jamba(jamba.JambaConfig(vocab_size=20, **overrides)).eval()


def test_layout_follows_periods_and_offsets():
    config = jamba.JambaConfig(n_layers=8, attn_period=8, attn_offset=4, moe_period=2, moe_offset=1)
    assert config.layout() == "mMmMaMmM"
    model = jamba.Jamba(config)
    kinds = ["attention" if isinstance(layer.mixer, jamba.HybridAttention) else "mamba" for layer in model.layers]
    assert kinds.count("attention") == 1 and kinds[4] == "attention"
    assert [isinstance(layer.ffn, jamba.MoE) for layer in model.layers] == [i % 2 == 1 for i in range(8)]
    with pytest.raises(ValueError, match="attn_offset"):
        jamba.JambaConfig(attn_period=4, attn_offset=4)
    with pytest.raises(ValueError, match="top_k"):
        jamba.JambaConfig(n_experts=2, top_k=3)


def test_moe_equals_the_dense_mixture_over_the_top_k_experts():
    torch.manual_seed(0)
    moe = jamba.MoE(jamba.JambaConfig(d_model=16, hidden_dim=24, n_experts=5, top_k=2))
    x = torch.randn(3, 7, 16)
    flat = x.reshape(-1, 16)
    logits = moe.router(flat)
    mask = logits >= logits.topk(2, -1).values[:, -1:]  # the two best experts of each token
    weights = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1)  # (tokens, experts), 0 elsewhere
    dense = sum(weights[:, e, None] * expert(flat) for e, expert in enumerate(moe.experts))
    torch.testing.assert_close(moe(x), dense.view_as(x))
    assert (mask.sum(-1) == 2).all()


def test_step_by_step_equals_full_forward_and_memory_is_what_memory_py_says():
    model = _tiny()
    ids = torch.randint(0, 20, (2, 17))
    with torch.no_grad():
        full = model(ids)
        state = jamba.HybridState()
        outs = [model(ids[:, :6], state)]
        sizes = {}
        for t in range(6, 17):
            outs.append(model(ids[:, t:t + 1], state))
            sizes[t + 1] = (state.kv.nbytes(), state.ssm.nbytes())
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-4, atol=1e-4)
    shape = model.config.shape()
    assert state.nbytes() == memory.cache_bytes(shape, 17, batch_size=2, bytes_per_element=4)
    # The KV part grows with every token, the SSM part stays constant.
    assert sizes[17][0] > sizes[7][0] and sizes[17][1] == sizes[7][1] == memory.ssm_state_bytes(shape, 2, 4)


def test_generate_is_greedy(full_forward_greedy):
    model = _tiny()
    prompt = torch.randint(0, 20, (1, 5))
    assert torch.equal(model.generate(prompt, 4), full_forward_greedy(model, prompt, 4))


def test_hybrid_trains():
    model = _tiny()
    model.train()
    ids = torch.randint(0, 20, (4, 12))
    loss = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
    loss.backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "experts" not in n)
