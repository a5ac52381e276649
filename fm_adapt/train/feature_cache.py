"""Features of a frozen encoder, computed once per split, and the checks that make them valid.

A linear probe trains only the head: `logits = head(pre_logits)`, where `pre_logits` is the
frozen encoder's output. When the encoder's training-mode forward pass is a fixed function of
the image (inference-mode BatchNorm, no active dropout) and the training images are the same
every epoch (a pp without random ops), each image's features can be computed once and the head
trained on them (`fm_adapt.train.linear_probe`). What that needs of a run config:

  * only parameters under `head/` train (`config.schedule`, e.g. compose.preset('linear_probe'));
  * no `config.adapt` transforms (they change the encoder's forward pass);
  * `config.input.pp` holds no random op (`data_pipelines.pp.RANDOM_OPS`);
  * a model with batch statistics (BatchNorm) runs with `config.frozen_statistics=True`, and
    without it no model field named '*drop*' is non-zero (dropout is active in training mode);
  * every evaluator is one of `CACHEABLE_EVALUATORS` (they score predictions of the split's
    images, which the features stand for);
  * one process (the cache is a host array of every example).

`ineligibility` lists what a config breaks (empty: eligible); `eligible` answers from the config
and the model's parameter shapes (no weights are loaded). The static rules cannot see everything a model does in training mode, so the probe also
checks its first training batch (`check_first_batch`): the model's own training-mode forward
pass of the images must give the cached features, and its logits under a random head the head's
logits of them.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from data_pipelines import data_dir as data_dir_lib
from data_pipelines import datasets
from data_pipelines import pp as pp_lib
from fm_adapt import models
from fm_adapt import param_paths
from fm_adapt.train import build
from fm_adapt.train import mesh as mesh_lib
from fm_adapt.train import state as state_lib

HEAD = "head"
CACHEABLE_EVALUATORS = ("classification",)


class NotEligible(ValueError):
  """A run config whose head cannot be trained on cached features; the message says why."""


def _trainable_reasons(trainable: Mapping[str, Any]) -> list[str]:
  paths = [p for p, t in param_paths.flatten(trainable).items() if t]
  outside = [p for p in paths if not p.startswith(HEAD + "/")]
  if not paths:
    return ["config.schedule freezes every parameter: there is no head to train."]
  if outside:
    shown = ", ".join(outside[:5]) + (f" (+{len(outside) - 5} more)" if len(outside) > 5 else "")
    return [f"parameters outside the head train ({shown}): only a frozen encoder's features "
            "can be cached; freeze everything but 'head/.*' (compose.preset('linear_probe')) or "
            "train end to end."]
  return []


def _model_reasons(config: ml_collections.ConfigDict, model: nn.Module,
                   collections: Sequence[str]) -> list[str]:
  if config.get("frozen_statistics"):
    return []  # Training runs the model in inference mode: no batch statistics, no dropout.
  reasons = []
  if collections:
    reasons.append(
        f"model {config.model_name!r} keeps batch statistics ({', '.join(collections)}) and "
        "config.frozen_statistics is False: training-mode BatchNorm normalizes each batch by its "
        "own statistics, so an image's features depend on its batch. Set "
        "config.frozen_statistics=True (the usual frozen-backbone probe) or train end to end.")
  active = {name: getattr(model, name) for name in models.model_fields(type(model))
            if "drop" in name and getattr(model, name)}
  if active:
    reasons.append(
        f"model {config.model_name!r} has dropout {active} and config.frozen_statistics is "
        "False: dropout is active in training mode, so features change every step. Set the "
        "rate(s) to 0 or config.frozen_statistics=True, or train end to end.")
  return reasons


def _config_reasons(config: ml_collections.ConfigDict) -> list[str]:
  reasons = []
  random_ops = pp_lib.random_ops(config.input.pp)
  if random_ops:
    reasons.append(
        f"config.input.pp={config.input.pp!r} holds random op(s) {random_ops}: augmented images "
        "give new features every epoch, so they cannot be cached. Remove them "
        f"(config.input.pp={pp_lib.drop_random(config.input.pp)!r}) or train end to end.")
  if config.get("adapt"):
    names = [dict(a).get("name") for a in config.adapt]
    reasons.append(f"config.adapt={names} changes the encoder's forward pass: the cached probe "
                   "trains the head of a plain frozen model; train end to end.")
  for key, entry in (config.get("evals") or {}).items():
    name = dict(entry).get("name", "classification")
    if name not in CACHEABLE_EVALUATORS:
      reasons.append(f"config.evals.{key} uses evaluator {name!r}, which needs the images; "
                     f"cached features serve {list(CACHEABLE_EVALUATORS)}.")
  if jax.process_count() > 1:
    reasons.append(f"{jax.process_count()} processes: the feature cache is one host array of "
                   "every example; multi-process runs train end to end.")
  return reasons


def ineligibility(config: ml_collections.ConfigDict, fns: build.TrainFns) -> list[str]:
  """Why the head of `config` cannot train on cached features (empty list: it can).

  Args:
    config: the run config.
    fns: its model, trainable mask and optimizer (`build.build_train_fns`).
  """
  collections = [k for k in fns.variables_shape if k != "params"]
  return (_trainable_reasons(fns.trainable) + _config_reasons(config)
          + _model_reasons(config, fns.model_fns.model, collections))


def image_shape(source: Sequence[Mapping[str, Any]], pp: str) -> tuple[int, ...]:
  """The shape of one preprocessed image of `source` (its first example)."""
  example = pp_lib.parse(pp)(dict(source[0]), np.random.default_rng(0))
  return tuple(np.shape(example["image"]))


def train_fns(config: ml_collections.ConfigDict, spec: Any, source: Sequence[Mapping[str, Any]],
              total_steps: int) -> build.TrainFns:
  """The model, trainable mask and optimizer of `config` (as `build.build_run` makes them)."""
  return build.build_train_fns(config, spec, image_shape(source, config.input.pp), total_steps,
                               jax.random.key(0, impl="rbg"))


def eligible(config: ml_collections.ConfigDict, data_dir: str | None = None
             ) -> tuple[bool, str]:
  """Whether the head of `config` can train on cached features, and if not, why.

  Builds the model's shapes (no weights are loaded, nothing is trained).

  Args:
    config: the run config.
    data_dir: the data directory flag (else config.data_dir, FM_ADAPT_DATA_DIR, the cache dir).

  Returns:
    (True, '') or (False, the reasons, one per line).
  """
  data_dir = data_dir_lib.resolve_data_dir(data_dir or config.get("data_dir"))
  source, spec = datasets.get_dataset(config.input.data, "train", data_dir)
  reasons = ineligibility(config, train_fns(config, spec, source, 1))
  return not reasons, "\n".join(reasons)


@dataclasses.dataclass(frozen=True)
class FeatureSplit:
  """The cached features of one split, in the split's order.

  Attributes:
    features: [N, D] pre-logits of every example.
    labels: [N] (or [N, L] multi-label) labels as the batches carry them.
  """
  features: np.ndarray
  labels: np.ndarray

  def __len__(self) -> int:
    return len(self.labels)


class FeatureSource(Sequence):
  """A split's cached features as a data source: example i is {'image': features[i], 'label'}.

  Of the same length as the split, so that a loader over it (same seed, same batch size) visits
  the examples in the same order, with the same padding, as the loader over the images.
  """

  def __init__(self, split: FeatureSplit):
    self._split = split

  def __len__(self) -> int:
    return len(self._split)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    if not 0 <= index < len(self):
      raise IndexError(f"Index {index} out of range for {len(self)} cached examples.")
    return {"image": self._split.features[index], "label": self._split.labels[index]}

  def __repr__(self) -> str:
    return f"FeatureSource({len(self)} x {self._split.features.shape[1:]})"


def make_features_fn(apply_fn: Callable[..., Any]) -> Callable[..., jax.Array]:
  """`features(state, images) -> pre_logits` of the model in inference mode, jitted."""

  def features(state: Mapping[str, Any], images: jax.Array) -> jax.Array:
    _, out, _ = apply_fn(state_lib.full_params(state), state["model_state"], images,
                         train=False, rng=None)
    return out["pre_logits"]

  return jax.jit(features)


def extract(features_fn: Callable[..., jax.Array], state: Mapping[str, Any],
            batches: Iterable[Mapping[str, np.ndarray]], mesh: jax.sharding.Mesh
            ) -> FeatureSplit:
  """The features of every real (unmasked) example of `batches`, in order (one process)."""
  weights = {k: state[k] for k in ("params", "frozen", "model_state")}
  features, labels = [], []
  for batch in batches:
    images = mesh_lib.global_batch(batch, mesh)["image"]
    out = np.asarray(jax.device_get(features_fn(weights, images)))
    keep = np.asarray(batch["mask"], bool)
    features.append(out[keep])
    labels.append(np.asarray(batch["label"])[keep])
  return FeatureSplit(np.concatenate(features), np.concatenate(labels))


def compute_dtype(model: nn.Module) -> Any:
  """The model's compute dtype (its `dtype` field; float32 for a model without one)."""
  return getattr(model, "dtype", jnp.float32)


