"""Image files to uint8 arrays: PIL modes, bit depth, and errors that name the file.

The image-folder builder (`custom.ImageFolder`) stores uint8 images, as every dataset here does
(the pp ops and the models take 0..255). 8-bit files (PIL modes in `EIGHT_BIT_MODES`) are
converted to grey ('L') or RGB and resized bilinear by PIL. Deeper files never go through PIL's
8-bit conversion, which clips them at 255 (a 16-bit grey ramp became 17 values, 99.6 % at 255):
16-bit grey PNG / TIFF (modes 'I;16*'), 32-bit integer ('I') and float ('F') TIFF, and 16-bit
colour PNG / TIFF (which PIL itself decodes to their high byte). What happens to them is the
`high_bit_depth` policy, one of `HIGH_BIT_DEPTHS`:

  'error' (default): the image is refused; the message names the file and this option.
  'per_image': each image's own [min, max] is mapped linearly onto 0..255. Contrast is kept;
      intensities are no longer comparable across images.
  'per_dataset': the [min, max] over every deep image of the dataset (all splits; no labels
      used) is mapped onto 0..255, so intensities stay comparable across images. It costs one
      more pass over the images; the range is recorded in the dataset's metadata.
  'full_range': the high byte, x // 256 (0..65535 onto 0..255), what PIL does for 16-bit
      colour. 16-bit files only: 'I' and 'F' images have no fixed range and are refused.

Deep grey images are resized in float32 (bilinear), then mapped and rounded; nothing is clipped.
16-bit colour files are accepted with 'full_range' only (PIL gives nothing deeper). 8-bit files
are stored as they are under every policy. Every failure (a missing, unreadable, truncated or
non-image file, an unsupported mode, several frames, non-finite values, a depth the policy
cannot represent) raises an error that names the file.
"""
from __future__ import annotations

import os
from collections.abc import Iterable

import numpy as np
from PIL import Image

HIGH_BIT_DEPTHS = ('error', 'per_image', 'per_dataset', 'full_range')
EIGHT_BIT_MODES = ('1', 'L', 'P', 'LA', 'PA', 'RGB', 'RGBA', 'RGBX', 'CMYK', 'YCbCr')
SIXTEEN_BIT_MODES = ('I;16', 'I;16L', 'I;16B', 'I;16N')
WIDE_MODES = ('I', 'F')  # 32-bit integer and float: no fixed range.
_OPTION = 'high_bit_depth'


class ImageFileError(ValueError):
  """An image file that cannot be stored as it is; the message names the file and the fix."""


def check_high_bit_depth(policy: str) -> str:
  """Returns `policy` if it is one of `HIGH_BIT_DEPTHS`, else raises ValueError listing them."""
  if policy not in HIGH_BIT_DEPTHS:
    raise ValueError(f'Unknown {_OPTION} {policy!r}; valid: {list(HIGH_BIT_DEPTHS)} '
                     '(see data_pipelines.images).')
  return policy


def _sixteen_bit_samples(image: Image.Image) -> bool:
  """Whether PIL decodes 16-bit samples of this (not yet loaded) file into an 8-bit mode."""
  for tile in image.tile:
    args = tile.args if isinstance(tile.args, tuple) else (tile.args,)
    if args and isinstance(args[0], str) and ';16' in args[0]:
      return True
  return False


