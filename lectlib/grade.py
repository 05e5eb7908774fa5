"""The autograder: grade learners' notebooks in isolated processes, write scores as JSON and CSV.

    python -m lectlib.grade SUBMISSION.ipynb|FOLDER --out grades.csv [--hidden FOLDER] [--chapter STEM]

How a verdict is reached, and why a submission cannot change it (book/instructors.md says more):
1. This process (the grader) imports every exercise check, and the instructor's hidden checks,
   before any learner's code runs, and keeps the files of lectlib and of the hidden checks in memory.
2. Each notebook runs in its own process, forked from a process that imported torch and the checks
   from a read-only copy written from that memory. It executes the exercise cells and the cells
   they read names from (so helpers from other cells work), then runs each check on the learner's
   function and records, call after call, only what the function returned or raised, as data
   (`to_data`).
3. The grader reruns each check itself on a stand-in that returns the recorded values (`Replay`):
   the expected values, the comparisons and the verdict are computed here, where the learner's
   patches to `run_check`, `torch.allclose` or anything else never ran.
4. Every cell and every exercise has a wall-clock limit, and so has the whole notebook. A process
   that hangs is killed, one that exits (`os._exit`) is noted; the step fails and a new process
   carries on with the rest.
5. After each notebook, lectlib, the hidden checks and the copy are compared with the memory; a
   change is tampering: the files are restored and the notebook scores zero.
"""

import argparse
import ast
import builtins
import csv
import json
import os
import re
import resource
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
import torch

from . import grading, release

LIBRARY = Path(__file__).resolve().parent
MAX_RESULT_BYTES = 64 * 2**20  # a recorded exercise larger than this is not read back
MAX_MESSAGE = 300  # characters of a learner's exception message kept in the report
MAX_FILE_BYTES = 256 * 2**20  # the largest file a learner's process may write (its output, its results)


# ---------------------------------------------------------------- recording and replaying calls

def to_data(value, depth: int = 0):
    """`value` as plain data that `torch.load(weights_only=True)` reads back, or an `{"unreadable": type}` marker."""
    if depth > 20:
        return {"unreadable": "a structure nested deeper than 20 levels"}
    if value is None:
        return None
    for plain in (bool, int, float, str):  # subclasses (numpy's float64, an int with a forged __eq__) become plain
        if isinstance(value, plain):
            return plain(value)[:100_000] if plain is str else plain(value)
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().clone().as_subclass(torch.Tensor)
    if isinstance(value, complex):
        return torch.tensor(value)
    if type(value).__module__ == "numpy":
        if getattr(value, "shape", ()):
            return torch.as_tensor(value.copy())
        return to_data(value.item(), depth + 1)
    if isinstance(value, (list, tuple)):
        items = [to_data(v, depth + 1) for v in value]
        return items if isinstance(value, list) else tuple(items)
    if isinstance(value, dict):
        return {to_data(k, depth + 1) if isinstance(k, (int, str)) else repr(k): to_data(v, depth + 1)
                for k, v in value.items()}
    return {"unreadable": type(value).__name__}


def describe(value, depth: int = 0) -> str:
    """The shape of a call's input (types, tensor shapes and dtypes), to check that a replay asks what was asked."""
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)}:{str(value.dtype).removeprefix('torch.')}"
    if isinstance(value, (list, tuple)) and depth < 3:
        inner = ", ".join(describe(v, depth + 1) for v in value[:8])
        return f"{type(value).__name__}[{len(value)}]({inner})"
    if isinstance(value, dict) and depth < 3:
        return "{" + ", ".join(f"{k!r}: {describe(v, depth + 1)}" for k, v in list(value.items())[:8]) + "}"
    return type(value).__name__


def describe_call(args: tuple, kwargs: dict) -> str:
    return describe(list(args)) + describe(dict(sorted(kwargs.items())))


class Record:
    """Calls `function` and records each call: its input's description and what it returned or raised."""

    def __init__(self, function):
        self.function, self.calls = function, []

    def __call__(self, *args, **kwargs):
        call = {"input": describe_call(args, kwargs)}
        self.calls.append(call)
        try:
            result = self.function(*args, **kwargs)
        except BaseException as error:  # noqa: B036 — sys.exit and KeyboardInterrupt are answers too
            call["raised"] = type(error).__name__
            call["message"] = str(error)[:MAX_MESSAGE]
            raise
        call["returned"] = to_data(result)
        return result


