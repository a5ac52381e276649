"""The recompilation tier: the update step and each evaluator's predict trace once (big_vision
utils_test idea), across steps, a padded last batch, a checkpoint save, a resume onto the
abstract state, and evaluations of trained, resumed and best-checkpoint states.

A tiny real run (`build.build_run`) on a synthetic MedMNIST-layout archive written in tmp_path:
20 training images at batch 8 are epochs of 3 steps, the third padded; 13 validation and 11 test
images at batch 8 end in padded batches too.
"""
import functools
import pathlib

import chex
import jax
import ml_collections
import numpy as np
import pytest

from fm_adapt import config as config_lib
from fm_adapt import evaluators as evaluators_lib
from fm_adapt.evaluators import classification as cls_eval
from fm_adapt.train import checkpoint as ckpt_lib
from fm_adapt.train import mesh as mesh_lib
from fm_adapt.train import build
from fm_adapt.train import state as state_lib
from fm_adapt.train import step as step_lib

SIZES = {"train": 20, "val": 13, "test": 11}
MODELS = {
    "vit": ("vit", dict(variant="mu/7", pool_type="gap")),
    # BatchNorm statistics: a non-empty model_state and the mask path of the padded batch.
    "resnet": ("resnet", dict(depth=18, width=4, conv_impl="xla")),
}


def _write_npz(path: pathlib.Path) -> None:
  rng = np.random.default_rng(0)
  arrays = {}
  for split, n in SIZES.items():
    labels = np.arange(n)[:, None] % 2
    noise = rng.integers(0, 160, size=(n, 28, 28))
    arrays[f"{split}_images"] = (noise + 60 * labels[:, :, None]).astype(np.uint8)
    arrays[f"{split}_labels"] = labels
  np.savez(path, **arrays)


def _config(tmp_path: pathlib.Path, model: str) -> ml_collections.ConfigDict:
  _write_npz(tmp_path / "tiny.npz")
  config = config_lib.base_config()
  config.model_name, model_kwargs = MODELS[model]
  config.model = ml_collections.ConfigDict(model_kwargs)
  config.input.update(dict(
      data=dict(name="npz", path=str(tmp_path / "tiny.npz"), tfds_dir=str(tmp_path / "tfds")),
      pp="value_range(-1,1)|flip_lr", batch_size=8, eval_batch_size=8))
  config.evals = ml_collections.ConfigDict(dict(
      val=dict(name="classification", split="val"),
      test=dict(name="classification", split="test", periodic=False)))
  config.total_steps = 8
  return config


def _traced_once(fn, name: str):
  """`fn` under `chex.assert_max_traces(n=1)`, counted apart from other wrappers of `fn`.

  chex counts traces per footprint (the call stack's function names, the source and the name),
  so each evaluator's wrapper gets its own name.
  """
  @functools.wraps(fn)
  def traced(*args):
    return fn(*args)

  traced.__name__ = traced.__qualname__ = name
  return chex.assert_max_traces(traced, n=1)


class TracedEvaluator(cls_eval.Evaluator):
  """The classification evaluator, its predict function allowed one trace."""

  def __init__(self, predict_fn, *args, split: str = "?", **kwargs):
    super().__init__(_traced_once(predict_fn, f"predict_{split}"), *args, split=split, **kwargs)


def _weights(state):
  return {"params": state["params"], "model_state": state["model_state"]}


def _steps(update, state, run, iterator, count: int) -> tuple[dict, list[bool]]:
  """`count` steps; returns the state and, per step, whether its batch was padded."""
  padded = []
  for _ in range(count):
    host = next(iterator)
    padded.append(not np.asarray(host["mask"]).all())
    state, measurements = update(state, run.rng, mesh_lib.global_batch(host, run.mesh))
    assert np.isfinite(float(measurements["loss"]))
  return state, padded


def _evaluate(run, state) -> dict:
  return {f"{key}/{name}": value for key, evaluator in run.evaluators.items()
          for name, value in evaluator.run(state)}


@pytest.mark.parametrize("model", list(MODELS))
def test_no_retrace_across_steps_resume_and_evaluations(tmp_path, monkeypatch, model):
  chex.clear_trace_counter()
  monkeypatch.setitem(evaluators_lib.EVALUATORS, "classification", TracedEvaluator)
  run = build.build_run(_config(tmp_path, model), str(tmp_path))
  assert run.steps_per_epoch == 3 and set(run.evaluators) == {"val", "test"}
  state = run.init_state()
  update = step_lib.jit_update(_traced_once(run.update_fn, "update_fn"), state, run.mesh)

  iterator = iter(run.train_loader)
  state, padded = _steps(update, state, run, iterator, 4)
  assert padded == [False, False, True, False]
  first = _evaluate(run, state)
  assert first["val/num_examples"] == 13 and first["test/num_examples"] == 11

  ckpt = ckpt_lib.RunCheckpointer(tmp_path / "workdir", keep=2, best_metric="val/auc")
  ckpt.save(4, state_lib.checkpointed(state), {}, iterator)
  assert ckpt.save_best(4, _weights(state), first)
  ckpt.wait()
  saved = jax.device_get(state_lib.checkpointed(state))

  # Resume as the loop does: a fresh state's abstract tree, restored, the frozen part rebuilt.
  fresh = run.init_state()
  iterator = iter(run.train_loader)
  restored, _, step = ckpt.restore_latest(ckpt_lib.abstract_of(state_lib.checkpointed(fresh)),
                                          iterator=iterator)
  assert step == 4
  chex.assert_trees_all_equal(jax.device_get(restored), saved)
  state = dict(restored, frozen=fresh["frozen"])

  state, padded = _steps(update, state, run, iterator, 3)  # Steps 5-7: step 6 is padded.
  assert padded == [False, True, False]
  assert int(state["step"]) == 7
  second = _evaluate(run, state)
  assert second.keys() == first.keys()

  # The final evaluation of the loop: the best checkpoint's weights restored onto the state.
  best = ckpt.restore_best(ckpt_lib.abstract_of(_weights(state)))
  final = _evaluate(run, dict(state, **best))
  assert final == pytest.approx(first)
  ckpt.close()
