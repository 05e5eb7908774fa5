"""Exercises of chapter 0: what long context costs in memory."""

from .. import memory
from . import expect_close, exercise

MIB, GIB = 2**20, 2**30


@exercise("kv_cache_bytes", reference=memory.kv_cache_bytes)
def _(candidate):
    llama70 = dict(n_layers=80, head_dim=128)
    expect_close(candidate(**llama70, n_kv_heads=64, seq_len=1), 2.5 * MIB,
                 "Llama-2-70B with 64 KV heads (MHA), one token, fp16: the lecture's 2.5 MB")
    expect_close(candidate(**llama70, n_kv_heads=64, seq_len=512), 1.25 * GIB,
                 "the same model at 512 tokens")
    expect_close(candidate(**llama70, n_kv_heads=64, seq_len=4096, batch_size=16), 160 * GIB,
                 "batch 16 x 4096 tokens: remember the batch")
    expect_close(candidate(**llama70, n_kv_heads=8, seq_len=1), 320 * 1024,
                 "its real 8 KV heads (GQA): only KV heads are cached, not query heads")
    expect_close(candidate(n_layers=30, n_kv_heads=3, head_dim=64, seq_len=1000, bytes_per_element=4), 4 * 2 * 30 * 3 * 64 * 1000,
                 "SmolLM2 in fp32 (4 bytes per number): keys AND values")


@exercise("attention_scores_bytes", reference=memory.attention_scores_bytes)
def _(candidate):
    expect_close(candidate(seq_len=4096, n_heads=1), 4096 * 4096 * 2, "one head, 4096 tokens, fp16")
    expect_close(candidate(seq_len=1000, n_heads=32, batch_size=2, bytes_per_element=4), 2 * 32 * 1000**2 * 4,
                 "batch 2, 32 heads, fp32: one N x N matrix per head and per sequence")
    expect_close(candidate(seq_len=2 * 8192, n_heads=8) / candidate(seq_len=8192, n_heads=8), 4.0,
                 "doubling the length must quadruple the scores")
