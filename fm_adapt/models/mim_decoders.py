"""Pixel decoders of masked image modelling: encoder tokens -> patches of pixels.

Both return [B, N, p*p*C], one row per patch of the grid in raster order, each row the patch's
pixels in (row, column, channel) order (`fm_adapt.objectives.mim_targets.patchify` lays the
target out the same way).

  LinearDecoder       SimMIM: one linear map per patch token (a 1x1 convolution to p*p*C
                      channels followed by a pixel shuffle, as in the paper).
  TransformerDecoder  MAE: the visible tokens, projected to the decoder width, are put back at
                      their positions among learned mask tokens, a fixed 2-D sin-cos position
                      embedding is added, and a few pre-norm transformer blocks predict every
                      patch.

Parameters (under the wrapper's `decoder/`):
  LinearDecoder       pred/{kernel,bias}
  TransformerDecoder  embed/{kernel,bias}, mask_token [1,1,Dd], blocks/block_{i}/..., blocks/norm,
                      pred/{kernel,bias}
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fm_adapt.models import vit

Array = jax.Array


class LinearDecoder(nn.Module):
  """SimMIM's light decoder: a linear map from each patch token to its p*p*C pixels.

  Attributes:
    patch_size: p.
    channels: C, the image channels.
    dtype: compute dtype.
  """
  patch_size: int
  channels: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, patch_tokens: Array) -> Array:
    """Maps patch tokens [B, N, D] to pixels [B, N, p*p*C] (float32)."""
    pixels = self.patch_size * self.patch_size * self.channels
    return nn.Dense(pixels, dtype=self.dtype, name='pred')(patch_tokens).astype(jnp.float32)


class TransformerDecoder(nn.Module):
  """MAE's decoder: mask tokens + visible tokens at their positions, a few blocks, pixels.

  Attributes:
    patch_size: p.
    channels: C, the image channels.
    width: the decoder's token width Dd (divisible by 4 and by num_heads).
    depth: number of transformer blocks.
    num_heads: attention heads.
    mlp_dim: hidden width of the blocks' MLP.
    dtype: compute dtype.
  """
  patch_size: int
  channels: int
  width: int = 128
  depth: int = 2
  num_heads: int = 4
  mlp_dim: int = 512
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, prefix: Array, visible: Array, keep: Array, grid: tuple[int, int]
               ) -> Array:
    """Predicts every patch from the encoded visible ones.

    Args:
      prefix: encoded prefix tokens [B, P, D] (class token, registers; P may be 0).
      visible: encoded visible patch tokens [B, K, D].
      keep: int [B, K], the grid positions of the visible tokens (distinct).
      grid: (rows, cols) of the patch grid, N = rows * cols.

    Returns:
      pixels [B, N, p*p*C] (float32).
    """
    b = keep.shape[0]
    n = grid[0] * grid[1]
    embed = nn.Dense(self.width, dtype=self.dtype, name='embed')
    visible, prefix = embed(visible), embed(prefix)
    mask_token = self.param('mask_token', nn.initializers.normal(stddev=0.02),
                            (1, 1, self.width), jnp.float32)
    tokens = jnp.broadcast_to(mask_token.astype(visible.dtype), (b, n, self.width))
    tokens = tokens.at[jnp.arange(b)[:, None], keep].set(visible)
    tokens = tokens + vit.posemb_sincos_2d(*grid, self.width).astype(tokens.dtype)
    x = jnp.concatenate([prefix, tokens], axis=1)
    x = vit.Encoder(depth=self.depth, mlp_dim=self.mlp_dim, num_heads=self.num_heads,
                    dtype=self.dtype, name='blocks')(x, True)
    pixels = self.patch_size * self.patch_size * self.channels
    out = nn.Dense(pixels, dtype=self.dtype, name='pred')(x[:, -n:])
    return out.astype(jnp.float32)
