"""Hidden checks of chapter 0, for the tests: other shapes than the public checks try.

A course keeps its own hidden checks out of the public repository (see book/instructors.md);
these are the example the tests grade with.
"""

from lectlib.grading import expect_close, hidden_check


@hidden_check("kv_cache_bytes", points=1)
def _(candidate):
    expect_close(candidate(n_layers=32, n_kv_heads=8, head_dim=128, seq_len=131072), 16 * 2**30,
                 "hidden: Llama-3-8B at 128k tokens in bf16")
    expect_close(candidate(n_layers=2, n_kv_heads=1, head_dim=4, seq_len=0), 0, "hidden: an empty cache")


@hidden_check("attention_scores_bytes", points=1)
def _(candidate):
    expect_close(candidate(seq_len=3, n_heads=5, batch_size=7, bytes_per_element=1), 3 * 3 * 5 * 7,
                 "hidden: odd sizes, one byte per score")
