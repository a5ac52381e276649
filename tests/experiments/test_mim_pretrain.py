"""experiments/mim_pretrain.py: the config of each objective, mask, size and variant, argument
errors, and (with the real MedMNIST files) a runlocal pretraining whose pictures are written
and whose export loads into the classification ViT."""
import json
import pathlib

import jax
import numpy as np
import pytest

from fm_adapt import study
from fm_adapt import models
from fm_adapt.train import loop
from fm_adapt.train import model_fns
from fm_adapt.weights import mim_encoder

FILE = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "mim_pretrain.py"


def _load():
  return study.load_experiment(str(FILE))[0]  # A fresh import: nothing cached.


def test_mae_defaults_follow_the_mae_recipe():
  config = _load().get_config("objective=mae,steps=1000,batch=128")
  assert config.model_name == "vit_mim"
  assert dict(config.model) == {"variant": "Ti/4", "pool_type": "gap"}
  assert config.loss.to_dict() == {"name": "mae", "mask": {"name": "random", "ratio": 0.75}}
  assert config.lr == pytest.approx(1.5e-4 * 128 / 256)
  assert (config.optax_name, config.optax.b2, config.wd) == ("adamw", 0.95, 0.05)
  assert config.schedule.to_dict() == {"decay_type": "cosine", "warmup_percent": 0.05}
  assert config.input.data.to_dict() == {"name": "pretrain_mixture", "image_size": 28,
                                         "channels": 3}
  assert config.total_steps == 1000 and config.eval_every == 100 and config.best_metric is None
  recon = config.evals.recon.to_dict()
  assert recon["name"] == "reconstruction" and recon["split"] == "val"
  assert recon["data"] == {"name": "medmnist", "flag": "pneumoniamnist", "size": 28,
                           "allow_download": False}
  assert recon["pp"] == "gray_to_rgb|value_range(-1,1)"


@pytest.mark.parametrize("arg, variant, loss, pp", [
    ("objective=simmim", "Ti/4", {"name": "simmim", "mask": {"name": "random", "ratio": 0.6}},
     "gray_to_rgb|value_range(-1,1)"),
    ("objective=simmim,mask=block,size=64,variant=S", "S/8",
     {"name": "simmim", "mask": {"name": "block", "ratio": 0.6}},
     "resize(64)|gray_to_rgb|value_range(-1,1)"),
    ("objective=frequency", "Ti/4", {"name": "frequency", "mask": None},
     "gray_to_rgb|value_range(-1,1)"),
    ("objective=deblur,mask=prior,prior=intensity,channels=1", "Ti/4",
     {"name": "deblur", "mask": {"name": "prior", "ratio": 0.5, "prior": "intensity"}},
     "value_range(-1,1)"),
    ("objective=mae,ratio=0.5,image_every=7,eval_flag=retinamnist", "Ti/4",
     {"name": "mae", "mask": {"name": "random", "ratio": 0.5}}, "value_range(-1,1)"),
])
def test_objectives_masks_sizes_and_variants(arg, variant, loss, pp):
  module = _load()
  config = module.get_config(arg)
  assert config.model.variant == variant
  assert config.loss.to_dict() == loss
  assert config.evals.recon.pp == pp
  size = 64 if "size=64" in arg else 28
  assert config.input.data.image_size == size
  assert config.input.data.channels == (1 if "channels=1" in arg else 3)
  assert module.classifier_model(arg) == {"variant": variant, "pool_type": "gap"}
  if "image_every=7" in arg:
    assert config.eval_every == config.checkpoint_every == 7


@pytest.mark.parametrize("arg, message", [
    ("objective=beit", r"objective='beit' is not valid; choose one of \['simmim', 'mae'"),
    ("objective=mae,mask=none", r"objective=mae masks patches: choose mask=random"),
    ("mask=grid", r"mask='grid' is not valid"),
    ("size=32", r"size=32 is not valid; choose one of \[28, 64\]"),
    ("variant=B", r"variant='B' is not valid; choose one of \['Ti', 'S'\]"),
    ("channels=1,eval_flag=retinamnist", r"eval_flag=retinamnist holds colour images"),
    ("eval_flag=organmnist3d", r"eval_flag='organmnist3d' is not valid"),
    ("ratio=1.5", r"ratio=1.5 must be in \(0, 1\)"),
    ("steps=0", r"steps=0 must be a positive int"),
    ("warmup=1.0", r"warmup=1.0 must be a fraction"),
    ("stepz=3", r"Unknown config argument 'stepz'"),
])
def test_argument_errors_name_the_valid_values(arg, message):
  with pytest.raises(ValueError, match=message):
    _load().get_config(arg)


def test_runlocal_pretraining_writes_pictures_and_an_export_a_vit_loads(shared_data_dir,
                                                                        tmp_path):
  module = _load()
  config = module.get_config("objective=simmim,runlocal=True")
  config.progress = False
  workdir = tmp_path / "mim"
  results = loop.train_and_evaluate(config, workdir, data_dir=str(shared_data_dir))
  assert results["metrics"]["recon/num_examples"] == 78  # BreastMNIST val, never pretraining.
  assert np.isfinite(results["metrics"]["recon/loss"])
  for name in ("reconstructions/step_2.png", "reconstructions/step_4.png",
               "reconstructions/final.png", "loss_curve.png"):
    assert (workdir / name).read_bytes().startswith(b"\x89PNG"), name
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in rows if "recon/loss" in r] == [2, 4]
  # The export is the encoder of the ViT that adapts it: mask token and decoder ignored, head
  # missing.
  vit = models.get_model("vit", num_classes=2, **module.classifier_model("runlocal=True"))
  target = jax.eval_shape(model_fns.init_variables_fn(vit, (28, 28, 3)),
                          jax.random.key(0))["params"]
  _, report = mim_encoder.import_mim_encoder(workdir / "export" / "model.npz",
                                             target_params=target)
  assert report.missing == ["head/bias", "head/kernel"]
  assert sorted(report.ignored) == ["params/decoder/pred/bias", "params/decoder/pred/kernel",
                                    "params/mask_token"]
  assert "params/embedding/kernel" in report.loaded.values()
