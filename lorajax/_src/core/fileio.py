"""Writing directories so that a failure never leaves a half-written one."""

import os
import shutil
import stat
import tempfile
import threading
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
    chmod_tree_default(tmp)
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


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
  """The process's file-creation mask (read without changing it)."""
  with _UMASK_LOCK:
    mask = os.umask(0o022)
    os.umask(mask)
  return mask


def chmod_default(path: str | os.PathLike) -> None:
  """Gives `path` the mode a plain `open`/`mkdir` would: 0o666 (files) or
  0o777 (directories) minus the umask.

  `tempfile.mkstemp`/`mkdtemp` create 0o600/0o700 entries, which would make
  files renamed into place unreadable to collaborators.
  """
  base = 0o777 if os.path.isdir(path) else 0o666
  os.chmod(path, base & ~current_umask())


def chmod_tree_default(root: str | os.PathLike) -> None:
  """`chmod_default` on `root` and everything below it."""
  root = os.fspath(root)
  chmod_default(root)
  for dirpath, dirnames, filenames in os.walk(root):
    for name in (*dirnames, *filenames):
      chmod_default(os.path.join(dirpath, name))


def path_problem(path: str | os.PathLike, *, kind: str = "file") -> str | None:
  """Why `path` cannot be read as a `kind` ("file" or "dir"), or None.

  Tells a missing path (ENOENT) from one that exists but may not be read
  (EACCES), a parent that is a file (ENOTDIR), and a file where a directory
  is expected or the other way round. Reading is actually attempted, so the
  answer is right for any user, root included.

  Args:
    path: The path to check.
    kind: `"file"` (opened for reading) or `"dir"` (listed).

  Returns:
    A short phrase completing "<path> ...", e.g. "does not exist", or None
    when the path is readable.
  """
  path = os.fspath(path)
  try:
    st = os.stat(path)
  except FileNotFoundError:
    parent = os.path.dirname(os.path.abspath(path))
    while parent and not os.path.exists(parent):
      parent = os.path.dirname(parent)
    return ("does not exist (no such file or directory; the nearest"
            f" existing parent is {parent!r})")
  except PermissionError:
    return ("cannot be reached: permission denied (EACCES) on a directory on"
            " its path. Ask its owner for access (`chmod a+x` on the"
            " directories) or copy it somewhere readable")
  except NotADirectoryError:
    return ("cannot exist: a component of its path is a file, not a"
            " directory (ENOTDIR)")
  except OSError as e:
    return f"cannot be accessed: {e.strerror or e} (errno {e.errno})"
  is_dir = stat.S_ISDIR(st.st_mode)
  if kind == "file" and is_dir:
    return "is a directory, not a file"
  if kind == "dir" and not is_dir:
    return "is a file, not a directory"
  try:
    if is_dir:
      os.listdir(path)
    else:
      with open(path, "rb"):
        pass
  except PermissionError:
    what = "directory may not be listed" if is_dir else "file may not be read"
    return (f"exists but the {what}: permission denied (EACCES; mode"
            f" {stat.filemode(st.st_mode)}, owner uid {st.st_uid}). Fix the"
            " permissions (`chmod u+r`) or run as a user who may read it")
  except OSError as e:
    return f"exists but cannot be read: {e.strerror or e} (errno {e.errno})"
  return None


def writable_dir_problem(path: str | os.PathLike) -> str | None:
  """Why the directory `path` could not be created and written, or None.

  Walks up to the nearest existing ancestor: it must be a directory that this
  process may write to. Nothing is created.

  Args:
    path: A directory that may or may not exist yet.

  Returns:
    A phrase completing "<path> cannot be written: ...", or None.
  """
  path = os.path.abspath(os.fspath(path))
  cur = path
  while True:
    try:
      st = os.stat(cur)
      break
    except FileNotFoundError:
      parent = os.path.dirname(cur)
      if parent == cur:
        return "no part of the path exists"
      cur = parent
    except NotADirectoryError:
      # Some ancestor is a file: find which.
      probe = cur
      while probe != os.path.dirname(probe):
        probe = os.path.dirname(probe)
        if os.path.isfile(probe):
          return f"{probe!r} is a file, not a directory (ENOTDIR)"
      return "a component of the path is a file, not a directory (ENOTDIR)"
    except PermissionError:
      return ("permission denied (EACCES) while looking up a directory on the"
              " path")
  if not stat.S_ISDIR(st.st_mode):
    which = "it" if cur == path else f"its parent {cur!r}"
    return f"{which} is a file, not a directory"
  if not os.access(cur, os.W_OK | os.X_OK):
    which = "it" if cur == path else f"the existing parent {cur!r}"
    return (f"{which} is not writable: permission denied (EACCES; mode"
            f" {stat.filemode(st.st_mode)}, owner uid {st.st_uid})")
  return None
