"""The pure training step `update_fn(train_state, rng, batch) -> (train_state, measurements)`,
with optional gradient accumulation over micro-batches, its jitting over the mesh, and the
prediction function of the evaluators.

`train_state` is the plain dict of `fm_adapt.train.state`.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fm_adapt import config as config_lib
from fm_adapt import objectives as objectives_lib
from fm_adapt.train import mesh as mesh_lib
from fm_adapt.train import state as state_lib

# apply_fn(params, model_state, images, *, train, rng, mask=None, **model_kwargs)
#   -> (logits, out, new_model_state)
ApplyFn = Callable[..., tuple[jax.Array, dict[str, Any], dict[str, Any]]]
LossFn = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def make_update_fn(apply_fn: ApplyFn, loss_fn: LossFn | objectives_lib.Objective,
                   tx: optax.GradientTransformation,
                   lr_fn: Callable[[jax.Array], jax.Array],
                   grad_accum_steps: int | None = 1) -> Callable[..., Any]:
  """Returns the (un-jitted) pure update function of one training step.

  Args:
    apply_fn: the model's forward pass on the merged (trainable + frozen) parameters.
    loss_fn: a classification loss `loss(logits, labels, mask) -> scalar`, the mean over the
      rows where mask is True, or an objective (`fm_adapt.objectives.Objective`, e.g. MIM)
      `objective(apply_fn, params, model_state, batch, rng) -> (loss, new_model_state, aux)`;
      the scalars of `aux` join the measurements (averaged over micro-batches like the loss).
    tx: optimizer over the trainable tree.
    lr_fn: learning rate of the first schedule group as a function of the step, for logging.
    grad_accum_steps: k > 1 computes the gradient of the batch in k micro-batches, one after
      another (`lax.scan`), so that only a micro-batch's activations are live at a time; see
      `accumulate_gradients`. The batch size must be divisible by k (by k times the device
      count for an even sharding, which `build` checks).
  """
  accum = config_lib.check_grad_accum_steps(grad_accum_steps)
  objective = (loss_fn if objectives_lib.is_objective(loss_fn)
               else objectives_lib.from_loss(loss_fn))

  def update_fn(state: Mapping[str, Any], rng: jax.Array, batch: Mapping[str, jax.Array]):
    step = state["step"]
    step_rng = jax.random.fold_in(rng, step)

    def loss_and_grads(params, model_state, micro_rng, micro_batch):
      def loss_of(params):
        full = state_lib.full_params(dict(state, params=params))
        loss, new_model_state, aux = objective(apply_fn, full, model_state, micro_batch,
                                               micro_rng)
        return loss, (new_model_state, aux)

      (loss, (new_model_state, aux)), grads = jax.value_and_grad(loss_of, has_aux=True)(params)
      return loss, grads, new_model_state, aux

    if accum == 1:
      loss, grads, new_model_state, aux = loss_and_grads(state["params"], state["model_state"],
                                                         step_rng, batch)
    else:
      loss, grads, new_model_state, aux = accumulate_gradients(
          loss_and_grads, state["params"], state["model_state"], step_rng, batch, accum)
    updates, opt = tx.update(grads, state["opt"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    new_state = dict(state, params=params, opt=opt, model_state=new_model_state, step=step + 1)
    measurements = {
        **aux,
        "loss": loss,
        "l2_grads": optax.global_norm(grads),
        "l2_params": optax.global_norm(params),
        "lr": jnp.asarray(lr_fn(step), jnp.float32),
    }
    return new_state, measurements

  return update_fn


def micro_batches(batch: Mapping[str, jax.Array], k: int) -> dict[str, jax.Array]:
  """Splits a batch [B, ...] into k micro-batches [k, B/k, ...]: micro-batch i holds the rows
  i, i + k, i + 2k, ...

  The strided split keeps every micro-batch spread over all devices: a batch sharded in
  contiguous blocks of B/n rows over n devices gives each device B/(k n) rows of each
  micro-batch, so no rows move between devices (B must be divisible by k n for that).
  """
  size = jax.tree.leaves(batch)[0].shape[0]
  if size % k:
    raise ValueError(f"The batch of {size} rows does not split into config.grad_accum_steps={k} "
                     "micro-batches: make the batch size a multiple of it.")
  return {name: jnp.swapaxes(x.reshape(size // k, k, *x.shape[1:]), 0, 1)
          for name, x in batch.items()}


def accumulate_gradients(loss_and_grads: Callable[..., Any], params: Any, model_state: Any,
                         rng: jax.Array, batch: Mapping[str, jax.Array], k: int
                         ) -> tuple[jax.Array, Any, Any, dict[str, jax.Array]]:
  """The loss, gradients, model state and aux measurements of one batch, in k micro-batches.

  The loss is a mean over the real rows (`mask` True), so micro-batch i, with n_i of the N real
  rows of the batch, enters with weight n_i / N: the summed gradients equal the gradient of the
  whole batch (up to float rounding), however unevenly the padding rows fall; so do the aux
  measurements. A micro-batch without real rows is skipped (`lax.cond`): zero gradient, model
  state unchanged.

  Differences from one big batch, inherent in splitting it: micro-batch i draws its dropout
  from `fold_in(rng, i)`; a model with batch statistics (BatchNorm) normalizes each
  micro-batch by its own statistics and updates its running statistics once per micro-batch,
  in order (as PyTorch or any framework does when accumulating), so only models without them
  give the big-batch update exactly.

  Args:
    loss_and_grads: `(params, model_state, rng, micro_batch) -> (loss, grads, model_state,
      aux)`, aux a dict of scalars.
    params: the trainable parameters.
    model_state: mutable collections (BatchNorm statistics), threaded through the micro-batches.
    rng: the step's key.
    batch: the global batch with 'mask' [B] bool.
    k: the number of micro-batches.

  Returns:
    (loss of the batch, its gradients, the model state after the last micro-batch, aux).
  """
  total = jnp.maximum(jnp.sum(batch["mask"]), 1)
  micro = micro_batches(batch, k)

  def run(state, index, micro):
    loss, grads, new_state, aux = loss_and_grads(params, state, jax.random.fold_in(rng, index),
                                                 micro)
    # The carried state keeps its dtypes (a float32 statistic updated from float64 values
    # would change the type of the loop's carry).
    new_state = jax.tree.map(lambda new, old: new.astype(old.dtype), new_state, state)
    return (loss.astype(jnp.float32), grads, new_state,
            jax.tree.map(lambda x: x.astype(jnp.float32), aux))

  aux_shape = jax.eval_shape(run, model_state, 0, jax.tree.map(lambda x: x[0], micro))[3]
  zero_aux = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shape)

  def body(carry, xs):
    grads_sum, loss_sum, aux_sum, state = carry
    index, micro = xs
    real = jnp.sum(micro["mask"])
    weight = real / total  # Exact ratio of ints, in the default float dtype.

    def skip(state, index, micro):
      del index, micro
      return jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params), state, zero_aux

    loss, grads, state, aux = jax.lax.cond(real > 0, run, skip, state, index, micro)
    grads_sum = jax.tree.map(lambda acc, g: acc + (weight * g).astype(acc.dtype),
                             grads_sum, grads)
    aux_sum = jax.tree.map(lambda acc, a: (acc + weight * a).astype(acc.dtype), aux_sum, aux)
    return (grads_sum, (loss_sum + weight * loss).astype(loss_sum.dtype), aux_sum, state), None

  init = (jax.tree.map(jnp.zeros_like, params), jnp.zeros((), jnp.float32), zero_aux,
          model_state)
  (grads, loss, aux, model_state), _ = jax.lax.scan(body, init, (jnp.arange(k), micro))
  return loss, grads, model_state, aux


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
