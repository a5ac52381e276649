"""Metrics against scikit-learn as the oracle."""
import numpy as np
import pytest
from sklearn import metrics as skm

from fm_adapt.evaluators import metrics


@pytest.mark.parametrize("seed", [0, 1])
def test_binary_auroc_matches_sklearn_with_ties(seed):
  rng = np.random.default_rng(seed)
  y = rng.integers(0, 2, 300)
  score = np.round(rng.random(300) + 0.3 * y, 1)  # Rounded: many ties.
  assert metrics.binary_auroc(y, score) == pytest.approx(skm.roc_auc_score(y, score), abs=1e-12)


def test_binary_task_uses_last_class():
  rng = np.random.default_rng(2)
  y = rng.integers(0, 2, 100)
  probs = rng.dirichlet([1, 1], 100)
  assert metrics.auroc(y, probs, "multiclass") == pytest.approx(skm.roc_auc_score(y, probs[:, 1]))
  assert metrics.accuracy(y, probs, "multiclass") == pytest.approx(
      skm.accuracy_score(y, probs.argmax(-1)))


def test_multiclass_macro_ovr_matches_sklearn():
  rng = np.random.default_rng(3)
  y = rng.integers(0, 5, 400)
  probs = rng.dirichlet(np.ones(5), 400)
  expected = skm.roc_auc_score(y, probs, multi_class="ovr", average="macro")
  assert metrics.auroc(y, probs, "multiclass") == pytest.approx(expected, abs=1e-12)


def test_multilabel_macro_matches_sklearn():
  rng = np.random.default_rng(4)
  y = rng.integers(0, 2, (200, 4))
  probs = rng.random((200, 4))
  assert metrics.auroc(y, probs, "multilabel") == pytest.approx(
      skm.roc_auc_score(y, probs, average="macro"), abs=1e-12)
  assert metrics.accuracy(y, probs, "multilabel") == pytest.approx(np.mean((probs > 0.5) == y))


def test_sensitivity_specificity_binary():
  y = np.array([1, 1, 1, 0, 0])
  probs = np.array([[0.1, 0.9], [0.2, 0.8], [0.7, 0.3], [0.6, 0.4], [0.4, 0.6]])
  sens, spec = metrics.sensitivity_specificity(y, probs, "multiclass")
  assert sens[1] == pytest.approx(2 / 3) and spec[1] == pytest.approx(1 / 2)
  tn, fp, fn, tp = skm.confusion_matrix(y, probs.argmax(-1)).ravel()
  assert sens[1] == pytest.approx(tp / (tp + fn)) and spec[1] == pytest.approx(tn / (tn + fp))
  out = metrics.classification_metrics(y, probs, "multiclass", ["normal", "pneumonia"])
  assert set(out) >= {"acc", "auc", "auc_pneumonia", "sens_pneumonia", "spec_normal"}
