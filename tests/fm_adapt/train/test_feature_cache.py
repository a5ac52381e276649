"""Linear probing on cached features gives the end-to-end frozen run, within float tolerance.

A tiny ViT (no batch statistics) and a tiny ResNet-18 with BatchNorm in inference mode
(`frozen_statistics`) train their heads end to end (`loop.train_and_evaluate`) and on cached
features (`linear_probe.train_and_evaluate_cached`) from the same config: the same results keys,
the same per-step training losses, the same best step, the same metrics and per-sample
predictions, and the same exported model (encoder bitwise, head within 1e-4), over more than one
epoch, so that the per-epoch shuffling and the padded last batch are replayed. Configs whose
head cannot train on cached features are refused with the reason.
"""
import json
import re
import signal

import jax
import numpy as np
import pytest

from fm_adapt import models
from fm_adapt import study
from fm_adapt.adapt import compose
from fm_adapt.evaluators import predictions as predictions_lib
from fm_adapt.train import feature_cache
from fm_adapt.train import interrupt
from fm_adapt.train import loop
from fm_adapt.train import workdir as workdir_lib
from fm_adapt.train import mesh as mesh_lib
from fm_adapt.train import model_fns

RTOL, ATOL = 1e-4, 1e-6
# 40 training examples in batches of 16: 3 steps per epoch, the last one padded; 7 steps run
# into a third epoch.
PROBE = dict(schedule=compose.preset("linear_probe"), total_steps=7, eval_every=3,
             checkpoint_every=3, lr=0.05, optax_name="adam")
RESNET = dict(model_name="resnet", model=dict(depth=18, width=4), frozen_statistics=True)


def _config(tiny_config, **overrides):
  """The tiny run (tests/fm_adapt/conftest.py) as a linear probe, with `overrides`."""
  config = tiny_config()
  study.apply_overrides(config, {**PROBE, **overrides})
  return config


def _cached(config, workdir):
  """`loop.train_and_evaluate` with the head trained on cached features (`config.probe`)."""
  config = config.copy_and_resolve_references()
  config.probe = "cached"
  return loop.train_and_evaluate(config, workdir)


def _losses(workdir):
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _stop_at_4(self, step):
  if step == 4:
    self.signum = signal.SIGTERM
  return step == 4


def _assert_same_run(want_dir, got_dir, want, got):
  assert sorted(want) == sorted(got)
  assert want["best_step"] == got["best_step"] and want["total_steps"] == got["total_steps"]
  assert want["trainable_params"] == got["trainable_params"]
  assert want["num_train_examples"] == got["num_train_examples"]
  assert want["train_class_counts"] == got["train_class_counts"]
  assert want["metrics"].keys() == got["metrics"].keys()
  for key, value in want["metrics"].items():
    if value is None:
      assert got["metrics"][key] is None, key
    else:
      np.testing.assert_allclose(got["metrics"][key], value, rtol=RTOL, atol=ATOL, err_msg=key)
  losses_want, losses_got = _losses(want_dir), _losses(got_dir)
  assert sorted(losses_want) == sorted(losses_got) == list(range(1, 8))
  np.testing.assert_allclose([losses_got[s] for s in sorted(losses_got)],
                             [losses_want[s] for s in sorted(losses_want)], rtol=RTOL, atol=ATOL)
  for name in ("val", "test"):
    p_want = predictions_lib.read_predictions(want_dir / "predictions" / f"{name}.csv")
    p_got = predictions_lib.read_predictions(got_dir / "predictions" / f"{name}.csv")
    np.testing.assert_array_equal(p_got.labels, p_want.labels)
    np.testing.assert_allclose(p_got.probs, p_want.probs, rtol=RTOL, atol=ATOL)
  with np.load(want["export"]) as a, np.load(got["export"]) as b:
    assert sorted(a.files) == sorted(b.files)
    for key in a.files:
      if "head" in key:
        np.testing.assert_allclose(b[key], a[key], rtol=RTOL, atol=ATOL, err_msg=key)
        assert np.abs(a[key]).max() > 0, key  # The head trained away from its zero init.
      else:
        np.testing.assert_array_equal(b[key], a[key], err_msg=key)


@pytest.mark.parametrize("model", ["vit", "resnet"])
def test_cached_probe_equals_end_to_end_run(tiny_config, tmp_path, model):
  """The ViT trains on a label_fraction subset (20 of the 40 examples: 2 steps per epoch), the
  ResNet on the whole split."""
  overrides = RESNET if model == "resnet" else {"input.label_fraction": 0.5}
  config = _config(tiny_config, **overrides)
  assert feature_cache.eligible(config) == (True, "")
  want = loop.train_and_evaluate(config, tmp_path / "end_to_end")
  got = _cached(config, tmp_path / "cached")
  _assert_same_run(tmp_path / "end_to_end", tmp_path / "cached", want, got)
  written = json.loads((tmp_path / "cached" / "results.json").read_text())
  assert written["metrics"] == got["metrics"] and written["export"] == got["export"]


