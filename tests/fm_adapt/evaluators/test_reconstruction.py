"""The 'reconstruction' evaluator: its loss (the objective's, inference mode, padding left out,
the same draw at every call), its options and errors, and a MIM run that writes its pictures."""
import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from fm_adapt import evaluators
from fm_adapt import objectives
from fm_adapt.evaluators import reconstruction
from fm_adapt.train import loop

P = 4
N = 49  # 28 px, patch 4.


def _fake_apply(pred, seen=None):
  """An apply_fn predicting `pred` [B, N, 16] whatever its input; records `train`."""
  def apply_fn(params, model_state, images, *, train, rng, mask=None, **kwargs):
    del params, rng, mask, kwargs
    if seen is not None:
      seen.append(train)
    return jnp.zeros((images.shape[0], 1)), {'pred': pred[:images.shape[0]]}, model_state
  return apply_fn


def _batches(images, batch=3):
  """Host batches of `images` as the eval loader gives them: the last padded and masked."""
  out = []
  for start in range(0, len(images), batch):
    chunk = images[start:start + batch]
    real = len(chunk)
    pad = np.full((batch - real, *images.shape[1:]), 1e3, np.float32)  # Loud padding.
    out.append({'image': np.concatenate([chunk, pad]), 'label': np.zeros(batch, np.int32),
                'mask': np.arange(batch) < real})
  return out


def _evaluator(objective, apply_fn, batches, **options):
  data = evaluators.EvalData('recon', 'pp', {}, None, apply_fn, objective)
  return reconstruction.Evaluator(None, lambda: batches, lambda b: jax.tree.map(jnp.asarray, b),
                                  'multiclass', split='val', data=data, **options)


def _state():
  return {'params': {}, 'frozen': {}, 'model_state': {}}


def test_loss_is_the_objectives_over_real_images_in_inference_mode_with_a_fixed_draw():
  rng = np.random.default_rng(0)
  images = rng.normal(size=(5, 28, 28, 1)).astype(np.float32)
  pred = jnp.asarray(rng.normal(size=(3, N, 16)).astype(np.float32))
  objective = objectives.get_objective(dict(name='simmim'), 'multiclass', patch_size=P)
  seen = []
  evaluator = _evaluator(objective, _fake_apply(pred, seen), _batches(images), seed=3)
  first = dict(evaluator.run(_state()))
  assert first['num_examples'] == 5.0 and set(seen) == {False}
  # Oracle: per batch, the L1 error on the masked patches of the draw fold_in(key(3), index).
  errors = []
  for index, start in enumerate((0, 3)):
    real = images[start:start + 3]
    padded = _batches(images)[index]['image']
    task = objective.draw(jax.random.split(jax.random.fold_in(jax.random.key(3), index))[0],
                          jnp.asarray(padded))
    per_patch = np.abs(np.asarray(pred) - np.asarray(task.target)).mean(-1)[:len(real)]
    masked = np.asarray(task.patch_mask)[:len(real)]
    errors.append(per_patch[masked])
  np.testing.assert_allclose(first['loss'], np.concatenate(errors).mean(), rtol=1e-5)
  assert dict(evaluator.run(_state())) == first  # The same draw at every call.
  other = dict(_evaluator(objective, _fake_apply(pred), _batches(images), seed=4).run(_state()))
  assert other['loss'] != first['loss']


