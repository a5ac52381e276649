"""experiments/peft_quick.py: its arguments parsed once, an explicit loss, valid strategies."""
import pathlib

import jax
import jax.numpy as jnp
import pytest

from fm_adapt import study
from fm_adapt import config as config_lib
from fm_adapt import models
from fm_adapt.adapt import compose
from fm_adapt import param_paths
from fm_adapt.train import optim

FILE = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "peft_quick.py"


def _load():
  """A fresh import of the experiment file (nothing cached from another test)."""
  return study.load_experiment(str(FILE))[0]  # A fresh import: nothing cached.


def _runs(module, arg):
  runs = []
  module.sweep(lambda **run: runs.append(run), arg)
  return runs


def test_arguments_are_parsed_once(monkeypatch):
  calls = []
  parse_arg = config_lib.parse_arg
  monkeypatch.setattr(config_lib, "parse_arg",
                      lambda *a, **k: calls.append(a) or parse_arg(*a, **k))
  module = _load()
  runs = _runs(module, "runlocal")
  for _ in runs[:3]:  # The study builds get_config(arg) once per run.
    assert module.get_config("runlocal").runlocal
  assert len(calls) == 1, calls


def test_config_sets_the_loss_and_validates():
  config = _load().get_config("runlocal")
  assert dict(config.loss) == {"name": "softmax_xent"}
  config_lib.validate(config)


def test_backbones_argument():
  module = _load()
  assert {r["name"].split("_")[0] for r in _runs(module, "runlocal,backbones=cnn")} == {"effnet"}
  with pytest.raises(ValueError, match=r"Unknown backbones \['vt'\]; valid: .*\['vit', 'cnn'\]"):
    module.get_config("backbones=vt")


def test_every_strategy_builds_on_its_backbone():
  """Each run's transforms and schedule fit its model (eval_shape only: nothing compiles)."""
  module = _load()
  base = module.get_config("runlocal")
  for run in _runs(module, "runlocal"):
    name = run.get("model_name", base.model_name)
    kwargs = dict(run.get("model", base.model))
    size = 32 if name == "efficientnet" else 28
    model = models.get_model(name, num_classes=2, **kwargs)
    params = jax.eval_shape(model.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32))["params"]
    schedule = run.get("schedule", base.schedule)
    if run.get("adapt"):
      adaptation = compose.apply_transforms(run["adapt"], name, kwargs)
      params = jax.eval_shape(adaptation.init_extra, params, jax.random.key(1))
      schedule = compose.schedule_for(adaptation, schedule)
    trainable = [p for p, m in param_paths.flatten(optim.trainable_mask(params, schedule)).items() if m]
    assert trainable, run["name"]
