"""Training objectives, chosen by `config.loss.name`: one registry for the one update step.

An objective is `objective(apply_fn, params, model_state, batch, rng) -> (loss, new_model_state,
aux)` (`fm_adapt.objectives.base`); `fm_adapt.train.step.make_update_fn` takes one
(or a plain classification loss, which it wraps with `from_loss`).

  classification  'softmax_xent', 'logit_adjusted_xent', 'sigmoid_xent'
                  (`fm_adapt.objectives.classification`): the model's logits against the labels.
  MIM             'simmim', 'mae', 'frequency', 'deblur' (`fm_adapt.objectives.mim`): the
                  images reconstructed by 'vit_mim'; the labels are ignored.

    objective = objectives.get_objective(config.loss, task, patch_size=model_fns.patch_size)
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax

from fm_adapt.objectives import base
from fm_adapt.objectives import classification as classification_lib
from fm_adapt.objectives import mim

Objective = base.Objective
FunctionObjective = base.FunctionObjective
LossFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


class ClassificationObjective(base.Objective):
  """A classification loss `loss(logits, labels, mask)` as an objective.

  Calls `apply_fn(params, model_state, batch['image'], train=True, rng=rng,
  mask=batch['mask'])` and returns (loss, new model state, {}).
  """

  def __init__(self, loss_fn: LossFn):
    self.loss_fn = loss_fn

  def __call__(self, apply_fn, params, model_state, batch, rng):
    logits, _, new_model_state = apply_fn(params, model_state, batch['image'], train=True,
                                          rng=rng, mask=batch['mask'])
    return self.loss_fn(logits, batch['label'], batch['mask']), new_model_state, {}


def from_loss(loss_fn: LossFn) -> ClassificationObjective:
  """The objective of a classification loss."""
  return ClassificationObjective(loss_fn)


def is_objective(fn: Callable[..., Any]) -> bool:
  """Whether fn is an `Objective` (else it is taken for a classification loss); wrap a plain
  function with the objective signature in `FunctionObjective`."""
  return isinstance(fn, base.Objective)


def names() -> list[str]:
  """Every objective name `config.loss.name` takes."""
  return sorted(classification_lib.LOSSES) + list(mim.NAMES)


def is_mim(spec: Mapping[str, Any] | str | None) -> bool:
  """Whether a config.loss entry names a MIM objective (the model then has no head)."""
  name = spec if isinstance(spec, str) else dict(spec or {}).get('name')
  return name in mim.NAMES


def get_objective(spec: Mapping[str, Any] | str | None, task: str, *,
                  patch_size: int | None = None) -> Objective:
  """The objective of a config.loss entry (dict(name=..., **options) or a name).

  Args:
    spec: the entry; None (or no name) picks the classification default of the task.
    task: the dataset's task ('multiclass', 'ordinal', 'multilabel'); MIM ignores it.
    patch_size: the model's patch size, needed by the MIM objectives.

  Raises:
    ValueError: an unknown name, listing every valid one; bad options.
  """
  entry = {'name': spec} if isinstance(spec, str) else dict(
      spec.to_dict() if hasattr(spec, 'to_dict') else (spec or {}))
  name = entry.get('name')
  if name in mim.NAMES:
    return mim.get_objective(entry, patch_size)
  if name is not None and name not in classification_lib.LOSSES:
    raise ValueError(f'Unknown loss {name!r}; valid: {names()}')
  return from_loss(classification_lib.get_loss(entry or None, task))
