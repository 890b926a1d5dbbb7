"""Files a run writes, each written whole or not at all, and paths taken as the user means them.

* ``atomic_path(path)``: the one way vae_jax replaces a file. The content goes to a
  temporary file beside ``path`` whose name is unique to this process and call, then
  ``os.replace`` puts it in place: a reader sees the old file or the new one, never half
  of one, and two processes writing the same file (two evaluations of one workdir) never
  share a temporary file.
* ``reporting(path)``: an ``OSError`` while writing becomes one ``WriteError`` that names
  the file and the cause the operating system gave, with the fix for that cause.
* ``expand(path)``: ``~`` and ``~user`` expanded, for every path a user gives (flags and
  config fields alike).
"""

from __future__ import annotations

import contextlib
import errno
import os
import pathlib
import tempfile
from collections.abc import Iterator

from vae_jax.errors import UserError

# What to do about a write that failed with each errno; anything else: fix the cause.
_ADVICE = {
  errno.ENOSPC: "free space on that file system",
  errno.EDQUOT: "free space within your disk quota",
  errno.EACCES: "fix the permissions of that directory",
  errno.EPERM: "fix the permissions of that directory",
  errno.EROFS: "the file system is read-only: use a writable directory",
  errno.EFBIG: "a file-size limit was reached (ulimit -f, or the file system's): raise it",
  errno.ENAMETOOLONG: "use a shorter directory path",
  errno.ENOENT: "a directory on the way was removed: check the path",
}


class WriteError(UserError, OSError):
  """A file could not be written; the message names it, the cause and the fix."""


def describe(e: OSError) -> str:
  """``"File too large (EFBIG)"``: the cause the operating system gave, by name."""
  name = errno.errorcode.get(e.errno, "") if e.errno is not None else ""
  reason = e.strerror or str(e) or type(e).__name__
  return f"{reason} ({name})" if name else reason


def advice(e: OSError) -> str:
  """What to do about ``e``: the fix for its errno, or "fix the cause"."""
  return _ADVICE.get(e.errno, "fix the cause")


@contextlib.contextmanager
def reporting(path: str | os.PathLike, then: str = "run the same command") -> Iterator[None]:
  """Turns an ``OSError`` inside the block into one ``WriteError`` naming ``path``, the
  cause and its fix, followed by ``then`` (what to do once it is fixed)."""
  try:
    yield
  except WriteError:
    raise
  except OSError as e:
    raise WriteError(
      f"Cannot write {path}: {describe(e)}. {advice(e).capitalize()}, then {then}."
    ) from e


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[pathlib.Path]:
  """Yields a temporary path to write ``path``'s new content to; on leaving the block
  without an error, the file replaces ``path`` in one step. On an error it is removed.

  The temporary file lies beside ``path`` (the same file system, so the replace is
  atomic), hidden, unique to this call, and keeps ``path``'s suffix for writers that read
  the format from it (``.png``, ``.npz``).
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=f".tmp{path.suffix}")
  os.close(fd)
  tmp = pathlib.Path(tmp)
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    tmp.unlink(missing_ok=True)


def atomic_write(path: str | os.PathLike, content: str | bytes) -> None:
  """Replaces ``path`` with ``content`` atomically (see ``atomic_path``)."""
  with atomic_path(path) as tmp:
    if isinstance(content, str):
      tmp.write_text(content)
    else:
      tmp.write_bytes(content)


def expand(path: str | os.PathLike) -> pathlib.Path:
  """``path`` with a leading ``~`` or ``~user`` expanded, as a shell would."""
  return pathlib.Path(os.path.expanduser(os.fspath(path)))
