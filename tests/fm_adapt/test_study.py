"""End-to-end study on the synthetic data of tests/fm_adapt/conftest.py: a base run, an adapted
run started from its export, skip and table; command-line overrides for every run, and each
run's workdir lock."""
import json
import pathlib
import re
import subprocess
import sys

import flax.traverse_util
import numpy as np
import pytest

from fm_adapt import study
from fm_adapt.train import workdir as workdir_lib
from fm_adapt.weights import native

REPO = pathlib.Path(__file__).resolve().parents[2]

_BASE_AND_LORA = """
    def sweep(add, arg=None):
      add(name="base")
      add(name="lora", model_init="run:base", model_load=dict(dont_load=["head/.*"]),
          adapt=[dict(name="lora", rank=2, targets=".*attn/(query|value)/kernel")])
      add(name="lora", seed=1, model_init="run:base", model_load=dict(dont_load=["head/.*"]),
          adapt=[dict(name="lora", rank=2, targets=".*attn/(query|value)/kernel")])
"""


def _kernels(params: dict) -> dict[str, np.ndarray]:
  """'/'-joined path -> array of every attention query/value kernel."""
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  return {k: np.asarray(v) for k, v in flat.items()
          if re.fullmatch(r".*attn/(query|value)/kernel", k)}


def test_study_runs_exports_adapts_and_tabulates(tmp_path, tiny_experiment):
  exp = tiny_experiment(_BASE_AND_LORA)
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
  base_export = native.load_native(tmp_path / "study" / "base-s0" / "export" / "model.npz")
  assert "lora" not in exported["params"]
  merged, frozen = _kernels(exported["params"]), _kernels(base_export["params"])
  assert merged and merged.keys() == frozen.keys()
  assert all(not np.array_equal(merged[k], frozen[k]) for k in merged)
  assert "| lora | 2 |" in markdown and "| base | 1 |" in markdown
  for suffix in ("md", "csv", "tex"):
    assert (tmp_path / "study" / f"results.{suffix}").exists()

  calls = []
  study.run_study(str(exp), tmp_path / "study", train=lambda *a: calls.append(a))
  assert calls == []  # Every run had finished: nothing is trained again.


def test_run_reference_needs_an_earlier_run(tmp_path, tiny_experiment):
  exp = tiny_experiment(_BASE_AND_LORA.replace('add(name="base")', "pass"))
  with pytest.raises(FileNotFoundError, match="has no export yet"):
    study.run_study(str(exp), tmp_path / "study")


def test_override_of_unknown_parent_is_clear():
  import ml_collections
  config = ml_collections.ConfigDict(dict(input=dict(pp="x")))
  with pytest.raises(KeyError, match="no 'model'"):
    study.apply_overrides(config, {"model.variant": "S/16"})
  study.apply_overrides(config, {"input.pp": "y", "schedule": [(".*", None)]})
  assert config.input.pp == "y" and config.schedule[0][0] == ".*"


_TWO_RUNS = """
    def sweep(add, arg=None):
      add(name="a")
      add(name="b", lr=0.01)
"""


def test_command_line_overrides_apply_to_every_run(tmp_path, tiny_experiment, tiny_env):
  exp, workdir = tiny_experiment(_TWO_RUNS), tmp_path / "study"
  out = subprocess.run(
      [sys.executable, "-m", "fm_adapt.study", "--config", str(exp), "--workdir", str(workdir),
       "--config.total_steps=2", "--config.description=cli"],
      cwd=REPO, env=tiny_env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  for run, lr in (("a-s0", 1e-3), ("b-s0", 0.01)):
    config = json.loads((workdir / run / "config.json").read_text())
    assert (config["total_steps"], config["description"], config["lr"]) == (2, "cli", lr)
    assert json.loads((workdir / run / "results.json").read_text())["total_steps"] == 2
  # Finished runs are skipped with the same overrides, and refused with a changed config.
  never = lambda *a: pytest.fail("a finished run was trained again")
  study.run_study(str(exp), workdir, train=never, overrides={"total_steps": 2, "description": "cli"})
  with pytest.raises(workdir_lib.ConfigChanged, match="total_steps: stored 2, now 4"):
    study.run_study(str(exp), workdir, train=never, overrides={"description": "cli"})


def test_override_of_a_key_the_sweep_sets_is_an_error(tmp_path, tiny_experiment):
  exp = tiny_experiment(_TWO_RUNS)
  never = lambda *a: pytest.fail("trained")
  with pytest.raises(ValueError, match=r"--config.lr overrides \['lr'\] that the sweep sets for "
                                       "run b-s0"):
    study.run_study(str(exp), tmp_path / "s", train=never, overrides={"lr": 0.1})
  with pytest.raises(ValueError, match=r"--config.seed overrides \['seed'\]"):
    study.run_study(str(exp), tmp_path / "s", train=never, overrides={"seed": 1})


_FAKE = {"metrics": {"test/auc": 0.5, "test/acc": 0.5, "val/auc": 0.5}, "trainable_params": 1,
         "data": {"variant": "tiny"}}
_HOLD = ("import sys, time\nfrom fm_adapt.train import workdir\n"
         "with workdir.lock(sys.argv[1]):\n  print('locked', flush=True)\n  time.sleep(600)\n")


def test_study_takes_each_runs_lock(tmp_path, tiny_experiment):
  exp = tiny_experiment(_TWO_RUNS)
  trained = []
  holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path / "s" / "b-s0")],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(workdir_lib.WorkdirBusy, match=f"in use by process {holder.pid} "):
      study.run_study(str(exp), tmp_path / "s", train=lambda *a: (trained.append(a), _FAKE)[1])
  finally:
    holder.kill()
    holder.wait()
  assert [a[1].name for a in trained] == ["a-s0"]  # Run b was left to the process holding it.
