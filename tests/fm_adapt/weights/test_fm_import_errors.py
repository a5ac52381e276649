"""Bad foundation-model checkpoints: another family's file, a truncated file, a missing key, a
pickled .pth with code in it. Each is one clear error naming the file and what was expected;
nothing is executed. Also the report of a non-strict import."""
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fm_adapt import weights
from fm_adapt.models import vit

DINOV2 = dict(variant='mu/14', layerscale=1e-5, posemb_grid=2)


def _target(**model):
  model = vit.Model(num_classes=None, **model)
  return model, jax.eval_shape(model.init, jax.random.key(0),
                               jax.ShapeDtypeStruct((1, 28, 28, 3), jnp.float32))['params']


def _timm_dinov2_file(reference, tmp_path, suffix='.safetensors', drop=()):
  torch, timm = reference.load('torch'), reference.load('timm')
  module = timm.create_model('vit_small_patch14_dinov2', pretrained=False, num_classes=0,
                             img_size=28, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2)
  sd = {k: v.detach().contiguous() for k, v in module.state_dict().items() if k not in drop}
  path = tmp_path / f'dinov2{suffix}'
  if suffix == '.pth':
    torch.save(sd, str(path))
  else:
    pytest.importorskip('safetensors.torch').save_file(sd, str(path))
  return path


def test_a_clip_file_into_a_dinov2_model_names_file_layout_and_what_is_missing(
    reference, tmp_path):
  torch, open_clip = reference.load('torch'), reference.load('open_clip')
  clip = open_clip.model.CLIP(
      embed_dim=8, vision_cfg=dict(layers=2, width=32, head_width=16, mlp_ratio=2,
                                   patch_size=14, image_size=28),
      text_cfg=dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1))
  path = tmp_path / 'clip.pth'
  torch.save(clip.state_dict(), str(path))
  _, target = _target(**DINOV2)
  with pytest.raises(weights.CheckpointMismatchError) as error:
    weights.import_vit(path, target_params=target)
  message = str(error.value)
  for part in (str(path), '(open_clip layout)', 'missing: encoder/block_0/ls_attn/scale',
               'missing: embedding/bias', 'unexpected: ln_pre/scale', 'unexpected: proj/kernel'):
    assert part in message


@pytest.mark.parametrize('suffix', ['.safetensors', '.pth'])
def test_truncated_file_is_named_with_its_size(reference, tmp_path, suffix):
  path = _timm_dinov2_file(reference, tmp_path, suffix)
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  _, target = _target(**DINOV2)
  with pytest.raises(ValueError, match='not a readable') as error:
    weights.import_vit(path, target_params=target)
  assert str(path) in str(error.value) and 'Is the download complete?' in str(error.value)


def test_missing_key_strict_error_and_non_strict_report(reference, tmp_path):
  path = _timm_dinov2_file(reference, tmp_path, drop=('blocks.1.ls2.gamma',))
  model, target = _target(**DINOV2)
  with pytest.raises(weights.CheckpointMismatchError,
                     match=r'missing: encoder/block_1/ls_mlp/scale \(32,\)'):
    weights.import_vit(path, target_params=target)
  init = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 3)))['params']
  params, report = weights.import_vit(path, target_params=init, strict=False)
  assert report.kept_init == ['encoder/block_1/ls_mlp/scale']
  assert report.problems == ['missing: encoder/block_1/ls_mlp/scale (32,) is not in the '
                             'checkpoint']
  np.testing.assert_array_equal(params['encoder']['block_1']['ls_mlp']['scale'],
                                init['encoder']['block_1']['ls_mlp']['scale'])
  assert 'kept its initialisation: encoder/block_1/ls_mlp/scale' in report.summary()


class _Payload:
  """Unpickling this would create the file named in `marker`."""

  def __init__(self, marker: pathlib.Path):
    self.marker = marker

  def __reduce__(self):
    return (pathlib.Path.touch, (self.marker,))


def test_pth_with_code_is_refused_and_nothing_runs(reference, tmp_path):
  torch = reference.load('torch')
  marker = tmp_path / 'code_ran'
  path = tmp_path / 'retfound.pth'
  torch.save({'model': {'cls_token': torch.zeros(1, 1, 32)}, 'args': _Payload(marker)},
             str(path))
  _, target = _target(**DINOV2)
  with pytest.raises(weights.PickleRefusedError, match='safetensors') as error:
    weights.import_vit(path, target_params=target)
  assert str(path) in str(error.value)
  assert not marker.exists()

