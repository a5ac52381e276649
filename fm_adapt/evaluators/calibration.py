"""Calibration of predicted probabilities: ECE, adaptive ECE, NLL, Brier, temperature scaling.

Conventions (the numeric functions take labels (N,) ints and probabilities (N, K), K >= 2):
- A binary task is a 2-class softmax, as MedMNIST's heads are: every metric treats it as two
  classes. Ordinal tasks are scored as multi-class.
- Multi-label tasks are calibrated per label and pooled: each (example, label) pair is a binary
  problem with probabilities [1 - p, p] (`as_multiclass`), so every metric is a mean over the
  N * L pairs and temperature scaling is sigmoid(logit / T) with one T for all labels.
- confidence = max_k p_k; correct = (argmax_k p_k == label).
- `ece`: 15 equal-width bins over [0, 1], bin b holding the confidences in (b/15, (b+1)/15] (the
  first bin also 0); sum over bins of |bin| / N * |accuracy(bin) - mean confidence(bin)|
  (Guo et al. 2017, "On Calibration of Modern Neural Networks").
- `ece_adaptive`: the same sum over 15 equal-mass bins: the examples sorted by confidence and
  split into 15 groups whose sizes differ by at most one (Nixon et al. 2019, adaptive ECE).
- `nll`: mean over examples of -log p_label.
- `brier`: mean over examples of sum_k (p_k - onehot(label)_k)^2, Brier's original multi-class
  score, in [0, 2]; for a 2-class softmax that is 2 (p_1 - y)^2, twice the binary (p - y)^2.
- Probabilities are clipped to [1e-12, 1] before a log (a float32 softmax underflows to 0).
- Temperature scaling (Guo et al. 2017): the model gives probabilities, so its logits are taken as
  log p, exact up to a per-example constant that softmax ignores. One scalar T > 0 minimises the
  NLL of softmax(log p / T) on the fit split (scipy `minimize_scalar` on log T, T in
  [0.01, 100]). T > 1 softens over-confident predictions; the argmax (accuracy) never changes.

`calibration_eval.Evaluator` (registered as 'calibration') scores a split with these; the
diagram is `reliability.plot_reliability`.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from absl import logging
from scipy import optimize

NUM_BINS = 15
EPS = 1e-12
T_RANGE = (0.01, 100.0)


def as_multiclass(labels: np.ndarray, probs: np.ndarray, task: str, split: str = "?"
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Checked (labels (N,), probabilities (N, K)) for the numeric functions of this module.

  Args:
    labels: (N,) or (N, 1) ints (multi-class, ordinal), or (N, L) 0/1 (multi-label).
    probs: (N, K) softmax probabilities, or (N, L) per-label sigmoid probabilities.
    task: 'multiclass', 'ordinal' or 'multilabel' (each label becomes a binary problem
      [1 - p, p]: N * L pairs, labels in row-major order).
    split: the split's name, for errors.

  Raises:
    ValueError: for an unknown task, no examples, non-finite scores or labels that do not fit.
  """
  labels, probs = np.asarray(labels), np.asarray(probs, np.float64)
  if task not in ("multiclass", "ordinal", "multilabel"):
    raise ValueError(f"Unknown task {task!r}; valid: ['multiclass', 'ordinal', 'multilabel'].")
  if probs.ndim != 2 or len(probs) == 0:
    raise ValueError(f"Split {split!r}: probabilities must be (examples > 0, classes); got "
                     f"{probs.shape}.")
  if not np.isfinite(probs).all():
    raise ValueError(f"Split {split!r}: non-finite probabilities; the model diverged or the "
                     "input holds NaNs.")
  if task == "multilabel":
    if labels.shape != probs.shape or not np.isin(labels, (0, 1)).all():
      raise ValueError(f"Split {split!r}: multi-label labels must be 0/1 of shape {probs.shape}; "
                       f"got {labels.shape}.")
    p = probs.reshape(-1)
    return labels.reshape(-1).astype(np.int64), np.stack([1 - p, p], axis=-1)
  labels = labels.reshape(-1) if labels.ndim == 2 and labels.shape[1] == 1 else labels
  if (probs.shape[1] < 2 or labels.shape != (len(probs),)
      or not np.isin(labels, np.arange(probs.shape[1])).all()):
    raise ValueError(f"Split {split!r}: labels must be {len(probs)} ints in [0, "
                     f"{probs.shape[1]}) for probabilities of shape {probs.shape} (classes >= 2); "
                     f"got shape {labels.shape}.")
  return labels.astype(np.int64), probs


