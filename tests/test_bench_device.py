"""The GPU sessions' commands, rehearsed on CPU: the time-budgeted parts, the flash device run under
the interpreter, and every shipped kernel config compiled for sm80 and sm90 without a GPU."""

import json

import pytest
import torch

from lectlib.bench import attention as bench_attention
from lectlib.bench import device_run


def test_parts_run_in_order_failures_are_kept_and_late_parts_skipped():
    written = {}

    def fail():
        raise ValueError("boom")

    parts = [device_run.Part("first", lambda: {"x": 1}), device_run.Part("broken", fail),
             device_run.Part("after", lambda: {"y": 2}), device_run.Part("too_long", lambda: {}, needs_s=1e6)]
    statuses = device_run.run_parts(parts, device_run.Budget(60), lambda name, rec: written.setdefault(name, rec))
    assert statuses == {"first": "ok", "broken": "failed", "after": "ok", "too_long": "skipped"}
    assert written["first"]["result"] == {"x": 1} and "ValueError: boom" in written["broken"]["error"]
    assert written["after"]["result"] == {"y": 2} and "needs 1000000 s" in written["too_long"]["error"]
    with pytest.raises(ValueError, match="budget"):
        device_run.Budget(0)


def test_flops_follow_the_flashattention_convention():
    fwd = bench_attention.attention_flops(batch=2, heads=3, n=1024, head_dim=64, causal=False, direction="fwd")
    assert fwd == 4 * 2 * 3 * 1024 ** 2 * 64
    assert bench_attention.attention_flops(batch=2, heads=3, n=1024, head_dim=64, causal=True,
                                           direction="fwd+bwd") == fwd / 2 * 3.5


@pytest.mark.skipif(torch.cuda.is_available(), reason="the rehearsal is for machines without a GPU")
def test_flash_device_run_rehearses_end_to_end_on_cpu(tmp_path, capsys):
    path = bench_attention.run_on_device(budget_s=600, tiny=True, out=tmp_path)
    assert path == tmp_path / "flash_cpu.json"
    record = json.loads(path.read_text())
    assert {"date", "torch", "triton", "device"} <= set(record["environment"])
    assert {name: p["status"] for name, p in record["parts"].items()} == dict.fromkeys(
        ["checks", "speed_d32", "speed_d16", "memory", "tuning"], "ok")
    checks = record["parts"]["checks"]["result"]
    assert checks["all_ok"] and {r["dtype"] for r in checks["rows"]} == {"fp16", "bf16"}
    assert any(r["kv_heads"] < r["heads"] for r in checks["rows"]) and any(r["n_q"] % 2 for r in checks["rows"])
    rows = record["parts"]["speed_d32"]["result"]["rows"]
    timed = {(r["method"], r["direction"]) for r in rows if r["tflops"]}
    assert {(m, d) for m in ("flash", "sdpa", "naive") for d in ("fwd", "fwd+bwd")} <= timed
    assert all(r["max_diff"] < 1e-4 for r in rows if r["tflops"])  # every method computes the same attention
    # SDPA's memory-efficient backend has no CPU kernel: recorded as such, not a crash.
    assert any(r["method"] == "sdpa_mem_efficient" and "error" in r for r in rows)
    out = capsys.readouterr().out
    assert "fwd+bwd ratio" in out and "every check within 2x SDPA's own error: True" in out
    # The chapter reads it back and draws it.
    (result,) = bench_attention.device_run_results(tmp_path)
    figure = bench_attention.speed_figure(result, direction="fwd+bwd", head_dim=32, causal=True)
    assert {trace.name for trace in figure.data} >= {"flash", "sdpa", "naive"}
    assert bench_attention.memory_figure(result).data
    bench_attention.recorded_figure(result)  # chapter 1's slider figure over direction, head dim, causal
    ratios = bench_attention.ratio_table(result["rows"])
    assert len(ratios) == 4 and all(r["fwd ratio"] > 0 and r["fwd+bwd ratio"] > 0 for r in ratios)


def test_every_shipped_config_compiles_for_sm80_and_sm90():
    """Through Triton's GPU IR (layouts, warps, software pipelining) for an A100 and an H100, no GPU needed."""
    rows = bench_attention.compile_in_subprocess([80, 90], head_dims=(128,), stop_after="ttgir")
    from lectlib import flash

    shipped = len(flash.FORWARD_CONFIGS) + 2 * len(flash.BACKWARD_CONFIGS)
    assert len(rows) == 2 * shipped and {r["capability"] for r in rows} == {80, 90}


@pytest.mark.skipif(torch.cuda.is_available(), reason="the rehearsal is for machines without a GPU")
def test_gpu_suite_rehearses_every_part_on_cpu(tmp_path):
    from lectlib.bench import gpu_suite

    statuses = gpu_suite.run(budget_s=900, out=tmp_path, tiny=True)
    assert statuses == dict.fromkeys(["ssm", "memory", "long_context", "streaming", "chapters"], "ok")
    read = lambda name: json.loads((tmp_path / f"{name}_cpu.json").read_text())  # noqa: E731
    assert read("ssm")["result"]["max_error_vs_parallel"] < 1e-4  # the Triton scan (interpreted) is the scan
    cache = read("gpu_memory")["result"]["kv_cache_rows"]
    assert [r["measured_over_formula"] for r in cache] == [1.0] * len(cache)  # memory.py's formula, exactly
    scalings = read("long_context")["result"]["scalings"]
    assert set(scalings) == {"rope", "dynamic_ntk", "yarn"} and all(s["passkey"] and s["needle"] for s in scalings.values())
    stream = read("streaming")["result"]
    assert len({m["nbytes"] for m in stream["long_stream"]["cache_bytes_at"]}) == 1  # flat memory through sinks
    assert read("chapters")["result"]["all_ok"] and "environment" in read("chapters")
