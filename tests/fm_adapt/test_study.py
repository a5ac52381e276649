"""End-to-end study: a base run, an adapted run started from its export, skip and table."""
import json
import textwrap

import pytest

from fm_adapt import study
from fm_adapt.weights import native

EXPERIMENT = textwrap.dedent("""
    from fm_adapt import config as config_lib

    def get_config(arg=None):
      config = config_lib.base_config()
      config.model = dict(variant="mu/7", pool_type="gap")
      config.input.update(dict(data=dict(name="npz", path="medmnist_derived/pneumoniamnist_subset_a.npz"),
                               pp="value_range(-1,1)", batch_size=16, eval_batch_size=256))
      config.evals.val = dict(name="classification", split="val")
      config.evals.test = dict(name="classification", split="test", periodic=False)
      config.total_steps = 2
      config.progress = False
      return config

    def sweep(add, arg=None):
      add(name="base")
      add(name="lora", model_init="run:base", model_load=dict(dont_load=["head/.*"]),
          adapt=[dict(kind="lora", rank=2, targets=".*attn/(query|value)/kernel")])
      add(name="lora", seed=1, model_init="run:base", model_load=dict(dont_load=["head/.*"]),
          adapt=[dict(kind="lora", rank=2, targets=".*attn/(query|value)/kernel")])
""")


def test_study_runs_exports_adapts_and_tabulates(tmp_path, shared_data_dir, monkeypatch):
  monkeypatch.setenv("FM_ADAPT_DATA_DIR", str(shared_data_dir))
  exp = tmp_path / "exp.py"
  exp.write_text(EXPERIMENT)
  markdown = study.run_study(str(exp), tmp_path / "study")
  base = json.loads((tmp_path / "study" / "base-s0" / "results.json").read_text())
  lora = json.loads((tmp_path / "study" / "lora-s0" / "results.json").read_text())
  # The adapted run trains only the LoRA factors and the head.
  assert lora["trainable_params"] < base["trainable_params"]
  assert lora["base_checkpoint"]["path"].endswith("base-s0/export/model.npz")
  assert len(lora["base_checkpoint"]["sha256"]) == 64
  # The adapted checkpoint holds no frozen copy of the base.
  saved = list((tmp_path / "study" / "lora-s0" / "ckpt").glob("*/state"))
  assert saved and not any((p / "frozen").exists() for p in saved)
  # Its export has LoRA merged: plain ViT keys only, and the frozen kernels changed by merging.
  exported = native.load_native(tmp_path / "study" / "lora-s0" / "export" / "model.npz")
  assert "lora" not in exported["params"]
  assert "| lora | 2 |" in markdown and "| base | 1 |" in markdown
  for suffix in ("md", "csv", "tex"):
    assert (tmp_path / "study" / f"results.{suffix}").exists()

  calls = []
  study.run_study(str(exp), tmp_path / "study", train=lambda *a: calls.append(a))
  assert calls == []  # Every run had finished: nothing is trained again.


def test_run_reference_needs_an_earlier_run(tmp_path):
  exp = tmp_path / "exp.py"
  exp.write_text(EXPERIMENT.replace('add(name="base")', "pass"))
  with pytest.raises(FileNotFoundError, match="has no export yet"):
    study.run_study(str(exp), tmp_path / "study")


def test_override_of_unknown_parent_is_clear():
  import ml_collections
  config = ml_collections.ConfigDict(dict(input=dict(pp="x")))
  with pytest.raises(KeyError, match="no 'model'"):
    study.apply_overrides(config, {"model.variant": "S/16"})
  study.apply_overrides(config, {"input.pp": "y", "schedule": [(".*", None)]})
  assert config.input.pp == "y" and config.schedule[0][0] == ".*"
