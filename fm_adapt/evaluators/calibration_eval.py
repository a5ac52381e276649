"""The 'calibration' evaluator: a split's calibration before and after temperature scaling.

  config.evals.calib = dict(name='calibration', split='test', fit_split='val', periodic=False)

The temperature is fitted on `fit_split`'s predictions (the entry's pp and batch size) and every
metric of `calibration.calibration_metrics` is reported on `split`; the conventions (bins, Brier,
binary and multi-label tasks) are those of `fm_adapt.evaluators.calibration`.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from absl import logging
from etils import epath

from fm_adapt.evaluators import calibration
from fm_adapt.evaluators import classification
from fm_adapt.evaluators import predictions as predictions_lib
from fm_adapt.evaluators import reliability

if TYPE_CHECKING:
  from fm_adapt.evaluators import EvalData


def reliability_path(predictions_path: str | os.PathLike) -> epath.Path:
  """`<dir>/<name>.csv` -> `<dir>/<name>_reliability.png`."""
  path = epath.Path(predictions_path)
  return path.parent / f"{path.stem}_reliability.png"


class Evaluator:
  """Calibration of one split, before and after temperature scaling fitted on `fit_split`.

  Yields num_examples and the metrics of `calibration.calibration_metrics`: ece, ece_adaptive,
  nll, brier, temperature, ece_ts, ece_adaptive_ts, nll_ts, brier_ts, fit_nll, fit_nll_ts. With
  a `predictions_path` (`<workdir>/predictions/<name>.csv`) it writes the split's predictions
  there and the reliability diagram before / after scaling to `<name>_reliability.png`
  (process 0 only).

  Args:
    predict_fn, batches, put_batch, task, class_names, split: as `classification.Evaluator`.
    data: loads the fit split with the entry's pp (`fm_adapt.evaluators.EvalData`).
    fit_split: the split whose predictions fit the temperature.
    num_bins: bins of both ECEs and of the diagram.
  """

  OPTIONS = {"fit_split": "the split that fits the temperature (default 'val')",
             "num_bins": "confidence bins of both ECEs and of the diagram (default 15)"}

  def __init__(self, predict_fn: Callable[..., jax.Array],
               batches: Callable[[], Iterable[Mapping[str, np.ndarray]]],
               put_batch: Callable[[Mapping[str, np.ndarray]], Mapping[str, jax.Array]],
               task: str, class_names: list[str] | None = None, split: str = "?", *,
               data: EvalData, fit_split: str = "val", num_bins: int = calibration.NUM_BINS):
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 1:
      raise ValueError(f"config.evals.{data.key}.num_bins={num_bins!r} must be a positive int.")
    if not isinstance(fit_split, str) or not fit_split:
      raise ValueError(f"config.evals.{data.key}.fit_split={fit_split!r} must name a split, "
                       "e.g. 'val'.")
    if fit_split == split:
      logging.warning("config.evals.%s: the temperature is fitted on the evaluated split %r "
                      "itself; set fit_split to another split (e.g. 'val').", data.key, split)
    self._split = classification.Evaluator(predict_fn, batches, put_batch, task, class_names,
                                           split=split)
    fit_batches = data.batches_for(fit_split, data.pp, f"config.evals.{data.key}.fit_split")
    self._fit = classification.Evaluator(predict_fn, fit_batches, put_batch, task, class_names,
                                         split=fit_split)
    self.task, self.split, self.fit_split, self.num_bins = task, split, fit_split, num_bins

  def _write(self, path: str | os.PathLike, raw: tuple[np.ndarray, np.ndarray],
             labels: np.ndarray, probs: np.ndarray, temperature: float) -> None:
    """The predictions CSV at `path` and the reliability diagram beside it."""
    names = self._split.class_names or [str(k) for k in range(raw[1].shape[-1])]
    predictions_lib.write_predictions(path, *raw, names)
    before = calibration.confidences(labels, probs)
    after = calibration.confidences(labels, calibration.apply_temperature(probs, temperature))
    reliability.plot_reliability(
        [before[0], after[0]], [before[1], after[1]], reliability_path(path),
        titles=["before temperature scaling",
                f"after (T = {temperature:.3g}, fitted on {self.fit_split})"],
        num_bins=self.num_bins, suptitle=f"Reliability on {self.split} ({self.task})")

  def run(self, train_state: Mapping[str, Any], predictions_path: str | os.PathLike | None = None
          ) -> Iterator[tuple[str, float | None]]:
    """Yields (metric name, value) pairs.

    Args:
      train_state: the state to evaluate.
      predictions_path: where to write the split's predictions CSV (the diagram goes beside
        it, `reliability_path`), or None.
    """
    raw = self._split.predict(train_state)
    labels, probs = calibration.as_multiclass(*raw, self.task, self.split)
    fit = calibration.as_multiclass(*self._fit.predict(train_state), self.task, self.fit_split)
    metrics = calibration.calibration_metrics(labels, probs, *fit, num_bins=self.num_bins)
    if predictions_path is not None and jax.process_index() == 0:  # Scores checked finite.
      self._write(predictions_path, raw, labels, probs, metrics["temperature"])
    yield "num_examples", float(len(raw[0]))
    yield from metrics.items()
