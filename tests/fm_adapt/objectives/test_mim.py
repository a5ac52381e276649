"""Tests of the MIM objectives: what the loss covers, what the model sees, that training lowers
it."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fm_adapt import objectives
from fm_adapt.models import mim as mim_model
from fm_adapt.objectives import masking, mim, mim_targets
from fm_adapt.train import model_fns
from fm_adapt.train import step as step_lib

P = 4
N = 49  # 28 px, patch 4.
DECODER = dict(decoder_width=16, decoder_depth=1, decoder_heads=2, decoder_mlp_dim=32)


def _images(b=4, seed=0):
  """Smooth images (a few random Gaussian blobs) [b, 28, 28, 1]."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:28, :28]
  out = np.zeros((b, 28, 28, 1), np.float32)
  for i in range(b):
    for _ in range(3):
      cy, cx, s = rng.uniform(4, 24), rng.uniform(4, 24), rng.uniform(2, 6)
      out[i, ..., 0] += rng.uniform(0.5, 1.5) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / s ** 2)
  return jnp.asarray(out)


def _batch(images, real=None):
  real = np.ones(len(images), bool) if real is None else real
  return {'image': images, 'label': jnp.zeros(len(images), jnp.int32), 'mask': jnp.asarray(real)}


def _fake_apply(pred, calls=None):
  """An apply_fn that predicts `pred` whatever its input, recording its keyword arguments."""
  def apply_fn(params, model_state, images, *, train, rng, mask=None, **kwargs):
    del params, rng, mask
    if calls is not None:
      calls.append(dict(kwargs, images=images, train=train))
    return jnp.zeros((images.shape[0], 1)), {'pred': pred}, model_state
  return apply_fn


def _objective(name, **options):
  return objectives.get_objective(dict(name=name, **options), 'multiclass', patch_size=P)


def test_reconstruction_loss_ignores_unmasked_patches_and_padding_rows():
  rng = np.random.default_rng(0)
  pred = jnp.asarray(rng.normal(size=(3, N, 16)).astype(np.float32))
  target = rng.normal(size=(3, N, 16)).astype(np.float32)
  patch_mask = np.zeros((3, N), bool)
  patch_mask[:, ::3] = True
  rows = jnp.asarray([True, True, False])
  loss = lambda t: float(mim.reconstruction_loss(pred, jnp.asarray(t), jnp.asarray(patch_mask,
                                                 jnp.float32), rows, 'l1'))
  base = loss(target)
  expected = np.abs(np.asarray(pred) - target)[:2][patch_mask[:2]].mean()
  np.testing.assert_allclose(base, expected, rtol=1e-6)
  changed = target.copy()
  changed[~patch_mask] += 10.0  # Every unmasked patch.
  changed[2] += 10.0  # The padding row.
  assert loss(changed) == base
  changed[0, 0] += 1.0  # One masked patch of a real row.
  assert loss(changed) != base


@pytest.mark.parametrize('name, options', [
    ('simmim', {}), ('mae', dict(norm_pix=False)), ('mae', {}),
    ('simmim', dict(mask=dict(name='block', ratio=0.4)))])
def test_objective_loss_moves_only_with_the_masked_patches_of_the_target(name, options):
  """The model's prediction fixed: changing the images' unmasked patches leaves the loss."""
  objective = _objective(name, **options)
  images = _images()
  pred = jnp.asarray(np.random.default_rng(1).normal(size=(4, N, 16)).astype(np.float32))
  rng = jax.random.key(7)
  loss_of = lambda im: float(objective(_fake_apply(pred), {}, {}, _batch(im), rng)[0])
  draw_rng, _ = jax.random.split(rng)
  patch_mask = np.asarray(objective.draw(draw_rng, images).patch_mask)
  assert (patch_mask.sum(1) == masking.num_masked(N, objective.options['mask']['ratio'])).all()
  pixel_mask = np.asarray(mim_targets.unpatchify(
      jnp.asarray(np.repeat(patch_mask[..., None], 16, -1), jnp.float32), P, (7, 7), 1)) > 0
  base = loss_of(images)
  assert loss_of(jnp.where(pixel_mask, images, images * 3 + 5.0)) == pytest.approx(
      base, rel=1e-6, abs=1e-7)
  assert loss_of(jnp.where(pixel_mask, images * 3 + 5.0, images)) != pytest.approx(base, rel=1e-3)


