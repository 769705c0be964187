"""Lint and type checks run as tests, so CI (`scripts/test.sh`) runs them.

The rule sets live in pyproject.toml (`[tool.ruff.lint]`, `[tool.mypy]`).
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(*args, timeout):
  return subprocess.run(
      [sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
      text=True, timeout=timeout, check=False)


def test_ruff_check():
  pytest.importorskip("ruff", reason="ruff is in the test extra")
  out = _run("ruff", "check", "--no-cache", "lorajax", "tests", timeout=120)
  assert out.returncode == 0, (
      "ruff check found problems (fix them, or `ruff check --fix` for the "
      "fixable ones):\n" + out.stdout + out.stderr)


def test_mypy():
  pytest.importorskip("mypy", reason="mypy is in the test extra")
  out = _run("mypy", "--no-error-summary", timeout=300)
  assert out.returncode == 0, (
      "mypy found type errors in lorajax/:\n" + out.stdout + out.stderr)
