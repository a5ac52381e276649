"""Classification metrics in numpy: accuracy, AUROC, per-class AUC, sensitivity, specificity.

Conventions follow the MedMNIST v2 evaluator: binary tasks score the last class; multi-class
AUROC is the macro mean of one-vs-rest AUCs; multi-label accuracy is the mean per-label accuracy
at threshold 0.5 and AUROC the macro mean of per-label AUCs.
"""
from __future__ import annotations

import numpy as np


def binary_auroc(y_true: np.ndarray, score: np.ndarray) -> float:
  """Area under the ROC curve (Mann-Whitney U, average ranks for ties); NaN if one class."""
  y_true = np.asarray(y_true).astype(bool).ravel()
  score = np.asarray(score, np.float64).ravel()
  n_pos, n_neg = int(y_true.sum()), int((~y_true).sum())
  if n_pos == 0 or n_neg == 0:
    return float("nan")
  order = np.argsort(score, kind="mergesort")
  sorted_scores = score[order]
  ranks = np.empty_like(sorted_scores)
  # Average rank (1-based) over runs of tied scores.
  boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
  starts = np.concatenate([[0], boundaries])
  ends = np.concatenate([boundaries, [len(score)]])
  for start, end in zip(starts, ends):
    ranks[start:end] = 0.5 * (start + 1 + end)
  rank_of = np.empty_like(ranks)
  rank_of[order] = ranks
  u = rank_of[y_true].sum() - n_pos * (n_pos + 1) / 2.0
  return float(u / (n_pos * n_neg))


def per_class_auroc(y_true: np.ndarray, probs: np.ndarray, task: str) -> np.ndarray:
  """One AUC per class (multi-class, one-vs-rest) or per label (multi-label)."""
  probs = np.asarray(probs)
  num_classes = probs.shape[-1]
  if task == "multilabel":
    return np.array([binary_auroc(y_true[:, k], probs[:, k]) for k in range(num_classes)])
  return np.array([binary_auroc(y_true == k, probs[:, k]) for k in range(num_classes)])


def auroc(y_true: np.ndarray, probs: np.ndarray, task: str) -> float:
  """AUROC: binary on the last class's score; multi-class / multi-label macro mean."""
  probs = np.asarray(probs)
  if task != "multilabel" and probs.shape[-1] == 2:
    return binary_auroc(y_true == 1, probs[:, 1])
  return float(np.nanmean(per_class_auroc(y_true, probs, task)))


def accuracy(y_true: np.ndarray, probs: np.ndarray, task: str, threshold: float = 0.5) -> float:
  """Top-1 accuracy; multi-label: mean per-label accuracy at `threshold`."""
  probs = np.asarray(probs)
  if task == "multilabel":
    return float(np.mean((probs > threshold) == np.asarray(y_true).astype(bool)))
  return float(np.mean(np.argmax(probs, axis=-1) == np.asarray(y_true)))


def sensitivity_specificity(y_true: np.ndarray, probs: np.ndarray, task: str,
                            threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
  """Per-class (one-vs-rest at the argmax, or per label at `threshold`) sensitivity, specificity."""
  probs = np.asarray(probs)
  num_classes = probs.shape[-1]
  if task == "multilabel":
    pred, true = probs > threshold, np.asarray(y_true).astype(bool)
  else:
    pred = np.eye(num_classes, dtype=bool)[np.argmax(probs, axis=-1)]
    true = np.eye(num_classes, dtype=bool)[np.asarray(y_true)]
  tp = np.sum(pred & true, axis=0)
  tn = np.sum(~pred & ~true, axis=0)
  with np.errstate(invalid="ignore", divide="ignore"):
    sens = tp / np.sum(true, axis=0)
    spec = tn / np.sum(~true, axis=0)
  return sens, spec


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, task: str,
                           class_names: list[str] | None = None) -> dict[str, float]:
  """All classification metrics of one split as a flat {name: value} dict."""
  out = {"acc": accuracy(y_true, probs, task), "auc": auroc(y_true, probs, task)}
  names = class_names or [str(k) for k in range(np.asarray(probs).shape[-1])]
  sens, spec = sensitivity_specificity(y_true, probs, task)
  for k, (a, s, p) in enumerate(zip(per_class_auroc(y_true, probs, task), sens, spec)):
    out[f"auc_{names[k]}"] = float(a)
    out[f"sens_{names[k]}"] = float(s)
    out[f"spec_{names[k]}"] = float(p)
  return out
