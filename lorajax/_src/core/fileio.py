"""Writing directories so that a failure never leaves a half-written one."""

import os
import shutil
import tempfile
from collections.abc import Callable


def write_dir_atomic(directory: str | os.PathLike,
                     write: Callable[[str], None]) -> None:
  """Runs `write(tmp)` on a fresh sibling directory, then renames it.

  An existing `directory` is moved aside first and deleted only after the
  rename succeeded; if anything fails, the temporary directory is removed and
  the old `directory` (if any) is put back. Callers decide beforehand whether
  replacing an existing directory is allowed.

  Args:
    directory: The final directory.
    write: Writes the directory's files into the path it is given.
  """
  directory = os.path.abspath(os.fspath(directory))
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  base = os.path.basename(directory)
  tmp = tempfile.mkdtemp(prefix=f".tmp-{base}-", dir=parent)
  old = None
  try:
    write(tmp)
    if os.path.exists(directory):
      if os.listdir(directory):
        old = tempfile.mkdtemp(prefix=f".old-{base}-", dir=parent)
        os.rmdir(old)
        os.rename(directory, old)
      else:
        os.rmdir(directory)
    os.rename(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    if old is not None and not os.path.exists(directory):
      os.rename(old, directory)
      old = None
    raise
  if old is not None:
    shutil.rmtree(old, ignore_errors=True)
