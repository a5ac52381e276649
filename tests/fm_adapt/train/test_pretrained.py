"""Starting runs from pretrained checkpoints: overlay rules, and a run from the real
EfficientNet-Lite0 weights on the synthetic data of tests/fm_adapt/conftest.py."""
import json

import jax
import numpy as np
import pytest

from fm_adapt import config as config_lib
from fm_adapt.train import loop, pretrained
from fm_adapt.weights import locate, native


def test_overlay_keeps_dont_load_and_names_shape_mismatch():
  init = {"params": {"body": {"kernel": np.zeros((2, 2))}, "head": {"kernel": np.zeros((2, 3))}}}
  loaded = {"params": {"body": {"kernel": np.ones((2, 2))}, "head": {"kernel": np.ones((2, 9))}}}
  out = pretrained.overlay(init, loaded, ["[^/]+/(?:head/.*)"], "ckpt")
  np.testing.assert_array_equal(out["params"]["body"]["kernel"], np.ones((2, 2)))
  np.testing.assert_array_equal(out["params"]["head"]["kernel"], np.zeros((2, 3)))
  with pytest.raises(ValueError, match=r"params/head/kernel: checkpoint \(2, 9\) vs model \(2, 3\)"):
    pretrained.overlay(init, loaded, [], "ckpt")
  with pytest.raises(ValueError, match=r"Missing: \['params/extra'\]"):
    pretrained.overlay(dict(init, params=dict(init["params"], extra=np.zeros(1))), loaded,
                       ["[^/]+/(?:head/.*)"], "ckpt")


def _native_export(tmp_path):
  variables = {"params": {"body": {"kernel": np.ones((2, 2), np.float32)},
                          "head": {"kernel": np.ones((2, 3), np.float32)}},
               "batch_stats": {"bn": {"mean": np.ones(2, np.float32)}}}
  init = jax.tree.map(np.zeros_like, variables)
  return native.save_native(tmp_path / "export.npz", variables), init


def test_model_load_picks_the_loader_by_name(tmp_path):
  path, init = _native_export(tmp_path)
  out = pretrained.load_pretrained(init, path, dict(name="fm_adapt", dont_load=["head/.*"]), [])
  np.testing.assert_array_equal(out["params"]["body"]["kernel"], np.ones((2, 2)))
  np.testing.assert_array_equal(out["params"]["head"]["kernel"], np.zeros((2, 3)))
  with pytest.raises(ValueError, match=r"the word is now 'name', not 'kind'\): write "
                                       r"model_load.name='fm_adapt'"):
    pretrained.load_pretrained(init, path, dict(kind="fm_adapt"), [])
  with pytest.raises(ValueError, match=r"Unknown config.model_load.name 'timmm'; valid: \["):
    pretrained.load_pretrained(init, path, dict(name="timmm"), [])


class _ShardedElsewhere:
  """A leaf whose value this process cannot read (a jax.Array with shards on other hosts)."""

  def __init__(self, shape, dtype):
    self.shape, self.dtype = shape, np.dtype(dtype)

  def __array__(self, *args, **kwargs):
    raise RuntimeError("spans non-addressable devices")


def test_load_reads_only_shapes_and_dtypes_and_returns_kept_leaves_as_they_are(tmp_path):
  path, init = _native_export(tmp_path)
  init = jax.tree.map(lambda x: _ShardedElsewhere(x.shape, x.dtype), init)
  out = pretrained.load_pretrained(init, path, dict(name="fm_adapt", dont_load=["head/.*"]), [])
  assert out["params"]["head"]["kernel"] is init["params"]["head"]["kernel"]
  np.testing.assert_array_equal(out["params"]["body"]["kernel"], np.ones((2, 2), np.float32))
  np.testing.assert_array_equal(out["batch_stats"]["bn"]["mean"], np.ones(2, np.float32))


def test_dont_load_regex_that_matches_nothing_is_an_error(tmp_path):
  """Every loader, including those returning full variables, checks each dont_load regex."""
  path, init = _native_export(tmp_path)
  with pytest.raises(ValueError, match=r"dont_load regex 'heads/.\*' matches no parameter.*"
                                       r"Closest paths: \['head/kernel'"):
    pretrained.load_pretrained(init, path, dict(dont_load=["bn/.*", "heads/.*"]), [])


def test_missing_checkpoint_file_is_clear(monkeypatch):
  monkeypatch.delenv("FM_ADAPT_WEIGHTS_DIR", raising=False)
  with pytest.raises(FileNotFoundError, match="FM_ADAPT_WEIGHTS_DIR"):
    locate.resolve_path("no_such_weights.npz")


@pytest.mark.real_data("the real EfficientNet-Lite0 ImageNet weights (sha256 ce66bb4a...) start a "
                       "LoRA run: their loader is detected from the file, the backbone is frozen "
                       "and the ImageNet head replaced")
def test_efficientnet_lite0_lora_run_from_real_weights(tmp_path, shared_weights_dir, tiny_data,
                                                       monkeypatch):
  monkeypatch.setenv("FM_ADAPT_WEIGHTS_DIR", str(shared_weights_dir))
  config = config_lib.base_config()
  config.model_name = "efficientnet"
  config.model = dict(dropout=0.2)
  config.model_init = "efficientnet-lite0-57934424.npz"
  config.model_load = dict(dont_load=["head/.*"])
  config.adapt = [dict(name="lora", rank=4, targets=r"block_1[45]/(expand|project)_conv/kernel")]
  config.frozen_statistics = True
  config.input.update(dict(data=dict(name="npz", path=tiny_data["tiny"],
                                     tfds_dir=f"{tiny_data['root']}/tfds"),
                           pp="resize(32)|gray_to_rgb|value_range(-1,1)", batch_size=8,
                           eval_batch_size=32))
  config.data_dir = tiny_data["root"]
  config.evals.test = dict(name="classification", split="test")
  config.best_metric = "test/auc"
  config.total_steps = 2
  config.progress = False
  results = loop.train_and_evaluate(config, tmp_path / "w")
  counts = {r["module"]: r for r in json.loads((tmp_path / "w" / "param_counts.json").read_text())}
  # Trainable: the LoRA factors and the new 2-class head; the pretrained backbone is frozen.
  # block_14: 192->1152->192, block_15: 192->1152->320; rank 4: 4 * (in + out) per kernel.
  assert counts["lora"]["trainable"] == 4 * (3 * (192 + 1152) + (1152 + 320))
  assert counts["head"]["trainable"] == 1280 * 2 + 2 and counts["stem"]["trainable"] == 0
  assert results["base_checkpoint"]["sha256"].startswith("ce66bb4a")
  assert results["metrics"]["test/num_examples"] == tiny_data["sizes"]["test"] == 30
