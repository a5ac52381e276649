"""Resizing a learned position embedding to another patch grid, as each model family does it.

A ViT pretrained at one resolution runs at another by interpolating its patch position
embedding [1, gh*gw, D] on the 2-D grid. The families differ in the kernel and the sampling
grid, and the differences are larger than float32 noise, so each is reproduced exactly:

  'bicubic'            PyTorch `F.interpolate(mode='bicubic', size=...)`, align_corners=False:
                       Keys' cubic with a = -0.75, source index clamped at the border. Used by
                       Hugging Face `Dinov2Model` and `CLIPVisionModel` (interpolate_pos_encoding).
  'bicubic_antialias'  the same with `antialias=True`: PIL's cubic (a = -0.5), its support
                       widened by the scale when shrinking, weights renormalised. timm's
                       `resample_abs_pos_embed` (timm ViTs with dynamic_img_size, and timm's
                       checkpoint filter) and open_clip's `resize_pos_embed`.
  'dinov2'             facebookresearch/dinov2 `interpolate_pos_encoding`: bicubic (a = -0.75,
                       no antialias) with `scale_factor=(g + 0.1) / M` instead of a size, so the
                       sampling positions are those of a grid 0.1 cells larger (the "historical
                       kludge" offset the DINOv2 code keeps for its checkpoints).
  'bilinear'           `jax.image.resize(method='bilinear')` (half-pixel centres, antialiased
                       when shrinking), what fm_adapt's checkpoint importer has always used.

Every method except 'bilinear' is a separable linear map, built here as two small [out, in]
matrices in float64 from static shapes and applied with one einsum, so the resize is exact,
differentiable in the embedding, and costs nothing at trace time.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ('bicubic', 'bicubic_antialias', 'dinov2', 'bilinear')
DINOV2_OFFSET = 0.1


def _cubic(x: np.ndarray, a: float) -> np.ndarray:
  """Keys' cubic convolution kernel with parameter a, at distances x."""
  x = np.abs(x)
  near = ((a + 2) * x - (a + 3)) * x * x + 1
  far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
  return np.where(x < 1, near, np.where(x < 2, far, 0.))


def _bicubic_matrix(in_size: int, out_size: int, scale: float) -> np.ndarray:
  """PyTorch's upsample_bicubic2d (align_corners=False) along one axis; scale = in / out."""
  m = np.zeros((out_size, in_size))
  for i in range(out_size):
    real = scale * (i + 0.5) - 0.5
    base = math.floor(real)
    t = real - base
    for tap, w in zip(range(-1, 3), _cubic(np.array([t + 1, t, 1 - t, 2 - t]), -0.75)):
      m[i, min(max(base + tap, 0), in_size - 1)] += w
  return m


def _antialias_matrix(in_size: int, out_size: int) -> np.ndarray:
  """PyTorch's _upsample_bicubic2d_aa (align_corners=False) along one axis."""
  scale = in_size / out_size
  support = 2. * scale if scale >= 1. else 2.
  invscale = 1. / scale if scale >= 1. else 1.
  m = np.zeros((out_size, in_size))
  for i in range(out_size):
    center = scale * (i + 0.5)
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), in_size)
    w = _cubic((np.arange(lo, hi) - center + 0.5) * invscale, -0.5)
    m[i, lo:hi] = w / w.sum() if w.sum() != 0 else w
  return m


def resize_matrix(in_size: int, out_size: int, method: str) -> np.ndarray:
  """The [out_size, in_size] float64 matrix of a separable resize along one axis.

  Args:
    in_size: cells of the stored grid along the axis.
    out_size: cells wanted.
    method: 'bicubic', 'bicubic_antialias' or 'dinov2' (see the module docstring).
  """
  if method == 'bicubic':
    return _bicubic_matrix(in_size, out_size, in_size / out_size)
  if method == 'bicubic_antialias':
    return _antialias_matrix(in_size, out_size)
  if method == 'dinov2':
    return _bicubic_matrix(in_size, out_size, in_size / (out_size + DINOV2_OFFSET))
  raise ValueError(f'Unknown position-embedding resize method {method!r}; valid: '
                   f'{[m for m in METHODS if m != "bilinear"]}.')


def resize(posemb: jax.Array, old_grid: tuple[int, int], new_grid: tuple[int, int],
           method: str) -> jax.Array:
  """Resizes a patch position embedding [1, gh*gw, D] (no prefix rows) to another grid.

  Args:
    posemb: [1, old_grid[0] * old_grid[1], D].
    old_grid: (gh, gw) of `posemb`.
    new_grid: (gh', gw') wanted.
    method: one of METHODS.

  Returns:
    [1, gh' * gw', D] in posemb's dtype (computed in float32); `posemb` itself when the grids
    are equal (as every family skips the resize then).
  """
  if method not in METHODS:
    raise ValueError(f'Unknown position-embedding resize method {method!r}; valid: '
                     f'{list(METHODS)}.')
  old_grid, new_grid = tuple(old_grid), tuple(new_grid)
  _, n, d = posemb.shape
  if n != old_grid[0] * old_grid[1]:
    raise ValueError(f'Grid {old_grid} does not hold the {n} position embeddings.')
  if old_grid == new_grid:
    return posemb
  grid = posemb.reshape(*old_grid, d).astype(jnp.float32)
  if method == 'bilinear':
    out = jax.image.resize(grid, (*new_grid, d), method='bilinear')
  else:
    rows = jnp.asarray(resize_matrix(old_grid[0], new_grid[0], method), jnp.float32)
    cols = jnp.asarray(resize_matrix(old_grid[1], new_grid[1], method), jnp.float32)
    out = jnp.einsum('ih,hwd,jw->ijd', rows, grid, cols, precision='highest')
  return out.reshape(1, -1, d).astype(posemb.dtype)
