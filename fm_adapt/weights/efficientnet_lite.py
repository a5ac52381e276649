"""Imports the PyTorch EfficientNet-Lite0 ImageNet checkpoint into our Flax tree.

The checkpoint (efficientnet-lite0-57934424.pth, or the same tensors as .npz) uses
the lukemelas/EfficientNet-PyTorch names: `_conv_stem`, `_bn0`,
`_blocks.N._expand_conv/_bn0/_depthwise_conv/_bn1/_project_conv/_bn2`,
`_conv_head`, `_bn1`, `_fc`. Layouts are converted from PyTorch to Flax:
convolutions OIHW -> HWIO, depthwise (C, 1, k, k) -> (k, k, 1, C), Linear
(out, in) -> (in, out).

The import is strict: every array in the file is used (the integer
`num_batches_tracked` counters are read and dropped), every parameter and
BatchNorm statistic of `fm_adapt.models.efficientnet.Model(variant='lite0')` is
filled, and every shape is checked.
"""
import re
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from fm_adapt.models import efficientnet
from fm_adapt.weights import readers

# PyTorch module name -> our module path.
_TOP_MODULES = {
    '_conv_stem': 'stem/conv',
    '_bn0': 'stem/bn',
    '_conv_head': 'head_conv',
    '_bn1': 'head_bn',
    '_fc': 'head',
}
_BLOCK_MODULES = {
    '_expand_conv': 'expand_conv',
    '_bn0': 'expand_bn',
    '_depthwise_conv': 'dw_conv',
    '_bn1': 'dw_bn',
    '_project_conv': 'project_conv',
    '_bn2': 'project_bn',
}
# PyTorch BatchNorm entry -> (collection, our leaf name).
_BN_LEAVES = {
    'weight': ('params', 'scale'),
    'bias': ('params', 'bias'),
    'running_mean': ('batch_stats', 'mean'),
    'running_var': ('batch_stats', 'var'),
}
_BLOCK_KEY = re.compile(r'_blocks\.(\d+)\.(\w+)\.(\w+)')
_TOP_KEY = re.compile(r'(\w+)\.(\w+)')
_IGNORED_LEAVES = ('num_batches_tracked',)


def load_efficientnet_lite0(path: readers.PathLike) -> dict[str, Any]:
  """Loads the EfficientNet-Lite0 checkpoint into Flax variables.

  Args:
    path: the `.npz` (numpy only) or `.pth` (needs torch) checkpoint.

  Returns:
    dict(params=..., batch_stats=...): nested dicts of float32 numpy arrays for
    `efficientnet.Model(num_classes=1000, variant='lite0')`.

  Raises:
    ValueError: a key the importer does not understand, a parameter the file
      lacks, or a shape that differs (naming the key and both shapes).
    PickleRefusedError: the file needs pickle.
  """
  arrays = readers.read_arrays(path)
  expected = _expected_shapes()
  converted, unknown = {}, []
  for key, value in arrays.items():
    if key.rsplit('.', 1)[-1] in _IGNORED_LEAVES:
      continue
    target = _target_of(key)
    if target is None:
      unknown.append(key)
      continue
    converted[target] = (key, value.shape, _to_flax_layout(target, np.asarray(value)))
  _check(path, expected, converted, unknown)
  flat = {target: value.astype(np.float32)
          for target, (_, _, value) in converted.items()}
  variables = flax.traverse_util.unflatten_dict(flat, sep='/')
  return {'params': variables['params'], 'batch_stats': variables['batch_stats']}


def _expected_shapes() -> dict[str, tuple[int, ...]]:
  """'/'-joined variable path (collection first) -> shape, for lite0."""
  model = efficientnet.Model(num_classes=1000, variant='lite0')
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, 32, 32, 3), jnp.float32))
  flat = flax.traverse_util.flatten_dict(shapes, sep='/')
  return {path: tuple(leaf.shape) for path, leaf in flat.items()}


def _target_of(key: str) -> str | None:
  """Our '/'-joined variable path for a PyTorch key, or None if unknown."""
  match = _BLOCK_KEY.fullmatch(key)
  if match:
    index, module, leaf = match.groups()
    module = _BLOCK_MODULES.get(module)
    prefix = f'block_{index}/{module}' if module else None
  else:
    match = _TOP_KEY.fullmatch(key)
    if not match:
      return None
    module, leaf = match.groups()
    prefix = _TOP_MODULES.get(module)
  if prefix is None:
    return None
  if prefix.endswith('bn'):
    if leaf not in _BN_LEAVES:
      return None
    collection, name = _BN_LEAVES[leaf]
    return f'{collection}/{prefix}/{name}'
  name = {'weight': 'kernel', 'bias': 'bias'}.get(leaf)
  return f'params/{prefix}/{name}' if name else None


def _to_flax_layout(target: str, value: np.ndarray) -> np.ndarray:
  """PyTorch layout -> Flax layout for a kernel; other leaves unchanged."""
  if not target.endswith('/kernel'):
    return value
  if value.ndim == 4:  # OIHW -> HWIO; depthwise (C,1,k,k) -> (k,k,1,C).
    return np.transpose(value, (2, 3, 1, 0))
  if value.ndim == 2:  # Linear (out, in) -> Dense (in, out).
    return value.T
  raise ValueError(f'{target}: kernel of unexpected rank {value.ndim}.')


def _check(path: readers.PathLike, expected: dict[str, tuple[int, ...]],
           converted: dict[str, tuple[str, tuple[int, ...], np.ndarray]],
           unknown: list[str]) -> None:
  """Raises one ValueError listing every unknown key, missing leaf and bad shape."""
  problems = [f'unexpected key {key!r} (no EfficientNet-Lite0 variable for it)'
              for key in sorted(unknown)]
  problems += [f'unexpected key {key!r} -> {target} (not in the model)'
               for target, (key, _, _) in sorted(converted.items())
               if target not in expected]
  problems += [f'missing: nothing in the file fills {target} {shape}'
               for target, shape in sorted(expected.items())
               if target not in converted]
  problems += [
      f'shape mismatch for key {key!r} -> {target}: checkpoint {shape} '
      f'(Flax layout {value.shape}) vs model {expected[target]}'
      for target, (key, shape, value) in sorted(converted.items())
      if target in expected and value.shape != expected[target]]
  if problems:
    raise ValueError(f'{path} is not an EfficientNet-Lite0 checkpoint:\n  '
                     + '\n  '.join(problems))
