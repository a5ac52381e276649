"""Tests of fm_adapt.weights.readers (no pickle, optional torch) and the LOADERS registry."""
import argparse
import fractions
import pickle
import sys

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from fm_adapt import weights
from fm_adapt.weights import readers


def test_reads_npz_and_safetensors(tmp_path):
  arrays = {'a.weight': np.arange(6, dtype=np.float32).reshape(2, 3),
            'b': np.ones(2, ml_dtypes.bfloat16)}
  np.savez(tmp_path / 'x.npz', **arrays)
  safetensors.numpy.save_file(arrays, str(tmp_path / 'x.safetensors'))
  for name in ('x.npz', 'x.safetensors'):
    got = readers.read_arrays(tmp_path / name)
    assert sorted(got) == sorted(arrays) == sorted(readers.list_keys(tmp_path / name))
    np.testing.assert_array_equal(got['a.weight'], arrays['a.weight'])


@pytest.mark.parametrize('name, content', [
    ('model.pkl', pickle.dumps({'w': np.zeros(2)})),
    ('model.pickle', b'anything'),
    ('disguised.npz', pickle.dumps({'w': np.zeros(2)})),
])
def test_pickle_files_are_refused(tmp_path, name, content):
  (tmp_path / name).write_bytes(content)
  with pytest.raises(readers.PickleRefusedError,
                     match=r'(?s)arbitrary code.*\.safetensors.*\.npz'):
    readers.read_arrays(tmp_path / name)


def test_object_arrays_are_refused(tmp_path):
  np.savez(tmp_path / 'objects.npz', w=np.zeros(2), meta=np.array([{'lr': 1}], dtype=object))
  with pytest.raises(readers.PickleRefusedError, match='pickled Python objects'):
    readers.read_arrays(tmp_path / 'objects.npz')


def test_unsupported_and_missing_files(tmp_path):
  with pytest.raises(ValueError, match=r"unsupported checkpoint extension '.h5'.*\.npz"):
    readers.read_arrays(tmp_path / 'model.h5')
  with pytest.raises(FileNotFoundError, match='No checkpoint file'):
    readers.read_arrays(tmp_path / 'absent.npz')
  np.save(tmp_path / 'single.npy', np.zeros(2))
  (tmp_path / 'single.npy').rename(tmp_path / 'single.npz')
  with pytest.raises(ValueError, match='single array'):
    readers.read_arrays(tmp_path / 'single.npz')


def test_pth_without_torch_says_how_to_install(tmp_path, monkeypatch):
  (tmp_path / 'm.pth').write_bytes(b'not read')
  monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` now fails
  with pytest.raises(ImportError, match=r'(?s)needs PyTorch.*fm_adapt\[torch\]'):
    readers.read_arrays(tmp_path / 'm.pth')


def test_pth_state_dicts(tmp_path):
  torch = pytest.importorskip('torch')
  sd = {'w': torch.arange(6, dtype=torch.float32).reshape(2, 3),
        'h': torch.ones(3, dtype=torch.bfloat16)}
  torch.save({'state_dict': sd, 'epoch': 3}, tmp_path / 'wrapped.pth')
  got = readers.read_arrays(tmp_path / 'wrapped.pth')
  np.testing.assert_array_equal(got['w'], np.arange(6).reshape(2, 3))
  assert got['h'].dtype == ml_dtypes.bfloat16 and got['h'].astype(np.float32).sum() == 3
  # MAE / RETFound checkpoints carry their argparse arguments: allowed, and ignored.
  torch.save({'model': sd, 'args': argparse.Namespace(lr=0.1, model='vit_large_patch16'),
              'epoch': 3}, tmp_path / 'retfound.pth')
  assert sorted(readers.read_arrays(tmp_path / 'retfound.pth')) == ['h', 'w']
  # Any other object is not: here a Fraction (rebuilt by calling its class).
  torch.save({'state_dict': sd, 'best': fractions.Fraction(1, 3)}, tmp_path / 'objs.pth')
  with pytest.raises(readers.PickleRefusedError, match=r'weights_only=True said'):
    readers.read_arrays(tmp_path / 'objs.pth')
  torch.save([1, 2], tmp_path / 'list.pth')
  with pytest.raises(ValueError, match='not a state dict'):
    readers.read_arrays(tmp_path / 'list.pth')


def test_registry_kinds():
  assert set(weights.LOADERS) == {'efficientnet_lite0', 'vit', 'big_vision', 'timm', 'hf',
                                  'pth', 'fm_adapt', 'fm_adapt_mim', 'hf_dinov2', 'open_clip', 'hf_clip',
                                  'retfound'}


def test_load_by_kind_and_by_path(tmp_path):
  d, n, k = 8, 4, 3
  rng = np.random.default_rng(0)
  sd = {'cls_token': rng.normal(size=(1, 1, d)), 'pos_embed': rng.normal(size=(1, 1 + n, d)),
        'patch_embed.proj.weight': rng.normal(size=(d, 3, 2, 2)),
        'patch_embed.proj.bias': rng.normal(size=d),
        'norm.weight': rng.normal(size=d), 'norm.bias': rng.normal(size=d),
        'head.weight': rng.normal(size=(k, d)), 'head.bias': rng.normal(size=k)}
  sd = {key: v.astype(np.float32) for key, v in sd.items()}
  path = tmp_path / 'tiny.safetensors'
  safetensors.numpy.save_file(sd, str(path))
  by_kind = weights.load('timm', path)
  by_path = weights.load(path)
  np.testing.assert_array_equal(by_kind['head']['kernel'], sd['head.weight'].T)
  np.testing.assert_array_equal(by_path['pos_embedding'], sd['pos_embed'][:, 1:])
  np.testing.assert_allclose(by_path['cls'], sd['cls_token'] + sd['pos_embed'][:, :1])
  assert weights.detect_name(path) == 'vit'


def test_detect_efficientnet(tmp_path, lite0_state_dict):
  """A checkpoint with EfficientNet-PyTorch key names (the real file's) is
  EfficientNet-Lite0; the same file without its stem is not."""
  np.savez(tmp_path / 'lite0.npz', **lite0_state_dict)
  assert weights.detect_name(tmp_path / 'lite0.npz') == 'efficientnet_lite0'
  stemless = {k: v for k, v in lite0_state_dict.items() if not k.startswith('_conv_stem.')}
  np.savez(tmp_path / 'stemless.npz', **stemless)
  assert weights.detect_name(tmp_path / 'stemless.npz') != 'efficientnet_lite0'


def test_load_errors(tmp_path):
  with pytest.raises(ValueError, match=r"'resnet' is neither a checkpoint loader name.*'timm'"):
    weights.load('resnet')
  with pytest.raises(ValueError, match='checkpoint path is missing'):
    weights.load('timm')
  with pytest.raises(ValueError, match='neither a checkpoint loader name'):
    weights.load('nope', tmp_path / 'x.npz')
