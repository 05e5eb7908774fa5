"""The book's structure: every chapter is in the table of contents, starts the same way, ships clean."""

from pathlib import Path

import nbformat
import pytest
import yaml

from lectlib import release

ROOT = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text())
CHAPTERS = release.chapters()


def _toc_files() -> set[str]:
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    return {entry["file"] for entry in toc["chapters"]}


def test_there_are_chapters():
    assert CHAPTERS


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.parent.name)
def test_chapter_is_in_the_table_of_contents(path):
    assert str(path.relative_to(ROOT).with_suffix("")) in _toc_files()


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.parent.name)
def test_chapter_opens_with_title_and_the_standard_setup_cell(path):
    notebook = nbformat.read(path, as_version=4)
    title, setup = notebook.cells[0], notebook.cells[1]
    assert title.cell_type == "markdown" and title.source.startswith("# ")
    assert "you will learn" in title.source
    assert setup.cell_type == "code" and setup.source.startswith("# Setup: in Colab")
    assert "remove-cell" in setup.metadata.get("tags", []), "the Colab setup is hidden on the website"
    # The Colab setup clones the repository the launch buttons point at (one URL, in _config.yml).
    assert f'"{CONFIG["repository"]["url"]}"' in setup.source


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.parent.name)
def test_chapter_is_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in notebook.cells if c.cell_type == "code")


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.parent.name)
def test_chapter_ends_with_exercises(path):
    notebook = nbformat.read(path, as_version=4)
    cells = release.exercise_cells(notebook)
    assert cells, f"{path.name} has no exercise cell"
    assert all("### BEGIN SOLUTION" in c.source and "check(" in c.source for c in cells)


def test_every_toc_entry_exists():
    for entry in _toc_files():
        assert any((ROOT / f"{entry}{suffix}").exists() for suffix in (".ipynb", ".md")), entry