def _decode(path: os.PathLike | str) -> tuple[Image.Image, bool]:
  """Opens and decodes one image; returns it and whether it is 16-bit colour.

  Raises:
    OSError: of the original type, naming the file, if it cannot be opened.
    ImageFileError: if it is not an image PIL can decode, is truncated or has several frames.
  """
  try:
    with open(path, 'rb') as f:
      with Image.open(f) as image:
        deep_colour = image.mode in EIGHT_BIT_MODES and _sixteen_bit_samples(image)
        frames = getattr(image, 'n_frames', 1)
        image.load()
  except OSError as e:
    if e.errno is not None:  # From the file system, not from PIL's decoders.
      raise type(e)(f'Cannot read image file {path}: {e.strerror or e}. Check that it exists '
                    'and is readable, or remove it from the folder.') from e
    raise ImageFileError(f'{path} is not a whole image PIL can decode ({e}). Re-export it or '
                         'remove it from the folder.') from e
  except (ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise ImageFileError(f'{path} is not an image PIL can decode ({e}). Re-export it or '
                         'remove it from the folder.') from e
  if frames != 1:
    raise ImageFileError(f'{path} holds {frames} frames (a stack or animation); the image folder '
                         'takes one 2D image per file. Save each frame as its own file.')
  return image, deep_colour


def _is_deep(image: Image.Image, deep_colour: bool, path, policy: str) -> bool:
  """Whether `image` takes the deep path; raises if its mode or depth cannot be stored."""
  mode = image.mode
  if deep_colour:
    if policy != 'full_range':
      raise ImageFileError(
          f"{path} is 16-bit colour; PIL decodes it to its high byte only, which "
          f"{_OPTION}='full_range' alone accepts ({_OPTION}={policy!r} is set). Set "
          f"{_OPTION}='full_range' in the image_folder data config, or convert it to 16-bit grey.")
    return False
  if mode in EIGHT_BIT_MODES:
    return False
  if mode not in SIXTEEN_BIT_MODES + WIDE_MODES:
    raise ImageFileError(f'{path} has PIL mode {mode!r}, which is not supported; save it as grey '
                         f'(8 or 16 bit) or RGB. Supported modes: '
                         f'{list(EIGHT_BIT_MODES + SIXTEEN_BIT_MODES + WIDE_MODES)}.')
  depth = '16-bit' if mode in SIXTEEN_BIT_MODES else f'32-bit {"float" if mode == "F" else "int"}'
  if policy == 'error':
    raise ImageFileError(
        f'{path} is a {depth} image (PIL mode {mode!r}); it is stored as uint8 only by rescaling, '
        f'never by clipping. Set {_OPTION} in the image_folder data config to one of '
        f"{list(HIGH_BIT_DEPTHS[1:])} (see data_pipelines.images).")
  if policy == 'full_range' and mode in WIDE_MODES:
    raise ImageFileError(
        f"{path} is a {depth} image (PIL mode {mode!r}), which has no fixed range for "
        f"{_OPTION}='full_range'; set {_OPTION} to 'per_image' or 'per_dataset'.")
  return True


def _values(image: Image.Image, path) -> np.ndarray:
  """The float32 values of a deep grey image; raises on NaN or infinity."""
  values = np.asarray(image.convert('F'), dtype=np.float32)
  if not np.isfinite(values).all():
    raise ImageFileError(f'{path} holds NaN or infinite values; replace them before export.')
  return values


def _rescale(values: np.ndarray, policy: str, value_range: tuple[float, float]) -> np.ndarray:
  """Maps deep values to uint8 by `policy` (`value_range` is the [min, max] mapped to 0..255)."""
  if policy == 'full_range':
    out = np.floor(values / 256)
  else:
    lo, hi = value_range
    out = np.zeros_like(values) if hi <= lo else np.round((values - lo) * (255 / (hi - lo)))
  # Values lie in range by construction; the clip only absorbs float rounding at the ends.
  return np.clip(out, 0, 255).astype(np.uint8)


def load_image(path: os.PathLike | str, size: tuple[int, int], channels: int,
               high_bit_depth: str = 'error',
               value_range: tuple[float, float] | None = None) -> np.ndarray:
  """Decodes one image file to uint8 (height, width, channels), resized bilinear.

  Args:
    path: the file.
    size: (height, width) of the result.
    channels: 1 (grey) or 3 (RGB; grey images are repeated).
    high_bit_depth: the policy for images deeper than 8 bits (module docstring).
    value_range: for 'per_dataset', the dataset's [min, max] (`value_range`).

  Raises:
    ImageFileError: naming the file, for a file that is not a whole image, an unsupported mode,
      or a depth the policy cannot store.
    OSError: naming the file, if it cannot be read.
  """
  image, deep_colour = _decode(path)
  if not _is_deep(image, deep_colour, path, high_bit_depth):
    try:
      image = image.convert('L' if channels == 1 else 'RGB')
    except ValueError as e:
      raise ImageFileError(f'{path}: PIL cannot convert mode {image.mode!r} ({e}).') from e
    image = image.resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint8).reshape(size[0], size[1], channels)
  values = _values(image, path)
  if high_bit_depth == 'per_image':
    value_range = (float(values.min()), float(values.max()))
  elif high_bit_depth == 'per_dataset' and value_range is None:
    raise ValueError("high_bit_depth='per_dataset' needs the dataset's value_range.")
  resized = np.asarray(Image.fromarray(values).resize(
      (size[1], size[0]), Image.Resampling.BILINEAR), dtype=np.float32)
  grey = _rescale(resized, high_bit_depth, value_range)
  return np.repeat(grey[..., None], channels, axis=-1)


def value_range(paths: Iterable[os.PathLike | str]) -> tuple[float, float] | None:
  """The [min, max] over the deep images among `paths` ('per_dataset'); None if there are none.

  Raises:
    ImageFileError, OSError: as `load_image` with high_bit_depth='per_dataset'.
  """
  lo, hi = np.inf, -np.inf
  for path in paths:
    image, deep_colour = _decode(path)
    if _is_deep(image, deep_colour, path, 'per_dataset'):
      values = _values(image, path)
      lo, hi = min(lo, float(values.min())), max(hi, float(values.max()))
  return None if lo > hi else (lo, hi)
