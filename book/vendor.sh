#!/usr/bin/env bash
# Copy the JavaScript the website serves itself into book/static/_vendor (not committed):
# plotly.js from the installed plotly package; require.js, the Jupyter widgets HTML manager and
# MathJax from the npm registry. Skipped when already there.
set -euo pipefail
cd "$(dirname "$0")"
out=static/_vendor
mkdir -p "$out"
python - "$out" <<'PY'
import shutil, sys
from importlib.resources import files
shutil.copy(files("plotly") / "package_data" / "plotly.min.js", sys.argv[1])
PY
if [ -f "$out/require.min.js" ] && [ -f "$out/embed-amd.js" ] && [ -f "$out/mathjax/tex-chtml.js" ]; then
  exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent requirejs@2.3.8 @jupyter-widgets/html-manager@1.0.15 mathjax@3.2.2 >/dev/null 2>&1)
for t in "$tmp"/*.tgz; do mkdir -p "${t%.tgz}" && tar -xzf "$t" -C "${t%.tgz}"; done
cp "$tmp"/requirejs-*/package/require.js "$out/require.min.js"
cp "$tmp"/jupyter-widgets-html-manager-*/package/dist/embed-amd.js "$out/embed-amd.js"
rm -rf "$out/mathjax" && mkdir -p "$out/mathjax/output/chtml"
cp "$tmp"/mathjax-*/package/es5/tex-chtml.js "$out/mathjax/"
cp -r "$tmp"/mathjax-*/package/es5/output/chtml/fonts "$out/mathjax/output/chtml/"
echo "vendored: $(ls "$out" | tr '\n' ' ')"
