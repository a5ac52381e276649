"""The 'calibration' evaluator end to end: a fake model on in-memory splits, built by
`make_evaluators`, its metrics exactly those of `calibration`, its diagram and predictions written.

Three classes; each image's first row holds its scores as integers x (x / 256: exact in float32,
summing to 1).
"""
import re

import ml_collections
import numpy as np
import pytest

from data_pipelines import datasets
from fm_adapt import config as config_lib
from fm_adapt import evaluators
from fm_adapt.evaluators import calibration, predictions
from fm_adapt.train import mesh as mesh_lib

NAMES = ("a", "b", "c")


def _split(n, seed):
  rng = np.random.default_rng(seed)
  labels = np.arange(n) % 3
  examples, probs = [], []
  for label in labels:
    x = rng.multinomial(241, [0.2, 0.2, 0.2] + np.eye(3)[label] * 0.4) + 5  # Sums to 256.
    image = np.zeros((4, 4, 1), np.uint8)
    image[0, :3, 0] = x
    examples.append({"image": image, "label": int(label)})
    probs.append(x / 256)
  return examples, labels, np.asarray(probs, np.float64)


SPLITS = {"val": _split(30, 0), "test": _split(23, 1), "empty": ([], None, None)}
SPEC = datasets.DatasetSpec(
    name="fake/three", task="multiclass", num_classes=3, class_names=NAMES,
    split_sizes={k: len(v[0]) for k, v in SPLITS.items()}, image_shape=(4, 4, 1), license="",
    variant="in-memory")


def _predict(train_state, images):
  del train_state
  return images[:, 0, :3, 0] / 256.0


@pytest.fixture()
def fake_data(monkeypatch):
  monkeypatch.setattr(datasets, "get_dataset",
                      lambda data_cfg, split, data_dir=None: (SPLITS[split][0], SPEC))


def _make(**evals):
  config = config_lib.base_config()
  config.input.update(dict(data=dict(name="fake"), pp="to_float", batch_size=4))
  config.evals = ml_collections.ConfigDict(evals)
  mesh = mesh_lib.make_mesh([("data", -1), ("fsdp", 1)])
  return evaluators.make_evaluators(config, None, SPEC, _predict, mesh)


def test_calibration_evaluator_end_to_end_writes_predictions_and_diagram(tmp_path, fake_data):
  evals, periodic = _make(calib=dict(name="calibration", split="test", fit_split="val",
                                     periodic=False))
  assert periodic == []
  out = dict(evals["calib"].run({}, predictions_path=tmp_path / "predictions" / "calib.csv"))
  _, labels, probs = SPLITS["test"]
  _, fit_labels, fit_probs = SPLITS["val"]
  expected = calibration.calibration_metrics(labels, probs, fit_labels, fit_probs)
  assert out.pop("num_examples") == 23
  assert list(out) == ["ece", "ece_adaptive", "nll", "brier", "temperature", "ece_ts",
                       "ece_adaptive_ts", "nll_ts", "brier_ts", "fit_nll", "fit_nll_ts"]
  for name, value in expected.items():
    assert out[name] == pytest.approx(value, abs=1e-12), name
  assert out["fit_nll_ts"] <= out["fit_nll"]
  png = tmp_path / "predictions" / "calib_reliability.png"
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  saved = predictions.read_predictions(tmp_path / "predictions" / "calib.csv")
  np.testing.assert_array_equal(saved.labels, labels)
  np.testing.assert_allclose(saved.probs, probs, atol=1e-12)
  assert not list(tmp_path.glob("predictions/.*"))  # No temporary file left behind.


def test_calibration_fit_split_is_checked_before_training(fake_data):
  with pytest.raises(ValueError, match=re.escape("Split 'empty' of fake/three has no examples "
                                                 "(config.evals.calib.fit_split)")):
    _make(calib=dict(name="calibration", split="test", fit_split="empty"))
  with pytest.raises(ValueError, match=r"config.evals.calib.num_bins=0 must be a positive int"):
    _make(calib=dict(name="calibration", split="test", num_bins=0))
