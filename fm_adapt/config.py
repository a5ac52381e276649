"""Config helpers shared by experiment files, and the validation of a run config.

Experiment files export `get_config(arg=None)`; `arg` is the string after ':' in
`--config experiments/X.py:key1=v1,key2=v2` and is read with `parse_arg` (big_vision
`configs/common.py` idea).
"""
from __future__ import annotations

import ast
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from data_pipelines import subsets

# Top-level keys a run config may hold; anything else is a typo and fails at once.
RUN_KEYS = {
    "seed": "int, the run's seed (params init, data order, dropout).",
    "model_name": "registry name of the model (fm_adapt.models.MODELS).",
    "model": "kwargs of the model, e.g. dict(variant='S/16').",
    "model_init": "None, or a pretrained checkpoint to start from (path relative to the weights dir).",
    "model_load": "kwargs of the checkpoint import (name, dont_load).",
    "adapt": "list of adaptation transforms, e.g. [dict(name='lora', rank=8, targets=...)].",
    "input": "data and batching, see INPUT_KEYS.",
    "evals": ("named evaluators, e.g. evals.val = dict(name='classification', split='val'); "
              "optional pp, batch_size, periodic (fm_adapt.evaluators.EVAL_KEYS)."),
    "frozen_statistics": "train with BatchNorm in inference mode (frozen CNN backbones).",
    "loss": "objective, e.g. dict(name='softmax_xent').",
    "total_epochs": "length of training in epochs (or use total_steps).",
    "total_steps": "length of training in steps (overrides total_epochs).",
    "optax_name": "adam | adamw | sgd | momentum | lion.",
    "optax": "kwargs of the optax transformation.",
    "lr": "base learning rate.",
    "wd": "decoupled weight decay on kernels (0 = none).",
    "grad_clip_norm": "global-norm gradient clipping (None = none).",
    "schedule": "one schedule dict, or [(regex, schedule_or_None), ...]; None freezes.",
    "mesh": "device mesh axes, e.g. [('data', -1), ('fsdp', 1)].",
    "sharding_rules": "[(regex, 'fsdp' | 'replicate'), ...] for parameters.",
    "log_every": "steps between training-metric logs.",
    "eval_every": "steps between evaluations (0 = once per epoch).",
    "checkpoint_every": "steps between checkpoints (0 = once per epoch).",
    "keep_ckpts": "how many periodic checkpoints to keep.",
    "best_metric": "evaluator metric that selects the best checkpoint, e.g. 'val/auc'.",
    "progress": "show a progress bar (True / False).",
    "data_dir": "data directory (else --data_dir, FM_ADAPT_DATA_DIR, the cache dir).",
    "dtype": ("compute dtype of the model: 'float32' | 'bfloat16' (parameters, optimizer "
              "state and the loss stay float32)."),
    "remat": ("True: recompute each transformer / ResNet block in the backward pass instead of "
              "keeping its activations (less memory, ~1/3 more compute)."),
    "grad_accum_steps": ("split each batch into this many micro-batches inside the update, "
                         "accumulating gradients (same update as one big batch)."),
    "probe": ("'end_to_end' (default) | 'cached': a linear probe's head trains on features the "
              "frozen encoder computes once per split (fm_adapt.train.linear_probe; an "
              "ineligible config is an error naming why) | 'auto': cached where eligible."),
    "runlocal": "whether the experiment was shrunk to a smoke run (recorded, not used).",
    "description": "free text recorded with the results.",
}


# Valid `config.dtype` values: the compute dtype of the model.
DTYPES = ("float32", "bfloat16")


def check_dtype(value: Any) -> str:
  """Returns `config.dtype` as a valid name; fails naming the valid ones."""
  if value not in DTYPES:
    raise ValueError(f"Unknown config.dtype {value!r}; valid: {list(DTYPES)}.")
  return value


# Valid `config.probe` values: how a linear probe's head is trained.
PROBES = ("end_to_end", "cached", "auto")