class Replay:
    """A stand-in for the learner's function: returns, call after call, what the recorded calls returned."""

    def __init__(self, calls: list, stopped: str | None):
        self.calls, self.stopped, self.count = calls, stopped, 0

    def __call__(self, *args, **kwargs):
        if self.count >= len(self.calls):
            why = f" (it stopped: {self.stopped})" if self.stopped else ""
            raise grading.ExerciseFailure(f"the check needs call {self.count + 1} of your function, but in the "
                                          f"learner's process it was called {len(self.calls)} times{why}")
        call = self.calls[self.count]
        self.count += 1
        asked = describe_call(args, kwargs)
        if call["input"] != asked:
            raise grading.ExerciseFailure(f"call {self.count}: your function was given {call['input']} in the "
                                          f"learner's process, but the check asks {asked} (was lectlib or torch changed?)")
        if "raised" in call:
            kind = str(call["raised"])
            exception = NotImplementedError if kind == "NotImplementedError" else type(kind, (Exception,), {})
            raise exception(str(call.get("message", ""))[:MAX_MESSAGE])
        returned = call.get("returned")
        unreadable = _unreadable(returned)
        if unreadable:
            raise grading.ExerciseFailure(f"your function returned a {unreadable}, which the grader cannot read "
                                          "back: return tensors, numbers, strings, lists, tuples or dicts")
        return returned


def _unreadable(value, depth: int = 0) -> str | None:
    """The type name in the first `{"unreadable": ...}` marker inside `value`, if any."""
    if isinstance(value, dict):
        if set(value) == {"unreadable"}:
            return str(value["unreadable"])
        value = list(value.values())
    if isinstance(value, (list, tuple)) and depth < 25:
        return next((found for v in value if (found := _unreadable(v, depth + 1))), None)
    return None


def checks_of(name: str, hidden: dict) -> list[tuple[str, object, float]]:
    """(label, check, points) of exercise `name`: the public check, then its checks in `hidden` (see `load_hidden`)."""
    exercise = grading.get(name)
    hidden = [(f"hidden {i + 1}", h.check, h.points) for i, h in enumerate(hidden.get(name, []))]
    return [("public", exercise.check, exercise.points)] + hidden


def record_checks(name: str, candidate, hidden: dict) -> dict:
    """{label: {"calls": [...], "stopped": why or None}} of each check of `name` run on `candidate` (learner's side)."""
    recorded = {}
    for label, check, _ in checks_of(name, hidden):
        stopped = None
        try:
            record = Record(grading.get(name).observed(candidate))
        except BaseException as error:  # noqa: B036 — observe itself may fail (no kernel here)
            record, stopped = Record(None), f"{type(error).__name__}: {str(error)[:MAX_MESSAGE]}"
        else:
            try:
                torch.manual_seed(0)  # a check drawing from the global generator draws the same inputs in the replay
                check(record)
            except BaseException as error:  # noqa: B036 — a failed check, or the learner's sys.exit
                stopped = f"{type(error).__name__}: {str(error)[:MAX_MESSAGE]}"
        recorded[label] = {"calls": record.calls, "stopped": stopped}
    return recorded


def replay_checks(name: str, recorded: dict, hidden: dict) -> list[dict]:
    """Each check of `name` rerun here on the recorded calls: [{check, points, max_points, passed, message}]."""
    results = []
    for label, check, points in checks_of(name, hidden):
        entry = recorded.get(label) if isinstance(recorded, dict) else None
        if not (isinstance(entry, dict) and isinstance(entry.get("calls"), list) and
                all(isinstance(c, dict) and isinstance(c.get("input"), str) for c in entry["calls"])):
            passed, message = False, "this check did not run in the learner's process"
        else:
            try:
                torch.manual_seed(0)
                grading.run_check(name, Replay(entry["calls"], entry.get("stopped")), check=check)
                passed, message = True, "passed"
            except grading.ExerciseFailure as failure:
                passed, message = False, str(failure)
        results.append({"check": label, "points": points if passed else 0, "max_points": points,
                        "passed": passed, "message": message})
    return results


# ---------------------------------------------------------------- reading a submission

