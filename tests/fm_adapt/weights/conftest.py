"""Fixtures for the weights tests: writers of external checkpoint layouts.

The `vit_writers` fixture gives the ViT writers below (pytest runs with
--import-mode=importlib, so tests take helpers from fixtures, not imports).
They write an fm_adapt ViT tree in external checkpoint layouts.
`lite0_state_dict` is a synthetic EfficientNet-Lite0 checkpoint in the layout of
the real one (../shared/weights/efficientnet-lite0-57934424.npz).

Each writer spells out the external layout on its own (names, transposes, head
axes), independently of `fm_adapt.weights.vit_formats`, so a test that writes
with these and imports with fm_adapt checks the two against each other. The
external layouts follow timm's VisionTransformer, Hugging Face's
ViTForImageClassification, big_vision's vit.py and vision_transformer's
models_vit.py (old flax auto-names: MultiHeadDotProductAttention_1, LayerNorm_2,
MlpBlock_3; class-token position row inside Transformer/posembed_input).
"""
import importlib.abc
import importlib.machinery
import sys
import types

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fm_adapt.models import efficientnet


def _depth(params: dict) -> int:
  return len([k for k in params['encoder'] if k.startswith('block_')])


def _cls_with_row(params: dict, cls_row: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(class token, posemb [1, 1+N, D]) whose fold is params' cls and pos_embedding."""
  cls = np.asarray(params['cls']) - cls_row
  pos = np.concatenate([cls_row, np.asarray(params['pos_embedding'])], axis=1)
  return cls, pos


def _linear(sd: dict, name: str, dense: dict) -> None:
  """A PyTorch Linear: weight (out, in), bias (out,)."""
  sd[f'{name}.weight'] = np.ascontiguousarray(np.asarray(dense['kernel']).T)
  sd[f'{name}.bias'] = np.asarray(dense['bias'])


def _layer_norm(sd: dict, name: str, ln: dict) -> None:
  sd[f'{name}.weight'] = np.asarray(ln['scale'])
  sd[f'{name}.bias'] = np.asarray(ln['bias'])


def _patch_conv(sd: dict, name: str, embedding: dict) -> None:
  """A PyTorch Conv2d: weight OIHW from the Flax HWIO kernel."""
  sd[f'{name}.weight'] = np.ascontiguousarray(
      np.asarray(embedding['kernel']).transpose(3, 2, 0, 1))
  sd[f'{name}.bias'] = np.asarray(embedding['bias'])


def to_timm(params: dict, cls_row: np.ndarray) -> dict[str, np.ndarray]:
  """timm VisionTransformer state dict (fused qkv, class-token position row)."""
  sd = {}
  sd['cls_token'], sd['pos_embed'] = _cls_with_row(params, cls_row)
  _patch_conv(sd, 'patch_embed.proj', params['embedding'])
  for i in range(_depth(params)):
    block, pre = params['encoder'][f'block_{i}'], f'blocks.{i}'
    attn = block['attn']
    _layer_norm(sd, f'{pre}.norm1', block['ln_attn'])
    sd[f'{pre}.attn.qkv.weight'] = np.ascontiguousarray(np.concatenate(
        [np.asarray(attn[n]['kernel']).T for n in ('query', 'key', 'value')], axis=0))
    sd[f'{pre}.attn.qkv.bias'] = np.concatenate(
        [np.asarray(attn[n]['bias']) for n in ('query', 'key', 'value')], axis=0)
    _linear(sd, f'{pre}.attn.proj', attn['out'])
    _layer_norm(sd, f'{pre}.norm2', block['ln_mlp'])
    _linear(sd, f'{pre}.mlp.fc1', block['mlp']['fc1'])
    _linear(sd, f'{pre}.mlp.fc2', block['mlp']['fc2'])
  _layer_norm(sd, 'norm', params['encoder']['norm'])
  _linear(sd, 'head', params['head'])
  return sd


def to_hf(params: dict, cls_row: np.ndarray) -> dict[str, np.ndarray]:
  """transformers ViTForImageClassification state dict ('vit.' prefix)."""
  sd = {}
  sd['vit.embeddings.cls_token'], sd['vit.embeddings.position_embeddings'] = (
      _cls_with_row(params, cls_row))
  _patch_conv(sd, 'vit.embeddings.patch_embeddings.projection', params['embedding'])
  for i in range(_depth(params)):
    block, pre = params['encoder'][f'block_{i}'], f'vit.encoder.layer.{i}'
    _layer_norm(sd, f'{pre}.layernorm_before', block['ln_attn'])
    for name in ('query', 'key', 'value'):
      _linear(sd, f'{pre}.attention.attention.{name}', block['attn'][name])
    _linear(sd, f'{pre}.attention.output.dense', block['attn']['out'])
    _layer_norm(sd, f'{pre}.layernorm_after', block['ln_mlp'])
    _linear(sd, f'{pre}.intermediate.dense', block['mlp']['fc1'])
    _linear(sd, f'{pre}.output.dense', block['mlp']['fc2'])
  _layer_norm(sd, 'vit.layernorm', params['encoder']['norm'])
  _linear(sd, 'classifier', params['head'])
  return sd


def _flax_attention(npz: dict, prefix: str, attn: dict, num_heads: int) -> None:
  """flax MultiHeadDotProductAttention: q/k/v kernel [D, H, dh], out [H, dh, D]."""
  for name in ('query', 'key', 'value'):
    kernel = np.asarray(attn[name]['kernel'])
    d = kernel.shape[0]
    npz[f'{prefix}/{name}/kernel'] = kernel.reshape(d, num_heads, d // num_heads)
    npz[f'{prefix}/{name}/bias'] = np.asarray(attn[name]['bias']).reshape(num_heads, -1)
  out = np.asarray(attn['out']['kernel'])
  npz[f'{prefix}/out/kernel'] = out.reshape(num_heads, -1, out.shape[-1])
  npz[f'{prefix}/out/bias'] = np.asarray(attn['out']['bias'])


def _flax_leaves(npz: dict, prefix: str, module: dict) -> None:
  for leaf, value in module.items():
    npz[f'{prefix}/{leaf}'] = np.asarray(value)


def to_big_vision(params: dict, num_heads: int, *, old: bool = False,
                  cls_row: np.ndarray | None = None) -> dict[str, np.ndarray]:
  """'/'-joined .npz of big_vision (old=False) or vision_transformer (old=True)."""
  mha, ln2, mlp = ('MultiHeadDotProductAttention_1', 'LayerNorm_2', 'MlpBlock_3') if old \
      else ('MultiHeadDotProductAttention_0', 'LayerNorm_1', 'MlpBlock_0')
  npz = {}
  _flax_leaves(npz, 'embedding', params['embedding'])
  if old:
    npz['cls'], npz['Transformer/posembed_input/pos_embedding'] = _cls_with_row(
        params, cls_row)
  else:
    npz['cls'] = np.asarray(params['cls'])
    npz['pos_embedding'] = np.asarray(params['pos_embedding'])
  for i in range(_depth(params)):
    block, pre = params['encoder'][f'block_{i}'], f'Transformer/encoderblock_{i}'
    _flax_leaves(npz, f'{pre}/LayerNorm_0', block['ln_attn'])
    _flax_attention(npz, f'{pre}/{mha}', block['attn'], num_heads)
    _flax_leaves(npz, f'{pre}/{ln2}', block['ln_mlp'])
    _flax_leaves(npz, f'{pre}/{mlp}/Dense_0', block['mlp']['fc1'])
    _flax_leaves(npz, f'{pre}/{mlp}/Dense_1', block['mlp']['fc2'])
  _flax_leaves(npz, 'Transformer/encoder_norm', params['encoder']['norm'])
  _flax_leaves(npz, 'head', params['head'])
  return npz


def scan_blocks(npz: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """big_vision scan=True layout: 'Transformer/encoderblock/...' stacked on axis 0."""
  out, stacked = {}, {}
  for key, value in npz.items():
    if key.startswith('Transformer/encoderblock_'):
      index, rest = key[len('Transformer/encoderblock_'):].split('/', 1)
      stacked.setdefault(rest, {})[int(index)] = value
    else:
      out[key] = value
  for rest, layers in stacked.items():
    out[f'Transformer/encoderblock/{rest}'] = np.stack([layers[i] for i in sorted(layers)])
  return out


@pytest.fixture(scope='session')
def vit_writers() -> types.SimpleNamespace:
  """to_timm, to_hf, to_big_vision and scan_blocks."""
  return types.SimpleNamespace(to_timm=to_timm, to_hf=to_hf, to_big_vision=to_big_vision,
                               scan_blocks=scan_blocks)


# EfficientNet-Lite0, lukemelas/EfficientNet-PyTorch names: our module -> theirs.
_LITE_TOP = {'stem/conv': '_conv_stem', 'stem/bn': '_bn0', 'head_conv': '_conv_head',
             'head_bn': '_bn1', 'head': '_fc'}
_LITE_BLOCK = {'expand_conv': '_expand_conv', 'expand_bn': '_bn0',
               'dw_conv': '_depthwise_conv', 'dw_bn': '_bn1',
               'project_conv': '_project_conv', 'project_bn': '_bn2'}
_LITE_LEAF = {'kernel': 'weight', 'bias': 'bias', 'scale': 'weight',
              'mean': 'running_mean', 'var': 'running_var'}


def to_efficientnet_lite(variables: dict) -> dict[str, np.ndarray]:
  """PyTorch state dict of `efficientnet.Model(variant='lite0')` variables.

  Convolutions HWIO -> OIHW (depthwise (k, k, 1, C) -> (C, 1, k, k)), Dense
  (in, out) -> Linear (out, in); BatchNorm scale/bias/mean/var -> weight/bias/
  running_mean/running_var.
  """
  sd = {}
  for collection in ('params', 'batch_stats'):
    flat = flax.traverse_util.flatten_dict(variables[collection], sep='/')
    for path, value in flat.items():
      module, leaf = path.rsplit('/', 1)
      if module.startswith('block_'):
        block, inner = module.split('/', 1)
        name = f"_blocks.{block[len('block_'):]}.{_LITE_BLOCK[inner]}"
      else:
        name = _LITE_TOP[module]
      value = np.asarray(value)
      if leaf == 'kernel':
        value = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T
      sd[f'{name}.{_LITE_LEAF[leaf]}'] = np.ascontiguousarray(value)
  return sd


@pytest.fixture(scope='session')
def lite0_variables() -> dict:
  """Random float32 variables of EfficientNet-Lite0 with 1000 classes (variances > 0)."""
  shapes = jax.eval_shape(efficientnet.Model(num_classes=1000, variant='lite0').init,
                          jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.float32))
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    if path[-1].key == 'var':
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    return rng.normal(0., 0.1, leaf.shape).astype(np.float32)

  variables = jax.tree_util.tree_map_with_path(fill, shapes)
  return {'params': variables['params'], 'batch_stats': variables['batch_stats']}


@pytest.fixture(scope='session')
def lite0_state_dict(lite0_variables) -> dict[str, np.ndarray]:
  """`lite0_variables` as a PyTorch-layout EfficientNet-Lite0 state dict (the
  real checkpoint's key names and shapes: checked against it in
  test_efficientnet_lite_weights.py)."""
  return to_efficientnet_lite(lite0_variables)


# --- The reference libraries of the foundation-model oracles (timm, open_clip, transformers).
#
# timm and open_clip import torchvision at import time (transforms, FrozenBatchNorm2d), but the
# ViT forward passes the oracles run never call it. PyPI has no CPU build of torchvision for
# torch 2.13.0+cpu: its wheel links libtorch_cuda and fails to import beside CPU torch
# ("operator torchvision::nms does not exist"). When torchvision is absent or fails to import,
# a stand-in takes its place whose every class raises when used, so an oracle that did touch
# torchvision would fail loudly instead of passing. With a working torchvision, nothing changes.

_STAND_IN_VERSION = '0.0+fm_adapt.stand.in'


class _Unavailable(type):
  """A torchvision name: attribute access gives more names, any call raises."""

  def __getattr__(cls, name):
    if name.startswith('__'):
      raise AttributeError(name)
    return _unavailable(f'{cls.__qualname__}.{name}')

  def __call__(cls, *args, **kwargs):
    raise RuntimeError(f'{cls.__qualname__} was called, but torchvision is a stand-in here '
                       '(tests/fm_adapt/weights/conftest.py): the oracle must not use it.')


def _unavailable(name: str) -> type:
  return _Unavailable(name, (), {'__qualname__': name})


class _StandInModule(types.ModuleType):

  def __getattr__(self, name):
    if name.startswith('__'):
      raise AttributeError(name)
    value = sys.modules.get(f'{self.__name__}.{name}') or _unavailable(f'{self.__name__}.{name}')
    setattr(self, name, value)
    return value


class _TorchvisionStandIn(importlib.abc.MetaPathFinder, importlib.abc.Loader):
  """Serves `torchvision` and every `torchvision.*` module as a `_StandInModule`."""

  def find_spec(self, fullname, path, target=None):
    if fullname == 'torchvision' or fullname.startswith('torchvision.'):
      return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
    return None

  def create_module(self, spec):
    module = _StandInModule(spec.name)
    module.__path__ = []
    module.__version__ = _STAND_IN_VERSION
    return module

  def exec_module(self, module):
    pass


def _ensure_torchvision_importable() -> None:
  if any(isinstance(f, _TorchvisionStandIn) for f in sys.meta_path):
    return
  try:
    import torchvision  # pylint: disable=g-import-not-at-top,unused-import
  except Exception:  # pylint: disable=broad-except
    for name in [n for n in sys.modules if n == 'torchvision' or n.startswith('torchvision.')]:
      del sys.modules[name]
    sys.meta_path.insert(0, _TorchvisionStandIn())


def import_reference(name: str) -> types.ModuleType:
  """Imports a reference library (timm, open_clip, transformers), or skips the test."""
  pytest.importorskip('torch', reason='the oracle tests need PyTorch: pip install -e ".[test]"')
  _ensure_torchvision_importable()
  return pytest.importorskip(
      name, reason=f'{name} is the oracle of this test: pip install -e ".[test]"')


@pytest.fixture(scope='session')
def reference() -> types.SimpleNamespace:
  """`reference.load(name)` imports timm / open_clip / transformers or skips the test."""
  return types.SimpleNamespace(load=import_reference)
