"""lectlib: long-context LLM techniques built from scratch, the library under the course book.

Modules, by concern:
    runtime    device and experiment scale (ci / book / gpu)
    data       the long text (King James Bible) as text, tokens and windows
    positions  rotary position embeddings and their extensions
    lengths    length generalisation: perplexity by position under each RoPE scaling
    tiny       the tiny KJV Llama trained here at 128 tokens (chapters 2 and 4)
    attention  attention functions, all (B, H, N, D) like torch SDPA
    kv         the KV cache and its eviction policies
    llama      a from-scratch Llama with pluggable attention and cache
    models     loaders: SmolLM2 offline, any Hugging Face causal LM
    evals      perplexity and long-context retrieval tasks
    memory     KV-cache and model-memory calculators with real presets
    sparse     sparse attention patterns (strided, fixed, sliding, dilated) and MoBA block routing
    ring       ring attention over torch.distributed, its layouts and communication calculator
    viz        figures: plotly for the website, ipywidgets in a notebook
    grading    exercise checks shared by notebooks and pytest
"""

from .runtime import use_triton_interpreter

__version__ = "0.1.0"
use_triton_interpreter()  # before any lectlib module imports transformers, which imports Triton