@pytest.mark.parametrize('name', ['frequency', 'deblur'])
def test_frequency_and_deblur_losses_cover_the_whole_image(name):
  objective = _objective(name)
  images = _images()
  pred = jnp.zeros((4, N, 16))
  loss_of = lambda im: float(objective(_fake_apply(pred), {}, {}, _batch(im),
                                       jax.random.key(0))[0])
  # Fixed prediction 0: the L1 loss is the mean absolute pixel of the (whole) target image.
  np.testing.assert_allclose(loss_of(images), np.abs(np.asarray(images)).mean(), rtol=1e-6)


def test_mae_passes_the_visible_patches_and_the_encoder_sees_only_them():
  objective = _objective('mae', mask=dict(name='random', ratio=0.75))
  images, calls = _images(), []
  objective(_fake_apply(jnp.zeros((4, N, 16)), calls), {}, {}, _batch(images), jax.random.key(0))
  (call,) = calls
  assert set(call) == {'keep', 'images', 'train'} and call['train']
  keep = np.asarray(call['keep'])
  assert keep.shape == (4, N - 37) and (np.diff(keep, axis=1) > 0).all()
  draw_rng, _ = jax.random.split(jax.random.key(0))
  patch_mask = np.asarray(objective.draw(draw_rng, images).patch_mask)
  for row in range(4):
    np.testing.assert_array_equal(keep[row], np.flatnonzero(~patch_mask[row]))
  # With the real model: the encoder's input holds the class token + the 12 visible patches.
  model = mim_model.Model(variant='mu/4', decoder_type='transformer', **DECODER)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))
  lengths = []

  def record(next_fun, args, kwargs, context):
    if context.module.path == ('encoder',) and context.method_name == '__call__':
      lengths.append(args[0].shape)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):  # Shapes only: tracing records them.
    jax.eval_shape(lambda p: objective(model_fns.make_apply_fn(model), p, {}, _batch(images),
                                       jax.random.key(0)), variables['params'])
  assert lengths == [(4, 1 + 12, 32)]


def test_mae_target_is_the_normalised_patches():
  objective = _objective('mae')
  images = _images()
  task = objective.draw(jax.random.key(0), images)
  np.testing.assert_allclose(task.target, mim_targets.normalize_patches(
      mim_targets.patchify(images, P)), rtol=1e-6)
  np.testing.assert_array_equal(task.weights, np.asarray(task.patch_mask, np.float32))


def test_deblur_target_is_the_sharp_input():
  objective = _objective('deblur', sigma=(1.0, 2.0))
  images = _images()
  task = objective.draw(jax.random.key(0), images)
  np.testing.assert_array_equal(task.target, mim_targets.patchify(images, P))
  blur_rng, _ = jax.random.split(jax.random.key(0))
  sigmas = jax.random.uniform(blur_rng, (4,), minval=1.0, maxval=2.0)
  np.testing.assert_allclose(task.inputs, mim_targets.gaussian_blur(images, sigmas, 2.0))
  assert np.abs(np.asarray(task.inputs) - np.asarray(images)).max() > 0.05
  assert task.model_kwargs == {} and not np.asarray(task.patch_mask).any()
  masked = _objective('deblur', mask=dict(name='random', ratio=0.5)).draw(jax.random.key(0),
                                                                          images)
  assert (np.asarray(masked.model_kwargs['patch_mask']).sum(1) == 25).all()
  np.testing.assert_array_equal(masked.target, mim_targets.patchify(images, P))


def test_frequency_input_is_the_band_removed_image_and_dual_masks_too():
  images = _images()
  task = _objective('frequency', band=(0.3, 0.8)).draw(jax.random.key(0), images)
  np.testing.assert_allclose(task.inputs, mim_targets.remove_frequency_band(images, (0.3, 0.8)),
                             atol=1e-6)
  np.testing.assert_array_equal(task.target, mim_targets.patchify(images, P))
  assert task.model_kwargs == {}
  dual = _objective('frequency', mask=dict(name='block', ratio=0.3)).draw(jax.random.key(0),
                                                                          images)
  assert (np.asarray(dual.model_kwargs['patch_mask']).sum(1) == 15).all()
  np.testing.assert_array_equal(dual.weights, np.ones((4, N)))


MODELS = {'simmim': 'linear', 'mae': 'transformer', 'frequency': 'linear', 'deblur': 'linear'}


