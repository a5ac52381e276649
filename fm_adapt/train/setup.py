"""Builds everything one run needs from its config: mesh, data, model, optimizer, evaluators."""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from data_pipelines import data_dir as data_dir_lib
from data_pipelines import datasets, loader
from data_pipelines import pp as pp_lib
from fm_adapt import models
from fm_adapt.evaluators import classification as cls_eval
from fm_adapt.objectives import classification as objectives
from fm_adapt.train import mesh as mesh_lib
from fm_adapt.train import optim, state as state_lib, step as step_lib, writer as writer_lib

EVALUATORS = {"classification": cls_eval.Evaluator}
EVAL_KEYS = ("type", "split", "pp", "batch_size", "periodic")


@dataclasses.dataclass
class Run:
  """The pieces of one run, built once from its config."""
  mesh: jax.sharding.Mesh
  spec: Any
  train_loader: Any
  batch_size: int
  steps_per_epoch: int
  total_steps: int
  rng: jax.Array
  init_state: Callable[[], dict[str, Any]]
  update_fn: Callable[..., Any]
  evaluators: dict[str, cls_eval.Evaluator]
  periodic_evals: list[str]
  final_state: Any = None


def _image_shape(source: Any, pp: str) -> tuple[int, ...]:
  example = pp_lib.parse(pp)(dict(source[0]), np.random.default_rng(0))
  return tuple(np.shape(example["image"]))


def _check_batch(batch_size: int, what: str) -> None:
  if batch_size % jax.device_count():
    raise ValueError(f"{what}={batch_size} must be divisible by the {jax.device_count()} devices.")


def make_evaluators(config, data_dir, spec, predict_fn, mesh) -> tuple[dict, list[str]]:
  """Builds the evaluators of `config.evals` (name -> dict(type=..., split=...))."""
  evaluators, periodic = {}, []
  default_pp = config.input.get("eval_pp", config.input.pp)
  for name, cfg in (config.get("evals") or {}).items():
    cfg = dict(cfg)
    unknown = sorted(set(cfg) - set(EVAL_KEYS))
    if unknown:
      raise ValueError(f"Unknown keys {unknown} in config.evals.{name}; valid: {list(EVAL_KEYS)}")
    kind = cfg.get("type", "classification")
    if kind not in EVALUATORS:
      raise ValueError(f"Unknown evaluator type {kind!r}; valid: {sorted(EVALUATORS)}")
    source, _ = datasets.get_dataset(config.input.data, cfg.get("split", name), data_dir)
    batch_size = cfg.get("batch_size", config.input.get("eval_batch_size", config.input.batch_size))
    _check_batch(batch_size, f"config.evals.{name}.batch_size")
    pp = cfg.get("pp", default_pp)
    batches = (lambda source=source, pp=pp, bs=batch_size: loader.make_loader(
        source, pp=pp, batch_size=bs, seed=0, shuffle=False, num_epochs=1,
        drop_remainder=False, pad_remainder=True))
    evaluators[name] = EVALUATORS[kind](
        predict_fn, batches, lambda b: mesh_lib.global_batch(b, mesh), spec.task,
        list(spec.class_names) if spec.class_names else None)
    if cfg.get("periodic", True):
      periodic.append(name)
  return evaluators, periodic


def setup_run(config: ml_collections.ConfigDict, data_dir_flag: str | None) -> Run:
  """Builds the `Run` of a config: nothing is trained or restored here."""
  mesh_lib.maybe_initialize_distributed()
  mesh = mesh_lib.make_mesh(config.get("mesh"))
  data_dir = data_dir_lib.resolve_data_dir(data_dir_flag)
  source, spec = datasets.get_dataset(config.input.data, "train", data_dir)
  batch_size = config.input.batch_size
  _check_batch(batch_size, "config.input.batch_size")
  steps_per_epoch = max(len(source) // batch_size, 1)
  total_steps = config.get("total_steps") or int(round(config.total_epochs * steps_per_epoch))
  seed = config.get("seed", 0)
  train_loader = loader.make_loader(
      source, pp=config.input.pp, batch_size=batch_size, seed=seed, shuffle=True,
      num_epochs=None, worker_count=config.input.get("worker_count", 0))
  model = models.get_model(config.model_name, num_classes=spec.num_classes,
                           **dict(config.get("model", {})))
  apply_fn = state_lib.make_apply_fn(model)
  init_rng, train_rng = jax.random.split(jax.random.key(seed))
  init_fn = state_lib.init_variables_fn(model, _image_shape(source, config.input.pp))
  variables_shape = jax.eval_shape(init_fn, init_rng)
  trainable = optim.trainable_mask(variables_shape["params"], config.get("schedule"))
  params_shape, _, _ = state_lib.split_variables(variables_shape, trainable)
  tx, schedules = optim.make_optimizer(config, params_shape, total_steps)
  loss_fn = objectives.get_loss(config.get("loss"), spec.task)
  update = step_lib.make_update_fn(apply_fn, loss_fn, tx, schedules[min(schedules)])
  rules = config.get("sharding_rules")

  def init_state() -> dict[str, Any]:
    variables = state_lib.sharded_init(init_fn, init_rng, mesh, rules)
    params, frozen, model_state = state_lib.split_variables(variables, trainable)
    opt = jax.jit(tx.init)(params)
    return {"params": params, "frozen": frozen, "model_state": model_state, "opt": opt,
            "step": jnp.zeros((), jnp.int32)}

  predict_fn = step_lib.make_predict_fn(apply_fn, spec.task)
  evaluators, periodic = make_evaluators(config, data_dir, spec, predict_fn, mesh)
  writer_lib.console(f"Run: {len(source)} train examples, batch {batch_size}, {steps_per_epoch} "
                     f"steps/epoch, {total_steps} steps, mesh {dict(mesh.shape)}, data {spec.name}")
  return Run(mesh=mesh, spec=spec, train_loader=train_loader, batch_size=batch_size,
             steps_per_epoch=steps_per_epoch, total_steps=total_steps, rng=train_rng,
             init_state=init_state, update_fn=update,
             evaluators=evaluators, periodic_evals=periodic)
