"""lectlib: long-context LLM techniques built from scratch, the library under the course book.

Modules, by concern:
    runtime     device, experiment scale (ci / book / gpu) and the Triton interpreter switch
    data        the long text (King James Bible) as text, tokens and windows
    positions   rotary position embeddings and their extensions (PI, NTK, dynamic NTK, YaRN)
    longlora    LongLoRA: shifted sparse attention (S²-Attn) and LoRA
    lengths     length generalisation: perplexity by position under each RoPE scaling
    tiny        the tiny KJV Llama trained here at 128 tokens (chapters 2 and 4)
    attention   attention functions, all (B, H, N, D) like torch SDPA: naive, online softmax, blockwise
    flash       the FlashAttention-2 Triton kernel, forward and backward, with its fallback
    kv          the KV cache and its eviction policies
    kvquant     KIVI's quantized KV cache, outlier channels, SmoothAttention and Hadamard
    quest       Quest: every token kept, each query reads only its top pages
    compression the KV-compression leaderboard, kept tokens and costs
    duo         DuoAttention: gated retrieval/streaming heads, gate training, the per-head cache
    llama       a from-scratch Llama with pluggable attention and cache
    models      loaders: SmolLM2 offline (converted once, checksummed), any Hugging Face causal LM
    train       the small training loop for models trained from zero
    evals       perplexity and long-context retrieval tasks
    streaming   attention sinks and streaming with a bounded KV cache
    ssm         Mamba: selective scans (sequential, parallel) and the Mamba LM
    ssm_triton  the selective scan as a Triton kernel
    jamba       a Jamba-style hybrid of attention, Mamba and mixture-of-experts layers
    synthetic   the Mamba paper's synthetic tasks (selective copying, induction heads)
    sparse      sparse attention patterns (strided, fixed, sliding, dilated) and MoBA block routing
    ring        ring attention over torch.distributed, its layouts and communication calculator
    memory      KV-cache and model-memory calculators with real presets
    profiling   time and peak memory of a function, on CPU and GPU
    bench       speed and memory benchmarks (`python -m lectlib.bench NAME`)
    viz         figures: plotly for the website, ipywidgets in a notebook
    grading     exercise checks shared by notebooks and pytest
    grade       the isolated autograder (`python -m lectlib.grade`) and its reports
    release     the student release of the chapters and the collection of answers
"""

from .runtime import use_triton_interpreter

__version__ = "0.1.0"
use_triton_interpreter()  # before any lectlib module imports transformers, which imports Triton
