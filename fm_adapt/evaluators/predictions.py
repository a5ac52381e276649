"""Per-sample predictions of one split as CSV: re-score, ensemble or compare runs.

One header row, then one row per image in the split's order:
  index,label,score_<class 0>,score_<class 1>,...                (multi-class, ordinal)
  index,label_<label 0>,label_<label 1>,...,score_<label 0>,...  (multi-label, 0/1 labels)
Scores are written with Python's shortest round-trip repr, so reading them back gives the same
numbers and re-scoring gives exactly the metrics of the evaluation (e.g. with the official
`medmnist.Evaluator`, or `fm_adapt.evaluators.metrics.classification_metrics`). Paths go through
`etils.epath`, so `gs://` works; the file appears whole (written to a temporary name, then renamed).
"""
from __future__ import annotations

import csv
import dataclasses
import io
import os
from collections.abc import Sequence

import numpy as np
from etils import epath

from fm_adapt.train import files


@dataclasses.dataclass(frozen=True)
class Predictions:
  """Per-sample predictions of one split.

  Attributes:
    index: (N,) position of each example in the split.
    labels: (N,) int labels, or (N, K) 0/1 labels for multi-label.
    probs: (N, K) float64 scores.
    class_names: one name per score column.
  """
  index: np.ndarray
  labels: np.ndarray
  probs: np.ndarray
  class_names: tuple[str, ...]


def _header(labels: np.ndarray, class_names: Sequence[str]) -> list[str]:
  label_columns = ["label"] if labels.ndim == 1 else [f"label_{c}" for c in class_names]
  return ["index", *label_columns, *(f"score_{c}" for c in class_names)]


def write_predictions(path: str | os.PathLike, labels: np.ndarray, probs: np.ndarray,
                      class_names: Sequence[str]) -> epath.Path:
  """Writes one CSV row per example: index, label(s), one score per class.

  Args:
    path: the CSV file to write (its directory is created); an existing file is replaced.
    labels: (N,) int labels, or (N, K) 0/1 labels (multi-label).
    probs: (N, K) scores.
    class_names: K unique names, one per score column.

  Returns:
    The written path.
  """
  labels, probs = np.asarray(labels), np.asarray(probs)
  names = [str(c) for c in class_names]
  if probs.ndim != 2 or probs.shape[1] != len(names) or len(set(names)) != len(names):
    raise ValueError(f"write_predictions: scores of shape {probs.shape} need one unique class "
                     f"name per column; got {names}.")
  labels = labels.reshape(-1) if labels.ndim == 2 and labels.shape[1] == 1 else labels
  if labels.shape not in ((len(probs),), probs.shape):
    raise ValueError(f"write_predictions: labels of shape {labels.shape} do not fit scores of "
                     f"shape {probs.shape}.")
  text = io.StringIO()
  writer = csv.writer(text, lineterminator="\n")
  writer.writerow(_header(labels, names))
  for i, (label, scores) in enumerate(zip(labels, probs)):
    label_cells = [int(v) for v in np.atleast_1d(label)]
    writer.writerow([i, *label_cells, *(repr(float(s)) for s in scores)])
  path = files.as_path(path)
  files.write_text(path, text.getvalue())  # Whole or not at all, locally or on gs://.
  return path


def read_predictions(path: str | os.PathLike) -> Predictions:
  """Reads a file written by `write_predictions`.

  Raises:
    ValueError: when the header is not `index`, label column(s), `score_<class>` columns.
  """
  path = epath.Path(path)
  rows = list(csv.reader(io.StringIO(path.read_text())))
  if not rows:
    raise ValueError(f"{path} is empty; expected a predictions CSV with a header row.")
  header, body = rows[0], rows[1:]
  names = [h[len("score_"):] for h in header if h.startswith("score_")]
  multilabel = header[1:2] != ["label"]
  if header != _header(np.zeros((0, len(names)) if multilabel else 0), names):
    raise ValueError(f"{path}: header {header} is not index, label(s), score_<class>... "
                     "as write_predictions writes it.")
  table = np.asarray(body, dtype=object).reshape(len(body), len(header))
  num_labels = len(names) if multilabel else 1
  labels = table[:, 1:1 + num_labels].astype(np.int64)
  return Predictions(index=table[:, 0].astype(np.int64),
                     labels=labels if multilabel else labels[:, 0],
                     probs=table[:, 1 + num_labels:].astype(np.float64),
                     class_names=tuple(names))
