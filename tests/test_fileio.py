"""Atomic directory writes: a failed write never damages the old directory."""

import os

import pytest

from lorajax._src.core import fileio


def _write(content):
  def write(tmp):
    with open(os.path.join(tmp, "f.txt"), "w") as f:
      f.write(content)
  return write


def test_new_and_replaced_directory(tmp_path):
  target = tmp_path / "out"
  fileio.write_dir_atomic(target, _write("one"))
  assert (target / "f.txt").read_text() == "one"
  fileio.write_dir_atomic(target, _write("two"))
  assert (target / "f.txt").read_text() == "two"
  assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporaries left


def test_failed_write_keeps_the_old_directory(tmp_path):
  target = tmp_path / "out"
  fileio.write_dir_atomic(target, _write("old"))

  def broken(tmp):
    _write("partial")(tmp)
    raise OSError("disk full")

  with pytest.raises(OSError, match="disk full"):
    fileio.write_dir_atomic(target, broken)
  assert (target / "f.txt").read_text() == "old"
  assert sorted(os.listdir(tmp_path)) == ["out"]


def test_failed_json_write_keeps_the_old_file(tmp_path):
  from lorajax._src.app import run_dir
  path = tmp_path / "run.json"
  run_dir.write_json_atomic(path, {"step": 1})
  with pytest.raises(TypeError, match="not JSON serialisable"):
    run_dir.write_json_atomic(path, {"step": object()})
  assert '"step": 1' in path.read_text()
  assert os.listdir(tmp_path) == ["run.json"]
