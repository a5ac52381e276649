"""Metric writers: JSON lines always, TensorBoard event files when tensorboardX is installed.

(clu's metric_writers import TensorFlow, which fm_adapt does not depend on; tensorboardX writes
the same event files without it.) The workdir may be a `gs://` URI (`etils.epath`): an object
cannot be appended to, so there each row rewrites `metrics.jsonl` whole; TensorBoard files go
through tensorboardX's own `gs://` and `s3://` writers, and are skipped with a warning where it
has none or the client library it needs (google-cloud-storage, boto3) is missing.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
from collections.abc import Mapping
from typing import Any

from etils import epath
import jax
import tqdm

from fm_adapt.train import files


class MetricWriter:
  """Writes `{step, name: value}` rows to `<workdir>/metrics.jsonl` and TensorBoard.

  Only process 0 writes; other processes' calls are no-ops. A run resumed at step `s` passes
  `resume_step=s`: rows of later steps (written before the run was stopped, and about to be
  written again) are dropped from `metrics.jsonl` and hidden from TensorBoard, and so are the
  `best/...` rows of an earlier final evaluation, so every step is in the log once.
  """

  def __init__(self, workdir: epath.PathLike, tensorboard: bool = True,
               resume_step: int | None = None):
    self._active = jax.process_index() == 0
    workdir = files.as_path(workdir)
    self._path = workdir / "metrics.jsonl"
    self._tb = None
    if self._active and resume_step is not None:
      _truncate(self._path, resume_step)
    if self._active and tensorboard:
      self._tb = _tensorboard(workdir / "tb", None if resume_step is None else resume_step + 1)

  def write(self, step: int, metrics: Mapping[str, float | None]) -> None:
    """Appends one row of scalar metrics at `step` (None, e.g. an undefined metric, as null)."""
    if not self._active:
      return
    row = {"step": int(step)}
    for name, value in metrics.items():
      if value is None:
        row[name] = None
        continue
      value = float(value)
      row[name] = value if math.isfinite(value) else str(value)
      if self._tb is not None:
        self._tb.add_scalar(name, value, int(step))
    _append(self._path, json.dumps(row) + "\n")

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


# tensorboardX's writers for URIs: scheme -> (its flag that the client imported, the package).
_TB_CLIENTS = {"gs": ("GCS_ENABLED", "google-cloud-storage"), "s3": ("S3_ENABLED", "boto3")}


def _tensorboard(logdir: epath.Path, purge_step: int | None) -> Any:
  """A tensorboardX `SummaryWriter` on `logdir`; None (with a warning for a URI) where it cannot
  write there, or tensorboardX is not installed."""
  try:
    import tensorboardX  # pylint: disable=import-outside-toplevel
  except ImportError:
    return None
  if not files.is_local(logdir):
    scheme = os.fspath(logdir).split("://", 1)[0]
    flag, package = _TB_CLIENTS.get(scheme, (None, None))
    if flag is None or not getattr(tensorboardX.record_writer, flag, False):
      reason = (f"tensorboardX writes {scheme}:// with {package} (pip install {package})"
                if package else f"tensorboardX cannot write to {scheme}://")
      console(f"Warning: no TensorBoard files in {logdir}: {reason}; the metrics are in "
              "metrics.jsonl.")
      return None
  return tensorboardX.SummaryWriter(os.fspath(logdir), purge_step=purge_step)


def _append(path: epath.Path, text: str) -> None:
  """Appends `text` to a local file; rewrites an object (no appends on object stores) whole."""
  if files.is_local(path):
    with path.open("a") as f:
      f.write(text)
  else:
    files.write_text(path, (path.read_text() if path.exists() else "") + text)


def read_metrics(workdir: epath.PathLike) -> list[dict]:
  """Reads back the rows of `<workdir>/metrics.jsonl`."""
  path = files.as_path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate(path: epath.Path, step: int) -> None:
  """Keeps the rows of `path` at steps <= `step`, less `best/...` summary rows (atomically)."""
  if not path.exists():
    return
  kept = []
  for number, line in enumerate(path.read_text().splitlines(), 1):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError:  # A line cut short by a killed process.
      console(f"Warning: dropping unreadable line {number} of {path}: {line[:80]!r}")
      continue
    if row.get("step", 0) <= step and not any(k.startswith("best/") for k in row):
      kept.append(line + "\n")
  files.write_text(path, "".join(kept))


def console(message: str) -> None:
  """Prints a line for the person running the job (process 0 only; keeps progress bars intact)."""
  logging.info(message)
  if jax.process_index() == 0:
    tqdm.tqdm.write(message, file=sys.stderr)
