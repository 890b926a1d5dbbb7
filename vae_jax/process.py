"""The process a run lives in: its age, its peak memory, and glibc's malloc arenas.

Linux facts read from ``/proc``, with portable fallbacks; used by the host loop
(``timings.json``), the evaluation JSON, the benchmarks and ``vae_jax.main``.
"""

from __future__ import annotations

import ctypes
import os
import pathlib
import resource
import sys
import time


def seconds_since_process_start() -> float:
  """Wall seconds since this process started (Linux ``/proc``; else since vae_jax.loop loaded)."""
  try:
    ticks = int(pathlib.Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
    uptime = float(pathlib.Path("/proc/uptime").read_text().split()[0])
    return uptime - ticks / os.sysconf("SC_CLK_TCK")
  except (OSError, ValueError, IndexError):
    return time.perf_counter() - _IMPORTED


_IMPORTED = time.perf_counter()


def limit_malloc_arenas(arenas: int = 2) -> bool:
  """Caps glibc's malloc arenas for this process (``M_ARENA_MAX``); True if it was set.

  glibc gives threads that contend for malloc arenas of their own, up to 8 per core.
  Orbax's and TensorStore's save threads allocate and free in many of them, and the freed
  memory stays fragmented there: a training run's resident memory grew by about 1.4 MB
  per checkpoint (66 MB over 47 saves of the Fashion-MNIST model), which over the
  thousands of evaluations and saves of a likelihood run adds up to gigabytes. With two
  arenas it grew by about 0.3 MB per save, at no measured cost in speed
  (docs/performance.md). A ``MALLOC_ARENA_MAX`` in the environment is left to glibc;
  other C libraries are left alone.
  """
  if "MALLOC_ARENA_MAX" in os.environ or not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:  # Not glibc (e.g. musl).
    return False
  m_arena_max = -8  # From glibc's malloc.h.
  return bool(libc.mallopt(m_arena_max, arenas))


def peak_rss_mib(pid: int | str = "self") -> float | None:
  """Peak resident memory of process ``pid`` so far, in MiB (None if it has exited).

  Linux: ``VmHWM`` of ``/proc/<pid>/status``, the high-water mark of the process's own
  address space. Not ``getrusage``'s ``ru_maxrss``: Linux carries that over ``exec`` from
  the process that forked, so a run started by a large Python process (a benchmark, a
  notebook) would report its parent's peak. Elsewhere, ``ru_maxrss`` of this process
  (KiB on Linux and BSD, bytes on macOS).
  """
  if os.path.exists("/proc/self/status"):
    try:
      with open(f"/proc/{pid}/status") as f:
        for line in f:
          if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0  # kB.
    except (FileNotFoundError, ProcessLookupError):
      pass
    return None  # Gone, or exited and not yet reaped (no address space left).
  if pid != "self":
    raise OSError(f"Cannot read the peak memory of process {pid} without /proc.")
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak / 2**20 if sys.platform == "darwin" else peak / 1024.0
