"""`make_evaluators` on an in-memory dataset with a fake model whose metrics are exactly known.

Each image's left column holds its score (x 255) and the rest its complement, so a left-right
flip changes the prediction: evaluation with a random op would not give the exact figures.
"""
import re
import warnings

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from data_pipelines import datasets
from fm_adapt import config as config_lib
from fm_adapt import evaluators
from fm_adapt.evaluators import metrics, predictions
from fm_adapt.train import mesh as mesh_lib

NAMES = ("normal", "pneumonia")


def _split(labels, seed):
  rng = np.random.default_rng(seed)
  scores = rng.integers(0, 256, len(labels)).astype(np.uint8)
  examples = []
  for label, score in zip(labels, scores):
    image = np.full((4, 4, 1), 255 - score, np.uint8)
    image[:, 0] = score
    examples.append({"image": image, "label": int(label)})
  probs = np.stack([1 - scores / 255.0, scores / 255.0], axis=-1)
  return examples, probs


SPLITS = {"val": _split([0, 1] * 5, 0),  # 10 examples: batches of 4 end in a padded one.
          "test": _split([1, 0, 1, 1, 0, 0, 1], 1),
          "one_class": _split([0] * 5, 2), "empty": ([], None)}
SPEC = datasets.DatasetSpec(
    name="fake/pneumonia", task="multiclass", num_classes=2, class_names=NAMES,
    split_sizes={k: len(v[0]) for k, v in SPLITS.items()}, image_shape=(4, 4, 1), license="",
    variant="in-memory")


def _predict(train_state, images):
  del train_state
  p1 = jnp.mean(images[:, :, 0, 0], axis=1) / 255.0  # The left column.
  return jnp.stack([1 - p1, p1], axis=-1)


@pytest.fixture(autouse=True)
def fake_data(monkeypatch):
  monkeypatch.setattr(datasets, "get_dataset",
                      lambda data_cfg, split, data_dir=None: (SPLITS[split][0], SPEC))


def _config(pp="to_float|flip_lr", **evals):
  config = config_lib.base_config()
  config.input.update(dict(data=dict(name="fake"), pp=pp, batch_size=4))
  config.evals = ml_collections.ConfigDict(evals or dict(
      val=dict(name="classification", split="val"),
      test=dict(name="classification", split="test", periodic=False)))
  return config


def _make(config):
  mesh = mesh_lib.make_mesh([("data", -1), ("fsdp", 1)])
  return evaluators.make_evaluators(config, None, SPEC, _predict, mesh)


def test_fake_model_metrics_exact_with_padded_batch_and_no_random_op(tmp_path):
  evals, periodic = _make(_config())  # The training pp flips; evaluation must not.
  assert periodic == ["val"] and set(evals) == {"val", "test"}
  for key in ("val", "test"):
    labels = np.array([e["label"] for e in SPLITS[key][0]])
    expected = metrics.classification_metrics(labels, SPLITS[key][1], "multiclass", NAMES)
    path = tmp_path / f"{key}.csv"
    out = dict(evals[key].run({}, predictions_path=path))
    assert out.pop("num_examples") == len(labels)
    assert out.keys() == expected.keys()
    for name, value in expected.items():
      assert out[name] == pytest.approx(value, abs=1e-6), name
    saved = predictions.read_predictions(path)
    np.testing.assert_array_equal(saved.labels, labels)
    np.testing.assert_allclose(saved.probs, SPLITS[key][1], atol=1e-6)


def test_eval_pp_is_the_training_pp_without_random_ops():
  config = _config("resize(4)|flip_lr|to_float|rot90|flip_ud(p=0.2)")
  assert evaluators.eval_pp(config, "val", {}) == "resize(4)|to_float"
  config.input.eval_pp = "to_float"
  assert evaluators.eval_pp(config, "val", {}) == "to_float"


@pytest.mark.parametrize("where", ["input", "entry"])
def test_explicit_eval_pp_with_a_random_op_is_an_error_naming_it(where):
  config = _config()
  if where == "input":
    config.input.eval_pp = "to_float|random_crop(4, pad=1)"
    key = "config.input.eval_pp"
  else:
    config.evals.val.pp = "flip_ud|to_float"
    key = "config.evals.val.pp"
  op = "random_crop(4, pad=1)" if where == "input" else "flip_ud"
  with pytest.raises(ValueError, match=re.escape(key) + ".* holds random op.*" + re.escape(
      repr([op]))):
    _make(config)


def test_derived_eval_pp_of_another_shape_is_an_error():
  with pytest.raises(ValueError, match=r"gives images of shape \(4, 4, 1\).*\(2, 2, 1\).*"
                                       "center_crop"):
    _make(_config("random_crop(2)|to_float"))


def test_old_word_type_says_it_is_now_name():
  config = _config(val=dict(type="classification", split="val"))
  with pytest.raises(ValueError, match=r"config.evals.val uses 'type', which is now 'name'"):
    _make(config)
  with pytest.raises(ValueError, match=r"Unknown evaluator name 'segmentation'.*classification"):
    _make(_config(val=dict(name="segmentation")))
  with pytest.raises(ValueError, match=r"Unknown keys \['splt'\]"):
    _make(_config(val=dict(name="classification", splt="val")))


def test_empty_split_fails_naming_the_key():
  with pytest.raises(ValueError, match=r"Split 'empty' of fake/pneumonia has no examples "
                                       r"\(config.evals.e.split\)"):
    _make(_config(e=dict(name="classification", split="empty")))
  with pytest.raises(ValueError, match=r"Split 'train' .* no examples \(config.input.data\); "
                                       r".*available: \['empty', 'one_class', 'test', 'val'\]"):
    evaluators.check_not_empty([], SPEC, "train", "config.input.data")


def test_one_class_split_warns_which_metrics_will_be_undefined():
  with pytest.warns(metrics.UndefinedMetricWarning,
                    match=r"Split 'one_class': every example has class 'normal'; no example has "
                          r"class 'pneumonia'.*null: mcc, auc, bal_acc, auc_normal, spec_normal"):
    _make(_config(oc=dict(name="classification", split="one_class")))
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    _make(_config())  # Both classes in every split: no warning.


@pytest.mark.parametrize("field,key", [("eval_batch_size", "config.input.eval_batch_size"),
                                       ("batch_size", "config.input.batch_size")])
def test_zero_batch_size_fails_before_any_evaluation(field, key):
  config = _config()
  config.input[field] = 0
  with pytest.raises(ValueError, match=rf"{key}=0 \(used by config.evals.(val|test)\) must be "
                                       "a positive int"):
    _make(config)
