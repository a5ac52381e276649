"""Where a checkpoint file is: as given (a local path or a URI), else under $FM_ADAPT_WEIGHTS_DIR.

Paths are `etils.epath.Path`s: a URI (`gs://bucket/w.npz`) stays that string, a local path is
made absolute (`fm_adapt.train.files.as_path`). The sha256 of the file is the id of a base
checkpoint recorded with the runs adapted from it.
"""
from __future__ import annotations

import hashlib
import os

from etils import epath

from fm_adapt.train import files

WEIGHTS_ENV = "FM_ADAPT_WEIGHTS_DIR"


def resolve_path(model_init: str | os.PathLike) -> epath.Path:
  """The checkpoint file: as given, else (a relative local path) under $FM_ADAPT_WEIGHTS_DIR.

  A URI (`gs://bucket/w.npz`) stays that string, a local path is made absolute
  (`files.as_path`); $FM_ADAPT_WEIGHTS_DIR may be a URI too.

  Raises:
    FileNotFoundError: no such file, naming where it looked.
    ValueError: a URI whose '//' was collapsed to '/' (what pathlib makes of 'gs://...').
  """
  text = os.path.expanduser(os.fspath(model_init))
  path = files.as_path(text)
  if path.is_file():
    return path
  base = os.environ.get(WEIGHTS_ENV)
  if base and files.is_local(text) and not os.path.isabs(text):
    under_base = files.as_path(base) / text
    if under_base.is_file():
      return under_base
  raise FileNotFoundError(
      f"The checkpoint {model_init!r} is not a file (looked as given"
      f"{' and under FM_ADAPT_WEIGHTS_DIR=' + base if base else ''}). Give a path, or set "
      "FM_ADAPT_WEIGHTS_DIR to the folder holding it.")


def file_sha256(path: epath.PathLike) -> str:
  """SHA-256 of a file (local or a URI), the id of a base checkpoint recorded with adapted runs."""
  digest = hashlib.sha256()
  with epath.Path(path).open("rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()
