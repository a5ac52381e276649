"""MedMNIST-C image corruptions (Di Salvo et al. 2024), chosen per modality, 5 severities each.

`corrupt(image, name, severity, modality, seed)` is a pure function of its arguments: the same
image and seed always give the same output, so it can sit in an evaluation pp (the `corrupt` op
of `data_pipelines.pp`). The randomness of the noise corruptions (and the angle of motion blur)
comes from `np.random.default_rng([seed, crc32(image bytes)])`: every image gets its own noise,
and one image gets the same draws at every severity, so a stronger severity is the same noise
scaled up.

Parameters and algorithms follow the public reference, github.com/francescodisalvo05/medmnistc-api
(`medmnistc/corruptions/registry.py`, `noise.py`, `compression.py`, `filter.py`, `enhance.py`,
`dataset_manager.py`, commit b6dee0e78fc39ba5f57944f796d93b9728f7fe55). Its names map to ours:
'jpeg_compression' -> 'jpeg', 'gamma_corr_up' / 'gamma_corr_down' -> 'gamma_up' / 'gamma_down';
its datasets to our modalities by `MODALITY_OF_FLAG`. The implementation here is our own (numpy,
PIL, scipy.ndimage); where the reference calls another library, the same operation is written out:

  pixelate        PIL BOX resize to int(size * factor), then BOX back (as the reference).
  jpeg            PIL JPEG at the given quality, decoded again (as the reference).
  gaussian_noise  x + N(0, sigma), x in [0, 1], clipped.
  speckle_noise   x + x * N(0, sigma), clipped.
  impulse_noise   skimage `random_noise(mode='s&p', amount)`: each sample (pixel and channel)
                  is hit with probability `amount`, then set to 1 or 0 with probability 1/2.
  shot_noise      Poisson(x * rate) / rate, clipped.
  gaussian_blur   torchvision `gaussian_blur(kernel_size=k)`: sigma = 0.15 k + 0.35, reflect
                  padding (scipy 'mirror'), rounded.
  motion_blur     ImageMagick `MotionBlurImage(radius, sigma, angle)`, angle uniform in
                  [-45, 45] degrees: a one-sided line kernel of width 2 ceil(radius) + 1 with
                  weights exp(-i^2 / 2 sigma^2), i = 0..width-1, at the rounded offsets along the
                  angle; edge pixels repeat beyond the border; rounded.
  defocus_blur    The reference's `disk(radius, alias_blur)` (a disk on a 17 x 17 grid for
                  radius <= 8, blurred by OpenCV's 3 x 3 Gaussian of sigma alias_blur with
                  reflect-101 borders) correlated with the image (OpenCV `filter2D`, reflect-101
                  borders = scipy 'mirror').
  brightness_*    PIL `ImageEnhance.Brightness(factor)`.
  contrast_*      PIL `ImageEnhance.Contrast(factor)`.
  gamma_*         torchvision `adjust_gamma(gamma)` on a PIL image: the table
                  int(255.999 * (v / 255) ** gamma).

The float corruptions end like the reference: `(x * 255).astype(uint8)` (truncation), except the
blurs, which round as torchvision and ImageMagick do. Grey images are corrupted the way
MedMNIST-C builds its grey test sets (`dataset_manager.py`): repeated to RGB, corrupted, and
converted back with PIL's `convert('L')` (luma 0.299 R + 0.587 G + 0.114 B). So the noise of a
grey image is the luma mean of three independent channel noises (Gaussian noise: sigma x 0.67),
as in the published grey sets.

Size. The spatial parameters (blur kernels, radii, sigmas) are in pixels, and MedMNIST-C applies
them to 224 x 224 images. They are applied here as they are, in pixels of whatever image comes in:
to reproduce MedMNIST-C, corrupt 224-px images (the `_224` archives, or `resize(224)` before
`corrupt` in the pp). On 28-px images the blurs are 8 times stronger relative to the anatomy (a
severity-5 motion blur of the ultrasound set smears along 35 px, more than the image); pixelate
(a fraction of the size), JPEG, the noises and the intensity changes do not depend on size.
"""
from __future__ import annotations

import io
import math
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageEnhance
from scipy import ndimage

SEVERITIES = (1, 2, 3, 4, 5)

