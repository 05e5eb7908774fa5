"""Benchmarks: `python -m lectlib.bench NAME [options]`, one module per NAME with a `main(argv)`.

Benchmarks measure speed and memory against a baseline measured in the same run, print a
table with ratios, and record GPU results to data/results/NAME-<device>.json with the device,
library versions and date (see `record`).
"""

import datetime
import json
import platform
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parents[2] / "data" / "results"


def environment() -> dict:
    """Device, versions and date, stored with every recorded result."""
    info = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
            "python": platform.python_version(), "cpu": platform.processor() or platform.machine()}
    if torch.cuda.is_available():
        info["device"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    else:
        info["device"] = "cpu"
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def record(name: str, rows: list[dict], **extra) -> Path:
    """Write rows with the environment to data/results/<name>-<device>.json; return the path."""
    env = environment()
    device = env["device"].lower().replace(" ", "-")
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}-{device}.json"
    path.write_text(json.dumps({"benchmark": name, "environment": env, **extra, "rows": rows}, indent=1))
    print(f"recorded {len(rows)} rows to {path}")
    return path


def load_results(name: str) -> list[dict]:
    """Every recorded result of benchmark `name` (one dict per device file)."""
    return [json.loads(p.read_text()) for p in sorted(RESULTS.glob(f"{name}-*.json"))]


def table(rows: list[dict], columns: list[str]) -> str:
    """A plain-text table of `columns` from `rows`."""
    cells = [[f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(x.rjust(w) for x, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)
