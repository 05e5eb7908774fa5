"""S²-Attn against naive attention under an explicitly built mask; LoRA against its formula."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from lectlib import longlora as LL
from lectlib.llama import Llama, LlamaConfig


def naive_masked_attention(q, k, v, mask):
    """softmax(q kᵀ / √D + log mask) v with k, v repeated for GQA: the textbook formula."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v


def loop_mask(n, g, h, causal):
    """The S²-Attn pattern written out token by token: the rolled order is r(t) = (t - g/2) mod n."""
    mask = torch.zeros(h, n, n, dtype=torch.bool)
    for head in range(h):
        shifted = head >= h // 2
        for i in range(n):
            for j in range(n):
                ri, rj = ((i - g // 2) % n, (j - g // 2) % n) if shifted else (i, j)
                mask[head, i, j] = ri // g == rj // g and (not causal or rj <= ri)
    return mask


@settings(max_examples=20, deadline=None)
@given(groups=st.integers(1, 4), half_g=st.integers(1, 4), h_kv=st.sampled_from([1, 2]), rep=st.sampled_from([1, 2, 3]),
       causal=st.booleans(), seed=st.integers(0, 1000))
def test_s2_attention_equals_full_attention_under_its_mask(groups, half_g, h_kv, rep, causal, seed):
    g = 2 * half_g
    n, h = groups * g, h_kv * rep
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(2, h, n, 8, generator=gen, dtype=torch.float64)
    k, v = torch.randn(2, 2, h_kv, n, 8, generator=gen, dtype=torch.float64)
    mask = loop_mask(n, g, h, causal)
    assert torch.equal(LL.s2_attention_mask(n, g, h, causal=causal), mask)
    want = naive_masked_attention(q, k, v, mask)
    assert torch.allclose(LL.s2_attention(q, k, v, group_size=g, causal=causal), want, atol=1e-10)


def test_shift_lets_early_tokens_see_the_last_group_under_a_causal_mask():
    """The documented caveat: the roll wraps, so tokens 0..G/2-1 of the shifted heads see tokens N-G/2..N-1."""
    n, g = 32, 8
    mask = LL.s2_attention_mask(n, g, 2)
    plain, shifted = mask
    assert LL.future_peeks(plain[None]) == 0
    assert shifted[0, n - g // 2:].all() and shifted[0, : n - g // 2].sum() == 1
    assert LL.future_peeks(shifted[None]) == (g // 2) ** 2  # every early token sees every late one
    # and it is real in the computation: changing the last token changes the output of the first one
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, n, 4)
    out = LL.s2_attention(q, k, v, group_size=g)
    v2 = v.clone()
    v2[:, :, -1] += 1
    out2 = LL.s2_attention(q, k, v2, group_size=g)
    assert torch.equal(out[:, 0, 0], out2[:, 0, 0]) and not torch.allclose(out[:, 1, 0], out2[:, 1, 0])


def test_s2_attention_sees_less_than_full_attention_but_covers_every_group_border():
    n, g, h = 64, 16, 4
    mask = LL.s2_attention_mask(n, g, h)
    full = torch.ones(n, n, dtype=torch.bool).tril()
    assert mask.sum() < h * full.sum()
    # information crosses a group border through the shifted heads: a query right after a border sees keys before it
    crossing = mask[h // 2:, g, g - 1]
    assert crossing.all() and not mask[: h // 2, g, g - 1].any()


def test_s2_attention_validates_and_falls_back_when_decoding():
    q = torch.randn(1, 2, 10, 4)
    with pytest.raises(ValueError, match="group_size"):
        LL.s2_attention(q, q, q, group_size=4)
    with pytest.raises(ValueError, match="group_size"):
        LL.s2_attn(3)
    k = torch.randn(1, 2, 12, 4)
    from lectlib.attention import sdpa_attention
    assert torch.equal(LL.s2_attention(q, k, k, group_size=4), sdpa_attention(q, k, k, causal=True))


def tiny_llama(**kw):
    torch.manual_seed(0)
    return Llama(LlamaConfig(vocab_size=50, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                             hidden_dim=64, rope_theta=10000.0, max_positions=64, **kw)).eval()


def test_s2_attention_plugs_into_llama_and_trains():
    model = tiny_llama()
    ids = torch.randint(0, 50, (2, 32))
    full = model(ids)
    model.set_attention(LL.s2_attn(8))
    sparse = model(ids)
    assert sparse.shape == full.shape and not torch.allclose(sparse, full, atol=1e-4)
    sparse.logsumexp(-1).mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.set_attention(LL.s2_attn(32))  # one group: plain heads are full causal attention
    assert model.generate(ids[:1, :32], 3).shape == (1, 3)  # decoding falls back to full attention


def test_lora_starts_as_the_base_model_and_trains_only_adapters_norms_embeddings():
    model = tiny_llama()
    ids = torch.randint(0, 50, (1, 16))
    before = model(ids).detach()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = LL.add_lora(model, r=4, alpha=8)
    assert torch.allclose(model(ids), before, atol=1e-6)  # B = 0: no change at the start
    c = model.config
    per_layer = (LL.lora_parameter_count(c.dim, c.n_heads * c.head_dim, 4) * 2
                 + LL.lora_parameter_count(c.dim, c.n_kv_heads * c.head_dim, 4) * 2)
    norms = (2 * c.n_layers + 1) * c.dim
    trainable, total = LL.count_parameters(model)
    assert trainable == sum(p.numel() for p in params) == c.n_layers * per_layer + norms + c.vocab_size * c.dim
    assert total == sum(v.numel() for v in frozen.values()) + c.n_layers * per_layer
    bare = tiny_llama()
    assert LL.count_parameters(bare)[0] > trainable  # every weight trains without LoRA
    optimizer = torch.optim.SGD(params, lr=0.5)
    model.train()
    torch.nn.functional.cross_entropy(model(ids)[0, :-1], ids[0, 1:]).backward()
    optimizer.step()
    after = dict(model.named_parameters())
    q = model.layers[0].self_attn.q_proj
    assert torch.equal(q.base.weight, frozen["layers.0.self_attn.q_proj.weight"])  # W is frozen
    assert torch.equal(after["layers.0.mlp.up_proj.weight"], frozen["layers.0.mlp.up_proj.weight"])
    assert not torch.equal(after["embed_tokens.weight"], frozen["embed_tokens.weight"])
    assert q.lora_B.abs().sum() > 0
    x = torch.randn(3, c.dim)
    assert torch.allclose(q(x), x @ q.weight.t(), atol=1e-5)  # the merged weight computes the same


def test_lora_only_adapters_when_asked():
    model = tiny_llama()
    LL.add_lora(model, r=2, train_embeddings=False, train_norms=False)
    c = model.config
    trainable, _ = LL.count_parameters(model)
    # q, o: 32 -> 32; k, v: 32 -> 16 (two KV heads of 8); each adapter is r·(d_in + d_out)
    assert trainable == c.n_layers * 2 * ((32 + 32) * 2 + (32 + 16) * 2) == 896


def test_s2_shift_exercise_catches_plausible_mistakes():
    from lectlib.grading import ExerciseFailure, run_check
    mistakes = [
        lambda x, g: x.roll(-g // 2, dims=2),  # every head shifted
        lambda x, g: LL.s2_shift(x, g, back=True),  # wrong direction
        lambda x, g: torch.cat([x[:, : x.shape[1] // 2].roll(-g // 2, 2), x[:, x.shape[1] // 2:]], 1),  # wrong half
        lambda x, g: torch.cat([x[:, : x.shape[1] // 2], x[:, x.shape[1] // 2:].roll(-g // 2, 3)], 1),  # wrong axis
    ]
    for candidate in mistakes:
        with pytest.raises(ExerciseFailure):
            run_check("s2_shift", candidate)
    run_check("s2_shift", lambda x, g: LL.s2_shift(x, g))
