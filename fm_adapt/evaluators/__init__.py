"""Evaluators chosen by name, and their construction from `config.evals`.

  config.evals.val = dict(name='classification', split='val')
  config.evals.test = dict(name='classification', split='test', periodic=False)

  config.evals.calib = dict(name='calibration', split='test', fit_split='val', periodic=False)
  config.evals.robust = dict(name='robustness', split='test', periodic=False)

Each entry may set `pp` and `batch_size` (defaults: `config.input.eval_pp`, else the training pp
without its random ops; `config.input.eval_batch_size`, else `config.input.batch_size`).
Evaluation never applies a random op: an eval pp holding one is an error naming it.

Besides `EVAL_KEYS`, an entry takes the options its evaluator class declares in `OPTIONS`
({key: help}); any other key is an error listing the valid ones for that evaluator. A class
with `OPTIONS` is built as `cls(predict_fn, batches, put_batch, task, class_names, split=...,
data=EvalData(...), **options)`: `EvalData.batches_for(split, pp, what)` gives it batches of
another split or pp with the entry's batch size and loader settings, checked like its own
(deterministic pp of the training shape, a split with examples). A class without `OPTIONS`
(classification) takes none and is built with the base arguments only.

An evaluator whose `OPTIONS` hold `data` evaluates the split of that dataset config instead of
`config.input.data` (e.g. held-out images for a run on pretraining data, which has no held-out
split); its eval pp must then give images of the training shape (`image_shape`). `EvalData`
also carries the model's `apply_fn` and the run's `objective` for evaluators that need more than
`predict_fn` (the 'reconstruction' evaluator of masked image modelling).

An evaluator class with `WRITES_FILES = True` writes files of its own into the run's workdir:
the training loop calls its `run(train_state, predictions_path=None, *, workdir, step, final)`
(`final`: the evaluation of the selected state after training).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging

from data_pipelines import datasets, loader
from data_pipelines import pp as pp_lib
from fm_adapt import config as config_lib
from fm_adapt.evaluators import calibration_eval
from fm_adapt.evaluators import classification
from fm_adapt.evaluators import metrics as metrics_lib
from fm_adapt.evaluators import reconstruction
from fm_adapt.evaluators import robustness
from fm_adapt.train import mesh as mesh_lib

EVALUATORS: dict[str, type] = {"classification": classification.Evaluator,
                               "calibration": calibration_eval.Evaluator,
                               "robustness": robustness.Evaluator,
                               "reconstruction": reconstruction.Evaluator}
EVAL_KEYS = ("name", "split", "pp", "batch_size", "periodic")

Batches = Callable[[], Iterable[Mapping[str, np.ndarray]]]


@dataclasses.dataclass(frozen=True)
class EvalData:
  """What an evaluator with options may load beyond its own batches (made by `make_evaluators`).

  Attributes:
    key: the entry's key in `config.evals`, for errors.
    pp: the entry's eval pp (`eval_pp`).
    data_cfg: the dataset config the entry evaluates as a dict: its `data` option where it has
      one, else `config.input.data`.
    batches_for: `(split, pp, what) -> batches`: a factory of fresh batch iterables of `split`
      preprocessed with `pp`, with the entry's batch size and loader settings (one pass, padded
      last batch). Checks when called: the split has examples (`what` names the config key
      that chose it), `pp` is deterministic and gives the training shape.
    apply_fn: the model's `apply(params, model_state, images, *, train, rng, mask=None,
      **model_kwargs)` (`fm_adapt.train.model_fns.make_apply_fn`), or None.
    objective: the run's training objective (`fm_adapt.objectives.get_objective`), or None.
  """
  key: str
  pp: str
  data_cfg: Mapping[str, Any]
  batches_for: Callable[[str, str, str], Batches]
  apply_fn: Callable[..., Any] | None = None
  objective: Any = None


def options_of(name: str) -> dict[str, str]:
  """The extra config keys of evaluator `name` ({key: help}); empty for one without `OPTIONS`."""
  return dict(getattr(EVALUATORS[name], "OPTIONS", None) or {})


def _checked_entry(key: str, cfg: Mapping[str, Any]) -> dict[str, Any]:
  """The keys of `config.evals.<key>`: `name` (not `type`) picks the evaluator, then only
  `EVAL_KEYS` and that evaluator's options."""
  cfg = dict(cfg.to_dict() if hasattr(cfg, "to_dict") else cfg)
  if "type" in cfg:
    raise ValueError(f"config.evals.{key} uses 'type', which is now 'name': write "
                     f"config.evals.{key} = dict(name={cfg['type']!r}, ...).")
  name = cfg.setdefault("name", "classification")
  if name not in EVALUATORS:
    raise ValueError(f"Unknown evaluator name {name!r} in config.evals.{key}; valid: "
                     f"{sorted(EVALUATORS)}")
  options = options_of(name)
  where = f"config.evals.{key} (a {name!r} evaluator" + (
      "; options: " + "; ".join(f"{k}: {v}" for k, v in options.items()) + ")" if options else
      ", which takes no options)")
  return config_lib.check_known_keys(cfg, (*EVAL_KEYS, *options), where)


def _batch_size(config: Any, key: str, cfg: Mapping[str, Any]) -> int:
  """The evaluator's global batch size, checked positive and divisible by the devices."""
  for what, value in ((f"config.evals.{key}.batch_size", cfg.get("batch_size")),
                      ("config.input.eval_batch_size", config.input.get("eval_batch_size")),
                      ("config.input.batch_size", config.input.get("batch_size"))):
    if value is not None:
      break
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f"{what}={value!r} (used by config.evals.{key}) must be a positive int.")
  if value % jax.device_count():
    raise ValueError(f"{what}={value} (used by config.evals.{key}) must be divisible by the "
                     f"{jax.device_count()} devices.")
  return value


def eval_pp(config: Any, key: str, cfg: Mapping[str, Any]) -> str:
  """The pp of `config.evals.<key>`: its own, else `config.input.eval_pp`, else the training pp
  without its random ops. An explicit pp with a random op is an error naming the op."""
  for what, value in ((f"config.evals.{key}.pp", cfg.get("pp")),
                      ("config.input.eval_pp", config.input.get("eval_pp"))):
    if value is not None:
      pp_lib.check_deterministic(value, what)
      return value
  train_pp = config.input.pp
  dropped = pp_lib.random_ops(train_pp)
  if dropped:
    logging.info("config.evals.%s: evaluating with the training pp without its random ops %s.",
                 key, dropped)
  return pp_lib.drop_random(train_pp)


def _check_shape(source: Sequence[dict], key: str, pp: str, train_pp: str) -> None:
  """The eval pp must give the images the model is trained on (checked on one example)."""
  rng = np.random.default_rng(0)
  shape = np.shape(pp_lib.parse(pp)(dict(source[0]), rng)["image"])
  train_shape = np.shape(pp_lib.parse(train_pp)(dict(source[0]), rng)["image"])
  if shape != train_shape:
    raise ValueError(
        f"config.evals.{key}: the eval pp {pp!r} gives images of shape {shape}, the training pp "
        f"{train_pp!r} gives {train_shape}. Set config.input.eval_pp (or config.evals.{key}.pp) "
        "to a deterministic pp of the training shape, e.g. center_crop for a random_crop.")


def split_labels(source: Sequence[dict]) -> np.ndarray:
  """The labels of every example of a split, in order."""
  return np.stack([np.asarray(source[i]["label"]) for i in range(len(source))])


def check_not_empty(source: Sequence[dict], spec: Any, split: str, what: str) -> None:
  """Fails for a split without examples (training or evaluation), naming the config key.

  Args:
    source: the split's examples.
    spec: the dataset spec (`name`, `split_sizes`).
    split: the split's name.
    what: the config key that selects the split, named in the error.
  """
  if len(source) == 0:
    raise ValueError(f"Split {split!r} of {spec.name} has no examples ({what}); choose a split "
                     f"with examples (available: {sorted(spec.split_sizes)}) or check the data.")


def check_split(source: Sequence[dict], spec: Any, split: str, what: str) -> None:
  """Fails for an empty split (`check_not_empty`); warns which metrics its labels leave undefined.

  Args:
    source: the split's examples.
    spec: the dataset spec (`name`, `task`, `class_names`, `split_sizes`).
    split: the split's name.
    what: the config key that selects the split, named in the error.
  """
  check_not_empty(source, spec, split, what)
  names = [str(c).replace(" ", "_") for c in spec.class_names]
  undefined = metrics_lib.undefined_metrics(split_labels(source), spec.task, names, split)
  metrics_lib.warn_undefined(split, undefined)


def _check_foreign_shape(source: Sequence[dict], key: str, pp: str,
                         image_shape: Sequence[int] | None) -> None:
  """The eval pp of an entry with its own `data` must give the training images' shape."""
  shape = np.shape(pp_lib.parse(pp)(dict(source[0]), np.random.default_rng(0))["image"])
  if image_shape is not None and tuple(shape) != tuple(image_shape):
    raise ValueError(
        f"config.evals.{key}: the eval pp {pp!r} gives images of shape {shape} from "
        f"config.evals.{key}.data, but the model trains on {tuple(image_shape)}. Set "
        f"config.evals.{key}.pp to a deterministic pp giving that shape (e.g. "
        "'resize(<size>)|gray_to_rgb|...').")


def _batches_factory(config: Any, data_dir: Any, spec: Any, key: str, batch_size: int,
                     data_cfg: Mapping[str, Any] | None = None,
                     image_shape: Sequence[int] | None = None
                     ) -> Callable[[str, str, str], Batches]:
  """`EvalData.batches_for` of entry `key`: each split is loaded and checked once.

  `data_cfg` (an entry's own `data` option; None: `config.input.data`) is checked for examples
  (not for its labels) and its pp against the training images' shape `image_shape`.
  """
  sources: dict[str, Sequence[dict]] = {}

  def batches_for(split: str, pp: str, what: str) -> Batches:
    if split not in sources:
      source, split_spec = datasets.get_dataset(
          config.input.data if data_cfg is None else data_cfg, split, data_dir)
      if data_cfg is None:
        check_split(source, spec, split, what)
      else:  # Another dataset's labels are the evaluator's concern.
        check_not_empty(source, split_spec, split, what)
      sources[split] = source
    source = sources[split]
    pp_lib.check_deterministic(pp, f"The pp of config.evals.{key}")
    if data_cfg is None:
      _check_shape(source, key, pp, config.input.pp)
    else:
      _check_foreign_shape(source, key, pp, image_shape)
    return lambda: loader.make_loader(
        source, pp=pp, batch_size=batch_size, seed=0, shuffle=False, num_epochs=1,
        drop_remainder=False, pad_remainder=True)

  return batches_for


def make_evaluators(config, data_dir, spec, predict_fn, mesh, *,
                    apply_fn: Callable[..., Any] | None = None, objective: Any = None,
                    image_shape: Sequence[int] | None = None) -> tuple[dict, list[str]]:
  """Builds the evaluators of `config.evals` (key -> dict(name=..., split=...)).

  Everything is checked here, before training: keys, names, batch sizes, that the eval pp is
  deterministic and gives the training shape, that each split has examples (and which metrics
  its labels leave undefined).

  Args:
    config, data_dir, spec, predict_fn, mesh: the run's config, data directory, training
      dataset spec, `predict(train_state, images)` and mesh.
    apply_fn, objective: the model's apply and the run's objective, given to evaluators with
      options (`EvalData`).
    image_shape: (H, W, C) of a preprocessed training example: the shape an entry with its own
      `data` must give.

  Returns:
    ({key: evaluator}, [keys of the evaluators run during training (`periodic`)]).
  """
  evaluators, periodic = {}, []
  for key, entry in (config.get("evals") or {}).items():
    cfg = _checked_entry(key, entry)
    split = cfg.get("split", key)
    batch_size = _batch_size(config, key, cfg)
    pp = eval_pp(config, key, cfg)
    own_data = cfg.get("data") if "data" in options_of(cfg["name"]) else None
    own_data = None if own_data is None else dict(own_data)
    batches_for = _batches_factory(config, data_dir, spec, key, batch_size, own_data,
                                   image_shape)
    batches = batches_for(split, pp, f"config.evals.{key}.split")
    cls = EVALUATORS[cfg["name"]]
    options = {k: cfg[k] for k in options_of(cfg["name"]) if k in cfg and k != "data"}
    data_cfg = dict(config.input.data) if own_data is None else own_data
    extra = {} if getattr(cls, "OPTIONS", None) is None else dict(
        data=EvalData(key, pp, data_cfg, batches_for, apply_fn, objective), **options)
    evaluators[key] = cls(
        predict_fn, batches, lambda b: mesh_lib.global_batch(b, mesh), spec.task,
        list(spec.class_names) if spec.class_names else None, split=split, **extra)
    if cfg.get("periodic", True):
      periodic.append(key)
  return evaluators, periodic
