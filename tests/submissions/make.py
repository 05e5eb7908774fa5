"""Writes the hand-made submissions that tests/test_grade.py grades (run it after changing them).

All answer chapter 0 (two exercises, no model): a class of four (ada tampers, ben is right,
cy gets half, dee hands in the release untouched) and one notebook per attack on the grader.
"""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).parent
SIGNATURES = {
    "kv_cache_bytes": "def kv_cache_bytes(*, n_layers, n_kv_heads, head_dim, seq_len, batch_size=1, bytes_per_element=2):",
    "attention_scores_bytes": "def attention_scores_bytes(*, seq_len, n_heads, batch_size=1, bytes_per_element=2):",
}
RIGHT = {
    "kv_cache_bytes": "return 2 * n_layers * n_kv_heads * head_dim * bytes_per_element * seq_len * batch_size",
    "attention_scores_bytes": "return batch_size * n_heads * seq_len * seq_len * bytes_per_element",
}
UNSOLVED = 'raise NotImplementedError("write your solution here")'


def exercise(name: str, body: str, *, tagged: bool = True, checker: str = "from lectlib.grading import check\n\n",
             call: str = "check") -> nbformat.NotebookNode:
    """An exercise cell as the release has it, with `body` as the function's body."""
    body = "\n".join("    " + line for line in body.splitlines())
    cell = new_code_cell(f'{checker}{SIGNATURES[name]}\n{body}\n\n{call}("{name}", {name})')
    cell.metadata["tags"] = ["exercise"] if tagged else []
    return cell


def notebook(*cells) -> nbformat.NotebookNode:
    nb = new_notebook(cells=[new_markdown_cell("# Chapter 0, exercises"), *cells])
    nb.metadata["lectlib"] = {"chapter": "00_why_long_context"}
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i}"  # fixed ids: rerunning this script changes nothing that did not change
    return nb


SUBMISSIONS = {
    # Right, with a helper from another cell and an import from a third.
    "class/ben": notebook(
        new_code_cell("import math"),
        new_code_cell("def per_token(n_layers, n_kv_heads, head_dim, bytes_per_element):\n"
                      "    return 2 * n_layers * n_kv_heads * head_dim * bytes_per_element"),
        new_code_cell("print('an experiment the grader does not need')"),
        exercise("kv_cache_bytes", "return per_token(n_layers, n_kv_heads, head_dim, bytes_per_element) * seq_len * batch_size"),
        exercise("attention_scores_bytes", "return batch_size * n_heads * math.prod([seq_len, seq_len]) * bytes_per_element"),
    ),
    # One right, one wrong (forgets the batch).
    "class/cy": notebook(
        exercise("kv_cache_bytes", RIGHT["kv_cache_bytes"]),
        exercise("attention_scores_bytes", "return n_heads * seq_len * seq_len * bytes_per_element"),
    ),
    # The release, untouched.
    "class/dee": notebook(exercise("kv_cache_bytes", UNSOLVED), exercise("attention_scores_bytes", UNSOLVED)),
    # Wrong answers behind a patched checker, a patched torch.allclose and a module of its own among the checks.
    "class/ada": notebook(
        new_code_cell(
            "import importlib, os, torch\n"
            "import lectlib.grading as grading\n"
            "grading.run_check = lambda name, candidate: None\n"
            "grading.check = lambda name, candidate: print(f'✓ {name}: all checks passed') or True\n"
            "torch.allclose = lambda *args, **kwargs: True\n"
            "folder = os.path.dirname(grading.__file__)\n"
            "os.chmod(folder, 0o755)\n"
            "with open(os.path.join(folder, 'zz_pass_all.py'), 'w') as f:\n"
            "    f.write('import lectlib.grading as g\\ng.run_check = lambda name, candidate: None\\n')\n"
            "importlib.import_module('lectlib.grading.zz_pass_all')"),
        exercise("kv_cache_bytes", "return 0", checker="", call="grading.check"),
        exercise("attention_scores_bytes", "return 0", checker="", call="grading.check"),
    ),
    # A loop that never ends; answers learned by heart from the public checks (the hidden check sees through it).
    "attacks/loop": notebook(
        exercise("kv_cache_bytes", "while True:\n    pass"),
        exercise("attention_scores_bytes",
                 "known = {(4096, 1, 1, 2): 33554432, (1000, 32, 2, 4): 256000000, (16384, 8, 1, 2): 4294967296,\n"
                 "         (8192, 8, 1, 2): 1073741824}\n"
                 "return known[(seq_len, n_heads, batch_size, bytes_per_element)]"),
    ),
    # KeyboardInterrupt in a cell, sys.exit in a solution.
    "attacks/exits": notebook(
        new_code_cell("BYTES_PER_ELEMENT = 2\nraise KeyboardInterrupt"),
        exercise("kv_cache_bytes", "assert BYTES_PER_ELEMENT == 2\n" + RIGHT["kv_cache_bytes"]),
        exercise("attention_scores_bytes", "import sys\nsys.exit(0)"),
    ),
    # os._exit in a solution ends the learner's process; the next exercise still counts.
    "attacks/os_exit": notebook(
        exercise("kv_cache_bytes", "import os\nos._exit(0)"),
        exercise("attention_scores_bytes", RIGHT["attention_scores_bytes"]),
    ),
    # Writes a module into the grader's own checks (the tests say where with an environment variable).
    "attacks/overwrite": notebook(
        new_code_cell(
            "import os\n"
            "target = os.environ['LECTLIB_TEST_GRADER_CHECKS']\n"
            "with open(os.path.join(target, 'zz_pass_all.py'), 'w') as f:\n"
            "    f.write('import lectlib.grading as g\\ng.run_check = lambda name, candidate: None\\n')"),
        exercise("kv_cache_bytes", f"print(target)\n{RIGHT['kv_cache_bytes']}"),
        exercise("attention_scores_bytes", RIGHT["attention_scores_bytes"]),
    ),
    # Right answers, exercise tags removed.
    "attacks/notags": notebook(*(exercise(n, RIGHT[n], tagged=False) for n in RIGHT)),
    # Nothing at all.
    "attacks/nothing": notebook(),
}

if __name__ == "__main__":
    for name, nb in SUBMISSIONS.items():
        path = HERE / f"{name}.ipynb"
        path.parent.mkdir(parents=True, exist_ok=True)
        nbformat.write(nb, path)
        print(path)
