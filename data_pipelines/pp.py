"""Preprocessing ops chosen by name in a `|` string: 'resize(64)|gray_to_rgb|value_range(-1,1)'.

`parse(pp_string)` returns one callable `fn(example, rng) -> example` that applies the ops left to
right. Examples are dicts of numpy arrays; ops read and replace `example['image']` and pass every
other field through. Images are (H, W, C), uint8 or float; the value ops (`value_range`,
`normalize`, `to_float`) also accept volumes (D, H, W, C). Random ops draw only from the
`np.random.Generator` they are given, so augmentation is fixed by the loader's (seed, epoch,
index). Ops are plain numpy / PIL (no JAX), so they run in grain worker processes, and a parsed
pipeline pickles (as its string).

Arguments are Python literals, positional or by keyword: `resize(64)`, `resize((64, 48))`,
`random_crop(28, pad=4)`, `normalize((0.5,), (0.25,))`, `flip_lr(p=0.3)`.
"""
from __future__ import annotations

import ast
import functools
import inspect
import re
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from data_pipelines import corruptions

Example = dict
Op = Callable[[Example, np.random.Generator], Example]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_NORMALIZE_PRESETS = {'imagenet': (IMAGENET_MEAN, IMAGENET_STD)}


def _size2(size: int | Sequence[int], op: str) -> tuple[int, int]:
  """An int or (height, width) as a (height, width) tuple of positive ints."""
  hw = (size, size) if isinstance(size, int) else size
  valid = isinstance(hw, (tuple, list)) and len(hw) == 2 and all(
      isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in hw)
  if not valid:
    raise ValueError(f'{op}: size must be a positive int or (height, width); got {size!r}.')
  return tuple(hw)


def _image_2d(example: Example, op: str) -> np.ndarray:
  image = np.asarray(example['image'])
  if image.ndim != 3:
    raise ValueError(f'{op} works on 2D images (H, W, C); got shape {image.shape}.')
  return image


def _with_image(example: Example, image: np.ndarray) -> Example:
  return {**example, 'image': image}


def _to_unit(image: np.ndarray) -> np.ndarray:
  """uint8 0..255 -> float32 0..1; float images are taken to be in [0, 1] already."""
  if image.dtype == np.uint8:
    return image.astype(np.float32) / 255.0
  return image.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# The ops: `_name(example, rng, **validated_args)`, made by the factories of `PP_OPS`.


_RESAMPLING = {'bilinear': Image.Resampling.BILINEAR, 'nearest': Image.Resampling.NEAREST,
               'bicubic': Image.Resampling.BICUBIC}


def _resize(example: Example, rng: np.random.Generator, *, size: tuple[int, int],
            method: str) -> Example:
  del rng
  image = _image_2d(example, 'resize')
  if image.shape[:2] == size:
    return example
  uint8 = image.dtype == np.uint8
  channels = []
  for c in range(image.shape[-1]):
    plane = Image.fromarray(np.ascontiguousarray(  # Mode 'L' for uint8, 'F' for float32.
        image[..., c] if uint8 else image[..., c].astype(np.float32)))
    channels.append(np.asarray(plane.resize((size[1], size[0]), _RESAMPLING[method])))
  return _with_image(example, np.stack(channels, axis=-1))


def _center_crop(example: Example, rng: np.random.Generator, *, size: tuple[int, int]) -> Example:
  del rng
  image = _image_2d(example, 'center_crop')
  h, w = image.shape[:2]
  if h < size[0] or w < size[1]:
    raise ValueError(f'center_crop{size}: image {image.shape} is smaller; resize first.')
  top, left = (h - size[0]) // 2, (w - size[1]) // 2
  return _with_image(example, image[top:top + size[0], left:left + size[1]])


def _random_crop(example: Example, rng: np.random.Generator, *, size: tuple[int, int],
                 pad: int) -> Example:
  image = _image_2d(example, 'random_crop')
  if pad:
    image = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
  h, w = image.shape[:2]
  if h < size[0] or w < size[1]:
    raise ValueError(f'random_crop{size}: image {image.shape} (after pad={pad}) is smaller.')
  top = int(rng.integers(h - size[0] + 1))
  left = int(rng.integers(w - size[1] + 1))
  return _with_image(example, image[top:top + size[0], left:left + size[1]])


def _gray_to_rgb(example: Example, rng: np.random.Generator) -> Example:
  del rng
  image = np.asarray(example['image'])
  if image.shape[-1] == 3:
    return example
  if image.shape[-1] != 1:
    raise ValueError(f'gray_to_rgb needs 1 or 3 channels (last axis); got shape {image.shape}.')
  return _with_image(example, np.repeat(image, 3, axis=-1))


