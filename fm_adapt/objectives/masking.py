"""Masking strategies of masked image modelling, pure functions of (rng, grid[, prior]).

Each strategy returns a bool mask [rows * cols] over the patch grid in raster order (True =
masked) with exactly `num_masked(rows * cols, ratio)` patches masked, whatever the draw:

  random   a uniformly random subset (SimMIM, MAE).
  block    BEiT / SimMIM-style blocks: random rectangles (area and aspect ratio drawn as in
           BEiT) are masked one after another until the count is reached; the last one is cut
           in raster order, and if the rectangles cover too little, random patches fill up.
  prior    each patch drawn with probability from a per-patch prior map (MedIM-style
           knowledge-guided masking), without replacement: the Gumbel-top-k trick on
           log(prior) / temperature. Patches of zero prior are masked only when the others do
           not reach the count. Priors (`PRIORS`): 'edge' (mean Sobel gradient magnitude of the
           patch, so masking favours anatomy over flat background) and 'intensity' (mean
           intensity above the image's minimum).

`mask_fn(spec)` turns a config entry dict(name=..., ratio=..., **options) into
`fn(rng, images [B, H, W, C], patch_size) -> [B, N] bool`, one independent draw per image.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

Array = jax.Array
Grid = tuple[int, int]


def num_masked(num_patches: int, ratio: float) -> int:
  """round(ratio * N), halves rounded up; must leave at least one patch masked and one visible.

  Raises:
    ValueError: a ratio outside (0, 1), or one that masks no patch or every patch of the grid.
  """
  if not 0.0 < ratio < 1.0:
    raise ValueError(f'The mask ratio must be in (0, 1), got {ratio}.')
  count = math.floor(ratio * num_patches + 0.5)
  if not 0 < count < num_patches:
    raise ValueError(f'Mask ratio {ratio} of {num_patches} patches masks {count}: choose a ratio '
                     'that masks at least one patch and leaves at least one visible.')
  return count


def _top_k_mask(scores: Array, count: int) -> Array:
  """True at the `count` largest scores (ties: lower index first)."""
  _, chosen = jax.lax.top_k(scores, count)
  return jnp.zeros(scores.shape, bool).at[chosen].set(True)


def random_mask(rng: Array, grid: Grid, ratio: float) -> Array:
  """A uniformly random set of exactly `num_masked(N, ratio)` of the N patches."""
  n = grid[0] * grid[1]
  return _top_k_mask(jax.random.uniform(rng, (n,)), num_masked(n, ratio))


def block_mask(rng: Array, grid: Grid, ratio: float, *, min_patches: int = 4,
               max_aspect: float = 1 / 0.3, num_blocks: int | None = None) -> Array:
  """BEiT-style block-wise mask of exactly `num_masked(N, ratio)` patches.

  Rectangles are drawn as in BEiT (area uniform in [min_patches, count], log aspect ratio
  uniform in [-log max_aspect, log max_aspect], position uniform on the grid) and masked in
  order: a patch's priority is the first rectangle covering it, then raster order; the `count`
  patches of highest priority are masked (the last rectangle may be cut), and patches no
  rectangle covers come last, in random order.

  Args:
    rng: key.
    grid: (rows, cols).
    ratio: fraction of patches to mask.
    min_patches: smallest rectangle area in patches.
    max_aspect: largest height / width ratio (and its inverse).
    num_blocks: rectangles drawn (default: count, plenty to reach it).
  """
  rows, cols = grid
  n = rows * cols
  count = num_masked(n, ratio)
  nb = num_blocks or count
  k_area, k_aspect, k_top, k_left, k_fill = jax.random.split(rng, 5)
  area = jax.random.uniform(k_area, (nb,), minval=min_patches, maxval=max(min_patches, count))
  log_aspect = jax.random.uniform(k_aspect, (nb,), minval=-math.log(max_aspect),
                                  maxval=math.log(max_aspect))
  aspect = jnp.exp(log_aspect)
  h = jnp.clip(jnp.round(jnp.sqrt(area * aspect)), 1, rows).astype(jnp.int32)
  w = jnp.clip(jnp.round(jnp.sqrt(area / aspect)), 1, cols).astype(jnp.int32)
  top = jnp.floor(jax.random.uniform(k_top, (nb,)) * (rows - h + 1)).astype(jnp.int32)
  left = jnp.floor(jax.random.uniform(k_left, (nb,)) * (cols - w + 1)).astype(jnp.int32)
  r = jnp.arange(rows)[None, :, None]
  c = jnp.arange(cols)[None, None, :]
  inside = ((r >= top[:, None, None]) & (r < (top + h)[:, None, None])
            & (c >= left[:, None, None]) & (c < (left + w)[:, None, None])).reshape(nb, n)
  first = jnp.where(inside.any(0), jnp.argmax(inside, axis=0), nb)
  order = jnp.where(first < nb, jnp.arange(n), jax.random.permutation(k_fill, n))
  priority = first * n + order  # Smaller is masked first.
  return _top_k_mask(-priority, count)


def prior_mask(rng: Array, grid: Grid, ratio: float, prior: Array, *,
               temperature: float = 1.0) -> Array:
  """Exactly `num_masked(N, ratio)` patches drawn without replacement with weights
  prior ** (1 / temperature) (Gumbel-top-k; temperature -> inf is uniform).

  Args:
    rng: key.
    grid: (rows, cols).
    ratio: fraction of patches to mask.
    prior: non-negative weights [rows, cols] (or [N]); zeros are masked only when needed.
    temperature: > 0; below 1 sharpens the preference, above 1 flattens it.
  """
  n = grid[0] * grid[1]
  if prior.size != n:
    raise ValueError(f'The prior has {prior.size} values for a grid of {grid}.')
  if temperature <= 0:
    raise ValueError(f'temperature must be > 0, got {temperature}.')
  prior = prior.reshape(n).astype(jnp.float32)
  positive = prior > 0
  gumbel = jax.random.gumbel(rng, (n,))
  perturbed = jnp.log(jnp.where(positive, prior, 1.0)) / temperature + gumbel
  # Sort key 1: positive priors first; key 2: the perturbed log prior, descending (zero-prior
  # patches, which come last, in random order).
  _, _, order = jax.lax.sort((jnp.where(positive, 0, 1), -jnp.where(positive, perturbed, gumbel),
                              jnp.arange(n)), num_keys=2)
  return jnp.zeros((n,), bool).at[order[:num_masked(n, ratio)]].set(True)


def patch_means(values: Array, patch_size: int) -> Array:
  """Mean of values [H, W] over each p x p patch -> [H/p, W/p]."""
  h, w = values.shape
  p = patch_size
  return values.reshape(h // p, p, w // p, p).mean(axis=(1, 3))


def sobel_magnitude(image: Array) -> Array:
  """Gradient magnitude [H, W] of the channel mean of image [H, W, C] (Sobel, edge-padded)."""
  gray = image.astype(jnp.float32).mean(-1)
  padded = jnp.pad(gray, 1, mode='edge')
  shift = lambda dy, dx: padded[1 + dy:1 + dy + gray.shape[0], 1 + dx:1 + dx + gray.shape[1]]
  gx = (shift(-1, 1) + 2 * shift(0, 1) + shift(1, 1)
        - shift(-1, -1) - 2 * shift(0, -1) - shift(1, -1))
  gy = (shift(1, -1) + 2 * shift(1, 0) + shift(1, 1)
        - shift(-1, -1) - 2 * shift(-1, 0) - shift(-1, 1))
  return jnp.sqrt(gx * gx + gy * gy)


def edge_prior(image: Array, patch_size: int) -> Array:
  """Edge energy per patch: the mean Sobel gradient magnitude of each patch, [rows, cols]."""
  return patch_means(sobel_magnitude(image), patch_size)


def intensity_prior(image: Array, patch_size: int) -> Array:
  """Mean intensity per patch above the image's minimum (channel mean), [rows, cols]."""
  gray = image.astype(jnp.float32).mean(-1)
  return patch_means(gray - gray.min(), patch_size)


