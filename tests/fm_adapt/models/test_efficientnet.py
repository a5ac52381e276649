"""Tests of fm_adapt.models.efficientnet: variants, parameter layout, shapes, train mode."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fm_adapt.models import efficientnet

LITE0_PARAMS = 4_652_008  # README of the ImageNet checkpoint (1000 classes)
BLOCK_0 = {'dw_conv', 'dw_bn', 'project_conv', 'project_bn'}
BLOCK = BLOCK_0 | {'expand_conv', 'expand_bn'}


def _abstract_variables(model: efficientnet.Model, size: int = 32) -> dict:
  image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), image)


def _random_variables(model: efficientnet.Model, seed: int = 0) -> dict:
  """Concrete variables from numpy (avoids compiling init); variances positive."""
  rng = np.random.default_rng(seed)
  def leaf(path, x):
    value = rng.normal(0., 0.1, x.shape).astype(np.float32)
    return np.abs(value) + 0.5 if path[-1].key == 'var' else value
  return jax.tree_util.tree_map_with_path(leaf, _abstract_variables(model))


def test_unknown_variant_lists_valid():
  with pytest.raises(ValueError, match=r"Unknown EfficientNet variant 'lite9'.*\['lite0'\]"):
    efficientnet.decode_variant('lite9')
  with pytest.raises(ValueError, match=r"'b0'.*\['lite0'\]"):
    efficientnet.Model(variant='b0')  # at construction, before any init


def test_parameter_names_and_shapes():
  variables = _abstract_variables(efficientnet.Model(num_classes=1000))
  params, stats = variables['params'], variables['batch_stats']
  blocks = [f'block_{i}' for i in range(16)]
  assert set(params) == {'stem', 'head_conv', 'head_bn', 'head', *blocks}
  assert set(params['stem']) == {'conv', 'bn'}
  assert set(params['block_0']) == BLOCK_0
  assert all(set(params[b]) == BLOCK for b in blocks[1:])
  assert params['stem']['conv']['kernel'].shape == (3, 3, 3, 32)
  assert params['block_0']['dw_conv']['kernel'].shape == (3, 3, 1, 32)
  assert params['block_3']['expand_conv']['kernel'].shape == (1, 1, 24, 144)
  assert params['block_3']['dw_conv']['kernel'].shape == (5, 5, 1, 144)
  assert params['block_3']['project_conv']['kernel'].shape == (1, 1, 144, 40)
  assert params['block_15']['project_conv']['kernel'].shape == (1, 1, 1152, 320)
  assert params['head_conv']['kernel'].shape == (1, 1, 320, 1280)
  assert params['head']['kernel'].shape == (1280, 1000)
  assert set(params['head_bn']) == {'scale', 'bias'}
  assert set(stats['head_bn']) == {'mean', 'var'}
  assert set(stats) == set(params) - {'head', 'head_conv'}
  assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == LITE0_PARAMS


@pytest.mark.parametrize('size, grid', [(224, 7), (33, 2), (64, 2)])
def test_output_shapes(size, grid):
  model = efficientnet.Model(num_classes=5)
  variables = _abstract_variables(model, size)
  logits, out = jax.eval_shape(model.apply, variables,
                               jax.ShapeDtypeStruct((2, size, size, 3), jnp.float32))
  assert logits.shape == (2, 5)
  assert set(out) == {'features', 'pre_logits', 'logits'}
  assert out['features'].shape == (2, grid, grid, 1280)
  assert out['pre_logits'].shape == (2, 1280)


def test_compute_dtype():
  model = efficientnet.Model(num_classes=5, dtype=jnp.bfloat16)
  variables = _abstract_variables(model)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables))
  logits, _ = jax.eval_shape(model.apply, variables,
                             jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  assert logits.dtype == jnp.bfloat16


def test_train_mode_updates_batch_stats_and_uses_dropout():
  model = efficientnet.Model(num_classes=5, dropout=0.5)
  variables = _random_variables(model)
  images = jnp.asarray(np.random.default_rng(1).normal(size=(2, 32, 32, 3)), jnp.float32)

  @jax.jit
  def train_apply(variables, rng):
    return model.apply(variables, images, train=True, mutable=['batch_stats'],
                       rngs={'dropout': rng})

  (logits_a, _), updates = train_apply(variables, jax.random.key(0))
  (logits_b, _), _ = train_apply(variables, jax.random.key(1))
  assert logits_a.shape == (2, 5) and np.all(np.isfinite(logits_a))
  assert not np.allclose(logits_a, logits_b)  # dropout differs by rng
  old, new = variables['batch_stats']['stem']['bn'], updates['batch_stats']['stem']['bn']
  assert not np.allclose(old['mean'], new['mean'])
  with pytest.raises(Exception, match='dropout'):
    jax.eval_shape(lambda v: model.apply(v, images, train=True, mutable=['batch_stats']),
                   variables)
