"""Classification metrics against scikit-learn as the oracle, and their undefined cases."""
import warnings

import numpy as np
import pytest
from sklearn import metrics as skm

from fm_adapt.evaluators import metrics

UndefinedMetricWarning = metrics.UndefinedMetricWarning


def _score(y, probs, task, names=None, split="val"):
  with warnings.catch_warnings():
    warnings.simplefilter("error", UndefinedMetricWarning)  # Every class present: no warning.
    return metrics.classification_metrics(y, probs, task, names, split)


@pytest.mark.parametrize("seed", [0, 1])
def test_binary_uses_last_class_and_matches_sklearn_with_ties(seed):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 2, 300)
  p1 = np.round(rng.random(300) * 0.7 + 0.3 * y, 1)  # Rounded: many ties.
  probs = np.stack([1 - p1, p1], axis=-1)
  out = _score(y, probs, "multiclass", ["normal", "pneumonia"])
  pred = probs.argmax(-1)
  assert out["auc"] == skm.roc_auc_score(y, p1)
  assert out["acc"] == skm.accuracy_score(y, pred)
  assert out["bal_acc"] == skm.balanced_accuracy_score(y, pred)
  assert out["mcc"] == skm.matthews_corrcoef(y, pred)
  assert out["auc_pneumonia"] == skm.roc_auc_score(y, p1)
  assert out["auc_normal"] == skm.roc_auc_score(y == 0, 1 - p1)


@pytest.mark.parametrize("task", ["multiclass", "ordinal"])
def test_multiclass_macro_ovr_matches_sklearn(task):
  rng = np.random.default_rng(3)
  y = rng.integers(0, 5, 400)
  probs = rng.dirichlet(np.ones(5), 400)
  out = _score(y, probs, task)
  pred = probs.argmax(-1)
  assert out["auc"] == pytest.approx(
      skm.roc_auc_score(y, probs, multi_class="ovr", average="macro"), abs=1e-15)
  assert out["bal_acc"] == skm.balanced_accuracy_score(y, pred)
  assert out["mcc"] == skm.matthews_corrcoef(y, pred)
  for k in range(5):
    assert out[f"auc_{k}"] == skm.roc_auc_score(y == k, probs[:, k])
    tn, fp, fn, tp = skm.confusion_matrix(y == k, pred == k).ravel()
    assert out[f"sens_{k}"] == tp / (tp + fn) and out[f"spec_{k}"] == tn / (tn + fp)


def test_multilabel_macro_over_labels_matches_sklearn():
  rng = np.random.default_rng(4)
  y = rng.integers(0, 2, (200, 4))
  probs = rng.random((200, 4))
  out = _score(y, probs, "multilabel", ["a", "b", "c", "d"])
  pred = probs > 0.5
  assert out["auc"] == pytest.approx(skm.roc_auc_score(y, probs, average="macro"), abs=1e-15)
  assert out["acc"] == pytest.approx(np.mean(pred == y), abs=1e-15)  # Mean per-label accuracy.
  assert out["bal_acc"] == pytest.approx(np.mean(
      [skm.balanced_accuracy_score(y[:, k], pred[:, k]) for k in range(4)]), abs=1e-15)
  assert out["mcc"] == pytest.approx(np.mean(
      [skm.matthews_corrcoef(y[:, k], pred[:, k]) for k in range(4)]), abs=1e-15)
  assert out["auc_c"] == skm.roc_auc_score(y[:, 2], probs[:, 2])


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_scores_are_an_error_naming_the_split(bad):
  # The hand-written AUROC gave 0.733 for all-NaN probabilities.
  y = np.array([0, 1, 1, 0, 1])
  with pytest.raises(ValueError, match=r"Split 'test': 5 of 5 examples have non-finite scores"):
    metrics.classification_metrics(y, np.full((5, 2), bad), "multiclass", split="test")
  probs = np.full((5, 2), 0.5)
  probs[2, 1] = bad
  with pytest.raises(ValueError, match=r"Split 'val': 1 of 5"):
    metrics.classification_metrics(y, probs, "multiclass", split="val")


def test_absent_class_is_null_with_a_warning_never_a_mean_over_the_rest():
  # The hand-written AUROC averaged the other classes' AUCs with nanmean, without a word.
  rng = np.random.default_rng(5)
  y = rng.integers(0, 2, 60)  # Class 2 ('tumour') is absent from the split.
  probs = rng.dirichlet(np.ones(3), 60)
  with pytest.warns(UndefinedMetricWarning, match=r"Split 'val': no example has class 'tumour'"):
    out = metrics.classification_metrics(y, probs, "multiclass", ["a", "b", "tumour"], "val")
  assert out["auc"] is None and out["auc_tumour"] is None and out["sens_tumour"] is None
  assert out["bal_acc"] is None
  assert out["spec_tumour"] == np.mean(probs.argmax(-1) != 2)  # Defined: it has negatives.
  assert out["auc_a"] == skm.roc_auc_score(y == 0, probs[:, 0])
  assert out["mcc"] == skm.matthews_corrcoef(y, probs.argmax(-1))  # Two classes present.


def test_one_class_split_names_every_undefined_metric():
  y = np.zeros(8, int)
  probs = np.tile([0.7, 0.3], (8, 1))
  with pytest.warns(UndefinedMetricWarning) as record:
    out = metrics.classification_metrics(y, probs, "multiclass", ["normal", "pneumonia"], "test")
  message = str(record[0].message)
  undefined = ["mcc", "auc", "bal_acc", "auc_normal", "spec_normal", "auc_pneumonia",
               "sens_pneumonia"]
  assert all(name in message for name in undefined) and "'test'" in message
  assert {k for k, v in out.items() if v is None} == set(undefined)
  assert out["acc"] == 1.0 and out["sens_normal"] == 1.0 and out["spec_pneumonia"] == 1.0
  assert metrics.undefined_metrics(y, "multiclass", ["normal", "pneumonia"]).keys() == set(
      undefined)


def test_multilabel_constant_label_is_null():
  rng = np.random.default_rng(6)
  y = rng.integers(0, 2, (50, 3))
  y[:, 1] = 1  # Every example has label 'b'.
  with pytest.warns(UndefinedMetricWarning, match="every example has label 'b'"):
    out = metrics.classification_metrics(y, rng.random((50, 3)), "multilabel", ["a", "b", "c"])
  assert out["auc_b"] is None and out["spec_b"] is None and out["sens_b"] is not None
  assert out["auc"] is None and out["bal_acc"] is None and out["mcc"] is None
  assert out["auc_a"] is not None


def test_bad_labels_and_empty_split_are_errors():
  probs = np.full((3, 2), 0.5)
  with pytest.raises(ValueError, match=r"Split 'val': labels must be 3 ints in \[0, 2\)"):
    metrics.classification_metrics(np.array([0, 1, 2]), probs, "multiclass", split="val")
  with pytest.raises(ValueError, match="Split 'val' has no examples"):
    metrics.classification_metrics(np.zeros(0, int), np.zeros((0, 2)), "multiclass", split="val")
  with pytest.raises(ValueError, match="3 class names for 2 classes"):
    metrics.classification_metrics(np.array([0, 1, 1]), probs, "multiclass", ["a", "b", "c"])
