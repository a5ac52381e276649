"""Tests of fm_adapt.weights.vit_import: every external layout, strictness, resampling.

Checkpoints are written in the external layouts by the `vit_writers` fixture from a
random mu-size fm_adapt tree, imported back and compared; a plain-numpy forward
pass of the timm-layout arrays is the oracle for the imported model's forward.
"""
import pickle

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from scipy.special import erf

from fm_adapt.models import vit
from fm_adapt.weights import readers
from fm_adapt.weights import vit_import

VARIANT, NUM_HEADS, NUM_CLASSES, IMAGE = 'mu/4', 2, 5, 32  # 8x8 grid, D=32, 2 blocks


def _model(num_classes: int = NUM_CLASSES, **kw) -> vit.Model:
  return vit.Model(num_classes=num_classes, variant=VARIANT, **kw)


def _abstract(image_size: int = IMAGE, **kw) -> dict:
  image = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  return jax.eval_shape(_model(**kw).init, jax.random.key(0), image)['params']


def _init(image_size: int = IMAGE, num_classes: int = NUM_CLASSES, seed: int = 1) -> dict:
  """A random fm_adapt ViT tree (eval_shape + numpy: no slow init compile on CPU)."""
  image = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  abstract = jax.eval_shape(_model(num_classes).init, jax.random.key(0), image)['params']
  return _random_like(abstract, seed)


def _random_like(tree: dict, seed: int = 0, scale: float = 0.2) -> dict:
  """The tree with every leaf replaced by numpy N(0, scale^2) (LN scales around 1)."""
  rng = np.random.default_rng(seed)
  def leaf(path, x):
    value = rng.normal(0., scale, x.shape).astype(np.float32)
    return value + 1. if path[-1].key == 'scale' else value
  return jax.tree_util.tree_map_with_path(leaf, tree)


@pytest.fixture(scope='module')
def params() -> dict:
  return _init(seed=0)


@pytest.fixture(scope='module')
def cls_row() -> np.ndarray:
  return np.random.default_rng(7).normal(0., 0.2, (1, 1, 32)).astype(np.float32)


def _assert_trees_close(actual: dict, expected: dict, atol: float = 1e-6) -> None:
  flat_a = dict(jax.tree_util.tree_leaves_with_path(actual))
  flat_e = dict(jax.tree_util.tree_leaves_with_path(expected))
  assert sorted(map(jax.tree_util.keystr, flat_a)) == sorted(
      map(jax.tree_util.keystr, flat_e))
  for path, value in flat_e.items():
    np.testing.assert_allclose(flat_a[path], value, atol=atol, rtol=0,
                               err_msg=jax.tree_util.keystr(path))


def _write(tmp_path, name: str, arrays: dict) -> str:
  # safetensors.numpy.save_file writes the raw buffer: non-C-contiguous arrays
  # (transposes, concatenations of transposes) would be saved scrambled.
  arrays = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
  path = tmp_path / name
  if name.endswith('.npz'):
    np.savez(path, **arrays)
  else:
    safetensors.numpy.save_file(arrays, str(path))
  return str(path)


def _layouts(vit_writers, params, cls_row) -> dict[str, tuple[str, str, dict]]:
  """name -> (format, file name, arrays)."""
  bv = vit_writers.to_big_vision(params, NUM_HEADS)
  return {
      'timm': ('timm', 'm.safetensors', vit_writers.to_timm(params, cls_row)),
      'hf': ('hf', 'm.safetensors', vit_writers.to_hf(params, cls_row)),
      'big_vision': ('big_vision', 'm.npz', bv),
      'big_vision_scan': ('big_vision', 'm.npz', vit_writers.scan_blocks(bv)),
      'vision_transformer': ('big_vision', 'm.npz', vit_writers.to_big_vision(
          params, NUM_HEADS, old=True, cls_row=cls_row)),
  }


@pytest.mark.parametrize('layout', ['timm', 'hf', 'big_vision', 'big_vision_scan',
                                    'vision_transformer'])
