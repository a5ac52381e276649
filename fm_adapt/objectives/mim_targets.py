"""Inputs and targets of masked image modelling: patches, frequency bands, blur.

  patchify / unpatchify   images [B, H, W, C] <-> patches [B, N, p*p*C] (raster order of the
                          grid; each patch's pixels in (row, column, channel) order, as the
                          decoders of `fm_adapt.models.mim_decoders` predict them).
  normalize_patches       MAE's per-patch normalised pixel target.
  remove_frequency_band   USFM-style frequency masking: the 2-D Fourier coefficients whose radial
                          frequency lies in [r0, r1) are set to zero (per image and channel).
  gaussian_blur           the input of the deblurring objective (its target is the sharp image).

Radial frequency: for coefficient (u, v) of an H x W image, r = sqrt(fy^2 + fx^2) / 0.5 with
fy, fx = `numpy.fft.fftfreq` (cycles per pixel), so r = 1 is the Nyquist frequency along an
axis and the corners reach sqrt(2).
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def patchify(images: Array, patch_size: int) -> Array:
  """images [B, H, W, C] -> patches [B, (H/p)*(W/p), p*p*C]."""
  b, h, w, c = images.shape
  p = patch_size
  if h % p or w % p:
    raise ValueError(f'Images {h}x{w} do not divide into patches of {p}.')
  x = images.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: Array, patch_size: int, grid: tuple[int, int], channels: int) -> Array:
  """patches [B, N, p*p*C] -> images [B, rows*p, cols*p, C] (inverse of `patchify`)."""
  b = patches.shape[0]
  rows, cols = grid
  p = patch_size
  x = patches.reshape(b, rows, cols, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, rows * p, cols * p, channels)


def normalize_patches(patches: Array, eps: float = 1e-6) -> Array:
  """Each patch minus its mean over its pixels, over sqrt(variance + eps) (MAE's norm_pix)."""
  mean = patches.mean(-1, keepdims=True)
  var = patches.var(-1, keepdims=True)
  return (patches - mean) / jnp.sqrt(var + eps)


def radial_frequency(height: int, width: int) -> np.ndarray:
  """r [H, W] of every coefficient of `fft2` (unshifted layout), 1 = Nyquist along an axis."""
  fy = np.fft.fftfreq(height)[:, None]
  fx = np.fft.fftfreq(width)[None, :]
  return np.sqrt(fy ** 2 + fx ** 2) / 0.5


def check_band(band: tuple[float, float]) -> tuple[float, float]:
  """(r0, r1) as floats.

  Raises:
    ValueError: anything but two numbers with 0 <= r0 < r1.
  """
  values = tuple(float(v) for v in band)
  if len(values) != 2 or not 0.0 <= values[0] < values[1]:
    raise ValueError(f'A frequency band is (r0, r1) with 0 <= r0 < r1 (1 = Nyquist), got {band}.')
  return values


def band_mask(height: int, width: int, band: tuple[float, float]) -> np.ndarray:
  """bool [H, W], True on the `fft2` coefficients with r0 <= r < r1 (the removed band).

  Raises:
    ValueError: a band that is not 0 <= r0 < r1, or one holding no coefficient of the image.
  """
  r0, r1 = check_band(band)
  r = radial_frequency(height, width)
  inside = (r >= r0) & (r < r1)
  if not inside.any():
    raise ValueError(f'The frequency band {band} holds no coefficient of a {height}x{width} '
                     f'image (radial frequencies up to {r.max():.3f}); widen it.')
  return inside


def remove_frequency_band(images: Array, band: tuple[float, float]) -> Array:
  """images [B, H, W, C] with the Fourier coefficients of radius in [r0, r1) set to zero.

  The band is symmetric under (u, v) -> (-u, -v), so the result is real (its imaginary part,
  rounding only, is dropped).
  """
  _, h, w, _ = images.shape
  keep = jnp.asarray(~band_mask(h, w, band))[None, :, :, None]
  spectrum = jnp.fft.fft2(images.astype(jnp.float32), axes=(1, 2))
  return jnp.fft.ifft2(spectrum * keep, axes=(1, 2)).real.astype(images.dtype)


def gaussian_kernels(sigmas: Array, radius: int) -> Array:
  """Normalised 1-D Gaussian weights [B, 2 * radius + 1], one row per sigma."""
  offsets = jnp.arange(-radius, radius + 1, dtype=jnp.float32)
  weights = jnp.exp(-0.5 * (offsets[None] / sigmas[:, None]) ** 2)
  return weights / weights.sum(-1, keepdims=True)


def gaussian_blur(images: Array, sigmas: Array, max_sigma: float) -> Array:
  """Blurs each image [B, H, W, C] with its own Gaussian (sigma [B] in pixels), separably.

  The kernel radius is ceil(3 * max_sigma) for all images (a static shape); the borders are
  reflected.
  """
  radius = max(int(math.ceil(3 * max_sigma)), 1)
  _, h, w, _ = images.shape
  if radius >= min(h, w):
    raise ValueError(f'Blur sigma {max_sigma} needs a kernel radius {radius} < the image side '
                     f'{min(h, w)}; use a smaller sigma.')
  weights = gaussian_kernels(sigmas.astype(jnp.float32), radius)  # [B, K]
  x = images.astype(jnp.float32)
  pad = ((0, 0), (radius, radius), (radius, radius), (0, 0))
  x = jnp.pad(x, pad, mode='reflect')
  k = 2 * radius + 1
  x = sum(weights[:, i, None, None, None] * x[:, i:i + h] for i in range(k))
  x = sum(weights[:, i, None, None, None] * x[:, :, i:i + w] for i in range(k))
  return x.astype(images.dtype)
