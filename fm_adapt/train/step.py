"""The pure training step `update_fn(train_state, rng, batch) -> (train_state, measurements)`,
its jitting over the mesh, and the prediction function of the evaluators.

`train_state` is the plain dict of `fm_adapt.train.state`.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fm_adapt.train import mesh as mesh_lib
from fm_adapt.train import state as state_lib

# apply_fn(params, model_state, images, *, train, rng, mask=None) -> (logits, out, new_model_state)
ApplyFn = Callable[..., tuple[jax.Array, dict[str, Any], dict[str, Any]]]
LossFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def make_update_fn(apply_fn: ApplyFn, loss_fn: LossFn, tx: optax.GradientTransformation,
                   lr_fn: Callable[[jax.Array], jax.Array]) -> Callable[..., Any]:
  """Returns the (un-jitted) pure update function of one training step.

  Args:
    apply_fn: the model's forward pass on the merged (trainable + frozen) parameters.
    loss_fn: `loss(logits, labels, mask) -> scalar`.
    tx: optimizer over the trainable tree.
    lr_fn: learning rate of the first schedule group as a function of the step, for logging.
  """

  def update_fn(state: Mapping[str, Any], rng: jax.Array, batch: Mapping[str, jax.Array]):
    step = state["step"]
    step_rng = jax.random.fold_in(rng, step)

    def loss_of(params):
      full = state_lib.full_params(dict(state, params=params))
      logits, _, new_model_state = apply_fn(full, state["model_state"], batch["image"],
                                            train=True, rng=step_rng, mask=batch["mask"])
      return loss_fn(logits, batch["label"], batch["mask"]), new_model_state

    (loss, new_model_state), grads = jax.value_and_grad(loss_of, has_aux=True)(state["params"])
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = dict(state, params=params, opt=opt, model_state=new_model_state, step=step + 1)
    measurements = {
        "loss": loss,
        "l2_grads": optax.global_norm(grads),
        "l2_params": optax.global_norm(params),
        "lr": jnp.asarray(lr_fn(step), jnp.float32),
    }
    return new_state, measurements

  return update_fn


def make_predict_fn(apply_fn: ApplyFn, task: str) -> Callable[..., jax.Array]:
  """Returns `predict(state, images) -> probabilities` (softmax, or sigmoid for multi-label)."""

  def predict(state: Mapping[str, Any], images: jax.Array) -> jax.Array:
    full = state_lib.full_params(state)
    logits, _, _ = apply_fn(full, state["model_state"], images, train=False, rng=None)
    logits = logits.astype(jnp.float32)
    return jax.nn.sigmoid(logits) if task == "multilabel" else jax.nn.softmax(logits, axis=-1)

  return predict


def jit_update(update_fn: Callable[..., Any], state: Mapping[str, Any],
               mesh: jax.sharding.Mesh) -> Callable[..., Any]:
  """Jits the update with the state's shardings, a sharded batch, and the state donated."""
  shardings = jax.tree.map(lambda x: x.sharding, state)
  replicated = mesh_lib.replicated(mesh)
  return jax.jit(update_fn, donate_argnums=(0,),
                 in_shardings=(shardings, replicated, mesh_lib.batch_sharding(mesh)),
                 out_shardings=(shardings, replicated))
