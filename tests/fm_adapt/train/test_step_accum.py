"""Tests of gradient accumulation (`make_update_fn(..., grad_accum_steps=k)`).

With k micro-batches the update must equal one update on the whole batch: the loss is a mean
over the real rows, so the micro-batches are weighted by their real rows, however unevenly the
padding rows fall. SGD (lr 1) makes the parameter change the gradient itself, so the comparison
is of gradients, not of Adam's normalised steps.
"""
import os
import subprocess
import sys
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fm_adapt.models import batch_norm, vit
from fm_adapt.objectives import classification as objectives
from fm_adapt.train import build, model_fns
from fm_adapt.train import step as step_lib

BATCH = 8


def _vit_state():
  """A tiny ViT (no dropout, random head so every parameter gets a gradient), SGD lr 1."""
  model = vit.Model(num_classes=3, variant='mu/4', head_zeroinit=False)
  shapes = jax.eval_shape(model_fns.init_variables_fn(model, (8, 8, 3)), jax.random.key(0))
  rng = np.random.default_rng(0)
  params = jax.tree.map(lambda s: (0.3 * rng.normal(size=s.shape)).astype(np.float32),
                        shapes['params'])
  tx = optax.sgd(1.0)
  state = {'params': params, 'frozen': {}, 'model_state': {}, 'opt': tx.init(params),
           'step': jnp.zeros((), jnp.int32)}
  return model, state, tx


_VIT_UPDATES = {}


def _vit_update(model, tx, k):
  """The jitted ViT update for k micro-batches, compiled once for the whole file."""
  if k not in _VIT_UPDATES:
    _VIT_UPDATES[k] = _update(model, tx, k)
  return _VIT_UPDATES[k]


def _update(model, tx, k):
  loss_fn = objectives.get_loss('softmax_xent', 'multiclass')
  return jax.jit(step_lib.make_update_fn(model_fns.make_apply_fn(model), loss_fn, tx,
                                         lambda step: 1.0, grad_accum_steps=k))


def _batch(mask, shape=(8, 8, 3)):
  """Random images and labels; the padding rows (mask False) hold large garbage."""
  rng = np.random.default_rng(1)
  mask = np.asarray(mask, bool)
  image = rng.normal(size=(len(mask), *shape)).astype(np.float32)
  image[~mask] *= 100.0
  return {'image': image, 'label': rng.integers(0, 3, len(mask)).astype(np.int32), 'mask': mask}


def _delta(new, old):
  return jax.tree.map(lambda a, b: np.asarray(a, np.float64) - np.asarray(b, np.float64),
                      new['params'], old['params'])


def _assert_trees_close(a, b, **kwargs):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **kwargs), a, b)


MASKS = {
    'no padding': [True] * BATCH,
    # k=4 puts rows (0, 4), (1, 5), (2, 6), (3, 7) together: 2, 1, 1, 1 real rows.
    'uneven padding': [True] * 5 + [False] * 3,
    # k=4: micro-batches 2 and 3 hold no real row at all.
    'empty micro-batches': [True, True, False, False] * 2,
}


@pytest.mark.parametrize('mask_name', sorted(MASKS))
def test_accumulated_update_equals_one_big_batch(mask_name):
  """Loss, gradient norm and the parameter change of k=4 equal those of k=1."""
  model, state, tx = _vit_state()
  batch = _batch(MASKS[mask_name])
  counts = np.asarray(step_lib.micro_batches(batch, 4)['mask']).sum(1)
  assert counts.sum() == batch['mask'].sum()
  if mask_name != 'no padding':  # A plain mean over micro-batches would be wrong here.
    assert len(set(counts.tolist())) > 1, counts
  rng = jax.random.key(3)
  one, one_m = _vit_update(model, tx, 1)(jax.tree.map(jnp.copy, state), rng, batch)
  four, four_m = _vit_update(model, tx, 4)(jax.tree.map(jnp.copy, state), rng, batch)
  np.testing.assert_allclose(four_m['loss'], one_m['loss'], rtol=1e-6)
  np.testing.assert_allclose(four_m['l2_grads'], one_m['l2_grads'], rtol=1e-5)
  assert float(one_m['l2_grads']) > 0.1  # The comparison below is of real gradients.
  _assert_trees_close(_delta(four, state), _delta(one, state), rtol=1e-4, atol=1e-6)
  assert int(four['step']) == 1


def test_micro_batches_are_strided():
  """Micro-batch i holds rows i, i+k, ...: each device's contiguous block of the batch holds
  rows of every micro-batch."""
  batch = {'x': np.arange(8)}
  np.testing.assert_array_equal(step_lib.micro_batches(batch, 4)['x'],
                                [[0, 4], [1, 5], [2, 6], [3, 7]])


def test_batch_not_divisible_by_the_micro_batches_is_an_error():
  model, state, tx = _vit_state()
  with pytest.raises(ValueError, match=r'8 rows does not split into config.grad_accum_steps=3'):
    _update(model, tx, 3)(state, jax.random.key(0), _batch([True] * BATCH))


@pytest.mark.parametrize('value', [0, -2, 1.5, True])
def test_bad_grad_accum_steps_is_an_error(value):
  model, _, tx = _vit_state()
  with pytest.raises(ValueError, match=rf'config.grad_accum_steps={value!r}: set it to a positive'):
    _update(model, tx, value)


