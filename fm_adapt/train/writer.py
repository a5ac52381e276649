"""Metric writers: JSON lines always, TensorBoard event files when tensorboardX is installed.

(clu's metric_writers import TensorFlow, which fm_adapt does not depend on; tensorboardX writes
the same event files without it.)
"""
from __future__ import annotations

import json
import logging
import math
import pathlib
import sys
from collections.abc import Mapping

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

  def __init__(self, workdir: str | pathlib.Path, tensorboard: bool = True,
               resume_step: int | None = None):
    self._active = jax.process_index() == 0
    self._path = pathlib.Path(workdir) / "metrics.jsonl"
    self._tb = None
    if self._active and resume_step is not None:
      _truncate(self._path, resume_step)
    if self._active and tensorboard:
      try:
        import tensorboardX  # pylint: disable=import-outside-toplevel
        purge = None if resume_step is None else resume_step + 1
        self._tb = tensorboardX.SummaryWriter(str(pathlib.Path(workdir) / "tb"), purge_step=purge)
      except ImportError:
        self._tb = None

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
    with self._path.open("a") as f:
      f.write(json.dumps(row) + "\n")

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str | pathlib.Path) -> list[dict]:
  """Reads back the rows of `<workdir>/metrics.jsonl`."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _truncate(path: pathlib.Path, step: int) -> None:
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
