"""Tests of the update step with full objectives (`fm_adapt.objectives.Objective`): aux
measurements, padding rows, gradient accumulation, one trace."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from fm_adapt import objectives
from fm_adapt.models import mim
from fm_adapt.train import model_fns
from fm_adapt.train import step as step_lib

DECODER = dict(decoder_width=16, decoder_depth=1, decoder_heads=2, decoder_mlp_dim=32)


def _state(params, tx):
  return {'params': params, 'frozen': {}, 'model_state': {}, 'opt': tx.init(params),
          'step': jnp.zeros((), jnp.int32)}


def _linear_problem():
  """A least-squares objective on params {'w': [3]} with an aux measurement."""

  def fn(apply_fn, params, model_state, batch, rng):
    del apply_fn, rng
    rows = batch['mask'].astype(jnp.float32)
    err = (batch['image'] @ params['w'] - batch['label']) ** 2
    loss = jnp.sum(err * rows) / jnp.maximum(rows.sum(), 1)
    aux = {'max_err': jnp.max(err * rows), 'mean_x': jnp.sum(batch['image'][:, 0] * rows)
           / jnp.maximum(rows.sum(), 1)}
    return loss, model_state, aux

  rng = np.random.default_rng(0)
  batch = {'image': jnp.asarray(rng.normal(size=(8, 3)), jnp.float32),
           'label': jnp.asarray(rng.normal(size=8), jnp.float32),
           'mask': jnp.asarray([True] * 5 + [False] * 3)}
  return objectives.FunctionObjective(fn), {'w': jnp.zeros(3)}, batch


def test_aux_measurements_join_and_accumulate_like_the_loss():
  objective, params, batch = _linear_problem()
  tx = optax.sgd(0.1)
  results = {}
  for k in (1, 2, 4):
    update = jax.jit(step_lib.make_update_fn(None, objective, tx, lambda s: 0.1,
                                             grad_accum_steps=k))
    state, m = update(_state(params, tx), jax.random.key(0), batch)
    results[k] = (state['params']['w'], m)
  x, y, real = (np.asarray(batch[k]) for k in ('image', 'label', 'mask'))
  assert set(results[1][1]) == {'loss', 'l2_grads', 'l2_params', 'lr', 'max_err', 'mean_x'}
  np.testing.assert_allclose(results[1][1]['mean_x'], x[real, 0].mean(), rtol=1e-6)
  np.testing.assert_allclose(results[1][1]['loss'], (y[real] ** 2).mean(), rtol=1e-6)
  for k in (2, 4):  # Means over real rows, so accumulation gives the same loss, step and mean_x.
    np.testing.assert_allclose(results[k][0], results[1][0], rtol=1e-5)
    np.testing.assert_allclose(results[k][1]['loss'], results[1][1]['loss'], rtol=1e-5)
    np.testing.assert_allclose(results[k][1]['mean_x'], results[1][1]['mean_x'], rtol=1e-5)


def test_a_plain_function_is_taken_for_a_classification_loss():
  """Only an `Objective` is called as one; a plain callable keeps the classification contract."""
  assert not objectives.is_objective(lambda logits, labels, mask: 0.0)
  assert objectives.is_objective(objectives.from_loss(lambda logits, labels, mask: 0.0))
  calls = []

  def apply_fn(params, model_state, images, *, train, rng, mask=None):
    calls.append((train, mask is not None))
    return images @ params['w'], {}, model_state

  loss = lambda logits, labels, mask: jnp.mean((logits[:, 0] - labels) ** 2)
  _, params, batch = _linear_problem()
  params = {'w': jnp.zeros((3, 1))}
  tx = optax.sgd(0.1)
  _, m = step_lib.make_update_fn(apply_fn, loss, tx, lambda s: 0.1)(_state(params, tx),
                                                                    jax.random.key(0), batch)
  assert calls == [(True, True)] and set(m) == {'loss', 'l2_grads', 'l2_params', 'lr'}


def _mim_setup(k):
  model = mim.Model(variant='mu/4', decoder_type='linear', **DECODER)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16, 16, 1)))['params']
  # No random draw (fixed sigma, no mask): micro-batches see what the whole batch sees.
  objective = objectives.get_objective(dict(name='deblur', sigma=(1.0, 1.0)), 'multiclass',
                                       patch_size=4)
  tx = optax.sgd(0.05)
  update = jax.jit(step_lib.make_update_fn(model_fns.make_apply_fn(model), objective, tx,
                                           lambda s: 0.05, grad_accum_steps=k))
  return _state(params, tx), update


def test_mim_objective_ignores_padding_rows_and_accumulates_exactly():
  rng = np.random.default_rng(0)
  real = rng.normal(size=(4, 16, 16, 1)).astype(np.float32)
  garbage = 100 * rng.normal(size=(4, 16, 16, 1)).astype(np.float32)
  padded = {'image': jnp.asarray(np.concatenate([real, garbage])),
            'label': jnp.zeros(8, jnp.int32), 'mask': jnp.asarray([True] * 4 + [False] * 4)}
  short = {'image': jnp.asarray(real), 'label': jnp.zeros(4, jnp.int32),
           'mask': jnp.ones(4, bool)}
  state, update = _mim_setup(1)
  short_state, short_m = update(jax.tree.map(jnp.copy, state), jax.random.key(1), short)
  padded_state, padded_m = update(jax.tree.map(jnp.copy, state), jax.random.key(1), padded)
  np.testing.assert_allclose(padded_m['loss'], short_m['loss'], rtol=1e-5)
  chex.assert_trees_all_close(padded_state['params'], short_state['params'], rtol=1e-4,
                              atol=1e-6)
  state2, update2 = _mim_setup(2)
  accum_state, accum_m = update2(state2, jax.random.key(1), padded)
  np.testing.assert_allclose(accum_m['loss'], short_m['loss'], rtol=1e-5)
  chex.assert_trees_all_close(accum_state['params'], short_state['params'], rtol=1e-4,
                              atol=1e-6)


def test_mim_update_traces_once():
  """Masks drawn from the step's key: new masks every step, one trace."""
  model = mim.Model(variant='mu/4', decoder_type='transformer', **DECODER)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 16, 16, 1)))['params']
  objective = objectives.get_objective(dict(name='mae'), 'multiclass', patch_size=4)
  tx = optax.adam(1e-3)
  update = jax.jit(chex.assert_max_traces(step_lib.make_update_fn(
      model_fns.make_apply_fn(model), objective, tx, lambda s: 1e-3), n=1))
  state = _state(params, tx)
  batch = {'image': jnp.asarray(np.random.default_rng(0).normal(size=(4, 16, 16, 1)),
                                jnp.float32),
           'label': jnp.zeros(4, jnp.int32), 'mask': jnp.ones(4, bool)}
  losses = []
  for _ in range(3):
    state, m = update(state, jax.random.key(0), batch)
    losses.append(float(m['loss']))
  assert int(state['step']) == 3 and len(set(losses)) == 3
