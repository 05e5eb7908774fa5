"""Assignments: the student release of the chapters.

Exercise cells carry the tag "exercise", hold the solution between `### BEGIN SOLUTION` and
`### END SOLUTION`, and end with `check("name", function)`. The student release replaces each
solution block with a `raise NotImplementedError`, clears every output, records the chapter in
the notebook's metadata (`lectlib.chapter`, which the grader reads), and keeps everything else:

    python -m lectlib.release release/          # student notebooks, one per chapter, and nothing else

Learners' notebooks are graded by `python -m lectlib.grade` (isolated processes, see there).
`submitted_functions` executes exercise cells in this process: only for the book's own notebooks.
"""

import re
import sys
from pathlib import Path

import nbformat

ROOT = Path(__file__).resolve().parents[1]
SOLUTION = re.compile(r"^([ \t]*)### BEGIN SOLUTION\n.*?^[ \t]*### END SOLUTION[ \t]*$", re.S | re.M)
CHECK_CALL = re.compile(r"""\bcheck\(\s*["'](\w+)["']""")


def strip_solutions(source: str) -> str:
    """The cell source with each solution block replaced by a NotImplementedError at its indentation."""
    return SOLUTION.sub(lambda m: f'{m.group(1)}raise NotImplementedError("write your solution here")', source)


def exercise_cells(notebook) -> list:
    """The code cells tagged "exercise"."""
    return [c for c in notebook.cells if c.cell_type == "code" and "exercise" in c.metadata.get("tags", [])]


def exercise_names(notebook) -> list[str]:
    """The exercises a notebook checks, in order: the names in the check("name", ...) calls of its exercise cells."""
    return list(dict.fromkeys(name for cell in exercise_cells(notebook) for name in CHECK_CALL.findall(cell.source)))


def student_notebook(notebook, chapter: str | None = None):
    """A copy of `notebook` with solutions cut out, all outputs cleared, and `chapter` in its metadata."""
    notebook = nbformat.from_dict(notebook)
    if chapter is not None:
        notebook.metadata["lectlib"] = {"chapter": chapter}
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    for cell in notebook.cells:  # every cell, tagged or not: a solution never reaches a learner
        if cell.cell_type == "code":
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
        nbformat.write(student_notebook(nbformat.read(path, as_version=4), chapter=path.stem), target)
        written.append(target)
    return written


def submitted_functions(path: Path) -> dict:
    """{exercise name: the function} from the exercise cells of one of the book's notebooks, run here.

    Not for learners' notebooks: their code would run inside this process (`lectlib.grade` isolates it).
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
