"""The 'robustness' evaluator on in-memory splits with a fake model whose metrics are exact.

Each image's left column holds its score (x / 255) and the rest its complement. A fake corruption
registry (two corruptions whose effect on the score is known) gives the expected figures of every
(corruption, severity); one test runs the real `data_pipelines.corruptions`.
"""
import re

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from data_pipelines import corruptions, datasets
from data_pipelines import pp as pp_lib
from fm_adapt import config as config_lib
from fm_adapt import evaluators
from fm_adapt.evaluators import metrics, robustness
from fm_adapt.train import mesh as mesh_lib

NAMES = ("normal", "pneumonia")
LABELS = np.array([1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 0])  # 11 examples: batches of 4 end padded.
SCORES = np.random.default_rng(0).integers(0, 256, len(LABELS)).astype(np.uint8)


def _image(score: int, size: int = 4) -> np.ndarray:
  image = np.full((size, size, 1), 255 - score, np.uint8)
  image[:, 0] = score
  return image


SPLITS = {"test": [{"image": _image(s), "label": int(y)} for s, y in zip(SCORES, LABELS)],
          "big": [{"image": _image(s, 28), "label": int(y)} for s, y in zip(SCORES, LABELS)]}
SPEC = datasets.DatasetSpec(
    name="fake/pneumonia", task="multiclass", num_classes=2, class_names=NAMES,
    split_sizes={k: len(v) for k, v in SPLITS.items()}, image_shape=(4, 4, 1), license="",
    variant="in-memory")

# The fake corruptions, as functions of the score x (the left column) and (severity, seed).
FAKE = {"darken": lambda x, s, seed: np.maximum(x.astype(int) - 20 * s - seed, 0),
        "invert": lambda x, s, seed: 255 - x.astype(int) if s >= 3 else x.astype(int)}


def _fake_corrupt(name, severity, seed=0, modality=None):
  assert modality in ("chest_xray", "fundus")

  def op(example, rng):
    del rng
    return {**example, "image": FAKE[name](example["image"], severity, seed).astype(np.uint8)}

  return op


@pytest.fixture()
def fake_corruptions(monkeypatch):
  monkeypatch.setattr(corruptions, "MODALITIES",
                      {"chest_xray": ("darken", "invert"), "fundus": ("darken",)})
  monkeypatch.setattr(corruptions, "MODALITY_OF_FLAG",
                      {"pneumoniamnist": "chest_xray", "retinamnist": "fundus"})
  monkeypatch.setitem(pp_lib.PP_OPS, "corrupt", _fake_corrupt)
  monkeypatch.setitem(pp_lib.RANDOM_OPS, "corrupt", False)


@pytest.fixture(autouse=True)
def fake_data(monkeypatch):
  monkeypatch.setattr(datasets, "get_dataset",
                      lambda data_cfg, split, data_dir=None: (SPLITS[split], SPEC))


def _counted_predict():
  """A fake model reading the left column, and how often JAX traced it."""
  traces = []

  def predict(train_state, images):
    del train_state
    traces.append(images.shape)
    p1 = jnp.mean(images[:, :, 0, 0], axis=1) / 255.0
    return jnp.stack([1 - p1, p1], axis=-1)

  return predict, traces


def _make(data=None, predict=None, **evals):
  config = config_lib.base_config()
  config.input.update(dict(data=data or dict(name="medmnist", flag="pneumoniamnist"),
                           pp="to_float", batch_size=4))
  config.evals = ml_collections.ConfigDict(evals)
  mesh = mesh_lib.make_mesh([("data", -1), ("fsdp", 1)])
  return evaluators.make_evaluators(config, None, SPEC, predict or _counted_predict()[0], mesh)


def _expected(scores: np.ndarray) -> dict:
  probs = np.stack([1 - scores / 255.0, scores / 255.0], axis=-1)
  out = metrics.classification_metrics(LABELS, probs, "multiclass", NAMES)
  return {m: out[m] for m in ("bal_acc", "acc", "auc")}


def _names(corruptions, severities):
  names = [f"clean/{m}" for m in robustness.METRICS]
  for c in corruptions:
    names += [f"{c}/{s}/{m}" for s in severities for m in robustness.METRICS]
    names += [f"{c}/mean/{m}" for m in robustness.METRICS]
  return names + [f"corrupted_mean/{m}" for m in robustness.METRICS]