def _parsed(source: str):
    from IPython.core.inputtransformer2 import TransformerManager

    try:
        return ast.parse(TransformerManager().transform_cell(source))
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def _names(tree) -> tuple[set, set]:
    """(names a cell binds at its top level, names it reads and does not bind anywhere in it)."""
    top, bound, read = set(), set(), set()

    def visit(node, nested):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            (bound if nested else top).add(node.name)
            for child in ast.iter_child_nodes(node):
                visit(child, True)
            return
        if isinstance(node, ast.Lambda):
            nested = True
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                (bound if nested else top).add((alias.asname or alias.name).split(".")[0])
        elif isinstance(node, ast.Name):
            if isinstance(node.ctx, ast.Load):
                read.add(node.id)
            else:
                (bound if nested else top).add(node.id)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, ast.ExceptHandler) and node.name:
            bound.add(node.name)
        for child in ast.iter_child_nodes(node):
            visit(child, nested)

    if tree is not None:
        visit(tree, False)
    return top, read - bound - top - set(dir(builtins))


def cells_to_run(sources: list[str], targets: list[int]) -> list[int]:
    """Indices of the cells to execute for cells `targets`: those, and, transitively, the latest earlier
    cell that binds each name they read (an assignment, import, def or class at the cell's top level)."""
    names = [_names(_parsed(s)) for s in sources]
    needed, todo = set(), list(targets)
    while todo:
        i = todo.pop()
        if i in needed:
            continue
        needed.add(i)
        for name in names[i][1]:
            defining = [j for j in range(i) if name in names[j][0]]
            if defining:
                todo.append(defining[-1])
    return sorted(needed)


@dataclass
class Submission:
    path: Path
    chapter: str | None
    expected: list[str]                 # the chapter's exercises, in its order
    sources: list[str]                  # code cells
    exercise_cells: dict[str, int]      # exercise name -> index in `sources` of its tagged cell
    errors: list[str] = field(default_factory=list)


def read_submission(path: Path, chapters: dict[str, list[str]], chapter: str | None = None) -> Submission:
    """The submission's code cells, which chapter it answers (`chapter`, else its metadata, its file name,
    its check(...) calls), and where each of its exercises is."""
    try:
        notebook = nbformat.read(path, as_version=4)
    except Exception as error:  # not a notebook at all: nothing to grade, said in the report
        return Submission(path, None, [], [], {}, [f"cannot read the notebook: {type(error).__name__}: {error}"])
    code = [c for c in notebook.cells if c.cell_type == "code"]
    sources = [c.source for c in code]
    tagged = {}
    for i, cell in enumerate(code):
        if "exercise" in cell.metadata.get("tags", []):
            for name in release.CHECK_CALL.findall(cell.source):
                tagged.setdefault(name, i)
    release_metadata = notebook.metadata.get("lectlib")
    claimed = release_metadata.get("chapter") if isinstance(release_metadata, dict) else None
    by_name = [stem for stem in chapters if stem in path.stem]
    mentioned = set(release.CHECK_CALL.findall("\n".join(sources)))
    by_checks = [stem for stem, names in chapters.items() if mentioned & set(names)]
    chapter = chapter or next((c for c in ([claimed] if claimed in chapters else []) + by_name + by_checks), None)
    submission = Submission(path, chapter, chapters.get(chapter, []), sources,
                            {n: i for n, i in tagged.items() if n in chapters.get(chapter, [])})
    if chapter is None:
        submission.errors.append("cannot tell which chapter this notebook answers (no lectlib metadata, no chapter name "
                                 "in the file name, no known check(...) call)")
    elif not submission.exercise_cells:
        untagged = [i for i, s in enumerate(sources) if release.CHECK_CALL.search(s)]
        hint = (f"; code cells {untagged} call check(...) but are not tagged 'exercise': restore the tag" if untagged
                else "")
        submission.errors.append(f"no exercise found: none of {chapter}'s {len(submission.expected)} exercise cells "
                                 f"(tag 'exercise', check(\"name\", ...)) is in the notebook{hint}")
    return submission


# ---------------------------------------------------------------- the learner's process

