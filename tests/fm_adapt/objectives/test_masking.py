"""Tests of the MIM masking strategies: exact counts, where they mask, the prior's preference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fm_adapt.objectives import masking

GRID = (7, 7)  # 28 px, patch 4.
DRAWS = 400


def _draws(fn, n=DRAWS):
  """n masks [n, N] of fn(key), one jitted vmap."""
  keys = jax.random.split(jax.random.key(0), n)
  return np.asarray(jax.jit(jax.vmap(fn))(keys))


@pytest.mark.parametrize('n, ratio, count', [(49, 0.75, 37), (49, 0.6, 29), (49, 0.5, 25),
                                             (16, 0.5, 8), (4, 0.125, 1)])
def test_num_masked_rounds_half_up(n, ratio, count):
  assert masking.num_masked(n, ratio) == count


@pytest.mark.parametrize('ratio', [0.0, 1.0, -0.1, 0.01, 0.999])
def test_num_masked_refuses_empty_or_full_masks(ratio):
  with pytest.raises(ValueError, match='ratio'):
    masking.num_masked(49, ratio)


@pytest.mark.parametrize('ratio', [0.3, 0.6, 0.75])
def test_random_mask_is_exact_and_uniform(ratio):
  masks = _draws(lambda k: masking.random_mask(k, GRID, ratio))
  count = masking.num_masked(49, ratio)
  assert masks.dtype == bool and masks.shape == (DRAWS, 49)
  assert (masks.sum(1) == count).all()
  freq = masks.mean(0)  # Each patch masked with probability count / N.
  assert np.abs(freq - count / 49).max() < 0.1
  assert len({m.tobytes() for m in masks}) > DRAWS * 0.99  # Different draws differ.
  again = masking.random_mask(jax.random.key(3), GRID, ratio)
  np.testing.assert_array_equal(again, masking.random_mask(jax.random.key(3), GRID, ratio))


def _neighbours_masked(masks, grid):
  """Mean number of masked 4-neighbours of a masked patch."""
  m = masks.reshape(-1, *grid)
  pad = np.pad(m, ((0, 0), (1, 1), (1, 1)))
  around = pad[:, :-2, 1:-1].astype(int) + pad[:, 2:, 1:-1] + pad[:, 1:-1, :-2] + pad[:, 1:-1, 2:]
  return (around * m).sum() / m.sum()


@pytest.mark.parametrize('grid, ratio', [((7, 7), 0.6), ((7, 7), 0.3), ((14, 14), 0.4),
                                         ((4, 6), 0.5)])
def test_block_mask_is_exact_and_blocky(grid, ratio):
  n = grid[0] * grid[1]
  blocks = _draws(lambda k: masking.block_mask(k, grid, ratio), 200)
  assert (blocks.sum(1) == masking.num_masked(n, ratio)).all()
  randoms = _draws(lambda k: masking.random_mask(k, grid, ratio), 200)
  # Blocks: masked patches have far more masked neighbours than under a random mask.
  assert _neighbours_masked(blocks, grid) > _neighbours_masked(randoms, grid) + 0.5
  assert blocks.mean(0).min() > 0  # Every patch is reachable.


def test_block_mask_is_one_rectangle_when_the_first_block_covers_the_count():
  """A single block of exactly the count: min_patches = count forces area = count."""
  mask = np.asarray(masking.block_mask(jax.random.key(1), (8, 8), 0.25, min_patches=16,
                                       max_aspect=1.0)).reshape(8, 8)
  rows, cols = np.nonzero(mask)
  assert mask.sum() == 16
  assert (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1) == 16  # A 4x4 square.


def test_prior_mask_is_exact_and_never_masks_zero_prior_when_it_need_not():
  prior = np.zeros(GRID, np.float32)
  prior[1:6, 1:6] = np.random.default_rng(0).uniform(0.1, 1.0, (5, 5))  # 25 positive patches
  masks = _draws(lambda k: masking.prior_mask(k, GRID, 0.4, jnp.asarray(prior)))  # 20 masked
  assert (masks.sum(1) == 20).all()
  assert not masks[:, prior.reshape(-1) == 0].any()
  # 0.75 masks 37 > 25: every positive patch, and 12 zero-prior ones at random.
  masks = _draws(lambda k: masking.prior_mask(k, GRID, 0.75, jnp.asarray(prior)))
  assert (masks.sum(1) == 37).all() and masks[:, prior.reshape(-1) > 0].all()
  zero_freq = masks[:, prior.reshape(-1) == 0].mean(0)
  assert zero_freq.min() > 0.2 and zero_freq.max() < 0.8  # 12 / 24 each, not the first ones.


def test_prior_mask_prefers_high_prior_patches():
  """Over many draws, the masking frequency rises with the prior; temperature flattens it."""
  prior = np.tile(np.linspace(0.05, 1.0, 7), (7, 1)).astype(np.float32)  # Rises to the right.
  freq = _draws(lambda k: masking.prior_mask(k, GRID, 0.3, jnp.asarray(prior))).mean(0)
  by_column = freq.reshape(GRID).mean(0)
  assert np.all(np.diff(by_column) > 0), by_column
  assert by_column[-1] > 2 * by_column[0]
  flat = _draws(lambda k: masking.prior_mask(k, GRID, 0.3, jnp.asarray(prior),
                                             temperature=100.0)).mean(0)
  assert np.ptp(flat.reshape(GRID).mean(0)) < 0.5 * np.ptp(by_column)


def _disc_image(size=28, radius=8):
  """A bright textured disc in the centre of a flat background, [size, size, 3]."""
  yy, xx = np.mgrid[:size, :size]
  inside = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < radius ** 2
  texture = np.sin(yy * 1.3) * np.cos(xx * 0.9)
  gray = np.where(inside, 0.6 + 0.3 * texture, 0.0).astype(np.float32)
  return jnp.asarray(np.repeat(gray[..., None], 3, -1))


def test_edge_prior_favours_anatomy_over_background():
  image = _disc_image()
  prior = np.asarray(masking.edge_prior(image, 4))
  assert prior.shape == GRID
  assert prior[0, 0] == 0 and prior[-1, -1] == 0  # Flat background: no edge energy.
  assert prior[3, 3] > 0  # Textured centre.
  intensity = np.asarray(masking.intensity_prior(image, 4))
  assert intensity[0, 0] == 0 and intensity[3, 3] > 0.3


def test_sobel_matches_a_numpy_oracle():
  image = np.random.default_rng(1).normal(size=(12, 10, 2)).astype(np.float32)
  gray = np.pad(image.mean(-1), 1, mode='edge')
  kx = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], np.float32)
  gx = np.zeros((12, 10), np.float32)
  gy = np.zeros((12, 10), np.float32)
  for i in range(3):
    for j in range(3):
      window = gray[i:i + 12, j:j + 10]
      gx += kx[i, j] * window
      gy += kx.T[i, j] * window
  np.testing.assert_allclose(masking.sobel_magnitude(jnp.asarray(image)),
                             np.sqrt(gx ** 2 + gy ** 2), rtol=1e-5, atol=1e-5)


def test_mask_fn_prior_masks_the_disc_in_a_batch():
  images = jnp.stack([_disc_image(), _disc_image()[::-1]])
  draw = masking.mask_fn(dict(name='prior', ratio=0.2, prior='edge'))
  masks = np.asarray(jax.jit(draw, static_argnums=2)(jax.random.key(0), images, 4))
  prior = np.asarray(jax.vmap(lambda im: masking.edge_prior(im, 4))(images)).reshape(2, -1)
  assert masks.shape == (2, 49) and (masks.sum(1) == 10).all()
  assert not masks[prior == 0].any()
  assert not np.array_equal(masks[0], masks[1])  # One draw per image.


@pytest.mark.parametrize('spec, match', [
    (dict(name='grid', ratio=0.5), r"Unknown mask strategy 'grid'; valid: \['random', 'block', "
                                   r"'prior'\]"),
    (dict(name='random'), 'needs a ratio'),
    (dict(name='random', ratio=1.5), r'in \(0, 1\)'),
    (dict(name='random', ratio=0.5, min_patches=4),
     r"Unknown option\(s\) \['min_patches'\] of the 'random' mask; valid: \['name', 'ratio'\]"),
    (dict(name='prior', ratio=0.5, prior='atlas'), r"Unknown mask prior 'atlas'; valid: "
                                                   r"\['edge', 'intensity'\]"),
])
def test_mask_fn_errors(spec, match):
  with pytest.raises(ValueError, match=match):
    masking.mask_fn(spec)


def test_prior_mask_errors():
  with pytest.raises(ValueError, match='12 values for a grid'):
    masking.prior_mask(jax.random.key(0), GRID, 0.5, jnp.ones((3, 4)))
  with pytest.raises(ValueError, match='temperature'):
    masking.prior_mask(jax.random.key(0), GRID, 0.5, jnp.ones(GRID), temperature=0.0)
