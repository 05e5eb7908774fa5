"""lectlib: long-context LLM techniques built from scratch, the library under the course book.

Modules, by concern:
    runtime    device and experiment scale (ci / book / gpu)
    data       the long text (King James Bible) as text, tokens and windows
    positions  rotary position embeddings and their extensions
    attention  attention functions, all (B, H, N, D) like torch SDPA
    kv         the KV cache and its eviction policies
    duo        DuoAttention: gated retrieval/streaming heads, their training and cache
    llama      a from-scratch Llama with pluggable attention and cache
    models     loaders: SmolLM2 offline, any Hugging Face causal LM
    evals      perplexity and long-context retrieval tasks
    memory     KV-cache and model-memory calculators with real presets
    viz        figures: plotly for the website, ipywidgets in a notebook
    grading    exercise checks shared by notebooks and pytest
"""

from .runtime import use_triton_interpreter

__version__ = "0.1.0"
use_triton_interpreter()  # before any lectlib module imports transformers, which imports Triton