# Five parameters per (modality, corruption), severities 1..5, from medmnistc-api registry.py
# (`CORRUPTIONS_DS['pneumoniamnist' | 'breastmnist' | 'retinamnist']`). Where the reference lists
# a sixth value (gaussian_blur 13, defocus (9, 0.6)) it is never used: severities are 0..4 there.
_PARAMS: dict[str, dict[str, tuple]] = {
    'chest_xray': {  # PneumoniaMNIST
        'pixelate': (0.8, 0.7, 0.6, 0.5, 0.4),
        'jpeg': (50, 30, 15, 10, 7),
        'gaussian_noise': (0.04, 0.05, 0.06, 0.07, 0.08),
        'speckle_noise': (0.05, 0.07, 0.10, 0.15, 0.20),
        'impulse_noise': (0.005, 0.01, 0.013, 0.017, 0.02),
        'shot_noise': (300, 200, 150, 100, 80),
        'gaussian_blur': (3, 5, 7, 9, 11),
        'brightness_up': (1.1, 1.2, 1.3, 1.4, 1.5),
        'brightness_down': (0.9, 0.8, 0.7, 0.6, 0.5),
        'contrast_up': (1.1, 1.2, 1.3, 1.4, 1.6),
        'contrast_down': (0.9, 0.8, 0.7, 0.6, 0.4),
        'gamma_up': (1.1, 1.2, 1.3, 1.4, 1.6),
        'gamma_down': (0.9, 0.8, 0.7, 0.6, 0.4),
    },
    'ultrasound': {  # BreastMNIST
        'pixelate': (0.30, 0.25, 0.20, 0.15, 0.10),
        'jpeg': (50, 30, 15, 10, 7),
        'speckle_noise': (0.10, 0.15, 0.20, 0.25, 0.30),
        'motion_blur': ((5, 5), (9, 7), (9, 10), (13, 10), (17, 12)),
        'brightness_up': (1.4, 1.5, 1.6, 1.8, 2.0),
        'brightness_down': (0.55, 0.5, 0.45, 0.4, 0.3),
        'contrast_down': (0.9, 0.8, 0.7, 0.6, 0.4),
    },
    'fundus': {  # RetinaMNIST
        'pixelate': (0.8, 0.60, 0.50, 0.40, 0.35),
        'jpeg': (30, 25, 20, 10, 5),
        'gaussian_noise': (0.04, 0.08, 0.12, 0.16, 0.20),
        'speckle_noise': (0.10, 0.15, 0.20, 0.25, 0.30),
        'defocus_blur': ((4, 0.1), (5, 0.2), (6, 0.3), (7, 0.4), (8, 0.5)),
        'motion_blur': ((8, 5), (15, 5), (15, 8), (15, 12), (20, 15)),
        'brightness_down': (0.9, 0.8, 0.7, 0.6, 0.5),
        'contrast_down': (0.9, 0.8, 0.7, 0.6, 0.4),
    },
}

MODALITIES: dict[str, tuple[str, ...]] = {m: tuple(table) for m, table in _PARAMS.items()}
SEVERITY_PARAMS: dict[tuple[str, str], tuple] = {
    (m, name): values for m, table in _PARAMS.items() for name, values in table.items()}
MODALITY_OF_FLAG = {'pneumoniamnist': 'chest_xray', 'breastmnist': 'ultrasound',
                    'retinamnist': 'fundus'}
# The corruptions that draw from the rng (different seeds give different outputs).
RANDOM_CORRUPTIONS = ('gaussian_noise', 'speckle_noise', 'impulse_noise', 'shot_noise',
                      'motion_blur')


# ----------------------------------------------------------------------------------------------
# The corruptions: `fn(rgb uint8 (H, W, 3), parameter, rng) -> uint8 (H, W, 3)`.


def _unit(rgb: np.ndarray) -> np.ndarray:
  return rgb / 255.0


def _from_unit(x: np.ndarray) -> np.ndarray:
  """[0, 1] floats -> uint8 by truncation, as the reference's `(x * 255).astype(np.uint8)`."""
  return (np.clip(x, 0.0, 1.0) * 255).astype(np.uint8)


def _round_uint8(x: np.ndarray) -> np.ndarray:
  return np.clip(np.round(x), 0, 255).astype(np.uint8)


