"""The 'robustness' evaluator: classification metrics under each corruption and severity.

  config.evals.robust = dict(name='robustness', split='test', periodic=False)

For each corruption of the dataset's modality (`data_pipelines.corruptions.MODALITIES`) and each
severity, the split is evaluated with the pp `corrupt('<name>', <severity>, seed=<seed>,
modality='<modality>')|<eval pp>`: the corruption applies to the stored uint8 image, before the
entry's own pp. Its spatial parameters are in pixels of that image (MedMNIST-C's are for 224 px:
use the `size=224` archives to reproduce its benchmark). It yields
  clean/<m>                      the uncorrupted split (the classification evaluator's figures)
  <corruption>/<severity>/<m>    each corruption and severity
  <corruption>/mean/<m>          mean over the severities of that corruption
  corrupted_mean/<m>             mean over every corruption and severity
for m in bal_acc, acc, auc (`metrics.classification_metrics`); a mean with an undefined member
is undefined (None), as the classification metrics are.

Options: `modality` (default: that of the MedMNIST flag of config.input.data,
`corruptions.MODALITY_OF_FLAG`), `corruptions` (a subset of the modality's; default all),
`severities` (default 1..5), `seed` (of the corruptions' noise; default 0). About
len(corruptions) * len(severities) + 1 passes over the split: run it at the end
(`periodic=False`). Every pass uses the same predict function, traced and compiled once.
Per-sample predictions are not written.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from data_pipelines import corruptions as corruptions_lib
from fm_adapt.evaluators import classification
from fm_adapt.evaluators import metrics as metrics_lib

if TYPE_CHECKING:
  from fm_adapt.evaluators import EvalData

METRICS = ("bal_acc", "acc", "auc")


def _modality(key: str, modality: str | None, data_cfg: Mapping[str, Any]) -> str:
  """The option, else the modality of config.input.data's MedMNIST flag; checked."""
  valid = sorted(corruptions_lib.MODALITIES)
  if modality is None:
    flag = data_cfg.get("flag") if data_cfg.get("name") == "medmnist" else None
    if flag not in corruptions_lib.MODALITY_OF_FLAG:
      known = dict(sorted(corruptions_lib.MODALITY_OF_FLAG.items()))
      raise ValueError(f"config.evals.{key}: no imaging modality known for the data "
                       f"{dict(data_cfg)} (known MedMNIST flags: {known}); set "
                       f"config.evals.{key}.modality to one of {valid}.")
    return corruptions_lib.MODALITY_OF_FLAG[flag]
  if modality not in corruptions_lib.MODALITIES:
    raise ValueError(f"config.evals.{key}.modality={modality!r} is unknown; valid: {valid}.")
  return modality


def _corruptions(key: str, modality: str, names: Sequence[str] | None) -> tuple[str, ...]:
  """The option's corruptions (every one of the modality's by default); checked."""
  valid = tuple(corruptions_lib.MODALITIES[modality])
  if names is None:
    return valid
  names = [names] if isinstance(names, str) else list(names)
  unknown = [n for n in names if n not in valid]
  if not names or unknown or len(set(names)) != len(names):
    raise ValueError(f"config.evals.{key}.corruptions={names!r}: give distinct names of the "
                     f"{modality!r} corruptions {list(valid)} (unknown: {unknown}).")
  return tuple(names)


def _severities(key: str, severities: Sequence[int] | None) -> tuple[int, ...]:
  valid = tuple(corruptions_lib.SEVERITIES)
  if severities is None:
    return valid
  values = list(severities) if isinstance(severities, (list, tuple)) else [severities]
  if (not values or len(set(values)) != len(values)
      or any(isinstance(s, bool) or not isinstance(s, int) or s not in valid for s in values)):
    raise ValueError(f"config.evals.{key}.severities={severities!r} must be distinct ints in "
                     f"{list(valid)}.")
  return tuple(values)