def _forker(channel_fd: int) -> None:
    """Entry point of the process that forks learners' processes, one per request on `channel_fd`.

    It imports torch, IPython and the checks once, runs no learner's code itself, and forks: a new
    Python process would cost seconds of imports per learner, a fork costs milliseconds. A request
    is a job file and the pipe for its events; the answer is the forked process's id.
    """
    from IPython.core import interactiveshell  # noqa: F401 — imported here once, for every fork

    grading.exercises()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # forked processes are reaped as they end
    channel = socket.socket(fileno=channel_fd)
    while True:
        message, fds, _, _ = socket.recv_fds(channel, 65536, 1)
        if not message or not fds:
            os._exit(0)
        pid = os.fork()
        if pid == 0:
            channel.close()
            os.setsid()  # its own process group: the grader kills it and whatever it started
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the notebook may wait for processes of its own
            try:
                _child(message.decode(), fds[0])
            finally:
                os._exit(1)
        os.close(fds[0])
        channel.sendall(f"{pid}\n".encode())


def _child(job_path: str, events_fd: int) -> None:
    """The learner's process: run the cells, then record every check, reporting each step on `events_fd`."""
    job = json.loads(Path(job_path).read_text())
    resource.setrlimit(resource.RLIMIT_FSIZE, (MAX_FILE_BYTES, MAX_FILE_BYTES))  # printing forever fills no disk
    output = os.open(job["output"], os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    for fd in (1, 2):
        os.dup2(output, fd)
    os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
    os.chdir(job["cwd"])
    os.environ["IPYTHONDIR"] = str(Path(job["cwd"]) / "ipython")
    events = os.fdopen(events_fd, "w", buffering=1)

    def say(**event):
        events.write(json.dumps(event) + "\n")

    from IPython.core.interactiveshell import InteractiveShell
    from traitlets.config import Config

    config = Config()
    config.HistoryManager.enabled = False
    config.InteractiveShell.xmode = "Plain"  # the rich tracebacks take seconds to format, inside a cell's time limit
    shell = InteractiveShell.instance(config=config)
    submitted = {}
    grading.check = lambda name, candidate: submitted.__setitem__(name, candidate) or True
    hidden = grading.load_hidden(job["hidden"]) if job["hidden"] else {}
    say(event="ready")
    for index, source in job["cells"]:
        say(event="cell", index=index)
        result = shell.run_cell(source, store_history=False, silent=True)
        error = result.error_in_exec or result.error_before_exec
        for name, variable in job["functions"].get(str(index), {}).items():
            # A notebook that replaced `check` still hands in the function its check(...) call names.
            if name not in submitted and callable(shell.user_ns.get(variable)):
                submitted[name] = shell.user_ns[variable]
        say(event="cell_done", index=index, error=None if error is None else
            f"{type(error).__name__}: {str(error)[:MAX_MESSAGE]}")
    for name in job["exercises"]:
        say(event="exercise", name=name)
        candidate = submitted.get(name)
        checks = {} if candidate is None else record_checks(name, candidate, hidden)
        recorded = {"submitted": candidate is not None, "checks": checks}
        torch.save(recorded, Path(job["results"]) / f"{name}.pt")
        say(event="exercise_done", name=name)
    say(event="finished")
    events.close()
    os._exit(0)  # nothing the notebook registered (atexit, threads) runs after the report


# ---------------------------------------------------------------- the grader's side

def _tree(root: Path, *, caches: bool = True) -> dict[str, bytes]:
    """{relative path: bytes} of every file under `root` (a link: its target), compiled caches unless `caches=False`."""
    files = {}
    for path in sorted(root.rglob("*")):
        relative = str(path.relative_to(root))
        if not caches and "__pycache__" in path.parts:
            continue
        if path.is_symlink():
            files[relative] = b"a link to " + os.fsencode(os.readlink(path))
        elif path.is_file():
            files[relative] = path.read_bytes()
    return files


def _make_read_only(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True) + [root]:
        if not path.is_symlink():
            path.chmod(stat.S_IREAD | stat.S_IEXEC if path.is_dir() else stat.S_IREAD)


def _writable(path: Path) -> None:
    if path.exists() and not path.is_symlink():
        path.chmod(path.stat().st_mode | stat.S_IWUSR | (stat.S_IXUSR if path.is_dir() else 0))


def _remove(root: Path) -> None:
    def writable_then_retry(function, path, _):
        _writable(Path(path).parent)
        _writable(Path(path))
        function(path)

    shutil.rmtree(root, onerror=writable_then_retry)


def _restore(root: Path, files: dict[str, bytes], *, read_only: bool = False) -> list[str]:
    """Put the tree `root` back as `files` (what was added removed, what changed rewritten); return what had changed."""
    now = _tree(root) if root.exists() else {}
    changed = sorted({p for p in now if now[p] != files.get(p)} | (set(files) - set(now)))
    for relative in changed:
        path = root / relative
        for folder in reversed(path.parents):
            if folder.is_relative_to(root):
                _writable(folder)
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            _remove(path)
        if relative in files:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(files[relative])
    if changed and read_only:
        _make_read_only(root)
    return [str(root / p) for p in changed]


class Grader:
    """Grades submissions one after the other, each in its own process, with limits in seconds."""

    def __init__(self, *, hidden: Path | None = None, chapter: str | None = None, timeout: float = 60.0,
                 notebook_timeout: float = 600.0):
        if not timeout > 0 or not notebook_timeout > 0:
            raise ValueError(f"timeout and notebook_timeout must be positive, got {timeout}, {notebook_timeout}")
        self.timeout, self.notebook_timeout = timeout, notebook_timeout
        self.chapters = {path.stem: release.exercise_names(nbformat.read(path, as_version=4))
                         for path in release.chapters()}
        if chapter is not None and chapter not in self.chapters:
            raise ValueError(f"chapter must be one of {sorted(self.chapters)}, got {chapter!r}")
        self.chapter = chapter
        # Every check is imported now, before any learner's code runs; the files are kept in memory:
        # each learner's process gets a copy written from them, and the originals are restored from them.
        grading.exercises()
        self.hidden_checks = grading.load_hidden(hidden) if hidden is not None else {}
        self.hidden = None if hidden is None else Path(hidden).resolve()
        self.dont_write_bytecode, sys.dont_write_bytecode = sys.dont_write_bytecode, True  # a new .pyc is tampering
        self.trees = {LIBRARY: _tree(LIBRARY)} | ({self.hidden: _tree(self.hidden)} if self.hidden else {})
        library = {f"lectlib/{p}": content for p, content in _tree(LIBRARY, caches=False).items()}
        if self.hidden:
            library |= {f"hidden/{p}": content for p, content in _tree(self.hidden, caches=False).items()}
        self.workdir = Path(tempfile.mkdtemp(prefix="lectlib-grade-"))
        self.copy = self.workdir / "library"  # what learners' processes import: read-only, restored after each
        _restore(self.copy, library, read_only=True)
        self.trees[self.copy] = library
        self.forker = None

    def close(self) -> None:
        self._stop_forker()
        _remove(self.workdir)
        sys.dont_write_bytecode = self.dont_write_bytecode

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.close()

    def grade(self, path: Path) -> dict:
        """The grade report of one notebook (see `report`)."""
        start = time.monotonic()
        submission = read_submission(Path(path), self.chapters, self.chapter)
        outcomes, failures = {}, {}
        if submission.exercise_cells:
            outcomes, failures = self._run(submission)
        changed = [p.replace(str(self.copy), "(the learners' copy)") for root, files in self.trees.items()
                   for p in _restore(root, files, read_only=root == self.copy)]
        graded = report(submission, outcomes, failures, self.hidden_checks, time.monotonic() - start)
        if changed:
            graded["errors"].append(f"tampering: the submission changed the grader's files (now restored), so it "
                                   f"scores zero: {changed[:5]}")
            for exercise in graded["exercises"]:
                exercise.update(points=0, passed=False, message=f"tampering; {exercise['message']}")
            graded["total"] = 0
        return graded

    def _run(self, submission: Submission) -> tuple[dict, dict]:
        """({exercise: recorded checks}, {exercise: why it failed}) from the learner's process(es)."""
        names = [n for n in submission.expected if n in submission.exercise_cells]
        cells = cells_to_run(submission.sources, [submission.exercise_cells[n] for n in names])
        scratch = Path(tempfile.mkdtemp(prefix="submission-", dir=self.workdir))
        (scratch / "results").mkdir()
        deadline = time.monotonic() + self.notebook_timeout
        skipped, cell_errors, outcomes, failures = set(), {}, {}, {}
        try:
            while time.monotonic() < deadline:
                todo = [n for n in names if n not in outcomes and n not in failures]
                if not todo:
                    break
                step = self._process(submission, scratch, [c for c in cells if c not in skipped], todo, deadline,
                                     cell_errors, outcomes)
                if step is None:
                    break
                kind, key, why = step
                if kind == "cell":  # the next process runs the others without it
                    skipped.add(key)
                    cell_errors[key] = why
                elif kind == "exercise":
                    failures[key] = why
                else:  # it stopped outside any cell or exercise (starting up): the rest cannot run either
                    failures.update({n: why for n in todo})
            for name in names:
                if name not in outcomes and name not in failures:
                    failures[name] = f"the notebook's time limit ({self.notebook_timeout:g} s) ran out before this exercise"
        finally:
            _remove(scratch)
        for name in names:  # an exercise whose cell never reached check(...) says why
            recorded = outcomes.get(name)
            if isinstance(recorded, dict) and recorded.get("submitted") is False:
                cell = submission.exercise_cells[name]
                why = cell_errors.get(cell)
                failures[name] = ("the exercise cell did not reach its check(...) call" +
                                  (f": {why}" if why else ""))
                del outcomes[name]
        return outcomes, failures

    def _process(self, submission, scratch, cells, exercises, deadline, cell_errors, outcomes):
        """Run one learner's process over `cells` then `exercises`; None when it finished, else the
        step that stopped it: ("cell", index, why), ("exercise", name, why) or ("start", None, why)."""
        read_end, write_end = os.pipe()
        functions = {}
        for name in exercises:
            index = submission.exercise_cells[name]
            found = re.search(rf"""\bcheck\(\s*["']{name}["']\s*,\s*(\w+)\s*\)""", submission.sources[index])
            if found:
                functions.setdefault(str(index), {})[name] = found.group(1)
        job = {"cells": [(i, submission.sources[i]) for i in cells], "exercises": exercises, "functions": functions,
               "hidden": str(self.copy / "hidden") if self.hidden else None, "results": str(scratch / "results"),
               "cwd": str(scratch), "output": str(scratch / "output.txt")}
        job_path = scratch / "job.json"
        job_path.write_text(json.dumps(job))
        try:
            pid = self._fork(job_path, write_end)
        finally:
            os.close(write_end)
        step, step_deadline, buffer = ("start", None), deadline, b""
        try:
            while True:
                wait = min(step_deadline, deadline) - time.monotonic()
                ready = select.select([read_end], [], [], max(wait, 0))[0] if wait > 0 else []
                if not ready:
                    if deadline <= step_deadline:
                        return (*step, f"timed out: the notebook's limit of {self.notebook_timeout:g} s ran out")
                    return (*step, f"timed out: still running after {self.timeout:g} s, the limit per {step[0]}")
                chunk = os.read(read_end, 65536)
                if not chunk:
                    where = {"cell": f"cell {step[1]}", "exercise": f"exercise {step[1]}"}.get(step[0], "starting")
                    return (*step, f"the learner's process ended while running {where} (os._exit, a crash or a signal)")
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    try:
                        event = json.loads(line)
                        kind = event["event"]
                    except (ValueError, KeyError, TypeError):
                        continue  # not an event of ours: the learner wrote to the pipe
                    if kind in ("ready", "cell_done"):
                        if kind == "cell_done" and event.get("error"):
                            cell_errors[event.get("index")] = str(event["error"])[:MAX_MESSAGE]
                        step, step_deadline = ("start", None), deadline
                    elif kind == "cell" and event.get("index") in cells:
                        step, step_deadline = ("cell", event["index"]), time.monotonic() + self.timeout
                    elif kind == "exercise" and event.get("name") in exercises:
                        step, step_deadline = ("exercise", event["name"]), time.monotonic() + self.timeout
                    elif kind == "exercise_done" and event.get("name") in exercises:
                        outcomes[event["name"]] = _read_result(scratch / "results" / f"{event['name']}.pt")
                        step, step_deadline = ("start", None), deadline
                    elif kind == "finished":
                        return None
        finally:
            os.close(read_end)
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def _fork(self, job_path: Path, events_fd: int) -> int:
        """The id of a learner's process forked for `job_path`, reporting on `events_fd` (see `_forker`)."""
        for _ in range(2):  # a learner's process may have killed the forker: start another once
            if self.forker is None or self.forker.poll() is not None:
                self._start_forker()
            try:
                socket.send_fds(self.channel, [str(job_path).encode()], [events_fd])
                reply = b""
                while not reply.endswith(b"\n"):
                    chunk = self.channel.recv(64)
                    if not chunk:
                        raise ConnectionError("the forker ended")
                    reply += chunk
                return int(reply)
            except (OSError, ValueError):
                self._stop_forker()
        raise RuntimeError(f"the grader's forking process failed twice; its output is in {self.workdir / 'forker.txt'}")

    def _start_forker(self) -> None:
        ours, its = socket.socketpair()
        ours.settimeout(self.notebook_timeout)  # its first answer waits for its imports
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LECTLIB_SUBMISSION")}
        env.update(PYTHONPATH=str(self.copy), PYTHONDONTWRITEBYTECODE="1", PYTHONSAFEPATH="1", MPLBACKEND="Agg")
        with open(self.workdir / "forker.txt", "ab") as log:
            self.forker = subprocess.Popen([sys.executable, "-c", "import sys, lectlib.grade as g; g._forker(int(sys.argv[1]))",
                                            str(its.fileno())], cwd=self.workdir, env=env, stdin=subprocess.DEVNULL,
                                           stdout=log, stderr=subprocess.STDOUT, pass_fds=(its.fileno(),),
                                           start_new_session=True)
        its.close()
        self.channel = ours

    def _stop_forker(self) -> None:
        if self.forker is not None:
            self.channel.close()
            try:
                os.killpg(self.forker.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            self.forker.wait()
            self.forker = None


def _read_result(path: Path):
    """What the learner's process recorded for one exercise, read as data only; None if unreadable."""
    try:
        if path.stat().st_size > MAX_RESULT_BYTES:
            return None
        return torch.load(path, weights_only=True)
    except Exception:  # a missing, truncated or forged file: the exercise fails, the grader goes on
        return None


# ---------------------------------------------------------------- reports

def report(submission: Submission, outcomes: dict, failures: dict, hidden: dict, seconds: float) -> dict:
    """One learner's grade: exercises found, each exercise's checks with points and messages, the total."""
    exercises = []
    for name in submission.expected:
        max_points = sum(points for _, _, points in checks_of(name, hidden))
        if name not in submission.exercise_cells:
            checks, message = [], "missing: no exercise cell of the notebook checks it"
        elif name in failures:
            checks, message = [], failures[name]
        elif not isinstance(outcomes.get(name), dict):
            checks, message = [], "the learner's process wrote no readable result for it"
        else:
            checks = replay_checks(name, outcomes[name].get("checks", {}), hidden)
            failed = [c for c in checks if not c["passed"]]
            message = "all checks passed" if not failed else f"{failed[0]['check']} check: {failed[0]['message']}"
        points = sum(c["points"] for c in checks)
        exercises.append({"name": name, "points": points, "max_points": max_points,
                          "passed": bool(checks) and all(c["passed"] for c in checks), "message": message,
                          "checks": checks})
    return {"submission": str(submission.path), "student": submission.path.stem, "chapter": submission.chapter,
            "exercises_found": [n for n in submission.expected if n in submission.exercise_cells],
            "exercises": exercises, "total": sum(e["points"] for e in exercises),
            "max_total": sum(e["max_points"] for e in exercises), "errors": submission.errors,
            "seconds": round(seconds, 1)}


def class_summary(reports: list[dict]) -> dict:
    """Per exercise: how many learners passed it and the mean points; the mean total."""
    names = list(dict.fromkeys(e["name"] for r in reports for e in r["exercises"]))
    summary = {}
    for name in names:
        rows = [e for r in reports for e in r["exercises"] if e["name"] == name]
        summary[name] = {"passed": sum(e["passed"] for e in rows), "graded": len(rows),
                         "mean_points": round(sum(e["points"] for e in rows) / len(rows), 3)}
    return {"students": len(reports), "exercises": summary,
            "mean_total": round(sum(r["total"] for r in reports) / max(1, len(reports)), 3)}


def write_reports(reports: list[dict], out: Path) -> tuple[Path, Path]:
    """`out` (CSV: a row per learner, a column per exercise) and the same name with .json (everything)."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    names = list(dict.fromkeys(e["name"] for r in reports for e in r["exercises"]))
    with open(out, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["student", "submission", "chapter", *names, "total", "max_total", "errors"])
        for r in reports:
            points = {e["name"]: e["points"] for e in r["exercises"]}
            writer.writerow([r["student"], r["submission"], r["chapter"], *(points.get(n, "") for n in names),
                             r["total"], r["max_total"], " | ".join(r["errors"])])
    json_path = out.with_suffix(".json")
    json_path.write_text(json.dumps({"students": reports, "summary": class_summary(reports)}, indent=1))
    return out, json_path


def table(reports: list[dict]) -> str:
    """The class as a Markdown table: a row per learner, points per exercise, total, and each failure's reason."""
    names = list(dict.fromkeys(e["name"] for r in reports for e in r["exercises"]))
    lines = ["| student | " + " | ".join(names) + " | total | notes |", "|---" * (len(names) + 3) + "|"]
    for r in reports:
        points = {e["name"]: f"{e['points']:g}/{e['max_points']:g}" for e in r["exercises"]}
        notes = r["errors"] + [f"{e['name']}: {e['message']}" for e in r["exercises"] if not e["passed"]]
        notes = "; ".join(n.replace("|", "/") if len(n) <= 160 else n[:159].replace("|", "/") + "…" for n in notes)
        lines.append(f"| {r['student']} | " + " | ".join(points.get(n, "") for n in names) +
                     f" | {r['total']:g}/{r['max_total']:g} | {notes} |")
    return "\n".join(lines)


def gradescope(report: dict) -> dict:
    """One learner's report as Gradescope's results.json: a test per check; hidden ones shown once grades are published."""
    tests = []
    for e in report["exercises"]:
        for c in e["checks"] or [{"check": "public", "points": 0, "max_points": e["max_points"], "message": e["message"]}]:
            tests.append({"name": f"{e['name']} ({c['check']})", "score": c["points"], "max_score": c["max_points"],
                          "output": c["message"], "visibility": "visible" if c["check"] == "public" else "after_published"})
    return {"score": report["total"], "output": "\n".join(report["errors"]), "tests": tests}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lectlib.grade", description=__doc__.splitlines()[0])
    parser.add_argument("submission", type=Path, help="a notebook, or a folder of notebooks (one per learner)")
    parser.add_argument("--out", type=Path, default=Path("grades.csv"), help="the CSV; the JSON report goes beside it")
    parser.add_argument("--hidden", type=Path, help="the instructor's folder of hidden checks (*.py)")
    parser.add_argument("--chapter", help="grade every notebook as this chapter (e.g. 00_why_long_context); by "
                        "default the chapter a notebook's metadata names")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per cell and per exercise")
    parser.add_argument("--notebook-timeout", type=float, default=600.0, help="seconds per notebook, in all")
    parser.add_argument("--gradescope", type=Path, help="also write this results.json (one submission only)")
    args = parser.parse_args(argv)
    if args.submission.is_dir():
        paths = sorted(args.submission.glob("*.ipynb"))
    elif args.submission.is_file():
        paths = [args.submission]
    else:
        parser.error(f"no such notebook or folder: {args.submission}")
    if not paths:
        parser.error(f"no .ipynb file in {args.submission}")
    reports = []
    try:
        grader = Grader(hidden=args.hidden, chapter=args.chapter, timeout=args.timeout,
                        notebook_timeout=args.notebook_timeout)
    except ValueError as error:
        parser.error(str(error))
    with grader:
        for path in paths:
            reports.append(grader.grade(path))
            r = reports[-1]
            print(f"{r['student']}: {r['total']:g}/{r['max_total']:g} ({r['seconds']} s)"
                  + "".join(f"\n  error: {e}" for e in r["errors"]), flush=True)
    csv_path, json_path = write_reports(reports, args.out)
    if args.gradescope:
        if len(reports) != 1:
            parser.error(f"--gradescope takes one submission, found {len(reports)}: {[r['student'] for r in reports]}")
        args.gradescope.parent.mkdir(parents=True, exist_ok=True)
        args.gradescope.write_text(json.dumps(gradescope(reports[0]), indent=1))
    print(table(reports))
    summary = class_summary(reports)
    for name, e in summary["exercises"].items():
        print(f"{name}: passed by {e['passed']} of {e['graded']}, mean {e['mean_points']:g} points")
    print(f"mean total: {summary['mean_total']:g}")
    print(f"wrote {csv_path} and {json_path}")
    nothing_found = [r["student"] for r in reports if not r["exercises_found"]]
    if nothing_found:
        print(f"error: no exercise found in {', '.join(nothing_found)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