@pytest.mark.parametrize('name', sorted(MODELS))
def test_a_few_steps_on_a_fixed_batch_lower_the_loss(name):
  """The real update step (`make_update_fn`) on a tiny MIM ViT, 28 px, patch 4."""
  model = mim_model.Model(variant='mu/4', decoder_type=MODELS[name], **DECODER)
  apply_fn = model_fns.make_apply_fn(model)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))['params']
  tx = optax.adam(3e-3)
  objective = _objective(name)
  update = jax.jit(step_lib.make_update_fn(apply_fn, objective, tx, lambda s: 3e-3))
  state = {'params': params, 'frozen': {}, 'model_state': {}, 'opt': tx.init(params),
           'step': jnp.zeros((), jnp.int32)}
  batch = _batch(_images(8))
  eval_loss = jax.jit(lambda p: objective(apply_fn, p, {}, batch, jax.random.key(99))[0])
  before = float(eval_loss(state['params']))
  losses = []
  for _ in range(25):
    state, measurements = update(state, jax.random.key(1), batch)
    losses.append(float(measurements['loss']))
  after = float(eval_loss(state['params']))
  assert np.isfinite(losses).all()
  assert after < 0.8 * before, (before, after, losses)


def test_views_for_the_reconstruction_grid():
  model = mim_model.Model(variant='mu/4', decoder_type='linear', **DECODER)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 28, 28, 1)))['params']
  images = _images(2)
  objective = _objective('simmim')
  views = objective.views(model_fns.make_apply_fn(model), params, {}, images, jax.random.key(0))
  assert {k: v.shape for k, v in views.items()} == {k: (2, 28, 28, 1) for k in
                                                    ('input', 'model_input', 'reconstruction')}
  patch_mask = np.asarray(objective.draw(jax.random.key(0), images).patch_mask)
  shown = np.asarray(mim_targets.patchify(jnp.asarray(views['model_input']), P))
  assert (shown[patch_mask] == 0).all()
  np.testing.assert_array_equal(shown[~patch_mask],
                                np.asarray(mim_targets.patchify(images, P))[~patch_mask])


def test_registry_and_config_errors():
  assert objectives.names() == ['logit_adjusted_xent', 'sigmoid_xent', 'softmax_xent', 'simmim',
                                'mae', 'frequency', 'deblur']
  assert objectives.is_mim(dict(name='mae')) and not objectives.is_mim(None)
  assert not objectives.is_mim('softmax_xent')
  assert isinstance(objectives.get_objective(None, 'multiclass'),
                    objectives.ClassificationObjective)
  objective = _objective('mae')
  assert objective.options == {'mask': {'name': 'random', 'ratio': 0.75}, 'norm_pix': True}
  valid = (r"\['logit_adjusted_xent', 'sigmoid_xent', 'softmax_xent', 'simmim', 'mae', "
           r"'frequency', 'deblur'\]")
  with pytest.raises(ValueError, match=f"Unknown loss 'mim'; valid: {valid}"):
    objectives.get_objective(dict(name='mim'), 'multiclass')
  with pytest.raises(ValueError, match=r"Unknown key\(s\) \['ratio'\] of config.loss for "
                                       r"'simmim'; valid: \['mask'\]"):
    _objective('simmim', ratio=0.5)
  with pytest.raises(ValueError, match="'mae' needs config.loss.mask"):
    _objective('mae', mask=None)
  with pytest.raises(ValueError, match="Unknown mask strategy 'grid'"):
    _objective('simmim', mask=dict(name='grid', ratio=0.5))
  with pytest.raises(ValueError, match="needs a ViT model .config.model_name='vit_mim'"):
    objectives.get_objective(dict(name='simmim'), 'multiclass')
  with pytest.raises(ValueError, match='0 <= r0 < r1'):
    _objective('frequency', band=(0.5, 0.1))
  with pytest.raises(ValueError, match='0 < lo <= hi'):
    _objective('deblur', sigma=(2.0, 1.0))


def test_a_classification_model_under_a_mim_objective_is_a_clear_error():
  from fm_adapt.models import vit
  model = vit.Model(num_classes=2, variant='mu/4')
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28, 1)))['params']
  params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), params)
  with pytest.raises(ValueError, match="needs a model with a pixel decoder"):
    _objective('deblur')(model_fns.make_apply_fn(model), params, {}, _batch(_images(2)),
                         jax.random.key(0))