PRIORS: dict[str, Callable[[Array, int], Array]] = {
    'edge': edge_prior,
    'intensity': intensity_prior,
}
STRATEGIES = ('random', 'block', 'prior')
_OPTIONS = {
    'random': ('name', 'ratio'),
    'block': ('name', 'ratio', 'min_patches', 'max_aspect', 'num_blocks'),
    'prior': ('name', 'ratio', 'prior', 'temperature'),
}
MaskFn = Callable[[Array, Array, int], Array]


def _grid(images: Array, patch_size: int) -> Grid:
  _, h, w, _ = images.shape
  if h % patch_size or w % patch_size:
    raise ValueError(f'Images {h}x{w} do not divide into patches of {patch_size}.')
  return h // patch_size, w // patch_size


def mask_fn(spec: Mapping[str, Any]) -> MaskFn:
  """`fn(rng, images [B, H, W, C], patch_size) -> [B, N] bool` for a mask config entry.

  Args:
    spec: dict(name='random' | 'block' | 'prior', ratio=..., **options): 'block' takes
      min_patches, max_aspect, num_blocks; 'prior' takes prior (a key of PRIORS, default
      'edge') and temperature.

  Raises:
    ValueError: an unknown strategy, option or prior (listing the valid ones), or a bad ratio.
  """
  spec = dict(spec.to_dict() if hasattr(spec, 'to_dict') else spec)
  name = spec.get('name')
  if name not in STRATEGIES:
    raise ValueError(f'Unknown mask strategy {name!r}; valid: {list(STRATEGIES)}.')
  unknown = sorted(set(spec) - set(_OPTIONS[name]))
  if unknown:
    raise ValueError(f'Unknown option(s) {unknown} of the {name!r} mask; valid: '
                     f'{list(_OPTIONS[name])}.')
  if 'ratio' not in spec:
    raise ValueError(f'The {name!r} mask needs a ratio, e.g. dict(name={name!r}, ratio=0.6).')
  ratio = float(spec['ratio'])
  if not 0.0 < ratio < 1.0:
    raise ValueError(f'The mask ratio must be in (0, 1), got {ratio}.')
  options = {k: v for k, v in spec.items() if k not in ('name', 'ratio')}
  if name == 'prior':
    prior_name = options.pop('prior', 'edge')
    if prior_name not in PRIORS:
      raise ValueError(f'Unknown mask prior {prior_name!r}; valid: {sorted(PRIORS)}.')

    def draw(rng, images, patch_size):
      grid = _grid(images, patch_size)
      priors = jax.vmap(lambda im: PRIORS[prior_name](im, patch_size))(images)
      keys = jax.random.split(rng, images.shape[0])
      return jax.vmap(lambda k, p: prior_mask(k, grid, ratio, p, **options))(keys, priors)
    return draw

  strategy = random_mask if name == 'random' else block_mask

  def draw(rng, images, patch_size):
    grid = _grid(images, patch_size)
    keys = jax.random.split(rng, images.shape[0])
    return jax.vmap(lambda k: strategy(k, grid, ratio, **options))(keys)
  return draw
