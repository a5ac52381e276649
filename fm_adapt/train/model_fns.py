"""A model's functions: `apply` and `init` factories, and the adapted, pretrained model of a config.

`make_apply_fn(model)` gives `apply(params, model_state, images, *, train, rng, mask=None,
**model_kwargs) -> (logits, out, new_model_state)`, the one signature the update step, the
evaluators and every adaptation transform (which wrap it) use; `init_variables_fn(model, image_shape)` gives
`init(rng) -> variables`. `build_model(config, ...)` builds the model of `config.model_name` /
`config.model` with the compute dtype of `config.dtype` and the rematerialization of
`config.remat` (`precision_kwargs`), and applies `config.adapt` and `config.model_init` around it.

`config.model_init = 'zoo:NAME:PATH'` (or 'zoo:PATH' with a published file name) is a catalogue
model (`fm_adapt.weights.zoo`): the ViT of the entry's configuration, with the keys of
`config.model` overriding it (printed), loaded with the entry's layout. The head is the
dataset's (`num_classes` of the data, never the catalogue's).

With a MIM objective (`config.loss.name` in `fm_adapt.objectives.mim.NAMES`) the model is built
without a head (`num_classes=None`): it pretrains an encoder ('vit_mim'), with the decoder the
objective needs (`decoder_type`, set unless config.model gives it).
"""
from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from fm_adapt import config as config_lib
from fm_adapt import models
from fm_adapt import objectives
from fm_adapt.adapt import compose
from fm_adapt import param_paths
from fm_adapt import weights
from fm_adapt.train import pretrained
from fm_adapt.weights import locate
from fm_adapt.train import writer


def takes_mask(model: nn.Module) -> bool:
  """Whether the model's `__call__` takes `mask` (rows of a batch to leave out of statistics)."""
  return "mask" in inspect.signature(type(model).__call__).parameters


def make_apply_fn(model: nn.Module, frozen_statistics: bool = False):
  """Returns `apply(params, model_state, images, *, train, rng, mask=None, **model_kwargs) ->
  (logits, out, state)`.

  Args:
    model: the linen module.
    frozen_statistics: train with the model in inference mode (BatchNorm running statistics,
      no dropout) and leave `model_state` unchanged — the usual way to probe or adapt a frozen
      CNN backbone, whose statistics would otherwise drift towards the few training batches.

  In training, `mask` ([B] bool, False on padding rows) reaches models whose `__call__` takes
  it (batch statistics that must ignore padding); others need no mask (nothing couples rows).
  `model_kwargs` go to the model's `__call__` as they are (e.g. the `patch_mask` or `keep` of
  masked image modelling, `fm_adapt.models.mim`).
  """
  pass_mask = takes_mask(model)

  def apply_fn(params, model_state, images, *, train: bool, rng: jax.Array | None,
               mask: jax.Array | None = None, **model_kwargs):
    train = train and not frozen_statistics
    variables = {"params": params, **model_state}
    rngs = {"dropout": rng} if (train and rng is not None) else {}
    kwargs = {"mask": mask} if (train and pass_mask and mask is not None) else {}
    kwargs.update(model_kwargs)
    if train and model_state:
      (logits, out), new_state = model.apply(variables, images, train=True, rngs=rngs,
                                             mutable=list(model_state), **kwargs)
      return logits, out, dict(new_state)
    logits, out = model.apply(variables, images, train=train, rngs=rngs, **kwargs)
    return logits, out, model_state

  return apply_fn


def init_variables_fn(model: nn.Module, image_shape: tuple[int, ...]):
  """Returns `init(rng) -> {'params': ..., <collections>...}` for one example of `image_shape`."""

  def init(rng: jax.Array) -> dict[str, Any]:
    images = jnp.zeros((1, *image_shape), jnp.float32)
    variables = model.init({"params": rng, "dropout": rng}, images, train=False)
    return {k: v for k, v in variables.items()}

  return init


# Model fields set by run-level config keys, never by `config.model`.
_RUN_LEVEL_FIELDS = {"dtype": "config.dtype", "remat": "config.remat"}


def precision_kwargs(config: ml_collections.ConfigDict, model_name: str) -> dict[str, Any]:
  """The model fields that `config.dtype` and `config.remat` set, checked against the model.

  'bfloat16' sets the model's compute `dtype` (its parameters, hence the optimizer state, stay
  float32; models return float32 logits and the losses reduce in float32); `remat=True` sets
  its `remat` field. Defaults ('float32', False) set nothing.

  Raises:
    ValueError: for an unknown dtype, a non-bool remat, a model without the field the setting
      needs, or `dtype` / `remat` given in `config.model` instead.
  """
  dtype = config_lib.check_dtype(config.get("dtype") or "float32")
  remat = config_lib.check_remat(config.get("remat"))
  for field, key in _RUN_LEVEL_FIELDS.items():
    if field in (config.get("model") or {}):
      raise ValueError(f"config.model.{field} is not read: set {key} instead.")
  if model_name not in models.MODELS:
    return {}  # `models.get_model` names the valid models.
  fields = models.model_fields(models.MODELS[model_name])
  out = {}
  if dtype != "float32":
    if "dtype" not in fields:
      raise ValueError(f"config.dtype={dtype!r}: model {model_name!r} has no compute dtype; "
                       "set config.dtype='float32'.")
    out["dtype"] = jnp.dtype(dtype)
  if remat:
    if "remat" not in fields:
      raise ValueError(f"config.remat=True: model {model_name!r} does not support "
                       "rematerialization; set config.remat=False.")
    out["remat"] = True
  return out


