"""Exercise checks, shared by the notebooks (instant feedback) and pytest (the autograder).

Each chapter has a module in this package that registers its exercises:

    @exercise("kv_cache_bytes", reference=memory.kv_cache_bytes)
    def _(candidate):
        expect_close(candidate(...), 2.5e6, "Llama-2-70B, one token")

A check receives the learner's function and raises `ExerciseFailure` with a message that
helps. In a notebook, `check("kv_cache_bytes", my_function)` prints the verdict at once;
pytest runs every check on lectlib's reference solution, and on a learner's notebook when
`LECTLIB_SUBMISSION` names it (see `tests/test_exercises.py`).
"""

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Callable

import torch


class ExerciseFailure(AssertionError):
    """A check found the candidate wrong; the message says how."""


@dataclass(frozen=True)
class Exercise:
    name: str
    check: Callable
    reference: Callable


_REGISTRY: dict[str, Exercise] = {}


def exercise(name: str, *, reference: Callable):
    """Register the decorated function as the check of exercise `name`."""

    def register(check: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"exercise {name!r} is registered twice")
        _REGISTRY[name] = Exercise(name, check, reference)
        return check

    return register


def _load_all() -> None:
    for module in pkgutil.iter_modules(__path__):
        importlib.import_module(f"{__name__}.{module.name}")


def exercises() -> dict[str, Exercise]:
    """All registered exercises by name."""
    _load_all()
    return dict(_REGISTRY)


def get(name: str) -> Exercise:
    found = exercises()
    if name not in found:
        raise ValueError(f"no exercise named {name!r}; known: {sorted(found)}")
    return found[name]


def run_check(name: str, candidate: Callable) -> None:
    """Run exercise `name` on `candidate`; raises ExerciseFailure when it is wrong."""
    exercise_ = get(name)
    try:
        exercise_.check(candidate)
    except ExerciseFailure:
        raise
    except NotImplementedError as error:
        raise ExerciseFailure(f"{name}: not implemented yet") from error
    except Exception as error:  # the learner's code crashed: say where, not a traceback wall
        raise ExerciseFailure(f"{name}: your function raised {type(error).__name__}: {error}") from error


def check(name: str, candidate: Callable) -> bool:
    """Notebook entry point: print a verdict for the learner and return whether it passed."""
    try:
        run_check(name, candidate)
    except ExerciseFailure as failure:
        print(f"✗ {name}: {failure}")
        return False
    print(f"✓ {name}: all checks passed")
    return True


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise ExerciseFailure(message)


def expect_close(actual, expected, what: str, *, rtol: float = 1e-4, atol: float = 1e-6) -> None:
    """Fail with `what` and both values unless actual ≈ expected (numbers or tensors)."""
    actual_t = torch.as_tensor(actual, dtype=torch.float64)
    expected_t = torch.as_tensor(expected, dtype=torch.float64)
    if actual_t.shape != expected_t.shape:
        raise ExerciseFailure(f"{what}: expected shape {tuple(expected_t.shape)}, got {tuple(actual_t.shape)}")
    if not torch.allclose(actual_t, expected_t, rtol=rtol, atol=atol, equal_nan=True):
        if actual_t.numel() == 1:
            raise ExerciseFailure(f"{what}: expected {expected_t.item():.6g}, got {actual_t.item():.6g}")
        error = (actual_t - expected_t).abs().max().item()
        raise ExerciseFailure(f"{what}: values differ from the expected ones by up to {error:.3g}")
