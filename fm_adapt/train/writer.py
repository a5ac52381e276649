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


class MetricWriter:
  """Writes `{step, name: value}` rows to `<workdir>/metrics.jsonl` and TensorBoard.

  Only process 0 writes; other processes' calls are no-ops.
  """

  def __init__(self, workdir: str | pathlib.Path, tensorboard: bool = True):
    self._active = jax.process_index() == 0
    self._path = pathlib.Path(workdir) / "metrics.jsonl"
    self._tb = None
    if self._active and tensorboard:
      try:
        import tensorboardX  # pylint: disable=import-outside-toplevel
        self._tb = tensorboardX.SummaryWriter(str(pathlib.Path(workdir) / "tb"))
      except ImportError:
        self._tb = None

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    """Appends one row of scalar metrics at `step`."""
    if not self._active:
      return
    row = {"step": int(step)}
    for name, value in metrics.items():
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


def console(message: str) -> None:
  """Prints a line for the person running the job (process 0 only; keeps progress bars intact)."""
  logging.info(message)
  if jax.process_index() == 0:
    tqdm.tqdm.write(message, file=sys.stderr)