def check_probe(value: Any) -> str:
  """Returns `config.probe` (None means 'end_to_end'); fails naming the valid ones."""
  value = "end_to_end" if value is None else value
  if value not in PROBES:
    raise ValueError(f"Unknown config.probe {value!r}; valid: {list(PROBES)}.")
  return value


def check_grad_accum_steps(value: Any) -> int:
  """Returns `config.grad_accum_steps` (None means 1); fails unless it is a positive int."""
  if value is None:
    return 1
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f"config.grad_accum_steps={value!r}: set it to a positive int (1: no "
                     "accumulation; k: k micro-batches of batch_size / k per step).")
  return value


def check_remat(value: Any) -> bool:
  """Returns `config.remat` (None means False); fails unless it is a bool."""
  if value is None:
    return False
  if not isinstance(value, bool):
    raise ValueError(f"config.remat={value!r}: set it to True or False.")
  return value


# Keys of `config.input`.
INPUT_KEYS = {
    "data": "dataset config, e.g. dict(name='medmnist', flag='breastmnist', size=28).",
    "pp": "training preprocessing string, e.g. 'resize(64)|value_range(-1,1)|flip_lr'.",
    "eval_pp": "evaluation preprocessing (default: pp without its random ops).",
    "batch_size": "global training batch size.",
    "eval_batch_size": "global evaluation batch size (default: batch_size).",
    "worker_count": "grain worker processes (0: in the main process).",
    "last_batch": ("'pad': whole epochs, the last batch padded and masked (PyTorch's "
                   "drop_last=False); 'carry': batches run on across epoch boundaries."),
    "label_fraction": ("share of the training split to train on, in (0, 1] (default 1.0): a "
                       "class-stratified subset fixed by the seed and the labels alone, the same "
                       "for every model and adaptation, at least one example per class, nested "
                       "across fractions (data_pipelines.subsets); epochs are over the subset, "
                       "evaluation splits are whole."),
}


def base_config() -> ml_collections.ConfigDict:
  """A run config holding every common key with its default, so any can be overridden.

  Keys whose default is None are typed placeholders, so `--config.total_steps=100` works.
  """
  placeholder = ml_collections.config_dict.placeholder
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.model_name = "vit"
  config.model = ml_collections.ConfigDict()
  config.model_init = placeholder(str)
  config.model_load = ml_collections.ConfigDict()
  config.adapt = ()
  config.input = ml_collections.ConfigDict(dict(worker_count=0, last_batch="pad",
                                                label_fraction=1.0))
  config.evals = ml_collections.ConfigDict()
  config.loss = ml_collections.ConfigDict()
  config.total_epochs = placeholder(float)
  config.total_steps = placeholder(int)
  config.optax_name = "adam"
  config.optax = ml_collections.ConfigDict()
  config.lr = 1e-3
  config.wd = 0.0
  config.grad_clip_norm = placeholder(float)
  config.schedule = ml_collections.ConfigDict(dict(decay_type="constant"))
  config.mesh = (("data", -1), ("fsdp", 1))
  config.sharding_rules = ((".*", "fsdp"),)
  config.log_every = 50
  config.eval_every = 0
  config.checkpoint_every = 0
  config.keep_ckpts = 2
  config.best_metric = "val/auc"
  config.progress = True
  config.frozen_statistics = False
  config.data_dir = placeholder(str)
  config.dtype = "float32"
  config.remat = False
  config.grad_accum_steps = 1
  config.runlocal = False
  config.probe = "end_to_end"
  config.description = ""
  return config


