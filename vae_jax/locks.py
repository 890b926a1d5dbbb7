"""Exclusive locks on files, so that two processes never write one directory at once.

A training run holds ``WORKDIR/.lock`` for its whole life: a second run of the
same workdir stops at once with a message naming the first (its pid), before it
reads or writes anything there. Preparing a dataset holds a lock in the data
directory: a second process preparing the same dataset waits for the first and
then reads what it prepared. Locks are ``fcntl.flock`` locks, released by the
operating system when the process ends, however it ends.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import pathlib
import time

from absl import logging

from vae_jax.errors import UserError


class Busy(UserError, RuntimeError):
  """Another process holds the lock; the message names it and says what to do."""


@contextlib.contextmanager
def exclusive(path: str | os.PathLike, *, wait: bool, what: str):
  """Holds an exclusive lock on ``path`` (created if missing) inside the ``with`` block.

  Args:
    path: the lock file.
    wait: wait for the holder to finish (logging that it does) instead of failing.
    what: what the lock protects, for messages (e.g. "the workdir runs/mnist").

  Raises:
    Busy: another process holds it and ``wait`` is false.
  """
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "a+") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "another process"
      if not wait:
        raise Busy(
          f"{what} is in use by {holder}. Wait for it to finish (or stop it), or use "
          "another directory."
        ) from None
      logging.warning("Waiting for %s, which holds %s.", holder, what)
      start = time.monotonic()
      fcntl.flock(f, fcntl.LOCK_EX)
      logging.info("%s is free after %.0f s.", what, time.monotonic() - start)
    f.seek(0)
    f.truncate()
    f.write(f"process {os.getpid()} on {os.uname().nodename}, since {time.ctime()}\n")
    f.flush()
    try:
      yield
    finally:
      f.seek(0)
      f.truncate()
      fcntl.flock(f, fcntl.LOCK_UN)
