"""python -m lectlib.bench NAME [options]: run benchmark NAME (a module of this package)."""

import importlib
import pkgutil
import sys

import lectlib.bench as bench


def main(argv: list[str]) -> None:
    names = sorted(m.name for m in pkgutil.iter_modules(bench.__path__) if not m.name.startswith("_"))
    if argv:
        argv[0] = argv[0].replace("-", "_")  # gpu-suite names the module gpu_suite
    if not argv or argv[0] not in names:
        raise SystemExit(f"usage: python -m lectlib.bench NAME [options]; NAME is one of {names}")
    importlib.import_module(f"lectlib.bench.{argv[0]}").main(argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
