"""The evaluator registry's per-evaluator options and `EvalData.batches_for`."""
import re

import ml_collections
import numpy as np
import pytest

from data_pipelines import datasets
from fm_adapt import config as config_lib
from fm_adapt import evaluators
from fm_adapt.evaluators import classification
from fm_adapt.train import mesh as mesh_lib

SPLITS = {
    "val": [{"image": np.full((4, 4, 1), i, np.uint8), "label": i % 2} for i in range(10)],
    "test": [{"image": np.full((4, 4, 1), 100 + i, np.uint8), "label": i % 2} for i in range(7)],
    "empty": []}
SPEC = datasets.DatasetSpec(
    name="fake/two", task="multiclass", num_classes=2, class_names=("a", "b"),
    split_sizes={k: len(v) for k, v in SPLITS.items()}, image_shape=(4, 4, 1), license="",
    variant="in-memory")


class ProbeEvaluator:
  """Takes one option and keeps what the registry gives it."""

  OPTIONS = {"other_split": "a second split to load"}

  def __init__(self, predict_fn, batches, put_batch, task, class_names=None, split="?", *,
               data, other_split="val"):
    self.batches, self.data, self.other_split, self.split = batches, data, other_split, split


@pytest.fixture(autouse=True)
def fake_data(monkeypatch):
  monkeypatch.setattr(datasets, "get_dataset",
                      lambda data_cfg, split, data_dir=None: (SPLITS[split], SPEC))
  monkeypatch.setitem(evaluators.EVALUATORS, "probe", ProbeEvaluator)


def _make(**evals):
  config = config_lib.base_config()
  config.input.update(dict(data=dict(name="fake", flag="x"), pp="to_float|flip_lr",
                           batch_size=4))
  config.evals = ml_collections.ConfigDict(evals)
  mesh = mesh_lib.make_mesh([("data", -1), ("fsdp", 1)])
  return evaluators.make_evaluators(config, None, SPEC, lambda s, x: x, mesh)


def test_unknown_option_is_an_error_naming_the_evaluators_valid_keys():
  with pytest.raises(ValueError, match=re.escape(
      "Unknown keys ['fit_splt'] in config.evals.c (a 'calibration' evaluator; options: "
      "fit_split: the split that fits the temperature (default 'val'); num_bins: ")) as error:
    _make(c=dict(name="calibration", split="test", fit_splt="val"))
  assert str(error.value).endswith("valid keys: ['name', 'split', 'pp', 'batch_size', "
                                   "'periodic', 'fit_split', 'num_bins']")
  with pytest.raises(ValueError, match=re.escape(
      "Unknown keys ['fit_split'] in config.evals.t (a 'classification' evaluator, which takes "
      "no options); valid keys: ['name', 'split', 'pp', 'batch_size', 'periodic']")):
    _make(t=dict(name="classification", split="test", fit_split="val"))
  assert evaluators.options_of("classification") == {}
  assert set(evaluators.options_of("robustness")) == {"modality", "corruptions", "severities",
                                                      "seed"}


def test_an_evaluator_with_options_gets_them_and_loads_other_splits():
  evals, periodic = _make(p=dict(name="probe", split="test", other_split="val", batch_size=2),
                          t=dict(name="classification", split="test"))
  probe = evals["p"]
  assert isinstance(evals["t"], classification.Evaluator) and periodic == ["p", "t"]
  assert probe.other_split == "val" and probe.split == "test"
  assert probe.data.key == "p" and probe.data.pp == "to_float"  # The training pp's random op gone.
  assert probe.data.data_cfg == {"name": "fake", "flag": "x"}
  own = list(probe.batches())
  assert [len(b["image"]) for b in own] == [2, 2, 2, 2] and own[-1]["mask"].tolist() == [1, 0]
  other = list(probe.data.batches_for("val", "to_float", "config.evals.p.other_split")())
  assert [len(b["image"]) for b in other] == [2] * 5  # The entry's batch size, one pass.
  images = np.concatenate([b["image"] for b in other])[:, 0, 0, 0]
  np.testing.assert_array_equal(images, np.arange(10))  # In order, float from to_float.
  assert images.dtype == np.float32


def test_batches_for_checks_split_pp_and_shape():
  evals, _ = _make(p=dict(name="probe", split="test"))
  batches_for = evals["p"].data.batches_for
  with pytest.raises(ValueError, match=re.escape("Split 'empty' of fake/two has no examples "
                                                 "(config.evals.p.other_split)")):
    batches_for("empty", "to_float", "config.evals.p.other_split")
  with pytest.raises(ValueError, match=r"The pp of config.evals.p='flip_ud\|to_float' holds "
                                       r"random op\(s\) \['flip_ud'\]"):
    batches_for("val", "flip_ud|to_float", "config.evals.p.other_split")
  with pytest.raises(ValueError, match=r"gives images of shape \(2, 2, 1\)"):
    batches_for("val", "center_crop(2)|to_float", "config.evals.p.other_split")