def test_every_corruption_and_severity_exactly_and_one_trace(fake_corruptions):
  predict, traces = _counted_predict()
  evals, periodic = _make(predict=predict, test=dict(name="classification", split="test"),
                          robust=dict(name="robustness", split="test", periodic=False))
  assert periodic == ["test"] and evals["robust"].modality == "chest_xray"
  out = dict(evals["robust"].run({}))
  assert list(out) == _names(("darken", "invert"), (1, 2, 3, 4, 5))
  clean = dict(evals["test"].run({}))
  for m in robustness.METRICS:
    assert out[f"clean/{m}"] == clean[m]
  assert len(traces) == 1, traces  # 11 passes over the split, one trace of the model.
  every = {m: [] for m in robustness.METRICS}
  for c, fn in FAKE.items():
    for s in range(1, 6):
      for m, value in _expected(fn(SCORES, s, 0)).items():
        assert out[f"{c}/{s}/{m}"] == pytest.approx(value, abs=1e-6), (c, s, m)
        every[m].append(value)
    for m in robustness.METRICS:
      assert out[f"{c}/mean/{m}"] == pytest.approx(
          np.mean([out[f"{c}/{s}/{m}"] for s in range(1, 6)]), abs=1e-12)
  for m in robustness.METRICS:
    assert out[f"corrupted_mean/{m}"] == pytest.approx(np.mean(every[m]), abs=1e-6)
  assert out["invert/5/auc"] == pytest.approx(1 - out["clean/auc"], abs=1e-6)  # Figures differ.


def test_options_pick_corruptions_severities_seed_and_modality(fake_corruptions):
  evals, _ = _make(robust=dict(name="robustness", split="test", corruptions=["darken"],
                               severities=[2, 5], seed=7))
  out = dict(evals["robust"].run({}))
  assert list(out) == _names(["darken"], [2, 5])
  for s in (2, 5):
    for m, value in _expected(FAKE["darken"](SCORES, s, 7)).items():
      assert out[f"darken/{s}/{m}"] == pytest.approx(value, abs=1e-6)
  evals, _ = _make(data=dict(name="npz", path="x.npz"),
                   robust=dict(name="robustness", split="test", modality="fundus"))
  assert evals["robust"].corruptions == ("darken",)


def test_bad_options_are_errors_naming_the_valid_ones(fake_corruptions):
  with pytest.raises(ValueError, match=re.escape(
      "config.evals.r.corruptions=['darken', 'blur']: give distinct names of the 'chest_xray' "
      "corruptions ['darken', 'invert'] (unknown: ['blur'])")):
    _make(r=dict(name="robustness", split="test", corruptions=["darken", "blur"]))
  with pytest.raises(ValueError, match=re.escape(
      "config.evals.r.modality='mri' is unknown; valid: ['chest_xray', 'fundus']")):
    _make(r=dict(name="robustness", split="test", modality="mri"))
  with pytest.raises(ValueError, match=r"no imaging modality known for the data .*'npz'.*"
                                       r"set config.evals.r.modality to one of"):
    _make(data=dict(name="npz", path="x.npz"), r=dict(name="robustness", split="test"))
  with pytest.raises(ValueError, match=r"config.evals.r.severities=\[0, 6\] must be distinct"):
    _make(r=dict(name="robustness", split="test", severities=[0, 6]))
  with pytest.raises(ValueError, match=r"config.evals.r.seed=-1 must be an int >= 0"):
    _make(r=dict(name="robustness", split="test", seed=-1))
  with pytest.raises(ValueError, match=r"Unknown keys \['severity'\] in config.evals.r \(a "
                                       r"'robustness' evaluator; options: modality: .*"
                                       r"valid keys: \[.*'severities', 'seed'\]"):
    _make(r=dict(name="robustness", split="test", severity=[1]))


def test_real_corruptions_on_a_chest_xray_split():
  evals, _ = _make(test=dict(name="classification", split="big", periodic=False),
                   robust=dict(name="robustness", split="big", severities=[1, 5],
                               periodic=False))
  names = corruptions.MODALITIES["chest_xray"]
  assert evals["robust"].corruptions == names
  out = dict(evals["robust"].run({}))
  assert list(out) == _names(names, [1, 5])
  clean = dict(evals["test"].run({}))
  assert all(out[f"clean/{m}"] == clean[m] for m in robustness.METRICS)
  assert all(v is not None and 0 <= v <= 1 for v in out.values())
  assert any(out[f"{c}/5/auc"] != clean["auc"] for c in names)  # The corruptions do something.
