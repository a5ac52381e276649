"""A MIM model's export (the run export, `loop.export_weights`) loads into a classification ViT:
decoder and mask token reported unused, the head missing, the encoder exactly the pretrained one."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fm_adapt import param_paths
from fm_adapt import weights
from fm_adapt.models import mim, vit
from fm_adapt.train import loop, pretrained
from fm_adapt.weights import mim_encoder, native

SHAPE = (1, 28, 28, 1)
DECODER = dict(decoder_width=16, decoder_depth=1, decoder_heads=2, decoder_mlp_dim=32)


def _random_params(model, shape=SHAPE, seed=0):
  """Nonzero numpy parameters of the model's shapes (no init kernels to compile)."""
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct(shape,
                                                                                 jnp.float32))
  return jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32),
                      abstract['params'])


def _export(tmp_path, decoder_type, **vit_kwargs):
  params = _random_params(mim.Model(variant='mu/4', decoder_type=decoder_type, **DECODER,
                                    **vit_kwargs))
  state = {'params': params, 'frozen': {}, 'model_state': {}}
  return loop.export_weights(tmp_path / 'model.npz', state, None), params


@pytest.mark.parametrize('decoder_type', ['linear', 'transformer'])
def test_export_loads_into_a_classification_vit(tmp_path, decoder_type):
  path, pretrained_params = _export(tmp_path, decoder_type)
  assert mim_encoder.is_mim_export(list(np.load(path).files))
  target = _random_params(vit.Model(num_classes=2, variant='mu/4'), seed=1)
  params, report = mim_encoder.import_mim_encoder(path, target_params=target)
  flat, flat_pre, flat_target = (param_paths.flatten(t) for t in (params, pretrained_params,
                                                                   target))
  assert set(flat) == set(flat_target)
  for p, value in flat.items():
    expected = flat_target[p] if p.startswith('head/') else flat_pre[p]
    np.testing.assert_array_equal(value, expected)
  unused = {k.removeprefix('params/') for k in report.ignored}
  assert unused == {p for p in flat_pre if p == 'mask_token' or p.startswith('decoder/')}
  assert ('mask_token' in unused) == (decoder_type == 'linear')
  assert report.missing == ['head/bias', 'head/kernel']
  assert len(report.loaded) == len(flat) - 2 and not report.problems
  summary = report.summary()
  decoder_keys = sorted(k for k in report.ignored if k.startswith('params/decoder/'))
  if len(decoder_keys) <= 4:  # Each key on a line of its own.
    assert 'ignored: params/decoder/pred/kernel (the pixel decoder' in summary
  else:  # One line: their count and common prefix.
    assert (f'ignored: {len(decoder_keys)} keys params/decoder/* (the pixel decoder'
            in summary)
    assert 'params/decoder/pred/kernel (' not in summary
  assert 'missing (a MIM model has no head; kept its initialisation): head/kernel' in summary


def test_model_init_path_through_pretrained_load(tmp_path, monkeypatch, capsys):
  """The loader as `config.model_load.name='fm_adapt_mim'` of the pretrained path."""
  monkeypatch.setitem(weights.LOADERS, 'fm_adapt_mim', mim_encoder.load_mim_encoder)
  path, pretrained_params = _export(tmp_path, 'linear', pool_type='gap', fc_norm=True,
                                    class_token=True)
  cls = vit.Model(num_classes=3, variant='mu/4', pool_type='gap', fc_norm=True, class_token=True)
  variables = {'params': _random_params(cls, seed=2)}
  loaded = pretrained.load_pretrained(variables, path, {'name': 'fm_adapt_mim'}, [])
  np.testing.assert_array_equal(loaded['params']['fc_norm']['scale'],
                                pretrained_params['fc_norm']['scale'])
  np.testing.assert_array_equal(loaded['params']['encoder']['block_1']['mlp']['fc2']['kernel'],
                                pretrained_params['encoder']['block_1']['mlp']['fc2']['kernel'])
  np.testing.assert_array_equal(loaded['params']['head']['kernel'],
                                variables['params']['head']['kernel'])
  err = capsys.readouterr().err
  assert 'ignored: params/mask_token' in err and 'missing' in err and 'head/bias' in err
  # dont_load works as for every loader, and each regex must match.
  loaded = pretrained.load_pretrained(variables, path, {'name': 'fm_adapt_mim',
                                                        'dont_load': ['fc_norm/.*']}, [])
  np.testing.assert_array_equal(loaded['params']['fc_norm']['scale'],
                                variables['params']['fc_norm']['scale'])


def test_position_embedding_is_resampled_to_another_resolution(tmp_path):
  path, pretrained_params = _export(tmp_path, 'linear')
  target = _random_params(vit.Model(num_classes=2, variant='mu/4'), shape=(1, 56, 56, 1))
  params, _ = mim_encoder.import_mim_encoder(path, target_params=target)
  assert params['pos_embedding'].shape == (1, 196, 32)
  np.testing.assert_allclose(params['pos_embedding'],
                             weights.resample_posemb(pretrained_params['pos_embedding'], 14))


def test_errors(tmp_path):
  path, _ = _export(tmp_path, 'linear')
  deeper = _random_params(vit.Model(num_classes=2, variant='Ti/4'), seed=1)
  with pytest.raises(weights.CheckpointMismatchError,
                     match=r'shape mismatch: embedding/kernel(.|\n)*missing: encoder/block_11'):
    mim_encoder.import_mim_encoder(path, target_params=deeper)
  registers = _random_params(vit.Model(num_classes=2, variant='mu/4', num_registers=1))
  with pytest.raises(weights.CheckpointMismatchError, match='missing: registers'):
    mim_encoder.import_mim_encoder(path, target_params=registers)
  target = _random_params(vit.Model(num_classes=2, variant='mu/4'))
  with pytest.raises(ValueError, match="dont_load regex 'heads/.*'"):
    mim_encoder.import_mim_encoder(path, target_params=target, dont_load=['heads/.*'])
  plain = native.save_native(tmp_path / 'plain.npz', {'params': target})
  assert not mim_encoder.is_mim_export(list(np.load(plain).files))
  with pytest.raises(ValueError, match="not a MIM export.*model_load.name='fm_adapt'"):
    mim_encoder.import_mim_encoder(plain, target_params=target)
  stray = native.save_native(tmp_path / 'stray.npz', {'params': {**target, 'mask_token':
                                                                 np.zeros((1, 1, 32)),
                                                                 'extra': np.zeros(3)}})
  with pytest.raises(weights.CheckpointMismatchError, match=r'unexpected: params/extra \(3,\)'):
    mim_encoder.import_mim_encoder(stray, target_params=target)
