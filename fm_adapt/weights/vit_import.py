"""Loads external ViT checkpoints into fm_adapt's ViT parameter tree.

    params = load_vit_checkpoint('vit_s16.safetensors', target_params=init_params,
                                 dont_load=['head/.*'])

reads the file (never unpickling), converts names and layouts (`vit_formats`,
`fm_layouts`; a class-token position row goes to `cls_pos_embedding` when the target has
one, else it is folded into `cls`), resamples the patch position embedding to the target's
patch grid (never the class row), takes the
parameters matched by `dont_load` from `target_params`, and checks the result
strictly against `target_params`: any missing or unexpected parameter and any
shape difference is reported in one error naming the paths, the checkpoint keys
and both shapes (cf. orbax#2972, a checkpoint silently loaded into a deeper model).

`import_vit` does the same and also returns an `ImportReport`: every parameter loaded and
the key it came from, every checkpoint key left out and why (ignored by the layout, or
dropped by dont_load), every parameter that kept its initialisation; with strict=False the
missing and unexpected entries are reported instead of raised.
"""
import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from fm_adapt import param_paths
from fm_adapt.weights import fm_layouts
from fm_adapt.weights import readers
from fm_adapt.weights import vit_formats

FORMATS = ('auto', 'big_vision', 'timm', 'hf', 'pth', 'hf_dinov2', 'open_clip', 'hf_clip',
           'retfound')
