"""Supervised classification objectives: multi-class, multi-label and long-tail aware.

Each loss takes `(logits [B, K], labels, mask [B], **kwargs)` and returns the mean loss over the
examples where `mask` is True. Multi-class labels are integer class ids [B]; multi-label labels
are multi-hot [B, K]. Registry: `LOSSES`.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  mask = mask.astype(values.dtype)
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def softmax_xent(logits, labels, mask, *, label_smoothing: float = 0.0,
                 class_weights: Sequence[float] | None = None) -> jax.Array:
  """Softmax cross-entropy for integer labels, with optional smoothing and class weights."""
  num_classes = logits.shape[-1]
  onehot = jax.nn.one_hot(labels, num_classes)
  targets = optax.smooth_labels(onehot, label_smoothing) if label_smoothing else onehot
  losses = optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)
  if class_weights is not None:
    losses = losses * jnp.asarray(class_weights, jnp.float32)[labels]
  return _masked_mean(losses, mask)


def logit_adjusted_xent(logits, labels, mask, *, class_priors: Sequence[float],
                        tau: float = 1.0) -> jax.Array:
  """Logit-adjusted softmax cross-entropy for long-tailed labels (Menon et al., ICLR 2021).

  Adds `tau * log(prior)` to the logits during training, so the argmax of the raw logits at
  test time is balanced across classes.
  """
  adjustment = tau * jnp.log(jnp.asarray(class_priors, jnp.float32) + 1e-12)
  return softmax_xent(logits.astype(jnp.float32) + adjustment, labels, mask)


LABEL_REDUCTIONS = ("mean", "sum")


def sigmoid_xent(logits, labels, mask, *, pos_weight: Sequence[float] | None = None,
                 label_reduction: str = "mean") -> jax.Array:
  """Sigmoid cross-entropy for multi-hot labels, mean over examples.

  Args:
    logits: [B, L].
    labels: multi-hot [B, L].
    mask: [B] bool, the real examples.
    pos_weight: optional [L] weights of the positive term (PyTorch's `pos_weight`).
    label_reduction: 'mean' over labels (PyTorch's BCEWithLogitsLoss, the MedMNIST v2 loss) or
      'sum' (L times larger gradients).
  """
  if label_reduction not in LABEL_REDUCTIONS:
    raise ValueError(f"Unknown label_reduction {label_reduction!r}; valid: {list(LABEL_REDUCTIONS)}")
  labels = labels.astype(jnp.float32)
  log_p = jax.nn.log_sigmoid(logits.astype(jnp.float32))
  log_not_p = jax.nn.log_sigmoid(-logits.astype(jnp.float32))
  weight = 1.0 if pos_weight is None else jnp.asarray(pos_weight, jnp.float32)
  per_label = -(weight * labels * log_p + (1.0 - labels) * log_not_p)
  reduce = jnp.mean if label_reduction == "mean" else jnp.sum
  return _masked_mean(reduce(per_label, axis=-1), mask)


LOSSES: dict[str, Callable[..., jax.Array]] = {
    "softmax_xent": softmax_xent,
    "logit_adjusted_xent": logit_adjusted_xent,
    "sigmoid_xent": sigmoid_xent,
}


def get_loss(spec: Mapping[str, Any] | str | None, task: str) -> Callable[..., jax.Array]:
  """Returns `loss(logits, labels, mask)` for a loss spec like dict(name='softmax_xent').

  Args:
    spec: loss name or dict(name=..., **kwargs); None picks the task's default.
    task: 'multiclass', 'ordinal' or 'multilabel' (picks the default and checks the match).
  """
  spec = {"name": spec} if isinstance(spec, str) else dict(spec or {})
  default = "sigmoid_xent" if task == "multilabel" else "softmax_xent"
  name = spec.pop("name", default)
  if name not in LOSSES:
    raise ValueError(f"Unknown loss {name!r}; valid: {sorted(LOSSES)}")
  if (name == "sigmoid_xent") != (task == "multilabel"):
    raise ValueError(f"Loss {name!r} does not fit a {task} task; use {default!r}.")
  fn = LOSSES[name]
  return lambda logits, labels, mask: fn(logits, labels, mask, **spec)