@pytest.mark.parametrize('fmt', ['explicit', 'auto'])
def test_round_trip(tmp_path, params, cls_row, vit_writers, layout, fmt):
  form, name, arrays = _layouts(vit_writers, params, cls_row)[layout]
  path = _write(tmp_path, name, arrays)
  form = form if fmt == 'explicit' else 'auto'
  loaded = vit_import.load_vit_checkpoint(path, format=form, target_params=params,
                                          num_heads=NUM_HEADS)
  _assert_trees_close(loaded, params)  # cls: (cls - row) + row, so not bitwise.
  no_target = vit_import.load_vit_checkpoint(path, format=form)
  _assert_trees_close(no_target, params)


def test_round_trip_pth(tmp_path, params, cls_row, vit_writers):
  torch = pytest.importorskip('torch')
  sd = {k: torch.from_numpy(v) for k, v in vit_writers.to_timm(params, cls_row).items()}
  torch.save(sd, tmp_path / 'm.pth')
  for form in ('pth', 'auto'):
    loaded = vit_import.load_vit_checkpoint(tmp_path / 'm.pth', format=form,
                                            target_params={'params': params})
    _assert_trees_close(loaded, params)


def _ln(x, p, eps=1e-6):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + eps) * p('weight') + p('bias')


def _timm_forward(sd: dict, images: np.ndarray, num_heads: int) -> np.ndarray:
  """A plain-numpy (float64) forward pass of a timm ViT from its state dict."""
  sd = {k: v.astype(np.float64) for k, v in sd.items()}
  get = lambda prefix: lambda leaf: sd[f'{prefix}.{leaf}']
  linear = lambda x, name: x @ sd[f'{name}.weight'].T + sd[f'{name}.bias']
  w = sd['patch_embed.proj.weight']  # [D, C, p, p]
  d, c, p, _ = w.shape
  b, h, wd, _ = images.shape
  patches = images.reshape(b, h // p, p, wd // p, p, c).transpose(0, 1, 3, 5, 2, 4)
  x = patches.reshape(b, -1, c * p * p) @ w.reshape(d, -1).T + sd['patch_embed.proj.bias']
  x = np.concatenate([np.broadcast_to(sd['cls_token'], (b, 1, d)), x], 1) + sd['pos_embed']
  dh = d // num_heads
  for i in range(len({k.split('.')[1] for k in sd if k.startswith('blocks.')})):
    pre = f'blocks.{i}'
    qkv = linear(_ln(x, get(f'{pre}.norm1')), f'{pre}.attn.qkv')
    q, k, v = (t.reshape(b, -1, num_heads, dh).transpose(0, 2, 1, 3)
               for t in np.split(qkv, 3, axis=-1))
    logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(dh)
    attn = np.exp(logits - logits.max(-1, keepdims=True))
    attn /= attn.sum(-1, keepdims=True)
    y = (attn @ v).transpose(0, 2, 1, 3).reshape(b, -1, d)
    x = x + linear(y, f'{pre}.attn.proj')
    y = linear(_ln(x, get(f'{pre}.norm2')), f'{pre}.mlp.fc1')
    y = 0.5 * y * (1. + erf(y / np.sqrt(2.)))
    x = x + linear(y, f'{pre}.mlp.fc2')
  x = _ln(x, get('norm'))
  return linear(x[:, 0], 'head')


@pytest.mark.parametrize('class_posemb', [False, True])
def test_forward_matches_numpy_timm_reference(tmp_path, params, cls_row, vit_writers,
                                              class_posemb):
  """fm_adapt's ViT on imported timm weights == numpy timm forward, within 1e-4: the class
  row folded into cls (default) or kept as cls_pos_embedding."""
  sd = vit_writers.to_timm(params, cls_row)
  path = _write(tmp_path, 'm.safetensors', sd)
  model = _model(class_posemb=class_posemb)
  loaded = vit_import.load_vit_checkpoint(path, target_params=_abstract(
      class_posemb=class_posemb))
  assert ('cls_pos_embedding' in loaded) == class_posemb
  images = np.random.default_rng(3).normal(size=(2, IMAGE, IMAGE, 3)).astype(np.float32)
  logits, _ = jax.jit(model.apply)({'params': loaded}, images)
  expected = _timm_forward(sd, images.astype(np.float64), NUM_HEADS)
  assert np.abs(expected).max() > 0.1  # a non-trivial output
  np.testing.assert_allclose(np.asarray(logits), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('old, new', [(4, 7), (7, 3), (5, (3, 8))])
def test_resample_constant_stays_constant(old, new):
  posemb = np.full((1, old * old, 6), 0.37, np.float32)
  out = vit_import.resample_posemb(posemb, new)
  gh, gw = (new, new) if isinstance(new, int) else new
  assert out.shape == (1, gh * gw, 6)
  np.testing.assert_allclose(out, 0.37, atol=1e-6)


def test_resample_keeps_orientation_and_identity():
  rows = np.repeat(np.arange(4.)[:, None], 6, axis=1)  # value = row index, 4x6 grid
  posemb = np.stack([rows, -rows], -1).reshape(1, 24, 2).astype(np.float32)
  assert vit_import.resample_posemb(posemb, (4, 6), old_grid=(4, 6)) is posemb
  out = vit_import.resample_posemb(posemb, (8, 3), old_grid=(4, 6)).reshape(8, 3, 2)
  np.testing.assert_allclose(out[..., 0], out[:, :1, 0].repeat(3, 1), atol=1e-6)
  assert np.all(np.diff(out[:, 0, 0]) >= 0) and out[-1, 0, 0] > out[0, 0, 0]
  np.testing.assert_allclose(out[..., 1], -out[..., 0], atol=1e-6)


def test_resample_needs_square_or_grid():
  with pytest.raises(ValueError, match='not a square grid'):
    vit_import.resample_posemb(np.zeros((1, 24, 2)), 4)


def test_load_resamples_to_target_grid(tmp_path, params, cls_row, vit_writers):
  path = _write(tmp_path, 'm.safetensors', vit_writers.to_timm(params, cls_row))
  target = _init(image_size=48)  # 12x12 grid
  loaded = vit_import.load_vit_checkpoint(path, target_params=target)
  assert loaded['pos_embedding'].shape == (1, 144, 32)
  np.testing.assert_allclose(
      loaded['pos_embedding'],
      vit_import.resample_posemb(params['pos_embedding'], 12), atol=1e-6)
  np.testing.assert_allclose(loaded['cls'], params['cls'], atol=1e-6)
  np.testing.assert_array_equal(loaded['encoder']['block_1']['mlp']['fc2']['kernel'],
                                params['encoder']['block_1']['mlp']['fc2']['kernel'])
  logits, _ = jax.jit(_model().apply)({'params': loaded}, jnp.zeros((1, 48, 48, 3)))
  assert logits.shape == (1, NUM_CLASSES)


@pytest.mark.parametrize('layout', ['timm', 'hf', 'vision_transformer'])
def test_class_row_becomes_cls_pos_embedding_and_is_never_resampled(
    tmp_path, params, cls_row, vit_writers, layout):
  """Into a class_posemb model the class row is its own parameter, bitwise, at the file's grid
  and at another one (where only the patch rows are resampled)."""
  form, name, arrays = _layouts(vit_writers, params, cls_row)[layout]
  path = _write(tmp_path, name, arrays)
  cls_token = params['cls'] - cls_row  # As the writers store it.
  for image_size, grid in ((IMAGE, 8), (48, 12)):
    loaded, report = vit_import.import_vit(
        path, format=form, target_params=_abstract(image_size, class_posemb=True))
    np.testing.assert_array_equal(loaded['cls_pos_embedding'], cls_row)
    np.testing.assert_array_equal(loaded['cls'], cls_token)
    np.testing.assert_allclose(loaded['pos_embedding'], vit_import.resample_posemb(
        params['pos_embedding'], grid), atol=1e-6)
    assert 'row 0 of' in report.loaded['cls_pos_embedding']
    assert ' + ' not in report.loaded['cls']  # Nothing folded into it.


def test_class_posemb_model_needs_a_class_row(tmp_path, params, vit_writers):
  """A file whose position embedding has only the patch rows (big_vision) does not fit."""
  path = _write(tmp_path, 'm.npz', vit_writers.to_big_vision(params, NUM_HEADS))
  with pytest.raises(vit_import.CheckpointMismatchError,
                     match=r'missing: cls_pos_embedding \(1, 1, 32\) is not in the checkpoint '
                     r"\(the checkpoint's position embedding has no class-token row: build the "
                     r'model with class_posemb=False\)'):
    vit_import.load_vit_checkpoint(path, target_params=_abstract(class_posemb=True))


def test_new_head_needs_dont_load(tmp_path, params, cls_row, vit_writers):
  path = _write(tmp_path, 'm.safetensors', vit_writers.to_hf(params, cls_row))
  target = _init(num_classes=3)
  with pytest.raises(vit_import.CheckpointMismatchError,
                     match=r"head/kernel from 'classifier.weight' \(5, 32\).*"
                     r"checkpoint \(32, 5\).*model \(32, 3\)"):
    vit_import.load_vit_checkpoint(path, target_params=target)
  loaded = vit_import.load_vit_checkpoint(path, target_params=target,
                                          dont_load=['head/.*'])
  assert loaded['head']['kernel'] is target['head']['kernel']
  np.testing.assert_array_equal(loaded['embedding']['kernel'],
                                params['embedding']['kernel'])


def test_missing_and_unexpected_are_listed(tmp_path, params, cls_row, vit_writers):
  """A 2-block checkpoint fits neither a 3-block nor a 1-block tree (cf. orbax#2972)."""
  path = _write(tmp_path, 'm.safetensors', vit_writers.to_timm(params, cls_row))
  deeper = dict(params, encoder=dict(params['encoder'],
                                     block_2=params['encoder']['block_1']))
  with pytest.raises(vit_import.CheckpointMismatchError,
                     match=r'(?s)missing: encoder/block_2/attn/key/bias.*'
                     r'missing: encoder/block_2/mlp/fc2/kernel'):
    vit_import.load_vit_checkpoint(path, target_params=deeper)
  shallower = dict(params, encoder={k: v for k, v in params['encoder'].items()
                                    if k != 'block_1'})
  with pytest.raises(vit_import.CheckpointMismatchError,
                     match=r"unexpected: encoder/block_1/attn/query/kernel from "
                     r"'blocks.1.attn.qkv.weight' \(96, 32\)"):
    vit_import.load_vit_checkpoint(path, target_params=shallower)


def test_unknown_checkpoint_keys_error_or_drop(tmp_path, params, cls_row, vit_writers):
  sd = vit_writers.to_hf(params, cls_row)
  sd['vit.pooler.dense.weight'] = np.zeros((32, 32), np.float32)
  path = _write(tmp_path, 'm.safetensors', sd)
  with pytest.raises(vit_import.CheckpointMismatchError,
                     match=r"unexpected: checkpoint key 'vit.pooler.dense.weight'"):
    vit_import.load_vit_checkpoint(path)
  loaded = vit_import.load_vit_checkpoint(path, target_params=params,
                                          dont_load=[r'vit\.pooler\..*'])
  _assert_trees_close(loaded, params)


def test_dont_load_that_matches_nothing_is_an_error(tmp_path, params, cls_row,
                                                    vit_writers):
  path = _write(tmp_path, 'm.safetensors', vit_writers.to_timm(params, cls_row))
  with pytest.raises(ValueError, match=r"dont_load pattern 'heads/.\*' matches no parameter.*"
                                       r"Closest paths: \['head/"):
    vit_import.load_vit_checkpoint(path, target_params=params, dont_load=['heads/.*'])


def test_dont_load_without_target_drops(tmp_path, params, cls_row, vit_writers):
  path = _write(tmp_path, 'm.safetensors', vit_writers.to_timm(params, cls_row))
  loaded = vit_import.load_vit_checkpoint(path, dont_load=['head/.*'])
  assert 'head' not in loaded and 'encoder' in loaded


def test_abstract_target(tmp_path, params, cls_row, vit_writers):
  path = _write(tmp_path, 'm.npz', vit_writers.to_big_vision(params, NUM_HEADS))
  abstract = jax.eval_shape(lambda: params)
  _assert_trees_close(vit_import.load_vit_checkpoint(path, target_params=abstract), params)
  with pytest.raises(ValueError, match='ShapeDtypeStruct'):
    vit_import.load_vit_checkpoint(path, target_params=abstract, dont_load=['head/.*'])


def test_num_heads_checked_for_big_vision(tmp_path, params, vit_writers):
  path = _write(tmp_path, 'm.npz', vit_writers.to_big_vision(params, NUM_HEADS))
  with pytest.raises(ValueError, match='has 2 heads.*num_heads=4'):
    vit_import.load_vit_checkpoint(path, num_heads=4)


def test_bfloat16_checkpoint_is_cast_to_target_dtype(tmp_path, params, cls_row,
                                                     vit_writers):
  import ml_dtypes  # pylint: disable=g-import-not-at-top
  sd = {k: v.astype(ml_dtypes.bfloat16)
        for k, v in vit_writers.to_timm(params, cls_row).items()}
  path = _write(tmp_path, 'm.safetensors', sd)
  loaded = vit_import.load_vit_checkpoint(path, target_params=params)
  assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves(loaded))
  _assert_trees_close(loaded, params, atol=0.02)


def test_format_errors(tmp_path, params, cls_row, vit_writers):
  path = _write(tmp_path, 'm.safetensors', vit_writers.to_timm(params, cls_row))
  with pytest.raises(ValueError, match=r"Unknown ViT checkpoint format 'jax'.*'timm'"):
    vit_import.load_vit_checkpoint(path, format='jax')
  with pytest.raises(ValueError, match='no key of a hf ViT checkpoint'):
    vit_import.load_vit_checkpoint(path, format='hf')
  other = _write(tmp_path, 'o.safetensors', {'foo.weight': np.zeros(3, np.float32)})
  with pytest.raises(ValueError, match="cannot tell the ViT checkpoint layout.*'foo.weight'"):
    vit_import.load_vit_checkpoint(other)


def test_pickled_checkpoints_are_refused(tmp_path):
  objects = tmp_path / 'objects.npz'
  np.savez(objects, a=np.array([{'x': 1}], dtype=object))
  disguised = tmp_path / 'disguised.npz'
  disguised.write_bytes(pickle.dumps({'a': np.zeros(3)}))
  pkl = tmp_path / 'm.pkl'
  pkl.write_bytes(pickle.dumps({}))
  for path in (objects, disguised, pkl):
    with pytest.raises(readers.PickleRefusedError, match='(?i)convert.*safetensors'):
      vit_import.load_vit_checkpoint(path)


def test_the_report_summarises_many_keys_ignored_for_one_reason():
  report = vit_import.ImportReport(path='ckpt.npz', layout='timm', ignored={
      **{f'decoder_blocks.{i}.attn.qkv.weight': 'the MAE decoder' for i in range(6)},
      'mask_token': 'the mask token', 'norm.weight': 'replaced by fc_norm'})
  lines = report.summary().splitlines()
  assert lines[1:] == [
      '  ignored: 6 keys decoder_blocks.* (the MAE decoder), '
      'e.g. decoder_blocks.0.attn.qkv.weight',
      '  ignored: mask_token (the mask token)',
      '  ignored: norm.weight (replaced by fc_norm)']
