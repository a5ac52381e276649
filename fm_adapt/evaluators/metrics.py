"""Classification metrics of one split, computed with scikit-learn.

Conventions follow the MedMNIST v2 evaluator (`medmnist/evaluator.py`, `getAUC` / `getACC`):
- binary (two classes): AUROC of the last class's score; accuracy at the argmax (the same as the
  last class's score > 0.5);
- multi-class and ordinal: AUROC is the macro mean of the one-vs-rest AUCs; accuracy at the argmax;
- multi-label: accuracy is the mean per-label accuracy at threshold 0.5; AUROC the macro mean of
  the per-label AUCs.
Besides `acc` and `auc`: `bal_acc` (balanced accuracy) and `mcc` (Matthews correlation) at the
argmax, or for multi-label the macro mean over labels of each at threshold 0.5; per class (or
label) `auc_<c>`, `sens_<c>`, `spec_<c>` (one-vs-rest at the argmax, or per label at 0.5).

A metric the split cannot define is None (JSON null), never a number: a class absent from the
split leaves its `auc_<c>` and `sens_<c>` undefined, a class that every example has leaves its
`auc_<c>` and `spec_<c>` undefined, and a mean over classes with an undefined member (`auc`,
`bal_acc`, multi-label `mcc`) is undefined too; multi-class `mcc` needs two classes present.
Each undefined metric is named in an `UndefinedMetricWarning` with its class and split.
Non-finite scores are an error naming the split.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import numpy as np
from sklearn import metrics as skm

TASKS = ("multiclass", "ordinal", "multilabel")
THRESHOLD = 0.5
_MEANS = ("auc", "bal_acc", "mcc")


class UndefinedMetricWarning(UserWarning):
  """A metric is undefined on a split (a class is absent, or present in every example)."""


def _checked(y_true: np.ndarray, probs: np.ndarray, task: str, split: str
             ) -> tuple[np.ndarray, np.ndarray]:
  """Validates labels and scores; returns (truth as an (N, K) bool matrix, float64 scores)."""
  if task not in TASKS:
    raise ValueError(f"Unknown task {task!r}; valid: {list(TASKS)}.")
  probs = np.asarray(probs, np.float64)
  y_true = np.asarray(y_true)
  if probs.ndim != 2 or (probs.shape[1] < 2 and task != "multilabel"):
    raise ValueError(f"Split {split!r}: scores must be (examples, classes >= 2); got {probs.shape}.")
  if len(probs) == 0:
    raise ValueError(f"Split {split!r} has no examples: nothing to score.")
  bad = ~np.isfinite(probs)
  if bad.any():
    rows = int(bad.any(axis=1).sum())
    raise ValueError(f"Split {split!r}: {rows} of {len(probs)} examples have non-finite scores "
                     "(NaN or inf); the model diverged or the input holds NaNs.")
  num_classes = probs.shape[1]
  if task == "multilabel":
    if y_true.shape != probs.shape or not np.isin(y_true, (0, 1)).all():
      raise ValueError(f"Split {split!r}: multi-label labels must be 0/1 of shape {probs.shape}; "
                       f"got shape {y_true.shape}.")
    return y_true.astype(bool), probs
  y_true = y_true.reshape(-1) if y_true.ndim == 2 and y_true.shape[1] == 1 else y_true
  if y_true.shape != (len(probs),) or not np.isin(y_true, np.arange(num_classes)).all():
    raise ValueError(f"Split {split!r}: labels must be {len(probs)} ints in [0, {num_classes}); "
                     f"got shape {y_true.shape}, values {np.unique(y_true)[:10]}.")
  return np.eye(num_classes, dtype=bool)[y_true.astype(int)], probs


def _names(class_names: Sequence[str] | None, num_classes: int) -> list[str]:
  names = [str(c) for c in class_names] if class_names else [str(k) for k in range(num_classes)]
  if len(names) != num_classes:
    raise ValueError(f"{len(names)} class names for {num_classes} classes: {names}.")
  return names


def _undefined(truth: np.ndarray, task: str, names: list[str]) -> dict[str, str]:
  """{metric: why it is undefined} for the labels of a split (scores play no part)."""
  positives = truth.sum(axis=0)
  kind = "label" if task == "multilabel" else "class"
  out: dict[str, str] = {}
  for name, count in zip(names, positives):
    if count == 0:
      why = f"no example has {kind} {name!r}"
      out.update({f"auc_{name}": why, f"sens_{name}": why})
    elif count == len(truth):
      why = f"every example has {kind} {name!r}"
      out.update({f"auc_{name}": why, f"spec_{name}": why})
  mean_why = "a mean over classes (or labels) with an undefined member"
  if task == "multilabel":
    return {**({m: mean_why for m in _MEANS} if out else {}), **out}
  if (positives == 0).any():
    out = {"auc": mean_why, "bal_acc": mean_why, **out}
  if (positives > 0).sum() < 2:
    out = {"mcc": "fewer than two classes present", **out}
  return out


def undefined_metrics(y_true: np.ndarray, task: str, class_names: Sequence[str],
                      split: str = "?") -> dict[str, str]:
  """The metrics of `classification_metrics` that the labels of a split leave undefined.

  Args:
    y_true: labels of the split: (N,) ints, or (N, K) 0/1 for multi-label.
    task: 'multiclass', 'ordinal' or 'multilabel'.
    class_names: one name per class or label.
    split: the split's name, for errors.

  Returns:
    {metric name: the reason it is undefined}; empty when every metric is defined.
  """
  names = _names(class_names, len(class_names))
  y_true = np.asarray(y_true)
  truth, _ = _checked(y_true, np.zeros((len(y_true), len(names))), task, split)
  return _undefined(truth, task, names)


def warn_undefined(split: str, undefined: dict[str, str]) -> None:
  """Warns once per split and content that `undefined` metrics will be reported as null."""
  if not undefined:
    return
  reasons = list(dict.fromkeys(v for k, v in undefined.items() if k not in _MEANS))
  warnings.warn(f"Split {split!r}: {'; '.join(reasons)}. These metrics are undefined and "
                f"reported as null: {', '.join(undefined)}.", UndefinedMetricWarning)


def _macro(values: list[float]) -> float:
  return float(np.mean(values))


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, task: str,
                           class_names: Sequence[str] | None = None, split: str = "?"
                           ) -> dict[str, float | None]:
  """All classification metrics of one split as a flat {name: value or None} dict.

  Args:
    y_true: (N,) int labels (multi-class, ordinal) or (N, K) 0/1 labels (multi-label).
    probs: (N, K) scores (probabilities) per class or label.
    task: 'multiclass', 'ordinal' or 'multilabel'.
    class_names: names for the per-class metrics (default '0', '1', ...).
    split: the split's name, for warnings and errors.

  Returns:
    acc, auc, bal_acc, mcc, then auc_<c>, sens_<c>, spec_<c> per class; None where undefined
    (see the module docstring).

  Raises:
    ValueError: non-finite scores, an empty split, or labels that do not fit the scores.
  """
  truth, probs = _checked(y_true, probs, task, split)
  names = _names(class_names, probs.shape[1])
  undefined = _undefined(truth, task, names)
  warn_undefined(split, undefined)
  multilabel = task == "multilabel"
  pred = probs > THRESHOLD if multilabel else np.eye(len(names), dtype=bool)[probs.argmax(-1)]
  labels, pred_labels = truth.argmax(-1), probs.argmax(-1)
  per_label = lambda fn: _macro([fn(truth[:, k], pred[:, k]) for k in range(len(names))])
  confusion = skm.multilabel_confusion_matrix(truth, pred)  # (K, 2, 2): [[tn, fp], [fn, tp]].
  tn, fp, fn, tp = (confusion[:, i, j] for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)))
  binary = not multilabel and len(names) == 2
  values: dict[str, Callable[[], float]] = {
      "acc": (lambda: per_label(skm.accuracy_score)) if multilabel else (
          lambda: skm.accuracy_score(labels, pred_labels)),
      "auc": (lambda: skm.roc_auc_score(truth[:, 1], probs[:, 1])) if binary else (
          lambda: _macro([skm.roc_auc_score(truth[:, k], probs[:, k])
                          for k in range(len(names))])),
      "bal_acc": (lambda: per_label(skm.balanced_accuracy_score)) if multilabel else (
          lambda: skm.balanced_accuracy_score(labels, pred_labels)),
      "mcc": (lambda: per_label(skm.matthews_corrcoef)) if multilabel else (
          lambda: skm.matthews_corrcoef(labels, pred_labels)),
  }
  for k, name in enumerate(names):
    values[f"auc_{name}"] = lambda k=k: skm.roc_auc_score(truth[:, k], probs[:, k])
    values[f"sens_{name}"] = lambda k=k: tp[k] / (tp[k] + fn[k])
    values[f"spec_{name}"] = lambda k=k: tn[k] / (tn[k] + fp[k])
  return {key: None if key in undefined else float(fn()) for key, fn in values.items()}