def head_apply_fn(dtype: Any = jnp.float32) -> Callable[..., Any]:
  """The model's head on features: `apply(params, model_state, features, *, train, rng,
  mask=None) -> (logits, out, model_state)`, the signature of `model_fns.make_apply_fn`.

  The head is the models' `nn.Dense` named `head` (ViT, ResNet, EfficientNet), computing in the
  model's compute `dtype`; its logits are float32 like the model's. `model_state` passes
  through unchanged (the encoder is frozen).
  """

  def apply_fn(params, model_state, features, *, train: bool, rng: jax.Array | None,
               mask: jax.Array | None = None):
    del train, rng, mask  # A linear head has no training mode.
    head = params[HEAD]
    dense = nn.Dense(head["kernel"].shape[-1], use_bias="bias" in head, dtype=dtype)
    logits = dense.apply({"params": head}, features).astype(jnp.float32)
    return logits, {"pre_logits": features, "logits": logits}, model_state

  return apply_fn


def feature_batches(split: FeatureSplit, batch_size: int) -> list[dict[str, np.ndarray]]:
  """`split` in batches of `batch_size` rows, the last padded (copies of row 0, mask False)."""
  n = len(split)
  rows = max(math.ceil(n / batch_size), 1) * batch_size
  pad = np.zeros(rows - n, np.int64)
  image = np.concatenate([split.features, split.features[pad]])
  label = np.concatenate([split.labels, split.labels[pad]])
  mask = np.arange(rows) < n
  return [{"image": image[i:i + batch_size], "label": label[i:i + batch_size],
           "mask": mask[i:i + batch_size]} for i in range(0, rows, batch_size)]


