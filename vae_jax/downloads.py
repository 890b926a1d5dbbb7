"""The published files a dataset is prepared from: found locally, or downloaded and verified.

``find`` looks, in order, in the directory the user names (``config.idx_dir`` or
``$VAE_JAX_IDX_DIR``), in the places an operating-system package installs the files
(Debian's ``dataset-fashion-mnist``), and in vae_jax's download directory; failing
those, and if the dataset may be downloaded, it downloads every file from its published
address when the machine is online, keeping a file only if its size and SHA-256 are the
published ones. Offline with none of these, it stops within seconds (the reachability
probe has a timeout even where name resolution hangs) and says where to put the files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import shutil
import socket
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence

from absl import logging

from vae_jax import files
from vae_jax.errors import UserError

CONNECT_TIMEOUT_S = 5.0
DOWNLOAD_TIMEOUT_S = 60.0


class DataError(UserError, RuntimeError):
  """A dataset cannot be found, fetched or read; the message says what to do."""


@dataclasses.dataclass(frozen=True)
class PublishedFile:
  """A file as its publisher serves it.

  Attributes:
    name: its file name.
    url: where it is published (``""``: not downloadable, a local copy only).
    size: its size in bytes, as published (TFDS registers these in its
      ``url_checksums`` and datasets' ``checksums.tsv``).
    sha256: its SHA-256, hex.
  """

  name: str
  url: str
  size: int
  sha256: str


def sha256(path: str | os.PathLike) -> str:
  with open(path, "rb") as f:
    return hashlib.file_digest(f, "sha256").hexdigest()


def given_dir(idx_dir: str | None) -> str | None:
  """The directory of source files the user named: ``idx_dir`` (``config.idx_dir``), else
  ``$VAE_JAX_IDX_DIR``, ``~`` expanded; ``None`` if neither is set."""
  given = idx_dir or os.environ.get("VAE_JAX_IDX_DIR")
  return str(files.expand(given)) if given else None


def online(url: str, timeout_s: float = CONNECT_TIMEOUT_S) -> bool:
  """Whether ``url``'s host accepts a TCP connection within ``timeout_s``.

  Name resolution cannot be given a timeout, and on a machine without DNS it
  retries for minutes; it runs in a daemon thread that is abandoned on time-out.
  """
  parsed = urllib.parse.urlparse(url)
  port = parsed.port or (443 if parsed.scheme == "https" else 80)
  result = []

  def probe():
    try:
      socket.create_connection((parsed.hostname, port), timeout=timeout_s).close()
      result.append(True)
    except OSError:
      pass

  thread = threading.Thread(target=probe, daemon=True)
  thread.start()
  thread.join(timeout_s)
  return bool(result)


def fetch_verified(
  url: str,
  target: pathlib.Path,
  verify: Callable[[pathlib.Path], None],
  failure_message: Callable[[Exception], str],
) -> None:
  """Downloads ``url`` to ``target`` through a temporary file beside it, kept only
  once ``verify(path)`` returns: an interrupted or wrong download never leaves a
  file that looks complete, nor a temporary one behind.

  Raises:
    DataError: the download failed (``failure_message(error)``), or ``verify``'s.
  """
  with files.atomic_path(target) as tmp:
    try:
      with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as r, open(tmp, "wb") as f:
        shutil.copyfileobj(r, f)
    except (urllib.error.URLError, OSError) as e:
      raise DataError(failure_message(e)) from e
    verify(tmp)


def verify_published(published: PublishedFile, path: pathlib.Path, origin: str) -> None:
  """Refuses a file whose size or SHA-256 is not the published one.

  Raises:
    DataError: naming ``origin`` (where the file came from) and both digests.
  """
  got_size = path.stat().st_size
  got = sha256(path) if got_size == published.size else "(not computed: the size differs)"
  if (got_size, got) != (published.size, published.sha256):
    raise DataError(
      f"{origin} is not the published file {published.name}: {got_size} bytes with SHA-256 {got}, "
      f"expected {published.size} bytes with {published.sha256}. Replace it with the "
      "published file (check the network, a proxy or a captive portal, for a download)."
    )


def _missing(directory: str | os.PathLike, wanted: Sequence[PublishedFile]) -> list[str]:
  return [f.name for f in wanted if not (pathlib.Path(directory) / f.name).is_file()]


def find(
  what: str,
  wanted: Sequence[PublishedFile],
  *,
  idx_dir: str | None,
  download_dir: pathlib.Path,
  system_dirs: Sequence[str] = (),
  instructions: str = "",
  verify_local: bool = False,
) -> pathlib.Path:
  """A directory holding every file of ``wanted``: given, found, or downloaded and verified.

  Args:
    what: the dataset's name, for messages.
    wanted: its published files.
    idx_dir: ``config.idx_dir`` (else ``$VAE_JAX_IDX_DIR``): where the user put them.
    download_dir: where downloads go (and are found again).
    system_dirs: where an operating-system package installs them.
    instructions: how to get the files by hand, for the message when they cannot be had.
    verify_local: check local copies against the published size and SHA-256 too (for
      files that are used as they are; downloads are always checked).

  Raises:
    DataError: the named directory lacks a file, a file is not the published one, or the
      files cannot be found and the machine is offline (or they are not downloadable).
  """
  explicit = given_dir(idx_dir)
  if explicit:
    missing = _missing(explicit, wanted)
    if missing:
      source = "config.idx_dir" if idx_dir else "$VAE_JAX_IDX_DIR"
      raise DataError(
        f"The directory {explicit} (from {source}) lacks {', '.join(missing)}. Put the "
        f"published files of {what!r} there.{_hint(instructions)}"
      )
    found = pathlib.Path(explicit)
  else:
    found = next(
      (pathlib.Path(d) for d in (*system_dirs, download_dir) if not _missing(d, wanted)), None
    )
  if found is not None:
    if verify_local:
      for f in wanted:
        verify_published(f, found / f.name, str(found / f.name))
    return found
  downloadable = all(f.url for f in wanted)
  if not downloadable or not online(wanted[0].url):
    reason = "cannot be downloaded" if not downloadable else f"{wanted[0].url} cannot be reached"
    raise DataError(offline_message(what, wanted, reason, instructions))
  download_dir.mkdir(parents=True, exist_ok=True)
  for f in wanted:
    target = download_dir / f.name
    if target.is_file():
      continue
    logging.info("Downloading %s", f.url)
    fetch_verified(
      f.url,
      target,
      lambda path, f=f: verify_published(f, path, f"The download of {f.url}"),
      lambda e, f=f: offline_message(
        what, wanted, f"downloading {f.url} failed: {e}", instructions
      ),
    )
  return download_dir


def _hint(instructions: str) -> str:
  return f"\n  {instructions}" if instructions else ""


def offline_message(
  what: str, wanted: Sequence[PublishedFile], reason: str, instructions: str = ""
) -> str:
  names = ", ".join(f.name for f in wanted)
  where = sorted({f.url.rsplit("/", 1)[0] + "/" for f in wanted if f.url})
  published = f"\nThey are published at {', '.join(where)}." if where else ""
  return (
    f"Dataset {what!r} is not prepared and {reason}.\n"
    f"Provide its files ({names}) in a directory, then either\n"
    f"  pass --config.idx_dir=/path/to/dir, or\n"
    f"  export VAE_JAX_IDX_DIR=/path/to/dir.{_hint(instructions)}{published}"
  )
