"""What makes a callable an objective of the update step (`fm_adapt.train.step`).

An objective is `objective(apply_fn, params, model_state, batch, rng) -> (loss, new_model_state,
aux)`: `params` are the full (trainable + frozen) parameters, `batch` the dict of 'image',
'label' and 'mask' (the real rows), `aux` a dict of scalar measurements. The loss must be a mean
over the real rows (gradient accumulation weighs micro-batches by their real rows).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax


class Objective:
  """Base class of objectives; `fm_adapt.train.step.make_update_fn` tells them from plain
  classification losses `loss(logits, labels, mask)` by it."""

  def __call__(self, apply_fn: Callable[..., Any], params: Any, model_state: Any,
               batch: dict[str, jax.Array], rng: jax.Array
               ) -> tuple[jax.Array, Any, dict[str, jax.Array]]:
    raise NotImplementedError


class FunctionObjective(Objective):
  """A plain function with the objective signature, as an `Objective`."""

  def __init__(self, fn: Callable[..., tuple[jax.Array, Any, dict[str, jax.Array]]]):
    self.fn = fn

  def __call__(self, apply_fn, params, model_state, batch, rng):
    return self.fn(apply_fn, params, model_state, batch, rng)
