"""Classification evaluator: runs a jitted predict function over a split and scores it."""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from fm_adapt.evaluators import metrics as metrics_lib
from fm_adapt.evaluators import predictions as predictions_lib


def _to_host(x: jax.Array) -> np.ndarray:
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


class Evaluator:
  """Scores a model on one split: the metrics of `metrics.classification_metrics`.

  Args:
    predict_fn: `predict(train_state, images) -> probabilities`; jitted once here.
    batches: a callable returning a fresh iterable of host batches with 'image', 'label' and
      'mask' (padded final batch), e.g. a grain loader factory.
    put_batch: places a host batch onto the devices (`mesh.global_batch`).
    task: 'multiclass', 'ordinal' or 'multilabel'.
    class_names: names used in per-class metric names.
    split: the split's name, for warnings and errors.
  """

  def __init__(self, predict_fn: Callable[..., jax.Array],
               batches: Callable[[], Iterable[Mapping[str, np.ndarray]]],
               put_batch: Callable[[Mapping[str, np.ndarray]], Mapping[str, jax.Array]],
               task: str, class_names: list[str] | None = None, split: str = "?"):
    self._predict = jax.jit(predict_fn)
    self._batches = batches
    self._put = put_batch
    self.task = task
    self.class_names = [str(c).replace(" ", "_") for c in class_names] if class_names else None
    self.split = split

  def predict(self, train_state: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """Returns (labels, probabilities) of every real example of the split, in order."""
    labels, probs = [], []
    for batch in self._batches():
      device_batch = self._put(batch)
      p = _to_host(self._predict(train_state, device_batch["image"]))
      keep = _to_host(device_batch["mask"]).astype(bool)
      probs.append(p[keep])
      labels.append(_to_host(device_batch["label"])[keep])
    return np.concatenate(labels), np.concatenate(probs)

  def run(self, train_state: Mapping[str, Any], predictions_path: str | os.PathLike | None = None
          ) -> Iterator[tuple[str, float | None]]:
    """Yields (metric name, value) pairs; a value is None where the split leaves it undefined.

    Args:
      train_state: the state to evaluate.
      predictions_path: where to write the per-sample predictions of this evaluation as CSV
        (`predictions.write_predictions`; process 0 only), or None.
    """
    labels, probs = self.predict(train_state)
    names = self.class_names or [str(k) for k in range(probs.shape[-1])]
    metrics = metrics_lib.classification_metrics(labels, probs, self.task, names, self.split)
    if predictions_path is not None and jax.process_index() == 0:  # Scores checked finite above.
      predictions_lib.write_predictions(predictions_path, labels, probs, names)
    yield "num_examples", float(len(labels))
    yield from metrics.items()
