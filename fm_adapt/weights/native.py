"""fm_adapt's own plain checkpoint: one `.npz` of '/'-joined variable paths.

Keys are `<collection>/<module path>/<leaf>`, e.g. 'params/encoder/block_0/attn/query/kernel'
or 'batch_stats/stem/bn/mean'. Written by a run's export (LoRA merged into the kernels) and read
back as `model_init` of another run.
"""
from __future__ import annotations

import os
import pathlib
from collections.abc import Mapping
from typing import Any

import numpy as np

from fm_adapt import param_paths

PathLike = str | os.PathLike
MARKER = "__fm_adapt_format__"  # A key every fm_adapt export holds (value: format version).


def save_native(path: PathLike, variables: Mapping[str, Any]) -> pathlib.Path:
  """Writes variables ({'params': ..., 'batch_stats': ...}) atomically to an `.npz`."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  flat = {k: np.ascontiguousarray(np.asarray(v)) for k, v in param_paths.flatten(variables).items()}
  flat[MARKER] = np.asarray(1)
  tmp = path.with_name(path.name + ".tmp.npz")
  np.savez(tmp, **flat)
  tmp.replace(path)
  return path


def is_native(keys: list[str]) -> bool:
  """Whether checkpoint keys are in fm_adapt's own layout."""
  return MARKER in keys


def load_native(path: PathLike) -> dict[str, Any]:
  """Reads an fm_adapt `.npz` back into nested variables (no pickle)."""
  with np.load(path, allow_pickle=False) as data:
    if not is_native(data.files):
      raise ValueError(f"{path} is not an fm_adapt export (no {MARKER!r} key); found keys such "
                       f"as {data.files[:5]}. Use another config.model_load.name.")
    flat = {k: data[k] for k in data.files if k != MARKER}
  return param_paths.unflatten(flat)
