"""Files written whole: to a temporary name beside their own, then renamed over it, so that
a reader never sees half a file."""

from __future__ import annotations

import glob
import os
import shutil
import socket
from pathlib import Path


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Another user's process.
    return True
  return True


def temporary(path: str | os.PathLike) -> Path:
  """The temporary name of this process's write of `path` (.NAME.tmp-HOST-PID beside it).
  Those that writers of this host no longer running left (a kill, or SIGTERM's default
  action, runs no `finally`) are removed first: they were never removed, each as large as the
  file. Another host's are left alone (its process ids mean nothing here)."""
  path = Path(path)
  prefix = str(path.with_name(f".{path.name}.tmp-{socket.gethostname()}-"))
  for left in glob.glob(glob.escape(prefix) + "*"):
    pid = left[len(prefix):]
    if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
      if os.path.isdir(left) and not os.path.islink(left):
        shutil.rmtree(left, ignore_errors=True)
      else:
        try:
          os.unlink(left)
        except FileNotFoundError:
          pass
  return Path(f"{prefix}{os.getpid()}")


def unwritable(folder: str | os.PathLike) -> tuple[Path, str] | None:
  """None if `folder` can be written into here, or made (with the folders above it that are
  missing); else (the nearest existing path at or above it, why not: "a file" or "a folder
  not writable here"). Checked before long work, whose results were lost at the end. (A
  process of root passes the check anywhere but on a read-only filesystem.)"""
  there = Path(folder).absolute()
  while not there.exists() and there != there.parent:
    there = there.parent
  if not there.is_dir():
    return there, "a file"
  if not os.access(there, os.W_OK | os.X_OK):
    return there, "a folder not writable here"
  return None
