"""Tests of the update step: a padded, masked last batch trains exactly as the short batch.

The equality is checked in float64: in float32, BatchNorm over a handful of values (5 rows of a
1x1 feature map deep in EfficientNet) differs by ~1e-3 between two summation orders alone.
Each model's step is compiled once per batch shape for the module (`_tiny_state` is cached):
compiling EfficientNet-Lite0's float64 step is most of these tests' time.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fm_adapt.models import efficientnet, resnet
from fm_adapt.objectives import classification as objectives
from fm_adapt.train import model_fns
from fm_adapt.train import step as step_lib


MODELS = {
    "resnet": lambda dtype: resnet.Model(num_classes=3, width=4, depth=18,
                                         weight_init="pytorch", dtype=dtype),
    # No dropout: its mask would differ between 5 and 8 rows.
    "efficientnet": lambda dtype: efficientnet.Model(num_classes=3, dropout=0.0,
                                                     conv_impl="xla", dtype=dtype),
}


@functools.lru_cache(maxsize=None)
def _tiny_state(name="resnet", dtype=jnp.float64):
  model = MODELS[name](dtype)
  variables = jax.jit(model_fns.init_variables_fn(model, (8, 8, 1)))(jax.random.key(0))
  variables = jax.tree.map(lambda x: x.astype(dtype), variables)
  # SGD: the update is the gradient itself. (Adam divides by |g| and turns rounding noise in a
  # gradient that is zero in exact arithmetic, e.g. of a bias followed by BatchNorm, into
  # visible differences; equal gradients give equal Adam steps anyway.)
  tx = optax.sgd(1e-2)
  params = variables["params"]
  state = {"params": params, "frozen": {}, "model_state": {"batch_stats": variables["batch_stats"]},
           "opt": tx.init(params), "step": jnp.zeros((), jnp.int32)}
  update = step_lib.make_update_fn(model_fns.make_apply_fn(model),
                                   objectives.get_loss("softmax_xent", "multiclass"), tx,
                                   lambda step: 1e-2)
  return state, jax.jit(update)


def _batches(dtype=np.float32):
  rng = np.random.default_rng(0)
  real = {"image": rng.normal(size=(5, 8, 8, 1)).astype(dtype),
          "label": rng.integers(0, 3, 5).astype(np.int32), "mask": np.ones(5, bool)}
  garbage = {"image": 100 * rng.normal(size=(3, 8, 8, 1)).astype(dtype),
             "label": np.array([2, 2, 2], np.int32), "mask": np.zeros(3, bool)}
  padded = {k: np.concatenate([real[k], garbage[k]]) for k in real}
  return real, padded


def _assert_trees_close(a, b, **kwargs):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y), **kwargs),
               a, b)


def test_padded_masked_batch_equals_the_short_batch():
  """Loss, gradients (hence the updated params) and BatchNorm statistics all ignore padding."""
  with jax.enable_x64(True):
    state, update = _tiny_state("resnet")
    real, padded = _batches(np.float64)
    rng = jax.random.key(1)
    short_state, short_m = update(jax.tree.map(jnp.copy, state), rng, real)
    padded_state, padded_m = update(jax.tree.map(jnp.copy, state), rng, padded)
    np.testing.assert_allclose(padded_m["loss"], short_m["loss"], rtol=1e-9)
    np.testing.assert_allclose(padded_m["l2_grads"], short_m["l2_grads"], rtol=1e-9)
    _assert_trees_close(padded_state, short_state, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_what_the_padding_rows_hold_does_not_change_the_step(name):
  """Two batches of the same real rows and different masked padding train alike (one compile
  per model; the test above checks against the short batch itself, on ResNet)."""
  with jax.enable_x64(True):
    state, update = _tiny_state(name)
    _, padded = _batches(np.float64)
    other = dict(padded, image=padded["image"] * np.where(padded["mask"], 1, -7)[:, None, None, None],
                 label=np.where(padded["mask"], padded["label"], 0).astype(np.int32))
    rng = jax.random.key(1)
    a_state, a_m = update(jax.tree.map(jnp.copy, state), rng, padded)
    b_state, b_m = update(jax.tree.map(jnp.copy, state), rng, other)
    np.testing.assert_allclose(a_m["loss"], b_m["loss"], rtol=1e-9)
    _assert_trees_close(a_state, b_state, rtol=1e-7, atol=1e-10)


def test_unmasked_padding_would_change_the_step():
  """The same padded batch with every row marked real moves the statistics: the mask matters."""
  with jax.enable_x64(True):
    state, update = _tiny_state("resnet")
    real, padded = _batches(np.float64)
    rng = jax.random.key(1)
    short_state, _ = update(jax.tree.map(jnp.copy, state), rng, real)
    unmasked_state, _ = update(jax.tree.map(jnp.copy, state), rng,
                               dict(padded, mask=np.ones(8, bool)))
  stats = lambda s: np.asarray(s["model_state"]["batch_stats"]["stem"]["bn"]["mean"])
  assert not np.allclose(stats(unmasked_state), stats(short_state), rtol=1e-3)
