"""fm_adapt's own plain checkpoint: one `.npz` of '/'-joined variable paths.

Keys are `<collection>/<module path>/<leaf>`, e.g. 'params/encoder/block_0/attn/query/kernel'
or 'batch_stats/stem/bn/mean'. Written by a run's export (LoRA merged into the kernels) and read
back as `model_init` of another run. Paths go through `etils.epath`, so `gs://` works.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from etils import epath
import numpy as np

from fm_adapt import param_paths
from fm_adapt.train import files

PathLike = str | os.PathLike
MARKER = "__fm_adapt_format__"  # A key every fm_adapt export holds (value: format version).


def save_native(path: PathLike, variables: Mapping[str, Any]) -> epath.Path:
  """Writes variables ({'params': ..., 'batch_stats': ...}) to an `.npz`, whole or not at all
  (`files.whole_file`); returns the path (a local one made absolute)."""
  path = files.as_path(path)
  flat = {k: np.ascontiguousarray(np.asarray(v)) for k, v in param_paths.flatten(variables).items()}
  flat[MARKER] = np.asarray(1)
  with files.whole_file(path) as f:
    np.savez(f, **flat)
  return path


def is_native(keys: list[str]) -> bool:
  """Whether checkpoint keys are in fm_adapt's own layout."""
  return MARKER in keys


def load_native(path: PathLike) -> dict[str, Any]:
  """Reads an fm_adapt `.npz` back into nested variables (no pickle)."""
  with epath.Path(path).open("rb") as f, np.load(f, allow_pickle=False) as data:
    if not is_native(data.files):
      raise ValueError(f"{path} is not an fm_adapt export (no {MARKER!r} key); found keys such "
                       f"as {data.files[:5]}. Use another config.model_load.name.")
    flat = {k: data[k] for k in data.files if k != MARKER}
  return param_paths.unflatten(flat)