def _tolerance(dtype: Any) -> float:
  """Tolerance of a recomputed value, relative to the largest: another batch layout changes the
  summation order (float32 ~1e-6, bfloat16 ~1e-2); dropout or batch statistics change far more."""
  return 1e-3 if jnp.dtype(dtype) == jnp.float32 else 5e-2


def _check_close(what: str, want: np.ndarray, got: np.ndarray, tol: float) -> None:
  want, got = np.asarray(want, np.float64), np.asarray(got, np.float64)
  diff = float(np.max(np.abs(want - got))) if want.size else 0.0
  scale = float(np.max(np.abs(want))) if want.size else 0.0
  if want.shape != got.shape or not diff <= tol * (1.0 + scale):
    raise NotEligible(
        f"The cached features do not reproduce the model's training step: {what} differ by "
        f"{diff:.3g} (largest value {scale:.3g}, shapes {want.shape} / {got.shape}). The "
        "encoder's training-mode forward pass is not the inference-mode one (dropout, batch "
        "statistics, a stochastic op?): train end to end.")


def _random_head(head: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """A head of the same shapes with N(0, 1/fan_in) kernel and N(0, 1) bias entries."""
  keys = dict(zip(sorted(head), jax.random.split(jax.random.key(0), len(head))))
  scale = {"kernel": 1.0 / math.sqrt(head["kernel"].shape[0])}
  return {k: jax.random.normal(keys[k], v.shape, v.dtype) * scale.get(k, 1.0)
          for k, v in head.items()}


def check_first_batch(apply_fn: Callable[..., Any], state: Mapping[str, Any], rng: jax.Array,
                      image_batch: Mapping[str, np.ndarray],
                      feature_batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh,
                      dtype: Any = jnp.float32) -> None:
  """Checks that a feature batch stands for an image batch in the model's first training step.

  The model's training-mode forward pass of the images (the update step's call: `rng` folded
  with step 0, the batch's mask) must give the cached features, and, with a random head (a zero
  head would make any features agree), logits equal to that head's logits of the features;
  labels and masks must be equal (the two loaders visit the examples in the same order).

  Args:
    apply_fn: the model's apply function (`model_fns.make_apply_fn`).
    state: the initial train state.
    rng: the run's training key.
    image_batch: the first batch of the image loader.
    feature_batch: the first batch of the feature loader.
    mesh: the device mesh.
    dtype: the model's compute dtype (sets the tolerance).

  Raises:
    NotEligible: naming what differs.
  """
  for key in ("label", "mask"):
    if not np.array_equal(image_batch[key], feature_batch[key]):
      raise NotEligible(f"The feature loader's first batch has other {key}s than the image "
                        "loader's: the two do not visit the examples in the same order.")
  full = dict(state_lib.full_params(state))
  full[HEAD] = _random_head(full[HEAD])
  images = mesh_lib.global_batch(image_batch, mesh)
  step_rng = jax.random.fold_in(rng, 0)
  forward = jax.jit(lambda p, s, x, m: apply_fn(p, s, x, train=True, rng=step_rng, mask=m))
  logits, out, _ = forward(full, state["model_state"], images["image"], images["mask"])
  keep = np.asarray(feature_batch["mask"], bool)
  tol = _tolerance(dtype)
  features = np.asarray(feature_batch["image"])[keep]
  _check_close("the pre-logits", features, np.asarray(out["pre_logits"], np.float32)[keep], tol)
  want, _, _ = head_apply_fn(dtype)(full, {}, jnp.asarray(features), train=True, rng=None)
  _check_close("the logits of a random head", np.asarray(want), np.asarray(logits)[keep], tol)
