"""Where code runs (device) and how big experiments are (scale).

The same chapter runs in three places: CI and the book build on a 2-core CPU, and Colab on a
GPU. Experiments pick their sizes with `pick(ci=..., book=..., gpu=...)`, so the code path is
the same everywhere and only the numbers change. `LECTLIB_SCALE` (ci | book | gpu) overrides
the default, which is "gpu" when CUDA is present and "book" otherwise.
"""

import os
import time
from contextlib import contextmanager

import torch

SCALES = ("ci", "book", "gpu")


def use_triton_interpreter() -> bool:
    """Choose Triton's interpreter where there is no CUDA GPU (Triton compiles only for GPUs) by
    setting TRITON_INTERPRET=1 unless it is set; return whether the interpreter is on.

    Triton reads the variable when it is imported, and transformers imports Triton, so lectlib
    calls this as it is imported itself, before any of its modules loads transformers.
    """
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_interpreter_problem() -> str | None:
    """Why Triton's interpreter cannot run kernels in this process, or None when it can (or is off).

    If Triton was imported before TRITON_INTERPRET=1 was set, its own library functions (`tl.max`,
    `tl.sum`) were built for the compiler, and an interpreted kernel that calls them fails.
    """
    if not use_triton_interpreter():
        return None
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(tl.max, InterpretedFunction):
        return None
    return ("Triton was imported before TRITON_INTERPRET=1 was set, so its interpreter cannot run the kernels: "
            "import lectlib before transformers or triton, or start Python with TRITON_INTERPRET=1")


def device() -> torch.device:
    """CUDA when present, CPU otherwise."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def scale() -> str:
    """The experiment scale in force: LECTLIB_SCALE if set, else gpu with CUDA, else book."""
    value = os.environ.get("LECTLIB_SCALE", "gpu" if torch.cuda.is_available() else "book")
    if value not in SCALES:
        raise ValueError(f"LECTLIB_SCALE={value!r}: expected one of {SCALES}")
    return value


def pick(*, ci, book, gpu=None):
    """The value for the current scale; `gpu` defaults to `book`."""
    return {"ci": ci, "book": book, "gpu": book if gpu is None else gpu}[scale()]


@contextmanager
def timed(what: str):
    """Print what an experiment does and how long it took."""
    print(f"{what} ...", flush=True)
    start = time.perf_counter()
    yield
    print(f"{what}: {time.perf_counter() - start:.1f} s", flush=True)
