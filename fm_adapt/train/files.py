"""A run's paths and the whole-or-nothing writes of its files (results.json, config.json, exports).

Paths are `etils.epath.Path`s (what orbax and tfds use): a URI such as `gs://bucket/run` stays
exactly that string (pathlib would collapse it to `gs:/bucket/run`, and `.absolute()` would put
the working directory in front); a local path is made absolute.

A local file is written to `<name>.tmp`, flushed and fsynced, then renamed over `<name>`; a
failure removes the temp file, so readers see the old file or the new one, never a part. On an
object store (`gs://`) the object is written in one upload, which is whole-or-nothing by itself
(a rename there is a copy and a delete, so a temp name would add a copy and no safety). JSON is
strict: NaN and infinities become `null` (bare `NaN` is not JSON for most readers).
"""
from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from typing import Any, BinaryIO

import numpy as np
from etils import epath

# A local path that starts like a URI whose '//' was collapsed ('gs:/bucket/run'): what
# `pathlib.Path('gs://bucket/run')` gives.
_COLLAPSED_URI = re.compile(r"^[a-z][a-z0-9+.-]*:/[^/]")


def is_local(path: epath.PathLike) -> bool:
  """Whether `path` is on the local filesystem (not a URI such as `gs://bucket/run`)."""
  return "://" not in os.fspath(path)


def as_path(path: epath.PathLike) -> epath.Path:
  """`path` as an `epath.Path`: a URI unchanged, a local path made absolute (links kept).

  Raises:
    ValueError: for a local path that is a URI with its '//' collapsed to '/' ('gs:/b/run', what
      `pathlib.Path('gs://b/run')` makes of it).
  """
  if not is_local(path):
    return epath.Path(path)
  text = os.fspath(path)
  if _COLLAPSED_URI.match(text):
    raise ValueError(f"{text!r} looks like a URI whose '//' was collapsed to '/' (pathlib does "
                     "that to 'gs://...'): pass the path as a string, e.g. "
                     f"{text.replace(':/', '://', 1)!r}.")
  return epath.Path(os.path.abspath(text))


@contextlib.contextmanager
def whole_file(path: epath.PathLike) -> Iterator[BinaryIO]:
  """Yields a binary file whose bytes replace `path` only when the block ends without error.

  Local: a temp file next to `path`, fsynced, renamed over it (the temp removed on error). An
  object store: the bytes are kept in memory and uploaded as one object at the end. The parent
  directory is created.
  """
  path = as_path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  if not is_local(path):
    buffer = io.BytesIO()
    yield buffer
    path.write_bytes(buffer.getbuffer())
    return
  tmp = path.with_name(path.name + ".tmp")
  try:
    with open(tmp, "wb") as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  _fsync_dir(path.parent)


def write_text(path: epath.PathLike, text: str) -> None:
  """Replaces `path` with `text` (UTF-8), whole or not at all (see `whole_file`)."""
  with whole_file(path) as f:
    f.write(text.encode())


def _fsync_dir(directory: epath.Path) -> None:
  """Makes a rename in `directory` durable (best effort: not every filesystem allows it)."""
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)


def jsonable(obj: Any) -> Any:
  """`obj` as plain JSON values: numpy / JAX scalars and arrays converted, non-finite -> None."""
  if isinstance(obj, Mapping):
    return {str(k): jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [jsonable(v) for v in obj]
  if obj is None or isinstance(obj, str):
    return obj
  if isinstance(obj, (bool, np.bool_)):
    return bool(obj)
  if isinstance(obj, (int, np.integer)):
    return int(obj)
  if isinstance(obj, (float, np.floating)):
    return float(obj) if math.isfinite(obj) else None
  if hasattr(obj, "__array__"):
    return jsonable(np.asarray(obj).tolist())
  return str(obj)


def dumps(obj: Any) -> str:
  """Strict JSON of `obj` (see `jsonable`), indented."""
  return json.dumps(jsonable(obj), indent=2, allow_nan=False)


def write_json(path: epath.PathLike, obj: Any) -> None:
  """Writes `obj` as strict JSON (NaN -> null), whole or not at all."""
  write_text(path, dumps(obj) + "\n")
