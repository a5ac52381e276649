"""build_model with a MIM objective: a headless 'vit_mim', its patch size, masking arguments."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fm_adapt import config as config_lib
from fm_adapt import models
from fm_adapt import objectives
from fm_adapt.models import mim
from fm_adapt.train import model_fns

SPEC = types.SimpleNamespace(num_classes=3, task='multiclass')
IMAGE_SHAPE = (28, 28, 1)


@pytest.fixture(autouse=True)
def _registered(monkeypatch):
  """'vit_mim' in the model registry (fm_adapt.models.MODELS), as a run needs it."""
  if 'vit_mim' not in models.MODELS:
    monkeypatch.setitem(models.MODELS, 'vit_mim', mim.Model)


def _config(name, loss):
  config = config_lib.base_config()
  config.model_name = name
  config.model = dict(variant='mu/4')
  if name == 'vit_mim':
    config.model.update(decoder_width=16, decoder_heads=2, decoder_mlp_dim=32, decoder_depth=1)
  config.loss = loss
  return config


def test_mim_objective_builds_a_headless_model_and_knows_its_patch_size():
  fns = model_fns.build_model(_config('vit_mim', dict(name='simmim')), SPEC, IMAGE_SHAPE)
  assert fns.model.num_classes is None and fns.patch_size == 4
  variables = jax.jit(fns.init_fn)(jax.random.key(0))
  assert 'head' not in variables['params'] and 'mask_token' in variables['params']
  objective = objectives.get_objective(dict(name='simmim'), SPEC.task,
                                       patch_size=fns.patch_size)
  batch = {'image': jnp.ones((2, *IMAGE_SHAPE)), 'label': jnp.zeros(2, jnp.int32),
           'mask': jnp.ones(2, bool)}
  loss, _, aux = objective(fns.apply_fn, variables['params'], {}, batch, jax.random.key(0))
  assert np.isfinite(float(loss)) and aux == {}


def test_model_kwargs_reach_the_model():
  fns = model_fns.build_model(_config('vit_mim', dict(name='mae')), SPEC, IMAGE_SHAPE)
  variables = jax.jit(fns.init_fn)(jax.random.key(0))
  keep = jnp.asarray([[0, 3, 7]], jnp.int32)
  _, out, _ = fns.apply_fn(variables['params'], {}, jnp.ones((1, *IMAGE_SHAPE)), train=True,
                           rng=jax.random.key(1), mask=jnp.ones(1, bool), keep=keep)
  assert out['patch_tokens'].shape == (1, 3, 32)


def test_the_objective_picks_the_decoder():
  assert model_fns.build_model(_config('vit_mim', dict(name='mae')), SPEC,
                               IMAGE_SHAPE).model.decoder_type == 'transformer'
  assert model_fns.build_model(_config('vit_mim', dict(name='deblur')), SPEC,
                               IMAGE_SHAPE).model.decoder_type == 'linear'
  config = _config('vit_mim', dict(name='mae'))
  config.model.decoder_type = 'linear'
  with pytest.raises(ValueError, match="'mae' needs config.model.decoder_type='transformer', "
                                       "got 'linear'"):
    model_fns.build_model(config, SPEC, IMAGE_SHAPE)


def test_classification_keeps_the_datasets_head_and_patch_size_of_other_models():
  fns = model_fns.build_model(_config('vit', None), SPEC, (8, 8, 3))
  assert fns.model.num_classes == 3 and fns.patch_size == 4
  assert model_fns.patch_size(models.resnet.Model(num_classes=3)) is None


def test_a_classification_loss_on_vit_mim_is_a_clear_error():
  fns = model_fns.build_model(_config('vit_mim', dict(name='softmax_xent')), SPEC, IMAGE_SHAPE)
  with pytest.raises(ValueError, match='has no head'):
    jax.eval_shape(fns.init_fn, jax.random.key(0))
