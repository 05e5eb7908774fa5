#!/usr/bin/env bash
# Builds the Gradescope autograder zip: bash autograder/make_zip.sh HIDDEN_FOLDER [OUT.zip]
# It holds setup.sh and run_autograder at its root, and what they need from this repository
# (lectlib, the chapters, which say which exercises a chapter has, requirements.txt) with the
# instructor's hidden checks as hidden/. Students never see this zip.
set -euo pipefail
hidden=${1:?usage: bash autograder/make_zip.sh HIDDEN_FOLDER [OUT.zip]}
out=$(realpath -m "${2:-autograder.zip}")
repo=$(cd "$(dirname "$0")/.." && pwd)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
cp "$repo/autograder/setup.sh" "$repo/autograder/run_autograder" "$stage/"
cp -r "$repo/lectlib" "$repo/chapters" "$repo/requirements.txt" "$stage/"
cp -r "$hidden" "$stage/hidden"
find "$stage" -name __pycache__ -prune -exec rm -rf {} +
rm -f "$out"
(cd "$stage" && python3 -m zipfile -c "$out" setup.sh run_autograder lectlib chapters requirements.txt hidden)
echo "wrote $out"
