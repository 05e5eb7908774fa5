"""The machinery of a GPU session's one command: parts in priority order under a time budget.

GPU time is lent in short sessions (minutes, start-up included). A device command therefore
runs its measurements as `Part`s, most important first; each part is guarded (one failure does
not lose the others), skipped when the budget has not left it the time it needs, and written to
JSON as soon as it finishes, so a run that times out keeps what it measured. `--tiny` runs the
same code on a CPU with tiny sizes (Triton under its interpreter): the rehearsal that keeps a
typo from costing a GPU session.
"""

import json
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import RESULTS, environment


def device_slug(env: dict | None = None) -> str:
    """The device name as a file-name part: 'nvidia-h100-80gb-hbm3', 'cpu'."""
    name = (env or environment())["device"].lower()
    return "".join(c if c.isalnum() else "-" for c in name).strip("-")


class Budget:
    """Seconds left of a time budget started now."""

    def __init__(self, seconds: float):
        if seconds <= 0:
            raise ValueError(f"budget seconds must be positive, got {seconds}")
        self.seconds = seconds
        self.start = time.perf_counter()

    def used(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return self.seconds - self.used()


@dataclass
class Part:
    """One measurement: `run()` returns a JSON-able result; `needs_s` is what it needs of the budget."""

    name: str
    run: Callable[[], dict]
    needs_s: float = 0.0


def run_parts(parts: list[Part], budget: Budget, write: Callable[[str, dict], Path]) -> dict:
    """Run `parts` in order under `budget`; write(name, record) each one's record; return {name: status}.

    A record is {status: ok | failed | skipped, seconds, result | error}: a part that raises is
    recorded as failed with its traceback and the next one runs.
    """
    statuses = {}
    for part in parts:
        if budget.left() < part.needs_s:
            record = dict(status="skipped", seconds=0.0,
                          error=f"{budget.left():.0f} s left of the budget, the part needs {part.needs_s:.0f} s")
        else:
            print(f"== {part.name} ({budget.left():.0f} s of the budget left)", flush=True)
            start = time.perf_counter()
            try:
                record = dict(status="ok", result=part.run())
            except Exception as error:  # noqa: BLE001  (a failed part is recorded, the run goes on)
                traceback.print_exc()
                record = dict(status="failed", error=f"{type(error).__name__}: {error}",
                              traceback=traceback.format_exc(limit=8))
            record["seconds"] = round(time.perf_counter() - start, 1)
        statuses[part.name] = record["status"]
        path = write(part.name, record)
        print(f"== {part.name}: {record['status']} in {record['seconds']} s -> {path}", flush=True)
    return statuses


def write_json(path: Path, payload: dict) -> Path:
    """Write payload with the environment (device, versions, date) to `path`; return it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": environment(), **payload}, indent=1, default=str))
    return path


def results_dir(out: str | None) -> Path:
    return Path(out) if out else RESULTS
