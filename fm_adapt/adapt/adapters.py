"""Bottleneck adapters: down-projection, nonlinearity, zero-initialized up-projection.

An adapter is a small residual branch `up(act(down(h)))` added into a frozen network. Its
up-projection (kernel and bias) starts at zero, so at initialization every adapter outputs exactly
zero and the adapted model computes exactly the base model's function.

Placement in the models (selected by configuration, see `check_vit_config` / `check_cnn_config`):

  ViT (`vit.Model(adapter=...)`), per encoder block, parameters
  `encoder/block_{i}/adapter_attn/{down,up}/...` and `encoder/block_{i}/adapter_mlp/{down,up}/...`:
    'sequential'  Houlsby et al. (2019): on the output y of the attention and/or MLP branch,
                  before the residual add: y <- y + scale * adapter(y).
    'parallel'    He et al. (2022, "Towards a unified view of parameter-efficient transfer
                  learning"), as AdaptFormer (Chen et al., 2022) places it in a pre-norm ViT: the
                  adapter reads the branch's input x (the residual stream, before the LayerNorm)
                  and is added to the branch output: y <- y + scale * adapter(x).

  EfficientNet-Lite (`efficientnet.Model(adapter=...)`), after each chosen MBConv block (its output
  h, after the block's own residual), parameters `block_{i}/adapter/{down,up}/...`:
    h <- h + adapter(h), a residual 1x1 bottleneck. The 1x1 convolutions are written as `nn.Dense`
    over the channel axis (identical arithmetic; kernels [C, dim] and [dim, C]).

Every adapter parameter path contains 'adapter', so the schedule rule `'.*adapter.*'` selects them.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fm_adapt.models import activations

ACTIVATIONS = {
    'gelu': activations.gelu,
    'relu': jax.nn.relu,
    'relu6': jax.nn.relu6,
    'silu': jax.nn.silu,
}
VIT_KINDS = ('sequential', 'parallel')
VIT_WHERE = ('attn', 'mlp')
VIT_KEYS = ('kind', 'dim', 'where', 'scale', 'act')
CNN_KEYS = ('dim', 'reduction', 'blocks', 'act')


class Bottleneck(nn.Module):
  """`up(act(down(x)))` over the last axis; `up` is zero-initialized (kernel and bias).

  Attributes:
    dim: bottleneck width.
    act: name of the nonlinearity, a key of ACTIVATIONS.
    dtype: compute dtype (parameters stay float32).
  """
  dim: int
  act: str = 'gelu'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Returns the adapter output, same shape as x (exactly zero at initialization)."""
    h = nn.Dense(self.dim, dtype=self.dtype, name='down')(x)
    h = ACTIVATIONS[self.act](h)
    return nn.Dense(x.shape[-1], dtype=self.dtype, kernel_init=nn.initializers.zeros,
                    bias_init=nn.initializers.zeros, name='up')(h)


def _check_keys(cfg: Mapping[str, Any], valid: Sequence[str], what: str) -> dict[str, Any]:
  cfg = dict(cfg)
  unknown = sorted(set(cfg) - set(valid))
  if unknown:
    raise ValueError(f'Unknown {what} key(s) {unknown}; valid keys: {list(valid)}.')
  return cfg


def _check_act(act: str) -> str:
  if act not in ACTIVATIONS:
    raise ValueError(f'Unknown adapter act {act!r}; valid: {sorted(ACTIVATIONS)}.')
  return act


def _check_dim(dim: Any, what: str) -> int:
  if not isinstance(dim, int) or isinstance(dim, bool) or dim <= 0:
    raise ValueError(f'{what} must be a positive int, got {dim!r}.')
  return dim


def check_vit_config(cfg: Mapping[str, Any]) -> dict[str, Any]:
  """Validates and completes a ViT adapter config.

  Args:
    cfg: dict with 'kind' ('sequential' | 'parallel'), 'dim' (bottleneck width) and optional
      'where' (subset of ('attn', 'mlp'), default both), 'scale' (default 1.0), 'act' (default
      'gelu').

  Returns:
    The config with every key set; 'where' as a tuple.

  Raises:
    ValueError: for unknown keys or values, listing the valid ones.
  """
  cfg = _check_keys(cfg, VIT_KEYS, 'ViT adapter')
  kind = cfg.get('kind')
  if kind not in VIT_KINDS:
    raise ValueError(f'Unknown ViT adapter kind {kind!r}; valid: {list(VIT_KINDS)}.')
  where = cfg.get('where', VIT_WHERE)
  where = (where,) if isinstance(where, str) else tuple(where)
  bad = [w for w in where if w not in VIT_WHERE]
  if bad or not where:
    raise ValueError(f'ViT adapter where={where!r}; valid: a non-empty subset of '
                     f'{list(VIT_WHERE)}.')
  return dict(kind=kind, dim=_check_dim(cfg.get('dim'), 'ViT adapter dim'), where=where,
              scale=float(cfg.get('scale', 1.0)), act=_check_act(cfg.get('act', 'gelu')))


def check_cnn_config(cfg: Mapping[str, Any], num_blocks: int) -> dict[str, Any]:
  """Validates and completes an EfficientNet adapter config.

  Args:
    cfg: dict with exactly one of 'dim' (bottleneck width of every adapter) or 'reduction'
      (width = max(channels // reduction, 1)), optional 'blocks' (indices of the MBConv blocks
      that get an adapter; default all; negative indices count from the end) and 'act' (default
      'relu6', the network's own nonlinearity).
    num_blocks: number of MBConv blocks of the model.

  Returns:
    The config with 'blocks' as a sorted tuple of non-negative indices.

  Raises:
    ValueError: for unknown keys, a missing or doubled width, or block indices out of range.
  """
  cfg = _check_keys(cfg, CNN_KEYS, 'EfficientNet adapter')
  if ('dim' in cfg) == ('reduction' in cfg):
    raise ValueError("EfficientNet adapter needs exactly one of 'dim' or 'reduction', got "
                     f'{sorted(cfg)}.')
  blocks = cfg.get('blocks')
  blocks = range(num_blocks) if blocks is None else blocks
  out_of_range = [b for b in blocks if not -num_blocks <= b < num_blocks]
  if out_of_range:
    raise ValueError(f'EfficientNet adapter blocks {out_of_range} out of range for '
                     f'{num_blocks} blocks.')
  result = dict(blocks=tuple(sorted({b % num_blocks for b in blocks})),
                act=_check_act(cfg.get('act', 'relu6')))
  if 'dim' in cfg:
    result['dim'] = _check_dim(cfg['dim'], 'EfficientNet adapter dim')
  else:
    result['reduction'] = _check_dim(cfg['reduction'], 'EfficientNet adapter reduction')
  return result


def cnn_width(cfg: Mapping[str, Any], channels: int) -> int:
  """Bottleneck width of an EfficientNet adapter on a feature map with `channels` channels."""
  if 'dim' in cfg:
    return int(cfg['dim'])
  return max(channels // int(cfg['reduction']), 1)
