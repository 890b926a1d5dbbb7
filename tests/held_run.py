"""``python -m vae_jax.main``, held still at a chosen log line: for tests that must not race.

    VAE_JAX_TEST_HOLD=REGEX VAE_JAX_TEST_GATE=PATH python tests/held_run.py <vae_jax.main flags>

Runs the command unchanged, except that the first log record (of any logger, in any
thread) whose message matches ``REGEX`` stops the thread that logged it: the driver
writes ``HELD: <message>`` to stderr and waits there until the file ``PATH`` exists,
then lets the thread go on. A test can thus act on a run at a known point (kill it
mid-save, start a second run beside it, send SIGTERM during an evaluation) knowing
that the run cannot move past that point, or end, before the test lets it. Without
``VAE_JAX_TEST_HOLD`` it is the plain command.

Nothing of this is in vae_jax itself: the hold is a logging handler installed here.
"""

import logging
import os
import pathlib
import re
import runpy
import signal
import sys
import threading
import time

HELD = "HELD: "


class _Hold(logging.Handler):
  """Stops the first thread that logs a message matching ``pattern`` until ``gate`` exists."""

  def __init__(self, pattern: str, gate: pathlib.Path):
    super().__init__(level=logging.DEBUG)
    self._pattern = re.compile(pattern)
    self._gate = gate
    self._fired = threading.Event()

  def handle(self, record: logging.LogRecord) -> bool:
    # Overrides Handler.handle so that no handler lock is held while waiting: other
    # threads may go on logging (and are held only where they wait for this one).
    if self._fired.is_set() or not self._pattern.search(record.getMessage()):
      return False
    self._fired.set()
    sys.stderr.write(f"{HELD}{record.getMessage().splitlines()[0]}\n")
    sys.stderr.flush()
    while not self._gate.exists():
      time.sleep(0.01)
    return True

  def emit(self, record: logging.LogRecord) -> None:  # Unused: handle() does the work.
    del record


def main() -> None:
  # Ctrl-C as in an interactive terminal, whatever the test runner inherited: a process
  # started in the background by a non-interactive shell (`pytest ... &`) ignores SIGINT,
  # and so would this run, which a test of Ctrl-C would then never interrupt.
  signal.signal(signal.SIGINT, signal.default_int_handler)
  pattern = os.environ.get("VAE_JAX_TEST_HOLD")
  if pattern:
    gate = pathlib.Path(os.environ["VAE_JAX_TEST_GATE"])
    logging.getLogger().addHandler(_Hold(pattern, gate))
  sys.argv = ["vae_jax.main", *sys.argv[1:]]
  runpy.run_module("vae_jax.main", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
  main()
