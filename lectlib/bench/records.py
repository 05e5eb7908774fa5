"""python -m lectlib.bench records: the book's recorded experiments on SmolLM2, in one GPU session.

The recorded grids (passkey and needle to 8k tokens, RoPE scalings over 16k, the KV-compression
leaderboard, DuoAttention's gates and share sweep, sparse patterns) take hours on a 2-core CPU and
minutes on a GPU. This command runs each record command of the library as a subprocess, most
important first, each under the time the budget has left (a part that fails or runs out of time
loses only itself), and packs data/results, data/duo and each part's output into OUT/records.tgz
after every part, so a session cut short keeps what it measured. The chapters plot the records and name their device.

    python -m lectlib.bench records --budget-s 520 --out $OUT     # on the GPU
    python -m lectlib.bench records --tiny --out /tmp/rehearsal   # the CPU rehearsal, tiny sizes
"""

import argparse
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from . import RESULTS

DATA = RESULTS.parent
REPO = DATA.parent


def parts(tiny: bool) -> list[tuple[str, list[str], float]]:
    """(name, `python -m` arguments, the share of the budget it may use at most) in priority order."""
    if tiny:
        return [
            ("duo-train", ["lectlib.duo", "train", "--steps", "2", "--length", "160", "--keys", "2"], 0.2),
            ("rope-buckets", ["lectlib.lengths", "buckets", "--length", "512", "--methods", "default", "yarn"], 0.2),
            ("passkey", ["lectlib.evals", "record", "passkey", "--lengths", "256", "--depths", "0.5", "--trials", "1"], 0.2),
            ("needle", ["lectlib.evals", "record", "needle", "--lengths", "256", "--depths", "0.5", "--trials", "1"], 0.2),
            ("kv-leaderboard", ["lectlib.compression", "leaderboard", "--scale", "ci", "--tasks", "perplexity,passkey"], 0.4),
            ("duo-shares", ["lectlib.duo", "experiments", "--parts", "ranking", "shares", "--length", "256", "--count", "1",
                            "--context", "256", "--continuation", "16"], 0.5),
            ("sparse", ["lectlib.sparse", "--n", "256", "--passkey-length", "200", "--depths", "0.5", "--trials", "1",
                        "--window", "32", "--names", "full", "MoBA 16 x 2"], 0.5),
        ]
    return [
        ("duo-train", ["lectlib.duo", "train", "--steps", "3000", "--minutes", "2.5", "--length", "4096", "--keys", "5",
                       "--lr", "0.05", "--l1", "0.05"], 0.4),
        ("rope-buckets", ["lectlib.lengths", "buckets", "--length", "16384"], 0.15),
        ("passkey", ["lectlib.evals", "record", "passkey"], 0.2),
        ("needle", ["lectlib.evals", "record", "needle"], 0.2),
        ("kv-leaderboard", ["lectlib.compression", "leaderboard", "--scale", "gpu"], 0.35),
        ("duo-shares", ["lectlib.duo", "experiments", "--parts", "ranking", "shares", "--length", "4096", "--count", "8",
                        "--context", "4096", "--continuation", "64"], 0.3),
        ("sparse", ["lectlib.sparse"], 0.3),
    ]


def pack(out: Path, logs: Path, log: list[str]) -> None:
    """OUT/records.tgz with data/results, data/duo and the parts' outputs (logs/), and OUT/records.log."""
    (out / "records.log").write_text("\n".join(log) + "\n")
    with tarfile.open(out / "records.tgz", "w:gz") as tar:
        for folder in ("results", "duo"):
            tar.add(DATA / folder, arcname=f"data/{folder}")
        tar.add(logs, arcname="logs")


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="python -m lectlib.bench records", description=__doc__.splitlines()[0])
    parser.add_argument("--budget-s", type=float, default=520)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: the CPU rehearsal")
    parser.add_argument("--only", nargs="+", default=None, help="run only these parts")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    logs = Path(tempfile.mkdtemp(prefix="records-logs-"))  # OUT may bring back 8 files: the logs travel packed
    from .. import models

    begin = time.perf_counter()
    models.checkpoint_path()  # convert the model once here, so no part's time limit pays for it
    log = [f"model ready in {time.perf_counter() - begin:.0f} s"]
    for old in ("evals_passkey.json", "evals_needle.json"):  # the grids are recorded whole, on one machine
        (RESULTS / old).unlink(missing_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.tiny:
        env["LECTLIB_SCALE"] = "ci"
    for name, command, share in parts(args.tiny):
        if args.only and name not in args.only:
            continue
        left = args.budget_s - (time.perf_counter() - begin)
        limit = min(left, share * args.budget_s)
        if limit < 10:
            log.append(f"{name}: skipped, {left:.0f} s left")
            continue
        start = time.perf_counter()
        with open(logs / f"{name}.txt", "w") as f:
            try:
                rc = subprocess.run([sys.executable, "-m", *command], cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    timeout=limit).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        log.append(f"{name}: rc {rc} in {time.perf_counter() - start:.0f} s (limit {limit:.0f} s): python -m {' '.join(command)}")
        print(log[-1], flush=True)
        pack(args.out, logs, log)
    pack(args.out, logs, log)