def _value_range(example: Example, rng: np.random.Generator, *, lo: float, hi: float,
                 in_min: float, in_max: float) -> Example:
  del rng
  image = np.asarray(example['image'], dtype=np.float32)
  scaled = (image - in_min) * np.float32((hi - lo) / (in_max - in_min)) + np.float32(lo)
  return _with_image(example, scaled.astype(np.float32))


def _normalize(example: Example, rng: np.random.Generator, *, mean: np.ndarray,
               std: np.ndarray) -> Example:
  del rng
  image = _to_unit(np.asarray(example['image']))
  if mean.size not in (1, image.shape[-1]):
    raise ValueError(f'normalize: {mean.size} means for {image.shape[-1]} channels (image shape '
                     f'{image.shape}); use gray_to_rgb first or give one value per channel.')
  return _with_image(example, ((image - mean) / std).astype(np.float32))


def _flip(example: Example, rng: np.random.Generator, *, axis: int, p: float) -> Example:
  image = _image_2d(example, 'flip_lr' if axis == 1 else 'flip_ud')
  if rng.random() < p:
    image = np.flip(image, axis=axis)
  return _with_image(example, image)


def _rot90(example: Example, rng: np.random.Generator) -> Example:
  image = _image_2d(example, 'rot90')
  if image.shape[0] != image.shape[1]:
    raise ValueError(f'rot90 needs square images (batches keep one shape); got {image.shape}.')
  return _with_image(example, np.rot90(image, k=int(rng.integers(4)), axes=(0, 1)))


def _to_float(example: Example, rng: np.random.Generator) -> Example:
  del rng
  return _with_image(example, np.asarray(example['image'], dtype=np.float32))


def _corrupt(example: Example, rng: np.random.Generator, *, name: str, severity: int, seed: int,
             modality: str) -> Example:
  del rng  # The corruption's draws come from (seed, the image's bytes): deterministic.
  image = _image_2d(example, 'corrupt')
  return _with_image(example, corruptions.corrupt(image, name, severity, modality, seed))


# ----------------------------------------------------------------------------------------------
# Factories: check the arguments of the pp string and bind them.


def resize(size: int | Sequence[int], method: str = 'bilinear') -> Op:
  """Resize to `size` (int or (height, width)) with PIL; uint8 stays uint8, float -> float32.

  Args:
    size: the output size.
    method: 'bilinear' (default), 'nearest' (pixel replication; what the MedMNIST v2 code uses
      to go from 28 to 224 px) or 'bicubic'.
  """
  if method not in _RESAMPLING:
    raise ValueError(f'resize: unknown method {method!r}; valid: {sorted(_RESAMPLING)}.')
  return functools.partial(_resize, size=_size2(size, 'resize'), method=method)


def center_crop(size: int | Sequence[int]) -> Op:
  """Crops the central `size` (int or (height, width))."""
  return functools.partial(_center_crop, size=_size2(size, 'center_crop'))


def random_crop(size: int | Sequence[int], pad: int = 0) -> Op:
  """Zero-pads `pad` pixels on each side, then crops `size` at a random place."""
  if not isinstance(pad, int) or pad < 0:
    raise ValueError(f'random_crop: pad must be an int >= 0; got {pad!r}.')
  return functools.partial(_random_crop, size=_size2(size, 'random_crop'), pad=pad)


def gray_to_rgb() -> Op:
  """Repeats a single channel three times; RGB images pass unchanged."""
  return _gray_to_rgb


def value_range(lo: float = -1.0, hi: float = 1.0, in_min: float = 0.0,
                in_max: float = 255.0) -> Op:
  """Maps [in_min, in_max] (default uint8 0..255) linearly to [lo, hi], as float32."""
  values = (lo, hi, in_min, in_max)
  if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
    raise ValueError(f'value_range: arguments must be numbers; got {values}.')
  if in_max == in_min:
    raise ValueError('value_range: in_min and in_max must differ.')
  return functools.partial(_value_range, lo=lo, hi=hi, in_min=in_min, in_max=in_max)