def parse_arg(arg: str | None, lazy: bool = False, **spec: Any) -> ml_collections.ConfigDict:
  """Parses 'key1=v1,key2=v2' against defaults given as keyword arguments.

  Values are read as Python literals when they parse (`lr=1e-3`, `runlocal=True`), else kept
  as strings; a key whose default is a string keeps the text as written (`fractions=0.1` is
  '0.1', not 0.1). A bare `key` means `key=True`. Unknown keys fail with the list of valid keys.

  Args:
    arg: the string after ':' in `--config file.py:arg`, or None.
    lazy: accept keys that are not in `spec` (as strings or literals).
    **spec: the valid keys and their defaults.

  Returns:
    A ConfigDict with the defaults overridden by `arg`.
  """
  out = ml_collections.ConfigDict(dict(spec))
  for item in filter(None, (arg or "").split(",")):
    key, _, value = item.partition("=")
    key = key.strip()
    if key not in spec and not lazy:
      raise ValueError(f"Unknown config argument {key!r}; valid: {sorted(spec)}")
    if not value:
      parsed = True
    elif isinstance(spec.get(key), str):
      parsed = value
    else:
      parsed = _literal(value)
    with out.unlocked():
      out[key] = parsed
  return out


def _literal(value: str) -> Any:
  try:
    return ast.literal_eval(value)
  except (ValueError, SyntaxError):
    return value


def check_label_fraction(value: Any) -> float:
  """Returns `config.input.label_fraction` (None means 1.0); fails unless it is in (0, 1]."""
  return 1.0 if value is None else subsets.check_fraction(value, "config.input.label_fraction")


def _check_batch_size(value: Any, key: str, required: bool = False) -> None:
  if value is None and not required:
    return
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f"{key}={value!r}: set it to a positive int (examples per batch over all "
                     "devices, a multiple of the device count).")


def check_known_keys(entry: Mapping[str, Any], valid: Sequence[str], where: str) -> dict[str, Any]:
  """Returns a config entry as a dict; fails on keys outside `valid`, naming `where`.

  Args:
    entry: a config section or list entry (dict or ConfigDict).
    valid: its valid keys.
    where: how the user finds it, e.g. 'config.evals.val'.
  """
  entry = dict(entry.to_dict() if hasattr(entry, "to_dict") else entry)
  unknown = sorted(set(entry) - set(valid))
  if unknown:
    raise ValueError(f"Unknown keys {unknown} in {where}; valid keys: {list(valid)}")
  return entry


def validate(config: Mapping[str, Any]) -> None:
  """Fails on a bad run config before anything is built: unknown top-level or `input` keys
  (listing the valid ones), batch sizes that are not positive ints, a `label_fraction` outside
  (0, 1], an unknown `dtype`, a `grad_accum_steps` that is not a positive int (or does not
  divide the batch size), a non-bool `remat`."""
  unknown = sorted(set(config.keys()) - set(RUN_KEYS))
  if unknown:
    valid = "\n".join(f"  {k}: {v}" for k, v in sorted(RUN_KEYS.items()))
    raise ValueError(f"Unknown config key(s) {unknown}. Valid keys:\n{valid}")
  unknown_input = sorted(set(config.get("input", {}).keys()) - set(INPUT_KEYS))
  if unknown_input:
    raise ValueError(f"Unknown config.input key(s) {unknown_input}; valid: {sorted(INPUT_KEYS)}")
  inputs = config.get("input") or {}
  _check_batch_size(inputs.get("batch_size"), "config.input.batch_size", required=True)
  _check_batch_size(inputs.get("eval_batch_size"), "config.input.eval_batch_size")
  for name, entry in (config.get("evals") or {}).items():
    _check_batch_size(dict(entry).get("batch_size"), f"config.evals.{name}.batch_size")
  check_label_fraction(inputs.get("label_fraction"))
  check_dtype(config.get("dtype", "float32"))
  check_probe(config.get("probe"))
  check_remat(config.get("remat"))
  steps = check_grad_accum_steps(config.get("grad_accum_steps"))
  if inputs.get("batch_size") % steps:
    raise ValueError(f"config.input.batch_size={inputs.get('batch_size')} is not divisible by "
                     f"config.grad_accum_steps={steps}: make the batch size a multiple of it.")
