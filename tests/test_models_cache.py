"""The converted-checkpoint cache of lectlib.models: concurrent first loads, failures, damaged files, LECTLIB_CACHE."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lectlib import models

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("value,expected", [("", Path.home() / ".cache" / "lectlib"),
                                            ("  ", Path.home() / ".cache" / "lectlib"),
                                            ("~/lectlib-cache", Path.home() / "lectlib-cache"),
                                            ("/tmp/elsewhere", Path("/tmp/elsewhere"))])
def test_cache_dir_reads_lectlib_cache(monkeypatch, value, expected):
    """An empty LECTLIB_CACHE means the default (not the current folder), and ~ is expanded."""
    monkeypatch.setenv("LECTLIB_CACHE", value)
    assert models.cache_dir() == expected


def test_a_failed_conversion_leaves_nothing_behind(tmp_path):
    class HalfSaved:
        def save_pretrained(self, folder):
            (Path(folder) / models.WEIGHTS).write_bytes(b"half a checkpoint")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        models._save_converted(HalfSaved(), None, tmp_path / "smollm2-135m-instruct")
    assert list(tmp_path.iterdir()) == []


def test_two_first_loads_at_once_both_succeed_and_a_damaged_file_is_named(tmp_path, monkeypatch):
    """Two processes convert into one fresh cache at once: one converts, the other waits for it; no
    temporary folder stays, the tokenizer config does not pin local_files_only, and a truncated or
    altered weights file is reported by name with the advice to delete it."""
    env = {**os.environ, "LECTLIB_CACHE": str(tmp_path), "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    code = "from lectlib import models; print(models.checkpoint_path())"
    runs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    outs = [run.communicate(timeout=900) for run in runs]
    target = tmp_path / "smollm2-135m-instruct"
    for run, (out, err) in zip(runs, outs):
        assert run.returncode == 0, err[-2000:]
        assert out.strip().splitlines()[-1] == str(target)
    assert sum("converting" in out for out, _ in outs) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["smollm2-135m-instruct", "smollm2-135m-instruct.lock"]
    assert "local_files_only" not in json.loads((target / "tokenizer_config.json").read_text())
    weights = target / models.WEIGHTS
    monkeypatch.setenv("LECTLIB_CACHE", str(tmp_path))
    assert models.checkpoint_path() == target  # as converted

    with open(weights, "r+b") as f:  # the same size, other bytes
        f.seek(weights.stat().st_size // 2)
        f.write(b"\x00" * 64)
    with pytest.raises(RuntimeError, match=f"{weights}.*sha256.*Delete the folder"):
        models.checkpoint_path()
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 1000)
    with pytest.raises(RuntimeError, match=f"{weights}.*bytes where.*Delete the folder"):
        models.checkpoint_path()
    (target / models.CHECKSUM).unlink()  # a cache converted before checksums: the header check catches it
    with pytest.raises(RuntimeError, match=f"{weights}.*Delete the folder"):
        models.checkpoint_path()
