"""MIM pretraining stopped in the middle resumes exactly: the masks and the data order of the
steps after the stop are those of the uninterrupted run, so the final state is bitwise equal.

MAE on the synthetic data of tests/fm_adapt/conftest.py (ViT-mu/7, 4 steps): its random masks
are drawn from the run's key and the step, its encoder gathers the visible patches.
"""
import json

import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from fm_adapt.train import interrupt
from fm_adapt.train import loop


def _mae_config(tiny_config, tiny_data):
  config = tiny_config(checkpoint_every=2, keep_ckpts=5)
  config.model_name = "vit_mim"
  config.loss = dict(name="mae", mask=dict(name="random", ratio=0.75))
  config.evals = ml_collections.ConfigDict({"recon": dict(
      name="reconstruction", split="val", num_images=2,
      data=dict(name="npz", path=tiny_data["tiny"], tfds_dir=tiny_data["root"] + "/tfds"))})
  config.best_metric = None
  return config


def _state(workdir, step: int) -> dict:
  tree = ocp.StandardCheckpointer().restore(workdir / "ckpt" / str(step) / "state")
  return ocp.tree.to_flat_dict({k: tree[k] for k in ("params", "opt", "step")})


def test_mae_pretraining_stopped_mid_run_resumes_bitwise(tiny_config, tiny_data, tmp_path,
                                                         monkeypatch):
  stop_after = 3  # After the periodic save of step 2, before that of step 4.
  config = _mae_config(tiny_config, tiny_data)
  reference = loop.train_and_evaluate(config, tmp_path / "reference")
  workdir = tmp_path / "stopped"
  with monkeypatch.context() as patch:
    patch.setattr(interrupt.StopOnSignal, "requested", lambda self, step: step == stop_after)
    with pytest.raises(interrupt.Stopped):
      loop.train_and_evaluate(config, workdir)
  resumed = loop.train_and_evaluate(config, workdir)
  assert resumed["resumed_from_step"] == stop_after
  want, got = _state(tmp_path / "reference", 4), _state(workdir, 4)
  assert want.keys() == got.keys()
  for key in want:
    np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(want[key]), err_msg=str(key))
  assert resumed["metrics"]["recon/loss"] == reference["metrics"]["recon/loss"]
  losses = [[row["train/loss"] for row in map(json.loads, (w / "metrics.jsonl").read_text()
                                               .splitlines()) if "train/loss" in row]
            for w in (tmp_path / "reference", workdir)]
  assert losses[0] == losses[1] and len(losses[0]) == 4