@pytest.mark.parametrize("overrides, reason", [
    ({"input.pp": "value_range(-1,1)|flip_lr"}, r"random op\(s\) \['flip_lr'\]"),
    ({"schedule": compose.preset("full")}, r"parameters outside the head train \(embedding/"),
    ({"schedule": compose.preset("bitfit")}, r"outside the head train \(embedding/bias"),
    ({"model": dict(variant="mu/7", pool_type="gap", dropout=0.1)},
     r"dropout \{'dropout': 0.1\} and config.frozen_statistics is False"),
    ({**RESNET, "frozen_statistics": False},
     r"batch statistics \(batch_stats\) and config.frozen_statistics is False"),
    ({"adapt": [dict(name="vpt", mode="shallow", num_tokens=2)]}, r"config.adapt=\['vpt'\]"),
    ({"evals.test": dict(name="robustness", split="test")},
     r"config.evals.test uses evaluator 'robustness'"),
])
def test_ineligible_configs_are_refused_with_the_reason(tiny_config, tmp_path, overrides, reason):
  config = _config(tiny_config, **overrides)
  ok, why = feature_cache.eligible(config)
  assert not ok
  assert re.search(reason, why), why


def test_random_pp_is_refused_before_training(tiny_config, tmp_path):
  config = _config(tiny_config, **{"input.pp": "value_range(-1,1)|flip_lr(p=0.3)"})
  with pytest.raises(feature_cache.NotEligible, match=r"random op\(s\) \['flip_lr\(p=0.3\)'\].*"
                                                      r"config.input.pp='value_range\(-1,1\)'"):
    _cached(config, tmp_path / "w")
  assert not (tmp_path / "w" / "ckpt").exists() and not (tmp_path / "w" / "results.json").exists()


def _first_batches(dropout: float):
  """(apply_fn, state, image batch, feature batch) of a tiny ViT with `dropout`: the features
  of the batch's images computed in inference mode, as the cache computes them."""
  model = models.get_model("vit", num_classes=2, variant="mu/7", pool_type="gap", dropout=dropout)
  apply_fn = model_fns.make_apply_fn(model)
  variables = jax.jit(model_fns.init_variables_fn(model, (28, 28, 1)))(jax.random.key(0))
  state = {"params": {}, "frozen": variables["params"], "model_state": {}}
  rng = np.random.default_rng(0)
  batch = {"image": rng.normal(size=(8, 28, 28, 1)).astype(np.float32),
           "label": rng.integers(0, 2, 8).astype(np.int32), "mask": np.arange(8) < 6}
  features = feature_cache.make_features_fn(apply_fn)(state, batch["image"])
  return apply_fn, state, batch, dict(batch, image=np.asarray(features))


def test_first_batch_check_passes_for_a_deterministic_encoder():
  apply_fn, state, images, features = _first_batches(dropout=0.0)
  mesh = mesh_lib.make_mesh(None)
  feature_cache.check_first_batch(apply_fn, state, jax.random.key(1), images, features, mesh)


@pytest.mark.parametrize("change, message", [
    ("dropout", "the pre-logits differ"),
    ("features", "the pre-logits differ"),
    ("labels", "other labels than the image loader's"),
])
def test_first_batch_check_catches_what_the_cache_would_get_wrong(change, message):
  """Training-mode dropout (which the static rules also refuse), features of other images, and
  another order all fail the check of the first training batch."""
  apply_fn, state, images, features = _first_batches(dropout=0.5 if change == "dropout" else 0.0)
  if change == "features":
    features = dict(features, image=features["image"][::-1])
  if change == "labels":
    features = dict(features, label=1 - features["label"])
  with pytest.raises(feature_cache.NotEligible, match=message):
    feature_cache.check_first_batch(apply_fn, state, jax.random.key(1), images, features,
                                    mesh_lib.make_mesh(None))


def test_interrupted_cached_probe_resumes_to_the_same_result(tiny_config, tmp_path, monkeypatch):
  """A cached probe stopped after its step-4 checkpoint resumes (train state and feature-loader
  position) and ends where an uninterrupted one does."""
  config = _config(tiny_config)
  want = _cached(config, tmp_path / "once")

  with monkeypatch.context() as patch:
    patch.setattr(interrupt.StopOnSignal, "requested", _stop_at_4)
    with pytest.raises(interrupt.Stopped):
      _cached(config, tmp_path / "twice")
  assert not (tmp_path / "twice" / "results.json").exists()
  got = _cached(config, tmp_path / "twice")
  assert got["metrics"] == want["metrics"] and got["best_step"] == want["best_step"]
  assert _losses(tmp_path / "twice") == _losses(tmp_path / "once")
  with np.load(want["export"]) as a, np.load(got["export"]) as b:
    for key in a.files:
      np.testing.assert_array_equal(b[key], a[key], err_msg=key)


def test_end_to_end_workdir_does_not_resume_on_cached_features(tiny_config, tmp_path,
                                                               monkeypatch):
  """The two modes' loaders read different sources, so a workdir trained in one mode does not
  resume in the other: config.probe differs, and nothing is moved or overwritten."""
  config, workdir = _config(tiny_config), tmp_path / "w"
  with monkeypatch.context() as patch:
    patch.setattr(interrupt.StopOnSignal, "requested", _stop_at_4)
    with pytest.raises(interrupt.Stopped):
      loop.train_and_evaluate(config, workdir)
  kept = sorted(p.name for p in (workdir / "ckpt").iterdir())
  with pytest.raises(workdir_lib.ConfigChanged, match='probe: stored "end_to_end", now "cached"'):
    _cached(config, workdir)
  assert sorted(p.name for p in (workdir / "ckpt").iterdir()) == kept
  assert not (workdir / "corrupt").exists() and not (workdir / "results.json").exists()
