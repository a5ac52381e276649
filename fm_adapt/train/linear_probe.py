"""Linear probing on cached features: the frozen encoder runs once per split, the head trains.

  config.probe = 'cached'  # or 'auto'; loop.train_and_evaluate then calls
  run = linear_probe.cached_run(config, build.build_run(config, data_dir), data_dir)

trains the same run as `loop.train_and_evaluate(config, workdir)` and writes the same files
(results.json, checkpoints, the best checkpoint by `config.best_metric`, predictions, the export
of the full model: frozen encoder + trained head) for a config whose only trainable parameters
are the head (`feature_cache.ineligibility` lists the conditions; any other config is refused
with `feature_cache.NotEligible` naming why). Only the inputs of the head change: each split's
pre-logits are computed once (`feature_cache.extract`, inference mode), and

  * training replays the image run's batches: `build.make_train_loader` over the cached
    features (a source of the same length, the same seed and batch size) gives the same
    per-epoch shuffling, padding and masks; the update step is `step.make_update_fn` with the
    same optimizer, schedule, loss and gradient accumulation around the model's head;
  * the evaluators are the same classification evaluators, scoring the head on the cached
    features of their split (their pp: `evaluators.eval_pp`).

The first training batch is checked against the model itself before anything trains
(`feature_cache.check_first_batch`). Checkpoints hold the same train state as the end-to-end
run's (head parameters, optimizer state, step; the frozen encoder is rebuilt from the seed and
the base checkpoint), and a killed run resumes as any run does, in the same mode: grain checks
that a saved loader position belongs to the same data source, so a workdir trained end to end
does not resume on cached features, or back (its checkpoints are refused, none is moved).
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import ml_collections

from data_pipelines import data_dir as data_dir_lib
from data_pipelines import datasets, loader
from fm_adapt import evaluators as evaluators_lib
from fm_adapt.evaluators import classification as cls_eval
from fm_adapt.objectives import classification as objectives
from fm_adapt.train import build
from fm_adapt.train import feature_cache
from fm_adapt.train import mesh as mesh_lib
from fm_adapt.train import optim
from fm_adapt.train import state as state_lib
from fm_adapt.train import step as step_lib
from fm_adapt.train import writer as writer_lib

NotEligible = feature_cache.NotEligible
# Rows of a batch of cached features in evaluation (the features are small; few calls).
EVAL_ROWS = 4096


def _head_update_fn(config: ml_collections.ConfigDict, spec: Any, fns: build.TrainFns,
                    head_apply: Callable[..., Any], total_steps: int) -> Callable[..., Any]:
  """The update step of `build.build_train_fns` with the head on features as the model."""
  params_shape, _, _ = state_lib.split_variables(fns.variables_shape, fns.trainable)
  tx, schedules = optim.make_optimizer(config, params_shape, total_steps, config.get("schedule"))
  loss_fn = objectives.get_loss(config.get("loss"), spec.task)
  return step_lib.make_update_fn(head_apply, loss_fn, tx, schedules[min(schedules)],
                                 grad_accum_steps=config.get("grad_accum_steps"))


def _feature_loader_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` for a loader over cached features: no pp (they are computed), no workers."""
  out = ml_collections.ConfigDict(config.to_dict())
  out.input.pp = ""
  out.input.worker_count = 0
  return out


class _Cache:
  """The features of each (split, pp) of a run, computed on first use."""

  def __init__(self, config: ml_collections.ConfigDict, data_dir: Any, apply_fn: Callable,
               state: Mapping[str, Any], mesh: jax.sharding.Mesh):
    self._config, self._data_dir, self._state, self._mesh = config, data_dir, state, mesh
    self._features_fn = feature_cache.make_features_fn(apply_fn)
    self._batch_size = config.input.get("eval_batch_size") or config.input.batch_size
    self._splits: dict[tuple[str, str], feature_cache.FeatureSplit] = {}

  def split(self, split: str, pp: str) -> feature_cache.FeatureSplit:
    """The features of the whole `split` preprocessed by `pp`, in the split's order."""
    if (split, pp) not in self._splits:
      source, _ = datasets.get_dataset(self._config.input.data, split, self._data_dir)
      self._splits[(split, pp)] = self._extract(source, pp, repr(split))
    return self._splits[(split, pp)]

  def training_split(self, source: Any, pp: str) -> feature_cache.FeatureSplit:
    """The features of the examples the run trains on (`source`: the split, or its
    `label_fraction` subset), preprocessed by the training `pp`."""
    return self._extract(source, pp, f"the training examples ({source!r})")

  def _extract(self, source: Any, pp: str, what: str) -> feature_cache.FeatureSplit:
    start = time.perf_counter()
    batches = loader.make_loader(source, pp=pp, batch_size=self._batch_size, seed=0,
                                 shuffle=False, num_epochs=1, drop_remainder=False,
                                 pad_remainder=True)
    out = feature_cache.extract(self._features_fn, self._state, batches, self._mesh)
    writer_lib.console(f"Cached features of {what} (pp {pp!r}): {out.features.shape} "
                       f"{out.features.dtype} in {time.perf_counter() - start:.1f} s")
    return out