def confidences(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(confidence = max probability, correct = argmax equals the label) per example."""
  return probs.max(axis=-1), probs.argmax(axis=-1) == labels


@dataclasses.dataclass(frozen=True)
class Bins:
  """Per-bin statistics of a reliability diagram (empty bins: count 0, NaN means).

  Attributes:
    edges: (B + 1,) bin edges in [0, 1] (equal-width bins).
    count: (B,) examples per bin.
    confidence: (B,) mean confidence per bin.
    accuracy: (B,) fraction correct per bin.
  """
  edges: np.ndarray
  count: np.ndarray
  confidence: np.ndarray
  accuracy: np.ndarray


def _bin_means(values: np.ndarray, index: np.ndarray, count: np.ndarray) -> np.ndarray:
  total = np.bincount(index, weights=values, minlength=len(count))
  with np.errstate(invalid="ignore", divide="ignore"):
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def equal_width_bins(conf: np.ndarray, correct: np.ndarray, num_bins: int = NUM_BINS) -> Bins:
  """Equal-width bins over [0, 1]: bin b holds the confidences in (b/B, (b+1)/B], bin 0 also 0."""
  conf, correct = np.asarray(conf, np.float64), np.asarray(correct, np.float64)
  edges = np.linspace(0.0, 1.0, num_bins + 1)
  index = np.searchsorted(edges[1:-1], conf, side="left")  # Inner edges strictly below conf.
  count = np.bincount(index, minlength=num_bins)
  return Bins(edges, count, _bin_means(conf, index, count), _bin_means(correct, index, count))


def _gap(count: np.ndarray, confidence: np.ndarray, accuracy: np.ndarray) -> float:
  keep = count > 0
  return float(np.sum(count[keep] / count.sum() * np.abs(accuracy[keep] - confidence[keep])))


def bins_ece(bins: Bins) -> float:
  """The calibration error of binned statistics: sum of |bin| / N * |accuracy - confidence|."""
  return _gap(bins.count, bins.confidence, bins.accuracy)


def ece(labels: np.ndarray, probs: np.ndarray, num_bins: int = NUM_BINS) -> float:
  """Expected calibration error over `num_bins` equal-width confidence bins."""
  return bins_ece(equal_width_bins(*confidences(labels, probs), num_bins))


def adaptive_ece(labels: np.ndarray, probs: np.ndarray, num_bins: int = NUM_BINS) -> float:
  """Expected calibration error over `num_bins` equal-mass bins (sorted by confidence)."""
  conf, correct = confidences(labels, probs)
  groups = [g for g in np.array_split(np.argsort(conf, kind="stable"), num_bins) if len(g)]
  count = np.array([len(g) for g in groups])
  return _gap(count, np.array([conf[g].mean() for g in groups]),
              np.array([correct[g].mean() for g in groups]))


def nll(labels: np.ndarray, probs: np.ndarray) -> float:
  """Mean negative log-likelihood of the labels (probabilities clipped to [1e-12, 1])."""
  return float(-np.mean(np.log(np.clip(probs[np.arange(len(labels)), labels], EPS, 1.0))))


def brier(labels: np.ndarray, probs: np.ndarray) -> float:
  """Mean over examples of the summed squared error to the one-hot label (range [0, 2])."""
  one_hot = np.eye(probs.shape[1])[labels]
  return float(np.mean(np.sum((probs - one_hot) ** 2, axis=-1)))


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
  """softmax(log p / T), computed stably, for (N, K) probabilities."""
  z = np.log(np.clip(probs, EPS, 1.0)) / temperature
  z -= z.max(axis=-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=-1, keepdims=True)


def fit_temperature(labels: np.ndarray, probs: np.ndarray) -> float:
  """The temperature T in [0.01, 100] minimising the NLL of softmax(log p / T).

  A T at the edge of the range is logged: the fit split cannot pin it down (e.g. every
  example right with confidence 1).
  """
  lo, hi = np.log(T_RANGE[0]), np.log(T_RANGE[1])
  result = optimize.minimize_scalar(
      lambda log_t: nll(labels, apply_temperature(probs, float(np.exp(log_t)))),
      bounds=(lo, hi), method="bounded", options={"xatol": 1e-6})
  temperature = float(np.exp(result.x))
  if min(result.x - lo, hi - result.x) < 1e-3:
    logging.warning("Temperature scaling: T=%.4g is at the edge of its range %s.", temperature,
                    T_RANGE)
  return temperature


def scores(labels: np.ndarray, probs: np.ndarray, num_bins: int = NUM_BINS) -> dict[str, float]:
  """ece, ece_adaptive, nll and brier of checked (labels, probabilities)."""
  return {"ece": ece(labels, probs, num_bins),
          "ece_adaptive": adaptive_ece(labels, probs, num_bins),
          "nll": nll(labels, probs), "brier": brier(labels, probs)}


def calibration_metrics(labels: np.ndarray, probs: np.ndarray, fit_labels: np.ndarray,
                        fit_probs: np.ndarray, num_bins: int = NUM_BINS) -> dict[str, float]:
  """Every calibration metric of a split, before and after temperature scaling.

  Args:
    labels, probs: the evaluated split, checked by `as_multiclass`.
    fit_labels, fit_probs: the split that fits the temperature, checked likewise.
    num_bins: bins of both ECEs.

  Returns:
    ece, ece_adaptive, nll, brier; temperature; the same four with suffix `_ts` after scaling;
    fit_nll and fit_nll_ts (the fit split's NLL before and after).
  """
  temperature = fit_temperature(fit_labels, fit_probs)
  scaled = apply_temperature(probs, temperature)
  return {**scores(labels, probs, num_bins), "temperature": temperature,
          **{f"{k}_ts": v for k, v in scores(labels, scaled, num_bins).items()},
          "fit_nll": nll(fit_labels, fit_probs),
          "fit_nll_ts": nll(fit_labels, apply_temperature(fit_probs, temperature))}
