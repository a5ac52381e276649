"""Builds everything one run needs from its config: mesh, data, model, optimizer, evaluators.

`build_run(config, data_dir)` returns a `Run`; nothing is trained or restored here.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from data_pipelines import data_dir as data_dir_lib
from data_pipelines import datasets, loader
from data_pipelines import pp as pp_lib
from data_pipelines import subsets
from fm_adapt import config as config_lib
from fm_adapt.adapt import compose
from fm_adapt.evaluators import classification as cls_eval
from fm_adapt.evaluators import check_not_empty, make_evaluators, split_labels
from fm_adapt import objectives
from fm_adapt.train import mesh as mesh_lib
from fm_adapt.train import model_fns as model_fns_lib
from fm_adapt.train import optim, state as state_lib, step as step_lib, writer as writer_lib


@dataclasses.dataclass
class Run:
  """The pieces of one run, built once from its config."""
  mesh: jax.sharding.Mesh
  spec: Any
  train_loader: Any
  batch_size: int
  steps_per_epoch: int
  num_train_examples: int
  total_steps: int
  rng: jax.Array
  init_state: Callable[[], dict[str, Any]]
  update_fn: Callable[..., Any]
  evaluators: dict[str, cls_eval.Evaluator]
  periodic_evals: list[str]
  base_checkpoint: dict[str, str] | None = None
  adaptation: Any = None
  padded_epochs: bool = True
  label_fraction: float = 1.0
  train_class_counts: dict[str, int] | None = None

  def epoch_of(self, step: int) -> float:
    """Epochs done after `step` steps: whole epochs of `steps_per_epoch` when each ends in a
    padded batch, else examples seen over the split size."""
    if self.padded_epochs:
      return step / self.steps_per_epoch
    return step * self.batch_size / self.num_train_examples


@dataclasses.dataclass
class TrainFns:
  """The model, trainable mask, optimizer and (unjitted) update step of a config."""
  model_fns: model_fns_lib.ModelFns
  variables_shape: Any
  trainable: Any
  tx: Any
  update_fn: Callable[..., Any]
  objective: Any = None


def build_train_fns(config: ml_collections.ConfigDict, spec: Any, image_shape: tuple[int, ...],
                    total_steps: int, init_rng: jax.Array) -> TrainFns:
  """The model (adapted, pretrained), schedule mask, optimizer and update step of a config.

  Args:
    config: the run config.
    spec: the dataset spec (`num_classes`, `task`).
    image_shape: (H, W, C) of one preprocessed example.
    total_steps: total steps of the learning-rate schedules.
    init_rng: the key the variables are initialized with (only its shape is used here).
  """
  model_fns = model_fns_lib.build_model(config, spec, image_shape)
  variables_shape = jax.eval_shape(model_fns.init_fn, init_rng)
  schedule = config.get("schedule")
  if model_fns.adaptation is not None:
    schedule = compose.schedule_for(model_fns.adaptation, schedule)
  trainable = optim.trainable_mask(variables_shape["params"], schedule)
  params_shape, _, _ = state_lib.split_variables(variables_shape, trainable)
  tx, schedules = optim.make_optimizer(config, params_shape, total_steps, schedule)
  loss_fn = objectives.get_objective(config.get("loss"), spec.task,
                                     patch_size=model_fns.patch_size)
  update = step_lib.make_update_fn(model_fns.apply_fn, loss_fn, tx, schedules[min(schedules)],
                                   grad_accum_steps=config.get("grad_accum_steps"))
  return TrainFns(model_fns, variables_shape, trainable, tx, update, loss_fn)


def _image_shape(source: Any, pp: str) -> tuple[int, ...]:
  example = pp_lib.parse(pp)(dict(source[0]), np.random.default_rng(0))
  return tuple(np.shape(example["image"]))


def check_batch(batch_size: int, grad_accum_steps: Any = 1) -> None:
  """The training batch must split into `grad_accum_steps` micro-batches sharded evenly over
  the devices: `batch_size` divisible by grad_accum_steps x the device count."""
  steps = config_lib.check_grad_accum_steps(grad_accum_steps)
  devices = jax.device_count()
  if batch_size % (steps * devices):
    accum = f" x config.grad_accum_steps={steps}" if steps > 1 else ""
    raise ValueError(f"config.input.batch_size={batch_size} must be divisible by the {devices} "
                     f"devices{accum} = {steps * devices}: make it a multiple of "
                     f"{steps * devices}.")


def training_subset(source: Any, spec: Any, fraction: float, seed: int
                    ) -> tuple[Any, dict[str, int]]:
  """The examples a run trains on, and their count per class (multi-label: positives per label).

  `fraction` < 1 keeps the class-stratified subset of `data_pipelines.subsets` (fixed by the seed
  and the labels alone, so every model and adaptation of a study trains on the same examples);
  1 keeps the split as it is. The labels are read in one pass over the split's records, except
  for a single-class split (e.g. unlabelled pretraining data), whose count is its size.
  """
  if spec.task != "multilabel" and spec.num_classes == 1 and fraction == 1:
    return source, {str(spec.class_names[0]): len(source)}
  labels = split_labels(source)
  if fraction < 1:
    indices = subsets.stratified_subset(labels, fraction, seed)
    source = subsets.Subset(source, indices, f"label_fraction={fraction!r}, seed={seed}")
    labels = labels[indices]
  counts = subsets.class_counts(labels, spec.num_classes)
  return source, dict(zip(map(str, spec.class_names), counts))


LAST_BATCH = ("pad", "carry")


def make_train_loader(config: ml_collections.ConfigDict, source: Any, seed: int
                      ) -> tuple[Any, int, int]:
  """The training loader of `config.input.last_batch`, its steps per epoch and total steps.

  'pad' (default): whole epochs of ceil(N / batch) steps, the last batch padded and masked (as
  PyTorch's DataLoader with drop_last=False), so `total_epochs` E is E * ceil(N / batch) steps.
  'carry': batches run on across epoch boundaries and nothing is padded, so E epochs are
  ceil(E * N / batch) steps and an "epoch" (evaluation, checkpoint) is ceil(N / batch) steps.
  """
  last_batch = config.input.get("last_batch", "pad")
  if last_batch not in LAST_BATCH:
    raise ValueError(f"Unknown config.input.last_batch {last_batch!r}; valid: {list(LAST_BATCH)}")
  batch_size, n = config.input.batch_size, len(source)
  steps_per_epoch = max(math.ceil(n / batch_size), 1)
  workers = config.input.get("worker_count", 0)
  if last_batch == "pad":
    total = config.get("total_steps") or max(math.ceil(config.total_epochs * steps_per_epoch), 1)
    train_loader = loader.make_epoch_loader(source, pp=config.input.pp, batch_size=batch_size,
                                            seed=seed, shuffle=True, worker_count=workers)
  else:
    total = config.get("total_steps") or max(math.ceil(config.total_epochs * n / batch_size), 1)
    train_loader = loader.make_loader(source, pp=config.input.pp, batch_size=batch_size,
                                      seed=seed, shuffle=True, num_epochs=None,
                                      worker_count=workers)
  return train_loader, steps_per_epoch, total


def _check_padding_is_masked(config: ml_collections.ConfigDict, model: Any,
                             variables_shape: Any) -> None:
  """A model with batch statistics must take `mask` when batches are padded."""
  padded = config.input.get("last_batch", "pad") == "pad"
  has_statistics = any(k != "params" for k in variables_shape)
  if padded and has_statistics and not config.get("frozen_statistics") and (
      not model_fns_lib.takes_mask(model)):
    raise ValueError(
        f"Model {config.model_name!r} keeps batch statistics but takes no `mask`, so the padding "
        "of a last batch would enter them. Set config.input.last_batch='carry' (no padding), "
        "or config.frozen_statistics=True.")


def _memory_note(config: ml_collections.ConfigDict) -> str:
  """' (4 micro-batches, bfloat16 compute, remat)' for the settings that are not defaults."""
  notes = []
  steps = config_lib.check_grad_accum_steps(config.get("grad_accum_steps"))
  if steps > 1:
    notes.append(f"{steps} micro-batches")
  if (config.get("dtype") or "float32") != "float32":
    notes.append(f"{config.dtype} compute")
  if config.get("remat"):
    notes.append("remat")
  return f" ({', '.join(notes)})" if notes else ""


def build_run(config: ml_collections.ConfigDict, data_dir_flag: str | None) -> Run:
  """Builds the `Run` of a config: nothing is trained or restored here."""
  mesh_lib.maybe_initialize_distributed()
  mesh = mesh_lib.make_mesh(config.get("mesh"))
  data_dir = data_dir_lib.resolve_data_dir(data_dir_flag)
  source, spec = datasets.get_dataset(config.input.data, "train", data_dir)
  check_not_empty(source, spec, "train", "config.input.data")
  batch_size = config.input.batch_size
  check_batch(batch_size, config.get("grad_accum_steps"))
  seed = config.get("seed", 0)
  split_size = len(source)
  fraction = config_lib.check_label_fraction(config.input.get("label_fraction"))
  source, class_counts = training_subset(source, spec, fraction, seed)
  train_loader, steps_per_epoch, total_steps = make_train_loader(config, source, seed)
  # rbg keys: the same quality for init and dropout, and far faster to compile on CPU than
  # threefry when a model has many parameter shapes (EfficientNet-Lite0 init: 35 s -> 15 s).
  init_rng, train_rng = jax.random.split(jax.random.key(seed, impl="rbg"))
  image_shape = _image_shape(source, config.input.pp)
  fns = build_train_fns(config, spec, image_shape, total_steps, init_rng)
  model_fns, update = fns.model_fns, fns.update_fn
  _check_padding_is_masked(config, model_fns.model, fns.variables_shape)
  rules = config.get("sharding_rules")

  def init_state() -> dict[str, Any]:
    variables = state_lib.sharded_init(model_fns.init_fn, init_rng, mesh, rules)
    return state_lib.initial_state(fns, variables, mesh)

  predict_fn = step_lib.make_predict_fn(model_fns.apply_fn, spec.task)
  evaluators, periodic = make_evaluators(config, data_dir, spec, predict_fn, mesh,
                                         apply_fn=model_fns.apply_fn, objective=fns.objective,
                                         image_shape=image_shape)
  subset = (f" of {split_size} (label_fraction {fraction:g}, per class {class_counts})"
            if fraction < 1 else "")
  writer_lib.console(f"Run: {len(source)}{subset} train examples, batch {batch_size}"
                     f"{_memory_note(config)}, {steps_per_epoch} steps/epoch, {total_steps} "
                     f"steps, mesh {dict(mesh.shape)}, data {spec.name}")
  return Run(mesh=mesh, spec=spec, train_loader=train_loader, batch_size=batch_size,
             steps_per_epoch=steps_per_epoch, num_train_examples=len(source),
             padded_epochs=config.input.get("last_batch", "pad") == "pad",
             total_steps=total_steps, rng=train_rng,
             init_state=init_state, update_fn=update,
             evaluators=evaluators, periodic_evals=periodic, base_checkpoint=model_fns.base,
             adaptation=model_fns.adaptation, label_fraction=fraction,
             train_class_counts=class_counts)