def normalize(mean: str | float | Sequence[float] = 'imagenet',
              std: float | Sequence[float] | None = None) -> Op:
  """(x - mean) / std per channel on the [0, 1] scale, as float32.

  uint8 images are first divided by 255; float images are taken to be in [0, 1] already.

  Args:
    mean: a preset name ('imagenet': mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)),
      or one mean per channel (or one for all).
    std: one std per channel (or one for all); must be left out with a preset.
  """
  if isinstance(mean, str):
    if mean not in _NORMALIZE_PRESETS or std is not None:
      raise ValueError(f'normalize: preset must be one of {sorted(_NORMALIZE_PRESETS)} with no '
                       f'std; got mean={mean!r}, std={std!r}.')
    mean, std = _NORMALIZE_PRESETS[mean]
  if std is None:
    raise ValueError('normalize: give std with an explicit mean.')
  mean_arr = np.asarray(mean, dtype=np.float32).reshape(-1)
  std_arr = np.asarray(std, dtype=np.float32).reshape(-1)
  if mean_arr.size != std_arr.size or not (std_arr > 0).all():
    raise ValueError(f'normalize: mean and std need the same length and std > 0; got mean={mean}, '
                     f'std={std}.')
  return functools.partial(_normalize, mean=mean_arr, std=std_arr)


def _probability(p: float, op: str) -> float:
  if not isinstance(p, (int, float)) or not 0 <= p <= 1:
    raise ValueError(f'{op}: p must be a probability in [0, 1]; got {p!r}.')
  return float(p)


def flip_lr(p: float = 0.5) -> Op:
  """Flips left-right with probability `p`."""
  return functools.partial(_flip, axis=1, p=_probability(p, 'flip_lr'))


def flip_ud(p: float = 0.5) -> Op:
  """Flips up-down with probability `p`."""
  return functools.partial(_flip, axis=0, p=_probability(p, 'flip_ud'))


def rot90() -> Op:
  """Rotates by k * 90 degrees, k uniform in {0, 1, 2, 3} (square images)."""
  return _rot90


def to_float() -> Op:
  """Casts the image to float32, values unchanged (0..255 stays 0..255)."""
  return _to_float


def corrupt(name: str, severity: int, seed: int = 0, modality: str | None = None) -> Op:
  """A MedMNIST-C corruption (`data_pipelines.corruptions.corrupt`), deterministic.

  It works on the raw uint8 image: put it before `value_range` / `normalize` / `to_float`, e.g.
  `corrupt('jpeg', 3, modality='chest_xray')|value_range(-1, 1)`. MedMNIST-C corrupts 224-px
  images and its blur sizes are in pixels: to reproduce the benchmark from smaller archives, put
  `resize(224)` before it. The noise is fixed by (seed, the image's bytes), not by the loader's
  rng, so the op may sit in an evaluation pp.

  Args:
    name: a corruption of the modality (`corruptions.MODALITIES[modality]`).
    severity: 1 (mildest) .. 5.
    seed: an int >= 0.
    modality: 'chest_xray', 'ultrasound' or 'fundus' (`corruptions.MODALITIES`); required, since
      the same corruption has other parameters in another modality (`corruptions.MODALITY_OF_FLAG`
      gives it for a MedMNIST flag).
  """
  if modality is None:
    raise ValueError(f'corrupt({name!r}, {severity!r}): pass modality=, one of '
                     f'{sorted(corruptions.MODALITIES)} (the same corruption has other parameters '
                     f'per modality; by MedMNIST flag: {corruptions.MODALITY_OF_FLAG}).')
  corruptions.check(name, severity, modality, seed)
  return functools.partial(_corrupt, name=name, severity=severity, seed=seed, modality=modality)


PP_OPS: dict[str, Callable[..., Op]] = {
    'resize': resize,
    'center_crop': center_crop,
    'random_crop': random_crop,
    'gray_to_rgb': gray_to_rgb,
    'value_range': value_range,
    'normalize': normalize,
    'flip_lr': flip_lr,
    'flip_ud': flip_ud,
    'rot90': rot90,
    'to_float': to_float,
    'corrupt': corrupt,
}

# Whether each op draws from its rng (an augmentation). Every op of PP_OPS declares it: evaluation
# drops the random ops of the training pp (`drop_random`) and refuses an eval pp with one
# (`check_deterministic`).
RANDOM_OPS: dict[str, bool] = {
    'resize': False,
    'center_crop': False,
    'random_crop': True,
    'gray_to_rgb': False,
    'value_range': False,
    'normalize': False,
    'flip_lr': True,
    'flip_ud': True,
    'rot90': True,
    'to_float': False,
    'corrupt': False,
}

_OP_RE = re.compile(r'^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(\((.*)\))?\s*$', re.DOTALL)


