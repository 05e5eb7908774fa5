"""Exercise checks, shared by the notebooks (instant feedback) and the grader (`lectlib.grade`).

Each chapter has a module in this package that registers its exercises:

    @exercise("kv_cache_bytes", reference=memory.kv_cache_bytes)  # worth points=1, the default
    def _(candidate):
        expect_close(candidate(...), 2.5e6, "Llama-2-70B, one token")

A check receives the learner's function and raises `ExerciseFailure` with a message that
helps. In a notebook, `check("kv_cache_bytes", my_function)` prints the verdict at once.
Modules are found by listing this package, so a new chapter's module needs no list to edit.

Rules a check follows, because the grader replays it (`lectlib.grade`): it only *calls* the
candidate (no introspection), with inputs made from fixed seeds, and compares what the calls
return. The grader runs the learner's function in a separate process, records what each call
returned, and reruns the check in its own process on those recorded values. When the learner's
function returns something other than data (a Triton step function returns Triton tensors),
`observe=` turns it into a function that returns data: the check then receives `observe(candidate)`.

Hidden checks are the instructor's: `@hidden_check("kv_cache_bytes", points=1)` in a Python file
of a private folder (`python -m lectlib.grade ... --hidden FOLDER`), never in this package, which
the learners install. The references are lectlib's own functions, which learners have too: an
exercise asks them to write the function the chapter teaches (see book/instructors.md).
"""

import importlib
import importlib.util
import pkgutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch


class ExerciseFailure(AssertionError):
    """A check found the candidate wrong; the message says how."""


@dataclass(frozen=True)
class Exercise:
    name: str
    check: Callable
    reference: Callable
    points: float = 1
    observe: Callable | None = None  # candidate -> a function returning data, for the grader's replay

    def observed(self, candidate: Callable) -> Callable:
        """What the check calls: the candidate itself, or `observe(candidate)`."""
        return candidate if self.observe is None else self.observe(candidate)


@dataclass(frozen=True)
class HiddenCheck:
    exercise: str
    check: Callable
    points: float = 1


_REGISTRY: dict[str, Exercise] = {}
_HIDDEN: dict[str, list[HiddenCheck]] = {}
_loaded = False


def _points(points) -> float:
    if isinstance(points, bool) or not isinstance(points, (int, float)) or not points > 0:
        raise ValueError(f"points must be a positive number, got {points!r}")
    return points


def exercise(name: str, *, reference: Callable, points: float = 1, observe: Callable | None = None):
    """Register the decorated function as the public check of exercise `name`, worth `points`."""
    points = _points(points)

    def register(check: Callable) -> Callable:
        if name in _REGISTRY:
            raise ValueError(f"exercise {name!r} is registered twice")
        _REGISTRY[name] = Exercise(name, check, reference, points, observe)
        return check

    return register


def hidden_check(name: str, *, points: float = 1):
    """Register the decorated function as a hidden check of exercise `name`, in a file that `load_hidden` reads."""
    points = _points(points)

    def register(check: Callable) -> Callable:
        _HIDDEN.setdefault(name, []).append(HiddenCheck(name, check, points))
        return check

    return register


def _load_all() -> None:
    """Import every chapter module of this package, once per process."""
    global _loaded
    if not _loaded:
        for module in pkgutil.iter_modules(__path__):
            importlib.import_module(f"{__name__}.{module.name}")
        _loaded = True


def load_hidden(folder) -> dict[str, list[HiddenCheck]]:
    """{exercise: its hidden checks} from each `*.py` file of the instructor's `folder`, imported anew."""
    global _HIDDEN
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"folder must be a directory of hidden checks, got {str(folder)!r}")
    known, outer, _HIDDEN = exercises(), _HIDDEN, {}
    try:
        for path in sorted(folder.glob("*.py")):
            spec = importlib.util.spec_from_file_location(f"_lectlib_hidden_{path.stem}", path)
            spec.loader.exec_module(importlib.util.module_from_spec(spec))
        loaded = _HIDDEN
    finally:
        _HIDDEN = outer
    unknown = sorted(set(loaded) - set(known))
    if unknown:
        raise ValueError(f"hidden checks in {folder} name exercises that no chapter registers: {unknown}")
    return loaded


def exercises() -> dict[str, Exercise]:
    """All registered exercises by name."""
    _load_all()
    return dict(_REGISTRY)


def get(name: str) -> Exercise:
    found = exercises()
    if name not in found:
        raise ValueError(f"no exercise named {name!r}; known: {sorted(found)}")
    return found[name]


def run_check(name: str, candidate: Callable, *, check: Callable | None = None) -> None:
    """Run exercise `name`'s public check (or `check`) on `candidate`; raises ExerciseFailure when it is wrong.

    The candidate is passed as the check receives it: observed (see `Exercise.observe`) by the
    caller when needed; `check` and `run_check(name, fn)` on a plain function observe it here.
    """
    exercise_ = get(name)
    try:
        if check is None:
            exercise_.check(exercise_.observed(candidate))
        else:
            check(candidate)
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
