"""Tests of the MIM model (ViT encoder + mask token + decoder) and the ViT's masking arguments."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fm_adapt import param_paths
from fm_adapt.models import mim, vit

SHAPE = (2, 28, 28, 3)
DECODER = dict(decoder_width=16, decoder_depth=1, decoder_heads=2, decoder_mlp_dim=32)


def _model(decoder_type, **kwargs):
  return mim.Model(variant='mu/4', decoder_type=decoder_type, **DECODER, **kwargs)


def _init(model, shape=SHAPE):
  return jax.jit(model.init)(jax.random.key(0), jnp.zeros(shape))


def _images(seed=0, shape=SHAPE):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape).astype(np.float32))


@pytest.mark.parametrize('decoder_type, extra', [
    ('linear', {'mask_token', 'decoder/pred/kernel', 'decoder/pred/bias'}),
    ('transformer', {'decoder/mask_token', 'decoder/embed/kernel', 'decoder/pred/kernel',
                     'decoder/blocks/block_0/attn/query/kernel', 'decoder/blocks/norm/scale'}),
])
@pytest.mark.parametrize('vit_kwargs', [{}, dict(pool_type='gap', class_token=True, fc_norm=True),
                                        dict(num_registers=2, pre_norm=True)])
def test_encoder_paths_are_the_classification_vits(decoder_type, extra, vit_kwargs):
  """Same paths and shapes as vit.Model minus the head; the rest is mask token + decoder."""
  image = jax.ShapeDtypeStruct(SHAPE, jnp.float32)
  mim_params = jax.eval_shape(_model(decoder_type, **vit_kwargs).init, jax.random.key(0),
                              image)['params']
  cls_params = jax.eval_shape(vit.Model(num_classes=3, variant='mu/4', **vit_kwargs).init,
                              jax.random.key(0), image)['params']
  mim_flat = {p: x.shape for p, x in param_paths.flatten(mim_params).items()}
  cls_flat = {p: x.shape for p, x in param_paths.flatten(cls_params).items()}
  assert set(cls_flat) - set(mim_flat) == {'head/kernel', 'head/bias'}
  only_mim = set(mim_flat) - set(cls_flat)
  assert extra <= only_mim
  assert all(p == 'mask_token' or p.startswith('decoder/') for p in only_mim)
  assert all(mim_flat[p] == cls_flat[p] for p in set(mim_flat) & set(cls_flat))


@pytest.mark.parametrize('decoder_type', ['linear', 'transformer'])
def test_outputs(decoder_type):
  model = _model(decoder_type)
  variables = _init(model)
  logits, out = model.apply(variables, _images())
  assert logits.shape == (2, 32) and out['pred'].shape == (2, 49, 4 * 4 * 3)
  assert out['pred'].dtype == jnp.float32 and out['encoded'].shape == (2, 50, 32)


def test_patch_mask_replaces_exactly_the_masked_patches():
  model = _model('linear')
  variables = _init(model)
  patch_mask = jnp.zeros((2, 49), bool).at[:, [0, 5, 48]].set(True)
  _, out = model.apply(variables, _images(), patch_mask=patch_mask)
  _, plain = model.apply(variables, _images())
  token = np.asarray(variables['params']['mask_token'][0, 0])
  pos = np.asarray(variables['params']['pos_embedding'][0])
  entering = np.asarray(out['with_posemb'])
  np.testing.assert_allclose(entering[:, [0, 5, 48]], np.broadcast_to(token + pos[[0, 5, 48]],
                                                                        (2, 3, 32)), rtol=1e-6)
  unmasked = np.setdiff1d(np.arange(49), [0, 5, 48])
  np.testing.assert_allclose(entering[:, unmasked], np.asarray(plain['with_posemb'])[:, unmasked])
  # The masked patches' pixels no longer reach the model.
  changed = _images().at[:, :4, :4].set(100.0)  # Patch 0.
  _, out_changed = model.apply(variables, changed, patch_mask=patch_mask)
  np.testing.assert_allclose(out_changed['pred'], out['pred'], rtol=1e-5, atol=1e-6)


def _encoder_input_lengths(model, variables, image, **kwargs):
  """The token count of every call of the module at path 'encoder' (intercepted)."""
  lengths = []

  def record(next_fun, args, kwargs_, context):
    if context.module.path == ('encoder',) and context.method_name == '__call__':
      lengths.append(args[0].shape[1])
    return next_fun(*args, **kwargs_)

  with nn.intercept_methods(record):  # Shapes only: tracing records them.
    jax.eval_shape(lambda v: model.apply(v, image, **kwargs), variables)
  return lengths


def test_mae_encoder_sees_only_the_visible_patches():
  model = _model('transformer')
  variables = _init(model)
  keep = jnp.asarray([[1, 4, 20, 30, 31, 48], [0, 2, 3, 5, 7, 11]], jnp.int32)  # 6 of 49 each
  assert _encoder_input_lengths(model, variables, _images(), keep=keep) == [1 + 6]
  assert _encoder_input_lengths(model, variables, _images()) == [1 + 49]
  _, out = model.apply(variables, _images(), keep=keep)
  assert out['patch_tokens'].shape == (2, 6, 32) and out['pred'].shape == (2, 49, 48)
  # The hidden patches do not reach the model.
  hidden = _images().at[:, 4:8, :].set(50.0)  # Row 1 of the grid: patches 7..13, none kept in 0.
  _, out_hidden = model.apply(variables, hidden, keep=keep)
  np.testing.assert_allclose(out_hidden['pred'][0], out['pred'][0], rtol=1e-5, atol=1e-6)
  assert not np.allclose(out_hidden['pred'][1], out['pred'][1])  # Row 1 holds its patch 7, 11.


def test_keep_gathers_tokens_with_their_position_embeddings():
  model = vit.Model(num_classes=None, variant='mu/4', pool_type='gap', class_token=False)
  variables = _init(model)
  keep = jnp.asarray([[3, 1], [40, 0]], jnp.int32)
  _, out = model.apply(variables, _images(), keep=keep)
  _, full = model.apply(variables, _images())
  np.testing.assert_allclose(out['with_posemb'],
                             np.take_along_axis(np.asarray(full['with_posemb']),
                                                np.asarray(keep)[..., None], 1), rtol=1e-6)
  assert out['encoded'].shape == (2, 2, 32)  # No class token: the two kept patches only.


def test_errors():
  images = _images()
  with pytest.raises(ValueError, match='no head'):
    _init(mim.Model(num_classes=3, variant='mu/4'))
  with pytest.raises(ValueError, match="Unknown decoder_type 'conv'"):
    _init(mim.Model(variant='mu/4', decoder_type='conv'))
  linear, mae = _model('linear'), _model('transformer')
  with pytest.raises(ValueError, match="needs decoder_type='transformer'"):
    linear.apply(_init(linear), images, keep=jnp.zeros((2, 3), jnp.int32))
  with pytest.raises(ValueError, match="needs decoder_type='linear'"):
    mae.apply(_init(mae), images, patch_mask=jnp.zeros((2, 49), bool))
  model = vit.Model(num_classes=None, variant='mu/4')
  variables = _init(model)
  with pytest.raises(ValueError, match='needs a mask_token'):
    model.apply(variables, images, patch_mask=jnp.zeros((2, 49), bool))
  with pytest.raises(ValueError, match=r'patch_mask must be \[batch, patches\]'):
    model.apply(variables, images, patch_mask=jnp.zeros((2, 48), bool), mask_token=jnp.zeros(32))
  with pytest.raises(ValueError, match='keep must be integer patch indices'):
    model.apply(variables, images, keep=jnp.zeros((2, 3)))