def _evaluators(config: ml_collections.ConfigDict, run: build.Run, cache: _Cache,
                head_apply: Callable[..., Any]) -> dict[str, cls_eval.Evaluator]:
  """The run's evaluators (same keys, splits, pp) scoring the head on cached features."""
  predict_fn = step_lib.make_predict_fn(head_apply, run.spec.task)
  rows = max(EVAL_ROWS // jax.device_count(), 1) * jax.device_count()
  class_names = list(run.spec.class_names) if run.spec.class_names else None
  out = {}
  for key in run.evaluators:
    cfg = dict(config.evals[key])
    split = cfg.get("split", key)
    batches = feature_cache.feature_batches(
        cache.split(split, evaluators_lib.eval_pp(config, key, cfg)), rows)
    out[key] = cls_eval.Evaluator(predict_fn, lambda batches=batches: batches,
                                  lambda b: mesh_lib.global_batch(b, run.mesh), run.spec.task,
                                  class_names, split=split)
  return out


def _first_then(state: dict[str, Any], init_state: Callable[[], dict[str, Any]]
                ) -> Callable[[], dict[str, Any]]:
  """An `init_state` that returns `state` (already built and loaded) once, then fresh ones."""
  pending = [state]
  return lambda: pending.pop() if pending else init_state()


def cached_run(config: ml_collections.ConfigDict, run: build.Run,
               data_dir: str | None = None) -> build.Run:
  """`run` (from `build.build_run(config, ...)`) training its head on cached features.

  Computes the features of the training split and of every evaluator's split, checks the first
  training batch against the model, and returns the run with its training loader, update step,
  evaluators and `init_state` replaced; everything else (total steps, steps per epoch, mesh,
  key, base checkpoint) is the image run's.

  Raises:
    NotEligible: for a config whose head cannot train on cached features (the reasons), or a
      model whose training step the features do not reproduce.
  """
  data_dir = data_dir_lib.resolve_data_dir(data_dir or config.get("data_dir"))
  source, spec = datasets.get_dataset(config.input.data, "train", data_dir)
  source, _ = build.training_subset(source, spec, run.label_fraction, config.get("seed", 0))
  fns = feature_cache.train_fns(config, spec, source, run.total_steps)
  reasons = feature_cache.ineligibility(config, fns)
  if reasons:
    raise NotEligible("This run cannot train its head on cached features:\n  - "
                      + "\n  - ".join(reasons))
  state = run.init_state()
  cache = _Cache(config, data_dir, fns.model_fns.apply_fn, state, run.mesh)
  train = feature_cache.FeatureSource(cache.training_split(source, config.input.pp))
  train_loader, steps_per_epoch, total_steps = build.make_train_loader(
      _feature_loader_config(config), train, config.get("seed", 0))
  if (steps_per_epoch, total_steps) != (run.steps_per_epoch, run.total_steps):
    raise RuntimeError(f"Internal error: the feature loader has {steps_per_epoch} steps/epoch "
                       f"and {total_steps} steps, the image run {run.steps_per_epoch} and "
                       f"{run.total_steps}: the cache holds other examples than the run's.")
  dtype = feature_cache.compute_dtype(fns.model_fns.model)
  feature_cache.check_first_batch(fns.model_fns.apply_fn, state, run.rng,
                                  next(iter(run.train_loader)), next(iter(train_loader)),
                                  run.mesh, dtype)
  head_apply = feature_cache.head_apply_fn(dtype)
  return dataclasses.replace(
      run, train_loader=train_loader, init_state=_first_then(state, run.init_state),
      update_fn=_head_update_fn(config, spec, fns, head_apply, run.total_steps),
      evaluators=_evaluators(config, run, cache, head_apply))
