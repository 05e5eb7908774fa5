"""lectlib.ring on gloo: output and gradients against single-process attention for P = 2 and 4 (one
spawn per world size, every check inside it), the layouts, and the calculator against bytes sent."""

import pytest
import torch

from lectlib import memory, ring

CASES = [  # (causal, layout, kv_heads): GQA (2 KV heads for 4 query heads) and MHA
    (False, "contiguous", 2), (False, "contiguous", 4), (True, "contiguous", 2), (True, "contiguous", 4),
    (True, "zigzag", 2), (True, "zigzag", 4),
]


def _checks(rank, world_size):
    """Every case on this rank, and the zig-zag and contiguous causal outputs rejoined for comparison."""
    out = {case: ring.check_against_single(rank, world_size, n=8 * world_size, kv_heads=case[2], causal=case[0],
                                           layout=case[1]) for case in CASES}
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 4 * world_size, 8, generator=g) for _ in range(3))
    for layout in ring.LAYOUTS:
        local = [ring.shard(t, world_size, layout)[rank] for t in (q, k, v)]
        out[layout] = ring.ring_attention(*local, causal=True, layout=layout)
    return out


@pytest.fixture(scope="module", params=[2, 4], ids=lambda p: f"P={p}")
def ring_run(request):
    return request.param, ring.spawn(_checks, request.param, timeout=120)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"causal={c[0]}-{c[1]}-kv_heads={c[2]}")
def test_ring_output_and_gradients_equal_single_process_attention(ring_run, case):
    world_size, results = ring_run
    for rank, result in enumerate(results):
        diff = result[case]
        for what in ("out", "dq", "dk", "dv"):
            assert diff[what] < 1e-12, f"rank {rank} of {world_size}: {what} differs by {diff[what]:.2e}"


def test_zigzag_layout_gives_the_contiguous_causal_result(ring_run):
    world_size, results = ring_run
    zigzag = ring.unshard([r["zigzag"] for r in results], "zigzag")
    contiguous = ring.unshard([r["contiguous"] for r in results], "contiguous")
    torch.testing.assert_close(zigzag, contiguous, atol=1e-6, rtol=1e-6)


def test_bytes_sent_match_the_calculator(ring_run):
    world_size, results = ring_run
    for (causal, layout, kv_heads) in CASES:
        want = sum(ring.ring_bytes_sent(seq_len=8 * world_size, world_size=world_size, n_kv_heads=kv_heads,
                                        head_dim=16, bytes_per_element=8, backward=backward)
                   for backward in (False, True))
        assert all(r[(causal, layout, kv_heads)]["bytes_sent"] == want for r in results)


def test_layouts_place_every_token_once_and_zigzag_balances_causal_work():
    x = torch.arange(24).view(1, 1, 24, 1)
    for layout in ring.LAYOUTS:
        blocks = ring.shard(x, 3, layout)
        assert torch.equal(ring.unshard(blocks, layout), x)
    assert ring.layout_positions(16, 1, 4, "zigzag").tolist() == [2, 3, 12, 13]

    def visible_pairs(rank, layout, world=4, n=32):
        pos = ring.layout_positions(n, rank, world, layout)
        return (pos[:, None] >= torch.arange(n)[None, :]).sum().item()

    assert len({visible_pairs(r, "zigzag") for r in range(4)}) == 1
    assert visible_pairs(3, "contiguous") > 3 * visible_pairs(0, "contiguous")


def test_calculator_matches_the_paper_and_grows_context_with_devices():
    # Liu et al. 2023, Table 1: with MHA in 16-bit the block must reach F/B tokens to hide the transfer.
    assert ring.overlap_block_tokens(flops=989e12, bandwidth=3.35e12 / 8 * 8, n_heads=32, n_kv_heads=32) == \
        pytest.approx(989e12 / 3.35e12, abs=1)
    rows = ring.max_context("Llama-2-7B", device_bytes=80e9, world_sizes=(1, 8))
    assert rows[1]["context"] == 8 * rows[0]["context"]
    per_token = memory.model_kv_cache_bytes("Llama-2-7B", 1) + 2 * 2 * 32 * 128 * 2
    assert rows[0]["tokens per device"] == int((80e9 - memory.weight_bytes("Llama-2-7B")) // per_token)
    assert ring.ring_bytes_per_step(block_tokens=1024, n_kv_heads=8, head_dim=128) == 2 * 8 * 1024 * 128 * 2


@pytest.mark.parametrize("call, argument", [
    (lambda: ring.spawn(print, 0), "world_size"),
    (lambda: ring.shard(torch.zeros(1, 1, 10, 2), 3), "world_size"),
    (lambda: ring.shard(torch.zeros(1, 1, 12, 2), 4, "zigzag"), "world_size"),
    (lambda: ring.layout_positions(8, 0, 2, "striped"), "layout"),
    (lambda: ring.ring_attention(*(torch.zeros(1, 1, 4, 2) for _ in range(3))), "group"),
    (lambda: ring.ring_bytes_per_step(block_tokens=0, n_kv_heads=1, head_dim=1), "block_tokens"),
    (lambda: ring.max_context("Llama-2-70B", device_bytes=16e9), "device_bytes"),
])
def test_bad_arguments_raise_value_error_naming_them(call, argument):
    with pytest.raises(ValueError, match=argument):
        call()
