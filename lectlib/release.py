"""Assignments: the student release of the chapters and the collection of a learner's answers.

Exercise cells carry the tag "exercise" and hold the solution between `### BEGIN SOLUTION` and
`### END SOLUTION`. The student release replaces each such block with a `raise
NotImplementedError`, clears every output, and keeps everything else:

    python -m lectlib.release release/          # student notebooks, one per chapter

A learner's notebook is graded by executing its exercise cells with `check` recording the
functions instead of printing (`submitted_functions`); `tests/test_exercises.py` then runs the
same checks as the notebook (`LECTLIB_SUBMISSION=path/to/notebook.ipynb pytest tests/test_exercises.py`).
"""

import re
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
SOLUTION = re.compile(r"^([ \t]*)### BEGIN SOLUTION\n.*?^[ \t]*### END SOLUTION[ \t]*$", re.S | re.M)


def strip_solutions(source: str) -> str:
    """The cell source with each solution block replaced by a NotImplementedError at its indentation."""
    return SOLUTION.sub(lambda m: f'{m.group(1)}raise NotImplementedError("write your solution here")', source)


def exercise_cells(notebook) -> list:
    """The code cells tagged "exercise"."""
    return [c for c in notebook.cells if c.cell_type == "code" and "exercise" in c.metadata.get("tags", [])]


def student_notebook(notebook):
    """A copy of `notebook` with solutions cut out of exercise cells and all outputs cleared."""
    notebook = nbformat.from_dict(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    for cell in exercise_cells(notebook):
        cell.source = strip_solutions(cell.source)
    return notebook


def chapters() -> list[Path]:
    """Every chapter notebook of the book."""
    return sorted((ROOT / "chapters").glob("*/*.ipynb"))


def release(out: Path) -> list[Path]:
    """Write the student release of every chapter under `out`; return the paths written."""
    written = []
    for path in chapters():
        target = Path(out) / path.relative_to(ROOT)
        target.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(student_notebook(nbformat.read(path, as_version=4)), target)
        written.append(target)
    return written


def submitted_functions(path: Path) -> dict:
    """{exercise name: the learner's function} from the exercise cells of a notebook.

    Each cell runs in its own namespace with `check` replaced by a recorder, so a cell that
    raises (an unsolved exercise) records nothing and the others still count.
    """
    import lectlib.grading as grading

    found = {}
    original = grading.check
    grading.check = lambda name, candidate: found.__setitem__(name, candidate)
    try:
        for cell in exercise_cells(nbformat.read(path, as_version=4)):
            try:
                exec(compile(cell.source, str(path), "exec"), {"__name__": "__submission__"})
            except Exception as error:  # an unsolved or broken exercise scores zero, the rest still count
                print(f"{path.name}: an exercise cell raised {type(error).__name__}: {error}")
    finally:
        grading.check = original
    return found


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: python -m lectlib.release OUTPUT_DIR")
    for written in release(Path(sys.argv[1])):
        print(written)
