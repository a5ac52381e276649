"""Tests of fm_adapt.train.model_fns: config.dtype and config.remat reach the model."""
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fm_adapt import config as config_lib
from fm_adapt import models
from fm_adapt.train import build, model_fns

SPEC = types.SimpleNamespace(num_classes=3, task='multiclass')
IMAGE_SHAPE = (8, 8, 3)


def _config(**overrides):
  config = config_lib.base_config()
  config.model = dict(variant='mu/4', head_zeroinit=False)
  config.lr = 0.1
  for key, value in overrides.items():
    config[key] = value
  return config


def test_defaults_set_no_model_field():
  assert model_fns.precision_kwargs(_config(), 'vit') == {}


def test_bfloat16_and_remat_set_the_model_fields():
  kwargs = model_fns.precision_kwargs(_config(dtype='bfloat16', remat=True), 'vit')
  assert kwargs == {'dtype': jnp.dtype(jnp.bfloat16), 'remat': True}
  built = model_fns.build_model(_config(dtype='bfloat16', remat=True), SPEC, IMAGE_SHAPE)
  assert built.model.dtype == jnp.bfloat16 and built.model.remat


def test_resnet_takes_both():
  kwargs = model_fns.precision_kwargs(_config(dtype='bfloat16', remat=True), 'resnet')
  assert kwargs == {'dtype': jnp.dtype(jnp.bfloat16), 'remat': True}


def test_unknown_dtype_lists_the_valid_ones():
  with pytest.raises(ValueError, match=r"Unknown config.dtype 'float16'; valid: \['float32', "
                                       r"'bfloat16'\]"):
    model_fns.precision_kwargs(_config(dtype='float16'), 'vit')


class _NoDtype(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, image, *, train=False):
    logits = nn.Dense(self.num_classes)(image.reshape(image.shape[0], -1))
    return logits, {'logits': logits}


def test_model_without_dtype_names_config_dtype(monkeypatch):
  monkeypatch.setitem(models.MODELS, 'nodtype', _NoDtype)
  assert model_fns.precision_kwargs(_config(), 'nodtype') == {}
  with pytest.raises(ValueError, match=r"config.dtype='bfloat16': model 'nodtype' has no compute "
                                       r"dtype; set config.dtype='float32'"):
    model_fns.precision_kwargs(_config(dtype='bfloat16'), 'nodtype')


def test_model_without_remat_names_config_remat():
  with pytest.raises(ValueError, match=r"config.remat=True: model 'efficientnet' does not "
                                       r"support rematerialization; set config.remat=False"):
    model_fns.precision_kwargs(_config(remat=True), 'efficientnet')


@pytest.mark.parametrize('field, key', [('dtype', 'config.dtype'), ('remat', 'config.remat')])
def test_model_field_is_refused_for_the_run_level_key(field, key):
  config = _config()
  config.model = dict(variant='mu/4', **{field: 'bfloat16' if field == 'dtype' else True})
  with pytest.raises(ValueError, match=rf'config.model.{field} is not read: set {key} instead'):
    model_fns.build_model(config, SPEC, IMAGE_SHAPE)


def _one_step(config):
  """One update of the library's step on a fixed batch; returns (state, measurements)."""
  fns = build.build_train_fns(config, SPEC, IMAGE_SHAPE, 10, jax.random.key(0))
  rng = np.random.default_rng(0)
  variables = jax.tree.map(lambda s: (0.3 * rng.normal(size=s.shape)).astype(s.dtype),
                           fns.variables_shape)
  params = variables['params']
  state = {'params': params, 'frozen': {}, 'model_state': {}, 'opt': fns.tx.init(params),
           'step': jnp.zeros((), jnp.int32)}
  batch = {'image': rng.normal(size=(4, *IMAGE_SHAPE)).astype(np.float32),
           'label': np.array([0, 1, 2, 0], np.int32), 'mask': np.ones(4, bool)}
  return jax.jit(fns.update_fn)(state, jax.random.key(1), batch)


def test_bfloat16_step_keeps_float32_params_and_optimizer_state():
  state, m = _one_step(_config(dtype='bfloat16'))
  leaves = jax.tree.leaves({'params': state['params'], 'opt': state['opt']})
  float_leaves = [x for x in leaves if jnp.issubdtype(x.dtype, jnp.floating)]
  assert float_leaves and all(x.dtype == jnp.float32 for x in float_leaves)
  assert m['loss'].dtype == jnp.float32 and np.isfinite(float(m['loss']))
  _, reference = _one_step(_config())
  np.testing.assert_allclose(m['loss'], reference['loss'], rtol=0.05)
  assert float(m['loss']) != float(reference['loss'])  # The compute did run in bfloat16.


def test_remat_step_equals_the_plain_step():
  remat, remat_m = _one_step(_config(remat=True))
  plain, plain_m = _one_step(_config())
  np.testing.assert_allclose(remat_m['loss'], plain_m['loss'], rtol=1e-6)
  np.testing.assert_allclose(remat_m['l2_grads'], plain_m['l2_grads'], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               remat['params'], plain['params'])


def test_ept_is_sized_by_the_images_run_not_the_stored_position_grid():
  """A ViT storing its position grid at 3x3 (pretraining resolution) run on 8x8 images with
  4-px patches (2x2): EPT's table has one row per token of the images run (1 + 4)."""
  config = _config(adapt=[dict(name='ept', num_tokens=2)])
  config.model = dict(variant='mu/4', head_zeroinit=False, posemb_grid=3,
                      posemb_resize='bicubic')
  fns = model_fns.build_model(config, SPEC, IMAGE_SHAPE)
  variables = fns.init_fn(jax.random.key(0))
  assert variables['params']['pos_embedding'].shape[1] == 9
  ept = variables['params']['prompt']['ept']
  assert ept.shape[1] == 1 + 4, ept.shape
  images = jnp.zeros((2, *IMAGE_SHAPE))
  logits, _, _ = fns.apply_fn(variables['params'], {}, images, train=False, rng=None)
  assert logits.shape == (2, SPEC.num_classes)
