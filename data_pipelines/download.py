"""Downloading one file: through a temporary `.part` file, md5-checked, interruptible.

`fetch(url, dest, md5)` writes `<dest folder>/.<dest name>.<random>.part` and renames it to `dest`
only when the whole file is there and its md5 is the expected one. On any failure, Ctrl-C
(SIGINT) or SIGTERM (what schedulers send before killing a job) included, the `.part` file is
deleted, and so is the destination folder when this download created it and it is empty.
A signal during a download raises `Interrupted` (a `KeyboardInterrupt`, like the training loop's
stops) once the cleanup is done, so callers' own cleanup (temporary folders) runs too; without
this, SIGTERM's default action would kill the process on the spot and leave the `.part` file.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import signal
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator

from absl import logging

from data_pipelines import npz

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_CHUNK = 1 << 16


class Interrupted(KeyboardInterrupt):
  """A download stopped by a signal; its partial file has been removed."""

  def __init__(self, url: str, dest: pathlib.Path, signum: int):
    self.signum = signum
    super().__init__(
        f'Download of {url} to {dest} stopped by {signal.Signals(signum).name}; the partial file '
        'was removed. Run the same command again to restart the download.')

  @property
  def exit_status(self) -> int:
    """The shell's status for a process ended by the signal: 128 + its number."""
    return 128 + self.signum


class ChecksumError(ValueError):
  """The downloaded bytes do not have the expected md5; nothing was saved."""


@contextlib.contextmanager
def _raise_on_signals(url: str, dest: pathlib.Path) -> Iterator[None]:
  """Turns the first SIGINT or SIGTERM into `Interrupted` while inside (main thread only).

  Later signals are ignored until the previous handlers are restored on exit, so that cleanup
  inside finishes. Signals that are ignored (SIG_IGN) stay ignored.
  """
  if threading.current_thread() is not threading.main_thread():
    yield  # Python delivers signals to the main thread only.
    return
  received = []

  def handle(signum, frame):
    del frame
    if not received:
      received.append(signum)
      raise Interrupted(url, dest, signum)

  previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
  for sig, handler in previous.items():
    if handler is not signal.SIG_IGN:
      signal.signal(sig, handle)
  try:
    yield
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)


def _new_dirs(folder: pathlib.Path) -> list[pathlib.Path]:
  """The folders of `folder`'s path that do not exist yet, deepest first."""
  new = []
  while not folder.exists():
    new.append(folder)
    folder = folder.parent
  return new


def _remove_empty(folders: list[pathlib.Path]) -> None:
  for folder in folders:
    try:
      folder.rmdir()
    except OSError:
      return  # Not empty (another file arrived): keep it and its parents.


def fetch(url: str, dest: os.PathLike | str, expected_md5: str, timeout: float = 60.0) -> None:
  """Downloads `url` to `dest` through a temporary `.part` file in the same folder, md5-checked.

  Args:
    url: what to download.
    dest: where the file goes; written only when whole and md5-checked.
    expected_md5: hex md5 the bytes must have.
    timeout: seconds a connection may stall.

  Raises:
    ChecksumError: if the md5 of the downloaded bytes differs (nothing is saved).
    OSError: if the download fails (the message says where to put the file by hand).
    Interrupted: on SIGINT or SIGTERM, after removing the partial file.
  """
  dest = pathlib.Path(dest)
  new_dirs = _new_dirs(dest.parent)
  tmp = None
  with _raise_on_signals(url, dest):
    try:
      dest.parent.mkdir(parents=True, exist_ok=True)
      logging.info('Downloading %s to %s', url, dest)
      fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f'.{dest.name}.', suffix='.part')
      tmp = pathlib.Path(tmp_name)
      with os.fdopen(fd, 'wb') as out, urllib.request.urlopen(url, timeout=timeout) as response:
        shutil.copyfileobj(response, out, _CHUNK)
      got = npz.md5sum(tmp)
      if got != expected_md5:
        raise ChecksumError(f'Downloaded {url} has md5 {got}, expected {expected_md5}; not saved '
                            f'to {dest}. The server may serve another file or the transfer was '
                            'corrupted.')
      os.replace(tmp, dest)
    except (urllib.error.URLError, OSError) as e:
      raise OSError(f'Could not download {url} to {dest}: {e}. Without network access, download '
                    f'the file elsewhere and put it at {dest}.') from e
    except Interrupted as e:
      logging.warning('%s', e)
      raise
    finally:
      if tmp is not None:
        tmp.unlink(missing_ok=True)
      if not dest.exists():
        _remove_empty(new_dirs)
