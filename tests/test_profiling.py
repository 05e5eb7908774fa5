"""Chapter 0's split of a forward into attention, projections, MLP and output, in time and in FLOPs."""

import pytest
import torch

from lectlib import profiling, tiny
from lectlib.attention import sdpa_attention
from lectlib.llama import Llama


def _model(**overrides):
    torch.manual_seed(0)
    return Llama(tiny.tiny_config(n_layers=2, **overrides)).eval()


@pytest.mark.parametrize("n", [1, 7, 64])
def test_flops_match_parameter_and_mask_counts(n):
    model = _model()
    c = model.config
    flops = profiling.llama_forward_flops(c, n)
    weights = lambda names: sum(m.weight.numel() for name, m in model.named_modules()  # noqa: E731
                                if isinstance(m, torch.nn.Linear) and name.split(".")[-1] in names)
    assert flops["projections"] == 2 * n * weights({"q_proj", "k_proj", "v_proj", "o_proj"})
    assert flops["mlp"] == 2 * n * weights({"gate_proj", "up_proj", "down_proj"})
    assert flops["output"] == 2 * n * model.lm_head.weight.numel()
    pairs = int(torch.ones(n, n).tril().sum())  # (query, key) pairs a causal mask keeps
    assert flops["attention"] == c.n_layers * c.n_heads * pairs * 2 * 2 * c.head_dim
    with pytest.raises(ValueError, match="n"):
        profiling.llama_forward_flops(c, 0)


def test_forward_time_parts_charges_each_part_and_restores_the_model(monkeypatch):
    """A fake clock that moves only inside the attention function (1 s per call) and inside layer 0's MLP (0.5 s):
    the split must charge exactly those, whatever the machine's load."""
    model = _model()
    ids = torch.randint(0, model.config.vocab_size, (1, 32))
    clock = [0.0]
    monkeypatch.setattr(profiling.time, "perf_counter", lambda: clock[0])

    def slow_attention(q, k, v, **kwargs):
        clock[0] += 1.0
        return sdpa_attention(q, k, v, **kwargs)

    def slow_mlp(module, args, output):
        clock[0] += 0.5

    model.set_attention(slow_attention)
    model.layers[0].mlp.register_forward_hook(slow_mlp)  # runs before the split's own hook stops the clock
    parts = profiling.forward_time_parts(model, ids)
    assert parts == {"attention": 2.0, "projections": 0.0, "mlp": 0.5, "output": 0.0, "other": 0.0, "total": 2.5}
    assert all(block.self_attn.attn_fn is slow_attention for block in model.layers)
    assert not model.lm_head._forward_hooks and not model.layers[1].mlp._forward_pre_hooks
    with pytest.raises(ValueError, match="input_ids"):
        profiling.forward_time_parts(model, ids[0])
