"""The autograder (`python -m lectlib.grade`) against the attacks of issue 17, on hand-made submissions.

tests/submissions/make.py writes the notebooks: all answer chapter 0 (two exercises worth
1 public + 1 hidden point each, hidden checks in tests/submissions/hidden/).
"""

import ast
import csv
import json
import shutil
import time
from pathlib import Path

import nbformat
import pytest
import torch

from lectlib import grade, grading, release

SUBMISSIONS = Path(__file__).parent / "submissions"
HIDDEN = SUBMISSIONS / "hidden"
TIMEOUT = 6.0  # seconds per cell and per exercise: the loop's cost


@pytest.fixture(scope="module")
def grader(tmp_path_factory):
    """One grader for the attacks, watching a copy of lectlib as the instructor's (the overwrite attack writes there)."""
    library = tmp_path_factory.mktemp("instructor") / "lectlib"
    shutil.copytree(grade.LIBRARY, library, ignore=shutil.ignore_patterns("__pycache__"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(grade, "LIBRARY", library)
        patch.setenv("LECTLIB_TEST_GRADER_CHECKS", str(library / "grading"))
        with grade.Grader(hidden=HIDDEN, timeout=TIMEOUT, notebook_timeout=300) as g:
            yield g


@pytest.fixture(scope="module")
def class_run(tmp_path_factory):
    """The class of four graded by the command, in the order ada (tampering), ben, cy, dee."""
    out = tmp_path_factory.mktemp("grades") / "grades.csv"
    status = grade.main([str(SUBMISSIONS / "class"), "--out", str(out), "--hidden", str(HIDDEN),
                         "--timeout", str(TIMEOUT)])
    return status, out, json.loads(out.with_suffix(".json").read_text())


def by_name(report: dict) -> dict:
    return {e["name"]: e for e in report["exercises"]}


def test_the_class_gets_the_scores_it_deserves(class_run):
    status, out, reports = class_run
    assert status == 0
    totals = {r["student"]: (r["total"], r["max_total"]) for r in reports["students"]}
    assert totals == {"ada": (0, 4), "ben": (4, 4), "cy": (2, 4), "dee": (0, 4)}
    rows = {row["student"]: row for row in csv.DictReader(out.open())}
    assert rows["cy"]["kv_cache_bytes"] == "2" and rows["cy"]["attention_scores_bytes"] == "0"
    assert reports["summary"]["exercises"]["kv_cache_bytes"] == {"passed": 2, "graded": 4, "mean_points": 1.0}
    cy = by_name(next(r for r in reports["students"] if r["student"] == "cy"))
    assert "batch 2, 32 heads" in cy["attention_scores_bytes"]["message"]


def test_gradescope_results_show_hidden_checks_once_published(class_run):
    cy = next(r for r in class_run[2]["students"] if r["student"] == "cy")
    results = grade.gradescope(cy)
    assert results["score"] == 2
    assert [(t["name"], t["score"], t["max_score"], t["visibility"]) for t in results["tests"]] == [
        ("kv_cache_bytes (public)", 1, 1, "visible"), ("kv_cache_bytes (hidden 1)", 1, 1, "after_published"),
        ("attention_scores_bytes (public)", 0, 1, "visible"),
        ("attention_scores_bytes (hidden 1)", 0, 1, "after_published")]


def test_a_patched_checker_scores_zero_and_the_next_learners_are_not_affected(class_run):
    """ada replaced run_check, check and torch.allclose and added a module to her copy of the checks."""
    reports = {r["student"]: r for r in class_run[2]["students"]}
    assert [r["student"] for r in class_run[2]["students"]] == ["ada", "ben", "cy", "dee"]
    ada = by_name(reports["ada"])
    assert ada["kv_cache_bytes"]["message"].endswith("expected 2.62144e+06, got 0")  # the replay's verdict
    assert [c["passed"] for c in ada["attention_scores_bytes"]["checks"]] == [False, False]
    assert "tampering" in reports["ada"]["errors"][0] and "zz_pass_all.py" in reports["ada"]["errors"][0]
    # graded after her, in the same run: the right answers pass, the untouched release does not
    assert all(e["passed"] for e in reports["ben"]["exercises"])
    assert [e["message"] for e in reports["dee"]["exercises"]] == [
        "public check: kv_cache_bytes: not implemented yet", "public check: attention_scores_bytes: not implemented yet"]
    assert not (grade.LIBRARY / "grading" / "zz_pass_all.py").exists()


def test_a_loop_is_a_timeout_failure_and_hidden_checks_catch_answers_learned_by_heart(grader):
    start = time.monotonic()
    report = grader.grade(SUBMISSIONS / "attacks" / "loop.ipynb")
    exercises = by_name(report)
    assert "timed out" in exercises["kv_cache_bytes"]["message"] and exercises["kv_cache_bytes"]["points"] == 0
    memorised = exercises["attention_scores_bytes"]
    assert [(c["check"], c["passed"]) for c in memorised["checks"]] == [("public", True), ("hidden 1", False)]
    assert memorised["points"] == 1 and "KeyError" in memorised["message"]
    assert time.monotonic() - start < 300


def test_exits_and_interrupts_fail_only_what_they_stop(grader):
    report = by_name(grader.grade(SUBMISSIONS / "attacks" / "exits.ipynb"))
    # a cell that raised KeyboardInterrupt after defining a name: the exercise using it still passes
    assert report["kv_cache_bytes"]["points"] == 2
    assert report["attention_scores_bytes"]["points"] == 0
    assert "your function raised SystemExit" in report["attention_scores_bytes"]["message"]
    report = by_name(grader.grade(SUBMISSIONS / "attacks" / "os_exit.ipynb"))
    assert report["kv_cache_bytes"]["points"] == 0
    assert "process ended while running exercise kv_cache_bytes" in report["kv_cache_bytes"]["message"]
    assert report["attention_scores_bytes"]["points"] == 2  # a new process went on after the os._exit


def test_a_module_written_into_the_graders_checks_is_undone_and_scores_zero(grader):
    report = grader.grade(SUBMISSIONS / "attacks" / "overwrite.ipynb")
    assert report["total"] == 0 and "tampering" in report["errors"][0] and "zz_pass_all.py" in report["errors"][0]
    assert not (grade.LIBRARY / "grading" / "zz_pass_all.py").exists()
    assert [c["passed"] for e in report["exercises"] for c in e["checks"]] == [True] * 4  # right, but tampered


@pytest.mark.parametrize("name, why", [("notags", "not tagged 'exercise'"), ("nothing", "no exercise found")])
def test_no_exercise_found_is_an_error_and_scores_zero(name, why, tmp_path, capsys):
    path = SUBMISSIONS / "attacks" / f"{name}.ipynb"
    assert grade.main([str(path), "--out", str(tmp_path / "g.csv")]) == 1
    report = json.loads((tmp_path / "g.json").read_text())["students"][0]
    assert report["total"] == 0 and report["max_total"] == 2 and report["exercises_found"] == []
    assert why in report["errors"][0]
    assert [e["message"] for e in report["exercises"]] == ["missing: no exercise cell of the notebook checks it"] * 2
    assert "no exercise found in" in capsys.readouterr().err


def test_the_release_has_no_solution_and_nothing_hidden(tmp_path):
    written = release.release(tmp_path)
    assert sorted(p for p in tmp_path.rglob("*") if p.is_file()) == sorted(written)
    released = "\n".join(p.read_text() for p in written)
    solutions = []
    for path in release.chapters():
        for cell in release.exercise_cells(nbformat.read(path, as_version=4)):
            block = release.SOLUTION.search(cell.source).group(0).splitlines()[1:-1]
            solutions += [line.strip() for line in block if len(line.strip()) > 25]
    assert solutions and not [s for s in solutions if json.dumps(s)[1:-1] in released]
    assert "BEGIN SOLUTION" not in released
    hidden = [node.value for path in HIDDEN.glob("*.py") for node in ast.walk(ast.parse(path.read_text()))
              if isinstance(node, ast.Constant) and isinstance(node.value, str) and len(node.value) > 15
              and node.value not in grading.exercises()]  # the messages, not the exercises' names
    assert hidden and not [text for text in hidden if text in released] and "hidden_check" not in released
    for path in written:
        notebook = nbformat.read(path, as_version=4)
        assert notebook.metadata["lectlib"]["chapter"] == path.stem  # how the grader knows the chapter


def test_cells_to_run_are_the_exercise_and_what_it_reads():
    sources = ["import torch\nimport math", "heavy = torch.randn(10**4, 10**4)", "def helper(x):\n    return math.sqrt(x)",
               "SCALE = 2", "def f(x):\n    y = helper(x) * SCALE\n    return torch.tensor(y)\ncheck('f', f)",
               "SCALE = 3"]
    assert grade.cells_to_run(sources, [4]) == [0, 2, 3, 4]
    assert grade.cells_to_run(["!pip install nothing\nx = 1", "print(x)", "y = (("], [1]) == [0, 1]


def test_the_replay_takes_only_data_and_checks_what_was_asked():
    record = grade.Record(lambda x, **kw: (torch.as_tensor(x) * 2, [1.5, "a"], torch.float32))
    record(torch.ones(2), scale=3)
    [call] = record.calls
    assert call["input"] == "list[1](tensor(2,):float32){'scale': int}"
    assert call["returned"][1] == [1.5, "a"] and call["returned"][2] == {"unreadable": "dtype"}
    replay = grade.Replay(record.calls, None)
    with pytest.raises(grading.ExerciseFailure, match="cannot read back"):
        replay(torch.ones(2), scale=3)
    with pytest.raises(grading.ExerciseFailure, match=r"was given list\[1\]\(tensor\(2,\)"):
        grade.Replay(record.calls, None)(torch.ones(3), scale=3)
    with pytest.raises(grading.ExerciseFailure, match="called 0 times .it stopped: KeyboardInterrupt"):
        grade.Replay([], "KeyboardInterrupt: ")(1)

    class Liar(float):
        def __eq__(self, other):
            return True

    assert type(grade.to_data(Liar(1.0))) is float


def test_registration_validates_points_and_hidden_names(tmp_path):
    with pytest.raises(ValueError, match="points must be a positive number, got 0"):
        grading.exercise("x", reference=abs, points=0)
    (tmp_path / "typo.py").write_text("from lectlib.grading import hidden_check\n"
                                      "@hidden_check('kv_cache_byte')\ndef _(candidate):\n    pass\n")
    with pytest.raises(ValueError, match="kv_cache_byte"):
        grading.load_hidden(tmp_path)
    assert set(grading.load_hidden(HIDDEN)) == {"kv_cache_bytes", "attention_scores_bytes"}
