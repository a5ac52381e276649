"""Per-sample predictions: written, read back and re-scored by scikit-learn to the same figures."""
import numpy as np
import pytest
from sklearn import metrics as skm

from fm_adapt.evaluators import metrics, predictions


def test_multiclass_round_trip_rescored_by_sklearn_gives_exactly_the_metrics(tmp_path):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, 50)
  probs = rng.dirichlet(np.ones(3), 50).astype(np.float32)  # As the model gives them.
  names = ["normal", "benign tumour", "malignant,grade 2"]  # Spaces and commas survive.
  path = predictions.write_predictions(tmp_path / "pred" / "test.csv", labels, probs, names)
  header = path.read_text().splitlines()[0]
  assert header == 'index,label,score_normal,score_benign tumour,"score_malignant,grade 2"'
  back = predictions.read_predictions(path)
  assert back.class_names == tuple(names)
  np.testing.assert_array_equal(back.index, np.arange(50))
  np.testing.assert_array_equal(back.labels, labels)
  np.testing.assert_array_equal(back.probs, probs)  # Exactly, not approximately.

  expected = metrics.classification_metrics(labels, probs, "multiclass", names, "test")
  y, p = back.labels, back.probs
  pred = p.argmax(-1)
  assert expected["auc"] == skm.roc_auc_score(y, p, multi_class="ovr", average="macro")
  assert expected["acc"] == skm.accuracy_score(y, pred)
  assert expected["bal_acc"] == skm.balanced_accuracy_score(y, pred)
  assert expected["mcc"] == skm.matthews_corrcoef(y, pred)
  for k, name in enumerate(names):
    assert expected[f"auc_{name}"] == skm.roc_auc_score(y == k, p[:, k])
    assert expected[f"sens_{name}"] == skm.recall_score(y == k, pred == k)
    assert expected[f"spec_{name}"] == skm.recall_score(y != k, pred != k)


def test_binary_and_multilabel_round_trips(tmp_path):
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 2, 40)
  probs = rng.dirichlet(np.ones(2), 40).astype(np.float32)
  back = predictions.read_predictions(
      predictions.write_predictions(tmp_path / "b.csv", labels, probs, ["neg", "pos"]))
  out = metrics.classification_metrics(labels, probs, "multiclass", ["neg", "pos"])
  assert out["auc"] == skm.roc_auc_score(back.labels, back.probs[:, -1])  # MedMNIST: last class.

  labels = rng.integers(0, 2, (40, 3))
  probs = rng.random((40, 3)).astype(np.float32)
  path = predictions.write_predictions(tmp_path / "m.csv", labels, probs, ["a", "b", "c"])
  assert path.read_text().splitlines()[0] == "index,label_a,label_b,label_c,score_a,score_b,score_c"
  back = predictions.read_predictions(path)
  np.testing.assert_array_equal(back.labels, labels)
  out = metrics.classification_metrics(labels, probs, "multilabel", ["a", "b", "c"])
  assert out["auc"] == skm.roc_auc_score(back.labels, back.probs, average="macro")
  assert out["acc"] == np.mean([skm.accuracy_score(back.labels[:, k], back.probs[:, k] > 0.5)
                                for k in range(3)])


def test_bad_arguments_and_foreign_files(tmp_path):
  with pytest.raises(ValueError, match="one unique class name per column"):
    predictions.write_predictions(tmp_path / "x.csv", [0, 1], np.zeros((2, 2)), ["a", "a"])
  with pytest.raises(ValueError, match="do not fit"):
    predictions.write_predictions(tmp_path / "x.csv", [0, 1, 1], np.zeros((2, 2)), ["a", "b"])
  (tmp_path / "other.csv").write_text("id,y,p\n0,1,0.5\n")
  with pytest.raises(ValueError, match="as write_predictions writes it"):
    predictions.read_predictions(tmp_path / "other.csv")
  assert not list(tmp_path.glob(".*.tmp"))