def _pixelate(rgb: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
  del rng
  image = Image.fromarray(rgb)
  width, height = image.size
  small = (max(1, int(width * factor)), max(1, int(height * factor)))  # max: < 10-px images.
  small_image = image.resize(small, Image.Resampling.BOX)
  return np.asarray(small_image.resize((width, height), Image.Resampling.BOX))


def _jpeg(rgb: np.ndarray, quality: int, rng: np.random.Generator) -> np.ndarray:
  del rng
  buffer = io.BytesIO()
  Image.fromarray(rgb).save(buffer, 'JPEG', quality=quality)
  buffer.seek(0)
  with Image.open(buffer) as decoded:
    return np.asarray(decoded.convert('RGB'))


def _gaussian_noise(rgb: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
  x = _unit(rgb)
  return _from_unit(x + rng.normal(scale=sigma, size=x.shape))


def _speckle_noise(rgb: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
  x = _unit(rgb)
  return _from_unit(x + x * rng.normal(scale=sigma, size=x.shape))


def _impulse_noise(rgb: np.ndarray, amount: float, rng: np.random.Generator) -> np.ndarray:
  x = _unit(rgb)
  hit = rng.random(x.shape) <= amount
  salt = rng.random(x.shape) <= 0.5
  x = np.where(hit & salt, 1.0, np.where(hit & ~salt, 0.0, x))
  return _from_unit(x)


def _shot_noise(rgb: np.ndarray, rate: float, rng: np.random.Generator) -> np.ndarray:
  return _from_unit(rng.poisson(_unit(rgb) * rate) / rate)


def _gaussian_blur(rgb: np.ndarray, kernel_size: int, rng: np.random.Generator) -> np.ndarray:
  del rng
  sigma = 0.15 * kernel_size + 0.35
  half = (kernel_size - 1) / 2
  t = np.linspace(-half, half, kernel_size, dtype=np.float32)
  weights = np.exp(-0.5 * (t / np.float32(sigma)) ** 2)
  weights = weights / weights.sum()
  x = rgb.astype(np.float32)
  for axis in (0, 1):
    x = ndimage.correlate1d(x, weights, axis=axis, mode='mirror')
  return _round_uint8(x)


def _motion_offsets(radius: float, sigma: float, angle: float) -> list[tuple[int, int, float]]:
  """(dy, dx, weight) of ImageMagick's motion-blur kernel: out(y, x) = sum w * in(y+dy, x+dx)."""
  width = int(2 * math.ceil(radius) + 1)
  i = np.arange(width, dtype=np.float64)
  weights = np.exp(-i * i / (2.0 * sigma * sigma))
  weights = weights / weights.sum()
  sin, cos = math.sin(math.radians(angle)), math.cos(math.radians(angle))
  return [(math.ceil(k * sin - 0.5), math.ceil(k * cos - 0.5), float(weights[k]))
          for k in range(width)]


def _motion_blur(rgb: np.ndarray, radius_sigma: tuple, rng: np.random.Generator) -> np.ndarray:
  radius, sigma = radius_sigma
  angle = rng.uniform(-45, 45)
  offsets = _motion_offsets(radius, sigma, angle)
  pad = max(max(abs(dy), abs(dx)) for dy, dx, _ in offsets)
  padded = np.pad(rgb.astype(np.float64), ((pad, pad), (pad, pad), (0, 0)), mode='edge')
  h, w = rgb.shape[:2]
  out = np.zeros(rgb.shape, np.float64)
  for dy, dx, weight in offsets:
    out += weight * padded[pad + dy:pad + dy + h, pad + dx:pad + dx + w]
  return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)  # ImageMagick rounds half up.


def _opencv_gaussian(ksize: int, sigma: float) -> np.ndarray:
  """cv2.getGaussianKernel(ksize, sigma) for sigma > 0, float32."""
  t = np.arange(ksize, dtype=np.float64) - (ksize - 1) / 2
  weights = np.exp(-t * t / (2.0 * sigma * sigma))
  return (weights / weights.sum()).astype(np.float32)


def _disk(radius: float, alias_blur: float) -> np.ndarray:
  """The reference's defocus kernel: an aliased disk blurred by a small Gaussian."""
  half, ksize = (8, 3) if radius <= 8 else (radius, 5)
  grid = np.arange(-half, half + 1)
  xx, yy = np.meshgrid(grid, grid)
  disk = (xx ** 2 + yy ** 2 <= radius ** 2).astype(np.float32)
  disk /= disk.sum()
  weights = _opencv_gaussian(ksize, alias_blur)
  for axis in (0, 1):  # cv2.GaussianBlur's default border is reflect-101 = scipy 'mirror'.
    disk = ndimage.correlate1d(disk, weights, axis=axis, mode='mirror')
  return disk


def _defocus_blur(rgb: np.ndarray, radius_alias: tuple, rng: np.random.Generator) -> np.ndarray:
  del rng
  kernel = _disk(*radius_alias).astype(np.float64)
  out = ndimage.correlate(_unit(rgb), kernel[..., None], mode='mirror')
  return _from_unit(out)


def _brightness(rgb: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
  del rng
  return np.asarray(ImageEnhance.Brightness(Image.fromarray(rgb)).enhance(factor))


def _contrast(rgb: np.ndarray, factor: float, rng: np.random.Generator) -> np.ndarray:
  del rng
  return np.asarray(ImageEnhance.Contrast(Image.fromarray(rgb)).enhance(factor))


def _gamma(rgb: np.ndarray, gamma: float, rng: np.random.Generator) -> np.ndarray:
  del rng
  table = np.array([int((255 + 1 - 1e-3) * pow(v / 255.0, gamma)) for v in range(256)])
  return table.astype(np.uint8)[rgb]


_FUNCTIONS: dict[str, Callable[[np.ndarray, object, np.random.Generator], np.ndarray]] = {
    'pixelate': _pixelate,
    'jpeg': _jpeg,
    'gaussian_noise': _gaussian_noise,
    'speckle_noise': _speckle_noise,
    'impulse_noise': _impulse_noise,
    'shot_noise': _shot_noise,
    'gaussian_blur': _gaussian_blur,
    'motion_blur': _motion_blur,
    'defocus_blur': _defocus_blur,
    'brightness_up': _brightness,
    'brightness_down': _brightness,
    'contrast_up': _contrast,
    'contrast_down': _contrast,
    'gamma_up': _gamma,
    'gamma_down': _gamma,
}


# ----------------------------------------------------------------------------------------------
# The entry point.


def check(name: str, severity: int, modality: str, seed: int = 0) -> None:
  """Raises ValueError naming the valid choices for an unknown modality, name or severity, or
  for a seed that is not an int >= 0."""
  if modality not in MODALITIES:
    raise ValueError(f'Unknown modality {modality!r}; valid: {sorted(MODALITIES)} '
                     f'(dataset flags map to them by MODALITY_OF_FLAG: {MODALITY_OF_FLAG}).')
  if name not in MODALITIES[modality]:
    raise ValueError(f'Unknown corruption {name!r} for modality {modality!r}; valid: '
                     f'{list(MODALITIES[modality])}.')
  if isinstance(severity, bool) or not isinstance(severity, (int, np.integer)) or (
      severity not in SEVERITIES):
    raise ValueError(f'Severity must be one of {list(SEVERITIES)}; got {severity!r}.')
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f'seed must be an int >= 0; got {seed!r}.')


def _check_image(image: np.ndarray) -> None:
  shape_ok = image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (1, 3))
  if image.dtype != np.uint8 or not shape_ok or min(image.shape[:2]) < 1:
    raise ValueError(f'corrupt needs a uint8 image (H, W), (H, W, 1) or (H, W, 3) with values '
                     f'0..255; got {image.dtype} {image.shape}. Corrupt the raw image, before '
                     'value_range / normalize / to_float.')


def corrupt(image: np.ndarray, name: str, severity: int, modality: str, seed: int) -> np.ndarray:
  """The MedMNIST-C corruption `name` of `modality` at `severity`, applied to `image`.

  Args:
    image: uint8, (H, W) or (H, W, 1) grey, or (H, W, 3) RGB; the raw image, before any
      value_range / normalize (MedMNIST-C corrupts 224-px images: see the module docstring).
    name: one of `MODALITIES[modality]`.
    severity: 1 (mildest) .. 5.
    modality: one of `MODALITIES` ('chest_xray', 'ultrasound', 'fundus').
    seed: an int >= 0; with the image's bytes it fixes the random draws.

  Returns:
    The corrupted image, uint8, of the shape of `image`.

  Raises:
    ValueError: for an unknown modality / name / severity (naming the valid ones), an image that
      is not uint8 grey or RGB, or a negative seed.
  """
  check(name, severity, modality, seed)
  image = np.asarray(image)
  _check_image(image)
  rng = np.random.default_rng([int(seed), zlib.crc32(np.ascontiguousarray(image).tobytes())])
  grey = image.ndim == 2 or image.shape[-1] == 1
  rgb = np.repeat(image.reshape(image.shape[:2] + (1,)), 3, axis=-1) if grey else image
  parameter = SEVERITY_PARAMS[(modality, name)][severity - 1]
  out = _FUNCTIONS[name](np.ascontiguousarray(rgb), parameter, rng)
  if grey:
    out = np.asarray(Image.fromarray(out).convert('L'))
  return out.reshape(image.shape)
