"""Model functions and the sharded initialization of the train state."""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fm_adapt.adapt import masks
from fm_adapt.train import mesh as mesh_lib


def takes_mask(model: nn.Module) -> bool:
  """Whether the model's `__call__` takes `mask` (rows of a batch to leave out of statistics)."""
  return "mask" in inspect.signature(type(model).__call__).parameters


def make_apply_fn(model: nn.Module, frozen_statistics: bool = False):
  """Returns `apply(params, model_state, images, *, train, rng, mask=None) -> (logits, out, state)`.

  Args:
    model: the linen module.
    frozen_statistics: train with the model in inference mode (BatchNorm running statistics,
      no dropout) and leave `model_state` unchanged — the usual way to probe or adapt a frozen
      CNN backbone, whose statistics would otherwise drift towards the few training batches.

  In training, `mask` ([B] bool, False on padding rows) reaches models whose `__call__` takes
  it (batch statistics that must ignore padding); others need no mask (nothing couples rows).
  """
  pass_mask = takes_mask(model)

  def apply_fn(params, model_state, images, *, train: bool, rng: jax.Array | None,
               mask: jax.Array | None = None):
    train = train and not frozen_statistics
    variables = {"params": params, **model_state}
    rngs = {"dropout": rng} if (train and rng is not None) else {}
    kwargs = {"mask": mask} if (train and pass_mask and mask is not None) else {}
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


def split_variables(variables: Mapping[str, Any], trainable: Mapping[str, Any]
                    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
  """Splits model variables into (trainable params, frozen params, model_state)."""
  params, frozen = masks.split(variables["params"], trainable)
  model_state = {k: v for k, v in variables.items() if k != "params"}
  return params, frozen, model_state


def sharded_init(init_fn, rng: jax.Array, mesh: jax.sharding.Mesh,
                 rules: Any = None) -> dict[str, Any]:
  """Initializes variables directly in their sharded layout (`eval_shape`, then jit)."""
  shapes = jax.eval_shape(init_fn, rng)
  shardings = mesh_lib.param_shardings(shapes, mesh, rules)
  return jax.jit(init_fn, out_shardings=shardings)(rng)
