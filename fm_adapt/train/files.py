"""Whole-or-nothing writes of a run's small files (results.json, config.json, metrics.jsonl).

A file is written to `<name>.tmp`, flushed and fsynced, then renamed over `<name>`; a failure
removes the temp file, so readers see the old file or the new one, never a part. JSON is strict:
NaN and infinities become `null` (bare `NaN` is not JSON for most readers).
"""
from __future__ import annotations

import json
import math
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np


def write_text(path: str | os.PathLike, text: str) -> None:
  """Atomically replaces `path` with `text` (temp file, fsync, rename; the temp removed on error)."""
  path = pathlib.Path(path)
  tmp = path.with_name(path.name + ".tmp")
  try:
    with tmp.open("w") as f:
      f.write(text)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  _fsync_dir(path.parent)


def _fsync_dir(directory: pathlib.Path) -> None:
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


def write_json(path: str | os.PathLike, obj: Any) -> None:
  """Atomically writes `obj` as strict JSON (NaN -> null)."""
  write_text(path, dumps(obj) + "\n")