def _parse_args(spec: str, call_text: str) -> tuple[list, dict]:
  """Literal positional and keyword arguments of `name(...)`."""
  try:
    call = ast.parse(call_text, mode='eval').body
    if not isinstance(call, ast.Call) or any(isinstance(a, ast.Starred) for a in call.args):
      raise ValueError
    args = [ast.literal_eval(a) for a in call.args]
    kwargs = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg}
    if len(kwargs) != len(call.keywords):
      raise ValueError
  except (SyntaxError, ValueError) as e:
    raise ValueError(f'Cannot parse pp op {spec!r}: arguments must be Python literals, e.g. '
                     f"'resize(64)', 'value_range(-1, 1)', 'random_crop(28, pad=4)'.") from e
  return args, kwargs


def _signature_text(factory: Callable[..., Op]) -> str:
  """`name(arg=default, ...)` without annotations, for error messages."""
  sig = inspect.signature(factory)
  params = [p.replace(annotation=inspect.Parameter.empty) for p in sig.parameters.values()]
  return f'{factory.__name__}{sig.replace(parameters=params, return_annotation=sig.empty)}'


def _make_op(spec: str) -> Op:
  match = _OP_RE.match(spec)
  if not match:
    raise ValueError(f'Cannot parse pp op {spec!r}; expected name or name(args). Valid names: '
                     f'{sorted(PP_OPS)}.')
  name = match.group(1)
  if name not in PP_OPS:
    raise ValueError(f'Unknown pp op {name!r} in {spec!r}; valid names: {sorted(PP_OPS)}.')
  if name not in RANDOM_OPS:
    raise ValueError(f'pp op {name!r} does not declare whether it is random: add it to '
                     'data_pipelines.pp.RANDOM_OPS.')
  factory = PP_OPS[name]
  args, kwargs = _parse_args(spec, f'f({match.group(3) or ""})')
  try:
    inspect.signature(factory).bind(*args, **kwargs)
  except TypeError as e:
    raise ValueError(f'Bad arguments for pp op {spec!r} ({e}); signature: '
                     f'{_signature_text(factory)}.') from None
  return factory(*args, **kwargs)


class Pipeline:
  """Parsed ops applied in order; call as `pipeline(example, rng)`. Pickles as its pp string."""

  def __init__(self, pp_string: str):
    self.pp_string = pp_string
    specs = [s for s in pp_string.split('|') if s.strip()]
    self.ops = [_make_op(spec) for spec in specs]

  def __call__(self, example: Example, rng: np.random.Generator) -> Example:
    for op in self.ops:
      example = op(example, rng)
    return example

  def __reduce__(self):
    return (Pipeline, (self.pp_string,))

  def __repr__(self) -> str:
    return f'Pipeline({self.pp_string!r})'


def parse(pp_string: str) -> Callable[[Example, np.random.Generator], Example]:
  """Parses `'op1(args)|op2|...'` into one function `fn(example, rng) -> example`.

  An empty string gives the identity.

  Raises:
    ValueError: for an unknown op (listing the valid names) or bad arguments (giving the op's
      signature).
  """
  if not isinstance(pp_string, str):
    raise ValueError(f'pp must be a string like "resize(64)|value_range(-1,1)"; got {pp_string!r}.')
  return Pipeline(pp_string)


def _op_specs(pp_string: str) -> list[tuple[str, str]]:
  """(name, spec text) of each op of a pp string, after checking that the whole string parses."""
  parse(pp_string)
  specs = [s.strip() for s in pp_string.split('|') if s.strip()]
  return [(_OP_RE.match(spec).group(1), spec) for spec in specs]


def random_ops(pp_string: str) -> list[str]:
  """The random ops (augmentations) of a pp string, as written, e.g. ['flip_lr', 'rot90']."""
  return [spec for name, spec in _op_specs(pp_string) if RANDOM_OPS[name]]


def drop_random(pp_string: str) -> str:
  """The pp string without its random ops: 'resize(64)|flip_lr|normalize' -> 'resize(64)|normalize'.

  Raises:
    ValueError: for a pp string that does not parse (unknown op, bad arguments).
  """
  return '|'.join(spec for name, spec in _op_specs(pp_string) if not RANDOM_OPS[name])


def check_deterministic(pp_string: str, what: str) -> None:
  """Fails when `pp_string` (the config key `what`) holds a random op, naming the op(s).

  Raises:
    ValueError: for a random op, or a pp string that does not parse.
  """
  found = random_ops(pp_string)
  if found:
    raise ValueError(f'{what}={pp_string!r} holds random op(s) {found}: evaluation must be '
                     f'deterministic. Remove them (e.g. {what}={drop_random(pp_string)!r}).')