def corrupt_pp(name: str, severity: int, seed: int, modality: str, pp: str) -> str:
  """`corrupt('<name>', <severity>, seed=<seed>, modality='<modality>')|<pp>`: corrupt the stored
  image, then apply `pp`."""
  op = f"corrupt({name!r}, {severity}, seed={seed}, modality={modality!r})"
  return f"{op}|{pp}" if pp.strip() else op


def _mean(values: Sequence[float | None]) -> float | None:
  return None if any(v is None for v in values) else float(np.mean(values))


class Evaluator:
  """Classification metrics of one split under every corruption and severity of a modality.

  Args:
    predict_fn, batches, put_batch, task, class_names, split: as `classification.Evaluator`
      (`batches`: the clean split).
    data: loads the corrupted split (`fm_adapt.evaluators.EvalData`).
    modality: the corruptions' modality (default: from the MedMNIST flag).
    corruptions: a subset of the modality's corruption names (default: all).
    severities: the severities (default all: 1..5).
    seed: seed of the corruptions.
  """

  OPTIONS = {
      "modality": "corruption set, e.g. 'chest_xray' (default: from config.input.data.flag)",
      "corruptions": "list of the modality's corruptions to run (default: all)",
      "severities": "list of severities in 1..5 (default: all five)",
      "seed": "seed of the corruptions (default 0)",
  }

  def __init__(self, predict_fn: Callable[..., jax.Array],
               batches: Callable[[], Iterable[Mapping[str, np.ndarray]]],
               put_batch: Callable[[Mapping[str, np.ndarray]], Mapping[str, jax.Array]],
               task: str, class_names: list[str] | None = None, split: str = "?", *,
               data: EvalData, modality: str | None = None,
               corruptions: Sequence[str] | None = None,
               severities: Sequence[int] | None = None, seed: int = 0):
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
      raise ValueError(f"config.evals.{data.key}.seed={seed!r} must be an int >= 0.")
    self.modality = _modality(data.key, modality, data.data_cfg)
    self.corruptions = _corruptions(data.key, self.modality, corruptions)
    self.severities = _severities(data.key, severities)
    # One predict function for every pass: jax.jit's cache traces and compiles it once.
    make = lambda b, s: classification.Evaluator(predict_fn, b, put_batch, task, class_names,
                                                  split=s)
    self._clean = make(batches, split)
    self._corrupted = {
        (c, s): make(data.batches_for(split, corrupt_pp(c, s, seed, self.modality, data.pp),
                                      f"config.evals.{data.key}.split"), f"{split}+{c}/{s}")
        for c in self.corruptions for s in self.severities}
    self.task, self.split = task, split

  def _scores(self, evaluator: classification.Evaluator, train_state: Mapping[str, Any]
              ) -> dict[str, float | None]:
    labels, probs = evaluator.predict(train_state)
    names = evaluator.class_names or [str(k) for k in range(probs.shape[-1])]
    out = metrics_lib.classification_metrics(labels, probs, self.task, names, evaluator.split)
    return {m: out[m] for m in METRICS}

  def run(self, train_state: Mapping[str, Any], predictions_path: str | os.PathLike | None = None
          ) -> Iterator[tuple[str, float | None]]:
    """Yields (metric name, value) pairs (see the module docstring).

    Args:
      train_state: the state to evaluate.
      predictions_path: accepted for the evaluator interface; nothing is written.
    """
    del predictions_path
    for m, value in self._scores(self._clean, train_state).items():
      yield f"clean/{m}", value
    every: dict[str, list[float | None]] = {m: [] for m in METRICS}
    for c in self.corruptions:
      per: dict[str, list[float | None]] = {m: [] for m in METRICS}
      for s in self.severities:
        for m, value in self._scores(self._corrupted[c, s], train_state).items():
          yield f"{c}/{s}/{m}", value
          per[m].append(value)
          every[m].append(value)
      for m in METRICS:
        yield f"{c}/mean/{m}", _mean(per[m])
    for m in METRICS:
      yield f"corrupted_mean/{m}", _mean(every[m])
