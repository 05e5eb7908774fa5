"""Every exercise's checks, on lectlib's reference solutions: what validates a chapter's new exercises.

    python -m pytest tests/test_exercises.py

Learners' notebooks are graded by `python -m lectlib.grade` (tests/test_grade.py), which replays
each check on the values the learner's function returned in another process: a check must
therefore give the same verdict when replayed (`test_the_check_replays`).
"""

import nbformat
import pytest

from lectlib import grade, grading, release

EXERCISES = sorted(grading.exercises())


@pytest.mark.parametrize("name", EXERCISES)
def test_exercise(name):
    grading.run_check(name, grading.get(name).reference)


@pytest.mark.parametrize("name", EXERCISES)
def test_the_check_replays(name):
    """The grader's path: record the reference's calls as data, rerun the check on them; it passes,
    and it fails on the record of a function that returns nonsense."""
    reference = grading.get(name).reference
    recorded = grade.record_checks(name, reference, {})
    assert recorded["public"]["stopped"] is None, recorded["public"]["stopped"]
    assert recorded["public"]["calls"], "the check never calls the candidate"
    [result] = grade.replay_checks(name, recorded, {})
    assert result["passed"], result["message"]
    for call in recorded["public"]["calls"]:
        call["returned"] = None
    [result] = grade.replay_checks(name, recorded, {})
    assert not result["passed"]


@pytest.mark.parametrize("name", EXERCISES)
def test_check_rejects_an_unsolved_exercise(name):
    """A check that passes a function which does nothing would grade nothing."""
    def unsolved(*args, **kwargs):
        raise NotImplementedError("write your solution here")

    with pytest.raises(grading.ExerciseFailure, match="not implemented"):
        grading.run_check(name, unsolved)


def test_every_chapter_exercise_is_registered_and_its_solution_passes():
    for path in release.chapters():
        found = release.submitted_functions(path)
        for name, function in found.items():
            assert name in EXERCISES, f"{path.name} checks {name!r}, which no grading module registers"
            grading.run_check(name, function)
        notebook = nbformat.read(path, as_version=4)
        cells = release.exercise_cells(notebook)
        assert len(found) == len(cells), f"{path.name}: an exercise cell did not reach its check"
        untagged = [i for i, c in enumerate(notebook.cells) if c.cell_type == "code" and c not in cells
                    and ("BEGIN SOLUTION" in c.source or release.CHECK_CALL.search(c.source))]
        assert not untagged, (f"{path.name}: cells {untagged} hold an exercise but lack the tag 'exercise' "
                              "(the grader and the release find exercises by it)")
        assert list(found) == release.exercise_names(nbformat.read(path, as_version=4))


def test_the_student_release_fails_the_checks(tmp_path):
    """Cutting the solutions out leaves every exercise unsolved, and the grader says so."""
    written = release.release(tmp_path)
    assert written
    for path in written:
        notebook = nbformat.read(path, as_version=4)
        for cell in release.exercise_cells(notebook):
            assert "BEGIN SOLUTION" not in cell.source and "NotImplementedError" in cell.source
        assert release.submitted_functions(path).keys() <= set(EXERCISES)
        for name, function in release.submitted_functions(path).items():
            with pytest.raises(grading.ExerciseFailure):
                grading.run_check(name, function)


def test_wrong_answers_are_explained():
    def off_by_two(*, n_layers, n_kv_heads, head_dim, seq_len, batch_size=1, bytes_per_element=2):
        return n_layers * n_kv_heads * head_dim * bytes_per_element * seq_len * batch_size

    with pytest.raises(grading.ExerciseFailure, match="expected 2.62144e\\+06, got 1.31072e\\+06"):
        grading.run_check("kv_cache_bytes", off_by_two)
    assert grading.check("kv_cache_bytes", off_by_two) is False


def test_strip_solutions_keeps_indentation():
    source = "def f(x):\n    ### BEGIN SOLUTION\n    return x\n    ### END SOLUTION\n\ncheck('f', f)"
    assert release.strip_solutions(source) == (
        "def f(x):\n    raise NotImplementedError(\"write your solution here\")\n\ncheck('f', f)")