@dataclasses.dataclass
class ModelFns:
  """A model's init / apply functions after adaptation, and its pretrained loading."""
  init_fn: Callable[[jax.Array], dict[str, Any]]
  apply_fn: Callable[..., Any]
  adaptation: Any = None
  load: Callable[[dict[str, Any]], dict[str, Any]] | None = None
  base: dict[str, str] | None = None
  model: Any = None

  @property
  def patch_size(self) -> int | None:
    """The patch size of a ViT (MIM objectives need it), None for other models."""
    return patch_size(self.model)


def patch_size(model: nn.Module | None) -> int | None:
  """The patch size of a ViT (`models.vit.Model` or a subclass), else None."""
  if not isinstance(model, models.vit.Model):
    return None
  return models.vit.decode_variant(model.variant)["patch_size"]


def catalogue_model(config: ml_collections.ConfigDict) -> tuple[Any, str, dict[str, Any]]:
  """(entry, checkpoint path, model kwargs) of a 'zoo:' `config.model_init`.

  The kwargs are the entry's ViT configuration with the keys of `config.model` on top (each
  overridden catalogue value is printed).

  Raises:
    ValueError: an unknown catalogue name (listing the catalogue), or a `config.model_name`
      other than 'vit' (catalogue models are ViTs).
  """
  entry, _ = weights.zoo.parse_spec(config.model_init)
  if config.get("model_name") != "vit":
    raise ValueError(
        f"config.model_init={config.model_init!r} is the catalogue model {entry.name!r}, a ViT, "
        f"but config.model_name={config.get('model_name')!r}: set config.model_name='vit'.")
  user = dict(config.get("model", {}))
  catalogue = weights.zoo.model_config(entry)
  changed = {k: (catalogue[k], v) for k, v in user.items() if k in catalogue and catalogue[k] != v}
  if changed:
    writer.console(f"config.model overrides the catalogue model {entry.name!r}: "
                   + ", ".join(f"{k}={v!r} (catalogue: {c!r})" for k, (c, v) in changed.items()))
  return entry, weights.zoo.parse_spec(config.model_init)[1], {**catalogue, **user}


def build_model(config: ml_collections.ConfigDict, spec: Any, image_shape: tuple[int, ...]
                ) -> ModelFns:
  """The model of a config, adapted by `config.adapt`, loading `config.model_init`."""
  entry = None
  if weights.zoo.is_spec(config.get("model_init")):
    entry, checkpoint, model_kwargs = catalogue_model(config)
    pretrained.check_catalogue_load(entry, config.get("model_load") or {})
  else:
    checkpoint, model_kwargs = config.get("model_init"), dict(config.get("model", {}))
  model_kwargs.update(precision_kwargs(config, config.model_name))
  mim_loss = objectives.is_mim(config.get("loss"))
  if mim_loss:
    model_kwargs = objectives.mim.model_kwargs(config.loss.name, model_kwargs)
  adapt_cfgs = [dict(a) for a in (config.get("adapt") or ())]
  adaptation = (compose.apply_transforms(adapt_cfgs, config.model_name, model_kwargs)
                if adapt_cfgs else None)
  kwargs = adaptation.model_kwargs if adaptation else model_kwargs
  num_classes = None if mim_loss else spec.num_classes
  model = models.get_model(config.model_name, num_classes=num_classes, **kwargs)
  apply_fn = make_apply_fn(model, bool(config.get("frozen_statistics")))
  model_init = init_variables_fn(model, image_shape)
  init_fn = model_init
  if adaptation is not None:
    apply_fn = adaptation.wrap_apply(apply_fn)

    def init_fn(rng):
      variables = model_init(rng)
      extra_rng = jax.random.fold_in(rng, 1)
      return dict(variables, params=adaptation.init_extra(variables["params"], extra_rng,
                                                          image_shape=tuple(image_shape)))

  if not checkpoint:
    return ModelFns(init_fn, apply_fn, adaptation, model=model)
  path = locate.resolve_path(checkpoint)
  base = {"path": str(path), "sha256": locate.file_sha256(path)}
  if entry is not None:
    base["zoo"] = entry.name
  base_model = models.get_model(config.model_name, num_classes=num_classes, **model_kwargs)
  base_paths = set(param_paths.flatten(jax.eval_shape(
      init_variables_fn(base_model, image_shape), jax.random.key(0))["params"]))
  extras = [p for p in param_paths.flatten(jax.eval_shape(init_fn, jax.random.key(0))["params"])
            if p not in base_paths]
  load_cfg = dict(config.get("model_load") or {})
  load = lambda variables: pretrained.load_pretrained(variables, path, load_cfg, extras, entry)
  return ModelFns(init_fn, apply_fn, adaptation, load, base, model)
