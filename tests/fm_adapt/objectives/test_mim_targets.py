"""Tests of the MIM inputs and targets: patches, the frequency band (numpy FFT oracle), blur."""
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from fm_adapt.objectives import mim_targets


def _images(shape=(2, 28, 28, 3), seed=0):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def test_patchify_layout_and_inverse():
  images = _images((2, 8, 12, 3))
  patches = np.asarray(mim_targets.patchify(jnp.asarray(images), 4))
  assert patches.shape == (2, 6, 48)
  # Patch 4 is grid row 1, column 1: pixels [4:8, 4:8], in (row, column, channel) order.
  np.testing.assert_array_equal(patches[1, 4], images[1, 4:8, 4:8].reshape(-1))
  np.testing.assert_array_equal(mim_targets.unpatchify(jnp.asarray(patches), 4, (2, 3), 3),
                                images)
  with pytest.raises(ValueError, match='do not divide'):
    mim_targets.patchify(jnp.asarray(images), 5)


def test_normalize_patches():
  patches = jnp.asarray(_images((2, 5, 48)) * 3 + 2)
  out = np.asarray(mim_targets.normalize_patches(patches))
  np.testing.assert_allclose(out.mean(-1), 0, atol=1e-5)
  np.testing.assert_allclose(out.std(-1), 1, atol=1e-4)


@pytest.mark.parametrize('size, band', [((28, 28), (0.2, 0.6)), ((28, 28), (0.0, 0.3)),
                                        ((16, 24), (0.5, 1.5)), ((28, 28), (0.9, 2.0))])
def test_frequency_band_removal_against_numpy_fft(size, band):
  """Exactly the band's coefficients vanish; every other coefficient is the input's."""
  images = _images((2, *size, 3))
  out = np.asarray(mim_targets.remove_frequency_band(jnp.asarray(images), band))
  assert out.dtype == np.float32 and out.shape == images.shape
  spectrum_in = np.fft.fft2(images.astype(np.float64), axes=(1, 2))
  spectrum_out = np.fft.fft2(out.astype(np.float64), axes=(1, 2))
  fy = np.fft.fftfreq(size[0])[:, None]
  fx = np.fft.fftfreq(size[1])[None, :]
  radius = np.hypot(fy, fx) * 2  # 1 = Nyquist.
  band_ = (radius >= band[0]) & (radius < band[1])
  assert band_.any() and (~band_).any()
  scale = np.abs(spectrum_in).max()
  np.testing.assert_allclose(np.abs(spectrum_out[:, band_]), 0, atol=1e-5 * scale)
  np.testing.assert_allclose(spectrum_out[:, ~band_], spectrum_in[:, ~band_], atol=1e-5 * scale)
  np.testing.assert_array_equal(mim_targets.band_mask(*size, band), band_)


def test_frequency_band_errors():
  with pytest.raises(ValueError, match='0 <= r0 < r1'):
    mim_targets.check_band((0.5, 0.2))
  with pytest.raises(ValueError, match='holds no coefficient'):
    mim_targets.band_mask(28, 28, (1.42, 2.0))  # Beyond the corners (sqrt 2).


def test_gaussian_blur_matches_scipy_per_image():
  images = _images((2, 20, 16, 2))
  sigmas = np.array([0.8, 1.7], np.float32)
  out = np.asarray(mim_targets.gaussian_blur(jnp.asarray(images), jnp.asarray(sigmas), 2.0))
  for i, sigma in enumerate(sigmas):
    # scipy's 'mirror' is numpy's 'reflect'; truncate so both use radius ceil(3 * 2.0) = 6.
    expected = ndimage.gaussian_filter(images[i].astype(np.float64), (sigma, sigma, 0),
                                       mode='mirror', truncate=6 / sigma)
    np.testing.assert_allclose(out[i], expected, atol=1e-5)
  with pytest.raises(ValueError, match='smaller sigma'):
    mim_targets.gaussian_blur(jnp.asarray(images), jnp.asarray(sigmas), 6.0)