def test_build_checks_batch_against_micro_batches_and_devices():
  build.check_batch(8, 4)
  with pytest.raises(ValueError, match=r'batch_size=8 must be divisible by the 1 devices x '
                                       r'config.grad_accum_steps=3 = 3: make it a multiple of 3'):
    build.check_batch(8, 3)


class _BatchNormNet(nn.Module):
  """conv -> masked BatchNorm -> mean -> dense: the smallest model with batch statistics."""

  @nn.compact
  def __call__(self, image, *, train=False, mask=None):
    x = nn.Conv(4, (3, 3), dtype=jnp.float64, param_dtype=jnp.float64)(image)
    bn = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=jnp.float64,
                      param_dtype=jnp.float64)
    x = jnp.mean(nn.relu(batch_norm.normalize(bn, x, mask)), axis=(1, 2))
    logits = nn.Dense(3, dtype=jnp.float64, param_dtype=jnp.float64)(x)
    return logits, {'logits': logits}


def test_batch_norm_micro_batch_without_real_rows_is_skipped():
  """BatchNorm over a micro-batch of padding only would be 0/0: that micro-batch is skipped, so
  the step equals one on the real rows alone (running statistics updated once)."""
  with jax.enable_x64(True):
    model = _BatchNormNet()
    variables = jax.jit(model_fns.init_variables_fn(model, (6, 6, 1)))(jax.random.key(0))
    variables = jax.tree.map(lambda x: x.astype(jnp.float64), variables)
    tx = optax.sgd(1.0)
    state = {'params': variables['params'], 'frozen': {},
             'model_state': {'batch_stats': variables['batch_stats']},
             'opt': tx.init(variables['params']), 'step': jnp.zeros((), jnp.int32)}
    batch = _batch([True, False, True, False], shape=(6, 6, 1))
    batch['image'] = batch['image'].astype(np.float64)
    real = {k: v[[0, 2]] for k, v in batch.items()}  # Micro-batch 0 of k=2.
    rng = jax.random.key(1)
    short, short_m = _update(model, tx, 1)(jax.tree.map(jnp.copy, state), rng, real)
    accum, accum_m = _update(model, tx, 2)(jax.tree.map(jnp.copy, state), rng, batch)
    assert np.isfinite(float(accum_m['loss']))
    np.testing.assert_allclose(accum_m['loss'], short_m['loss'], rtol=1e-6)
    stats = lambda s: np.asarray(s['model_state']['batch_stats']['BatchNorm_0']['mean'])
    assert not np.allclose(stats(short), stats(state))  # The statistics did move.
    _assert_trees_close(jax.tree.map(np.asarray, accum['params']),
                        jax.tree.map(np.asarray, short['params']), rtol=1e-6, atol=1e-9)
    _assert_trees_close(jax.tree.map(np.asarray, accum['model_state']),
                        jax.tree.map(np.asarray, short['model_state']), rtol=1e-7, atol=1e-10)


_SHARDED = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np, optax
    from fm_adapt.models import vit
    from fm_adapt.objectives import classification as objectives
    from fm_adapt.train import mesh as mesh_lib, model_fns, state as state_lib, step as step_lib
    mesh = mesh_lib.make_mesh([("data", 2), ("fsdp", 2)])
    model = vit.Model(num_classes=3, variant="mu/4", head_zeroinit=False)
    init = model_fns.init_variables_fn(model, (8, 8, 3))
    variables = state_lib.sharded_init(init, jax.random.key(0, impl="rbg"), mesh)
    tx = optax.sgd(1.0)
    loss_fn = objectives.get_loss("softmax_xent", "multiclass")
    rng = np.random.default_rng(1)
    mask = np.array([True] * 13 + [False] * 3)
    local = dict(image=rng.normal(size=(16, 8, 8, 3)).astype(np.float32),
                 label=rng.integers(0, 3, 16).astype(np.int32), mask=mask)
    out = []
    for k in (1, 2):
      params = variables["params"]
      opt = jax.jit(tx.init, out_shardings=mesh_lib.optimizer_shardings(
          tx, jax.eval_shape(tx.init, params), jax.tree.map(lambda x: x.sharding, params), mesh))(
              params)
      state = dict(params=jax.tree.map(jnp.copy, params), frozen={}, model_state={}, opt=opt,
                   step=jax.device_put(jnp.zeros((), jnp.int32), mesh_lib.replicated(mesh)))
      update = step_lib.jit_update(step_lib.make_update_fn(
          model_fns.make_apply_fn(model), loss_fn, tx, lambda s: 1.0, grad_accum_steps=k),
          state, mesh)
      new, m = update(state, jax.random.key(2), mesh_lib.global_batch(local, mesh))
      out.append((jax.device_get(new["params"]), float(m["loss"])))
    np.testing.assert_allclose(out[1][1], out[0][1], rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                 out[1][0], out[0][0])
    print("OK")
''')


def test_accumulation_on_a_sharded_mesh_equals_one_big_batch():
  """On 4 simulated devices (data 2 x fsdp 2) the strided micro-batches need no resharding and
  give the big-batch update."""
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4 '
             + os.environ['FM_ADAPT_TEST_XLA_FLAGS'],
             JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-c', _SHARDED], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
  assert result.returncode == 0 and 'OK' in result.stdout, result.stderr[-3000:]