def test_views_show_the_first_real_images_on_their_input_range():
  rng = np.random.default_rng(1)
  images = rng.uniform(-1, 1, size=(4, 28, 28, 1)).astype(np.float32)
  objective = objectives.get_objective(dict(name='simmim'), 'multiclass', patch_size=P)
  pred = jnp.zeros((3, N, 16))
  evaluator = _evaluator(objective, _fake_apply(pred), _batches(images), num_images=3)
  views = evaluator.views(_state())
  assert sorted(views) == ['input', 'model_input', 'reconstruction']
  assert all(v.shape == (3, 28, 28, 1) for v in views.values())
  lo, hi = images[:3].min(axis=(1, 2, 3)), images[:3].max(axis=(1, 2, 3))
  np.testing.assert_allclose(views['input'], (images[:3] - lo[:, None, None, None])
                             / (hi - lo)[:, None, None, None], rtol=1e-5, atol=1e-6)
  assert views['input'].min() == 0.0 and views['input'].max() == 1.0
  # A zero prediction is drawn at the value 0 of each input's range.
  np.testing.assert_allclose(views['reconstruction'][:, 0, 0, 0], -lo / (hi - lo), rtol=1e-5)


def test_errors_name_the_fix():
  loss = objectives.get_objective(dict(name='softmax_xent'), 'multiclass')
  with pytest.raises(ValueError, match=r"config.evals.recon: the 'reconstruction' evaluator "
                     r"needs a masked image modelling objective"):
    _evaluator(loss, _fake_apply(None), [])
  simmim = objectives.get_objective(dict(name='simmim'), 'multiclass', patch_size=P)
  with pytest.raises(ValueError, match=r"config.evals.recon.num_images=0 must be an int >= 1"):
    _evaluator(simmim, _fake_apply(None), [], num_images=0)
  with pytest.raises(ValueError, match=r"config.evals.recon.seed=-1 must be an int >= 0"):
    _evaluator(simmim, _fake_apply(None), [], seed=-1)


def _mim_config(tiny_config, tiny_data, **recon):
  config = tiny_config()
  config.model_name = 'vit_mim'
  config.loss = dict(name='simmim', mask=dict(name='random', ratio=0.5))
  config.evals = ml_collections.ConfigDict({'recon': dict(
      name='reconstruction', split='val', num_images=3,
      data=dict(name='npz', path=tiny_data['one_class_val'],
                tfds_dir=tiny_data['root'] + '/tfds'), **recon)})
  config.best_metric = None
  return config


def test_a_mim_run_evaluates_held_out_images_of_its_data_option_and_writes_pictures(
    tiny_config, tiny_data, tmp_path):
  workdir = tmp_path / 'w'
  results = loop.train_and_evaluate(_mim_config(tiny_config, tiny_data), workdir)
  # The entry's own data: the 10 val images of one_class_val (the training archive has 20).
  assert results['metrics']['recon/num_examples'] == 10.0
  assert np.isfinite(results['metrics']['recon/loss'])
  rows = [json.loads(l) for l in (workdir / 'metrics.jsonl').read_text().splitlines()]
  assert [r['step'] for r in rows if 'recon/loss' in r] == [2, 4]
  for name in ('reconstructions/step_2.png', 'reconstructions/step_4.png',
               'reconstructions/final.png', 'loss_curve.png'):
    assert (workdir / name).read_bytes().startswith(b'\x89PNG'), name
  assert sorted(p.name for p in (workdir / 'reconstructions').iterdir()) == [
      'final.png', 'step_2.png', 'step_4.png']
  series = reconstruction.read_curves(workdir / 'metrics.jsonl', ('train/loss', 'recon/loss'))
  assert [s for s, _ in series['train/loss']] == [1, 2, 3, 4]


def test_an_entry_with_its_own_data_must_give_the_training_shape(tiny_config, tiny_data,
                                                                  tmp_path):
  config = _mim_config(tiny_config, tiny_data, pp='resize(32)|value_range(-1,1)')
  with pytest.raises(ValueError, match=r"config.evals.recon: the eval pp 'resize\(32\)\|"
                     r"value_range\(-1,1\)' gives images of shape \(32, 32, 1\) from "
                     r"config.evals.recon.data, but the model trains on \(28, 28, 1\)"):
    loop.train_and_evaluate(config, tmp_path / 'w')
  assert not (tmp_path / 'w' / 'ckpt').exists()