CONVERTERS = {**vit_formats.CONVERTERS, **fm_layouts.CONVERTERS}
Grid = int | tuple[int, int]


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the target parameter tree."""


@dataclasses.dataclass
class ImportReport:
  """What an import did with every checkpoint key and every model parameter.

  Attributes:
    path: the checkpoint file.
    layout: the converter used ('timm', 'hf_dinov2', 'open_clip', ...).
    loaded: fm_adapt path -> the checkpoint key(s) it came from (with any folding).
    ignored: checkpoint key -> why the layout leaves it out (text tower, MAE decoder, ...).
    dropped: checkpoint keys or paths that `dont_load` dropped.
    kept_init: fm_adapt paths that kept the target's initialisation (dont_load, or missing
      with strict=False).
    problems: missing / unexpected / shape-mismatch entries (an error when strict).
  """
  path: str
  layout: str
  loaded: dict[str, str] = dataclasses.field(default_factory=dict)
  ignored: dict[str, str] = dataclasses.field(default_factory=dict)
  dropped: list[str] = dataclasses.field(default_factory=list)
  kept_init: list[str] = dataclasses.field(default_factory=list)
  problems: list[str] = dataclasses.field(default_factory=list)

  def summary(self) -> str:
    """A multi-line account: each parameter not loaded, and the keys left out.

    Keys ignored for one reason are one line when there are more than
    `_IGNORED_LISTED` of them (their count and common prefix), so a MAE decoder or a
    text tower does not bury the lines that matter.
    """
    lines = [f'{self.path} ({self.layout} layout): {len(self.loaded)} parameter(s) loaded.']
    lines += _ignored_lines(self.ignored)
    lines += [f'  dropped by dont_load: {key}' for key in self.dropped]
    lines += [f'  kept its initialisation: {p}' for p in self.kept_init]
    lines += [f'  {problem}' for problem in self.problems]
    return '\n'.join(lines)


_IGNORED_LISTED = 4  # More keys ignored for one reason are summarised on one line.


def _common_prefix(keys: Sequence[str]) -> str:
  """The longest prefix of whole path components ('/' or '.') shared by every key."""
  split = [re.split(r'(?<=[/.])', k) for k in keys]
  prefix = []
  for parts in zip(*split):
    if len(set(parts)) != 1:
      break
    prefix.append(parts[0])
  return ''.join(prefix)


def _ignored_lines(ignored: Mapping[str, str]) -> list[str]:
  """Report lines for the ignored keys: each key, or one line per reason with many keys."""
  by_reason: dict[str, list[str]] = {}
  for key, why in sorted(ignored.items()):
    by_reason.setdefault(why, []).append(key)
  lines = []
  for why, keys in by_reason.items():
    if len(keys) <= _IGNORED_LISTED:
      lines += [f'  ignored: {key} ({why})' for key in keys]
    else:
      lines.append(f'  ignored: {len(keys)} keys {_common_prefix(keys)}* ({why}), '
                   f'e.g. {keys[0]}')
  return lines


def import_vit(path: readers.PathLike, *,
               format: str = 'auto',  # pylint: disable=redefined-builtin
               dont_load: Sequence[str] = (),
               target_params: Mapping[str, Any] | None = None,
               num_heads: int | None = None,
               strict: bool = True) -> tuple[dict[str, Any], ImportReport]:
  """Like `load_vit_checkpoint`, and returns (params, ImportReport).

  Args:
    path, format, dont_load, target_params, num_heads: see `load_vit_checkpoint`; format
      may also be 'hf_dinov2', 'open_clip' or 'hf_clip' (`fm_layouts`).
    strict: raise `CheckpointMismatchError` on any missing or unexpected parameter and any
      shape mismatch (default). With False, a parameter missing from the checkpoint keeps the
      target's value, unexpected keys are left out, and both are listed in the report's
      `problems`; shape mismatches are still an error.
  """
  if format not in FORMATS:
    raise ValueError(f'Unknown ViT checkpoint format {format!r}; valid: {list(FORMATS)}.')
  arrays = readers.read_arrays(path)
  layout = _layout(path, format, list(arrays))
  target = _flatten_target(target_params)
  num_patches = target[vit_formats.POSEMB].shape[1] if vit_formats.POSEMB in target else None
  converted = CONVERTERS[layout](arrays, num_heads=num_heads, num_patches=num_patches,
                                 class_posemb=vit_formats.CLS_POSEMB in target)
  if not converted.params:
    raise ValueError(f'{path}: no key of a {layout} ViT checkpoint found; first keys: '
                     f'{list(arrays)[:8]}. Pick another `format`.')
  report = ImportReport(path=str(path), layout=layout, ignored=dict(converted.ignored))
  params = _merge(path, converted, target_params is not None, target, dont_load, report,
                  strict)
  return params, report


def load_vit_checkpoint(path: readers.PathLike, *,
                        format: str = 'auto',  # pylint: disable=redefined-builtin
                        dont_load: Sequence[str] = (),
                        target_params: Mapping[str, Any] | None = None,
                        num_heads: int | None = None) -> dict[str, Any]:
  """Loads a ViT checkpoint into fm_adapt's parameter tree.

  Args:
    path: a `.npz`, `.safetensors` or (with torch) `.pth`/`.pt`/`.bin` file.
    format: 'big_vision' (.npz of big_vision / vision_transformer), 'timm'
      (also DINOv2 / MAE / RETFound in timm's or facebookresearch's names),
      'hf' (Hugging Face ViT), 'pth' (a timm state dict saved by torch),
      'hf_dinov2' (Hugging Face Dinov2Model, RAD-DINO), 'open_clip' (an open_clip
      image tower or whole CLIP, BiomedCLIP), 'hf_clip' (Hugging Face CLIP),
      'retfound' (MAE / RETFound encoder into a global-pool model: its 'norm' ignored), or
      'auto' to tell the layout from the key names.
    dont_load: regexes (full match) over '/'-joined paths. Parameters they match
      are taken from `target_params` (e.g. 'head/.*' for a new head); checkpoint
      entries they match that the target lacks (e.g. 'pooler\\..*' of an HF
      ViTModel) are dropped. A pattern that matches nothing is an error.
    target_params: the freshly initialized fm_adapt tree (the 'params'
      collection, or variables holding it). Enables position-embedding
      resampling, `dont_load` and the strict check; the result then has
      exactly its paths, shapes and dtypes. Leaves may be ShapeDtypeStructs
      unless `dont_load` takes values from them.
    num_heads: the expected number of attention heads; checked against
      big_vision checkpoints, which store heads as their own axis.

  Returns:
    The nested params dict. Converted leaves are numpy arrays (in the target's
    dtype when given, else the file's); `dont_load` leaves are the target's own.

  Raises:
    CheckpointMismatchError: missing / unexpected parameters or shape
      mismatches (all listed), or an unknown checkpoint key without a target.
    PickleRefusedError: the file needs pickle.
    ValueError: an unknown format, a layout that cannot be detected, a
      `dont_load` pattern that matches nothing.
  """
  return import_vit(path, format=format, dont_load=dont_load, target_params=target_params,
                    num_heads=num_heads)[0]


def resample_posemb(posemb: Any, new_grid: Grid, *,
                    old_grid: Grid | None = None) -> np.ndarray:
  """Resizes a patch position embedding to another grid (bilinear, 2-D).

  Args:
    posemb: [1, gh * gw, D] embedding of the patch tokens only (no class row).
    new_grid: target grid (gh', gw'), or one int for a square grid.
    old_grid: the grid of `posemb`; inferred as square when omitted.

  Returns:
    [1, gh' * gw', D] numpy array in posemb's dtype. jax.image.resize 'bilinear'
    (half-pixel centers, antialiased when shrinking) on the [gh, gw, D] grid, so a
    constant embedding stays constant.
  """
  posemb = np.asarray(posemb)
  if posemb.ndim != 3 or posemb.shape[0] != 1:
    raise ValueError(f'Expected a position embedding [1, N, D], got {posemb.shape}.')
  _, n, d = posemb.shape
  old_grid = _as_grid(old_grid) if old_grid is not None else _square_grid(n)
  new_grid = _as_grid(new_grid)
  if old_grid[0] * old_grid[1] != n:
    raise ValueError(f'Grid {old_grid} does not hold the {n} position embeddings.')
  if old_grid == new_grid:
    return posemb
  grid = jnp.asarray(posemb.reshape(*old_grid, d), jnp.float32)
  resized = jax.image.resize(grid, (*new_grid, d), method='bilinear')
  return np.asarray(resized).reshape(1, -1, d).astype(posemb.dtype)


def _as_grid(grid: Grid) -> tuple[int, int]:
  return (grid, grid) if isinstance(grid, int) else tuple(int(g) for g in grid)


def _square_grid(n: int) -> tuple[int, int]:
  side = math.isqrt(n)
  if side * side != n:
    raise ValueError(f'{n} position embeddings are not a square grid; pass the grid '
                     'explicitly (resample_posemb(..., old_grid=(gh, gw))).')
  return side, side


def _layout(path: readers.PathLike, fmt: str, keys: list[str]) -> str:
  """The converter to use: the format given, or the one the keys show."""
  if fmt == 'pth':
    return 'timm'
  if fmt != 'auto':
    return fmt
  layout = fm_layouts.detect_layout(keys) or vit_formats.detect_layout(keys)
  if layout is None:
    raise ValueError(
        f'{path}: cannot tell the ViT checkpoint layout ({readers.suffix(path)} file, '
        f'first keys {keys[:8]}); pass format= one of {list(FORMATS[1:])}.')
  return layout


def _flatten_target(target_params: Mapping[str, Any] | None) -> dict[str, Any]:
  """'/'-joined path -> leaf of the target params (unwrapping {'params': ...})."""
  if target_params is None:
    return {}
  if 'params' in target_params:
    target_params = target_params['params']
  return flax.traverse_util.flatten_dict(dict(target_params), sep='/')


class _Patterns:
  """dont_load regexes (full match): `skip(path)`, and a check that each selects something."""

  def __init__(self, patterns: Sequence[str]):
    if isinstance(patterns, str):
      patterns = [patterns]
    self.patterns = {p: re.compile(p) for p in patterns}

  def __call__(self, path: str) -> bool:
    return any(rx.fullmatch(path) for rx in self.patterns.values())

  def check_all_used(self, paths: Sequence[str]) -> None:
    param_paths.check_patterns_match(list(self.patterns), paths, what='dont_load pattern')


def _merge(path: readers.PathLike, converted: vit_formats.Converted, has_target: bool,
           target: dict[str, Any], dont_load: Sequence[str], report: ImportReport,
           strict: bool = True) -> dict[str, Any]:
  """Applies dont_load, fits the target (if any), raises on problems, unflattens."""
  skip = _Patterns(dont_load)
  leftovers = {k: s for k, s in converted.leftovers.items() if not skip(k)}
  params = {p: v for p, v in converted.params.items() if not skip(p)}
  report.dropped = sorted({k for k in converted.leftovers if skip(k)}
                          | {p for p in converted.params if skip(p)})
  problems = [f'unexpected: checkpoint key {key!r} {shape} (no fm_adapt parameter '
              'for it; drop it with dont_load)' for key, shape in sorted(leftovers.items())]
  result = params
  if has_target:
    result, target_problems = _fill_target(target, params, converted.sources, skip, report,
                                           strict)
    problems += target_problems
  skip.check_all_used(sorted(set(converted.params) | set(converted.leftovers)
                             | set(target)))
  report.loaded = {p: converted.sources[p] for p in result if p in params}
  report.problems = problems
  if problems and (strict or any(p.startswith('shape mismatch') for p in problems)):
    raise CheckpointMismatchError(
        f'{path} ({report.layout} layout) does not fit the ViT parameters '
        f'({len(problems)} problem(s)):\n  ' + '\n  '.join(problems))
  if not strict:
    result = {p: v for p, v in result.items() if not has_target or p in target}
  return flax.traverse_util.unflatten_dict(result, sep='/')


def _fill_target(target: dict[str, Any], params: dict[str, np.ndarray],
                 sources: dict[str, str], skip: _Patterns, report: ImportReport,
                 strict: bool) -> tuple[dict[str, Any], list[str]]:
  """Each target path from dont_load (target value) or the checkpoint; problems."""
  result, problems = {}, []
  for p, init in target.items():
    if skip(p):
      result[p] = _target_value(p, init)
      report.kept_init.append(p)
    elif p in params:
      result[p], problem = _fit(p, params[p], init, sources[p])
      problems += [problem] if problem else []
    else:
      problems.append(f'missing: {p} {tuple(init.shape)} is not in the checkpoint'
                      + (_NO_CLASS_ROW if p == vit_formats.CLS_POSEMB else ''))
      if not strict:
        result[p] = _target_value(p, init)
        report.kept_init.append(p)
  problems += [f'unexpected: {p} from {sources[p]} (not in the model)'
               for p in sorted(set(params) - set(target))]
  return result, problems


_NO_CLASS_ROW = (" (the checkpoint's position embedding has no class-token row: build the "
                 'model with class_posemb=False)')


def _target_value(path: str, init: Any) -> Any:
  if isinstance(init, jax.ShapeDtypeStruct):
    raise ValueError(f'dont_load matched {path}, whose target is a ShapeDtypeStruct; '
                     'pass initialized target_params to take values from them.')
  return init


def _fit(path: str, value: np.ndarray, init: Any, source: str
         ) -> tuple[np.ndarray, str | None]:
  """Resamples a position embedding to the target grid, checks the shape, casts."""
  if (path == vit_formats.POSEMB and value.shape != tuple(init.shape)
      and value.ndim == 3 and value.shape[-1] == init.shape[-1]):
    value = resample_posemb(value, _square_grid(init.shape[1]))
  if value.shape != tuple(init.shape):
    return value, (f'shape mismatch: {path} from {source}: checkpoint {value.shape} '
                   f'(fm_adapt layout) vs model {tuple(init.shape)}')
  return np.asarray(value).astype(init.dtype, copy=False), None
