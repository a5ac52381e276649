"""The encoder of a MIM-pretrained export, loaded into a classification ViT.

A 'vit_mim' run (`fm_adapt.models.mim`) exports, with the export of every run (the native
`.npz`, `fm_adapt.weights.native`), the classification ViT's encoder under the very same paths
plus the parameters only pretraining uses: the encoder's `mask_token` (SimMIM) and the pixel
`decoder/...`. `import_mim_encoder` loads the encoder into a ViT of the same configuration:

  * every encoder parameter of the ViT must be in the file with its shape (the position
    embedding is resampled to the ViT's grid when the resolution differs), else an error;
  * `mask_token` and `decoder/...` are reported as ignored (pretraining only);
  * the ViT's head is reported missing (a MIM model has none) and keeps its initialisation;
  * any other difference (a key of another model, another collection) is an error.

`load_mim_encoder` is the same as a `fm_adapt.weights.LOADERS` function (prints the report,
returns the parameters), for `config.model_load = dict(name='fm_adapt_mim')`.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fm_adapt import param_paths
from fm_adapt.train import writer
from fm_adapt.weights import native
from fm_adapt.weights import readers
from fm_adapt.weights import vit_import

LAYOUT = 'fm_adapt_mim'
HEAD = re.compile(r'head/.*')
# Parameter paths only the MIM model has, with why they are left out.
PRETRAINING_ONLY = (
    (re.compile(r'mask_token'), 'the mask token of masked image modelling (pretraining only)'),
    (re.compile(r'decoder/.*'), 'the pixel decoder of masked image modelling (pretraining only)'),
)


@dataclasses.dataclass
class MimImportReport(vit_import.ImportReport):
  """`vit_import.ImportReport` plus `missing`: the head, absent from a MIM export."""
  missing: list[str] = dataclasses.field(default_factory=list)

  def summary(self) -> str:
    """The import report; the missing head on lines of their own."""
    lines = [super().summary()]
    lines += [f'  missing (a MIM model has no head; kept its initialisation): {p}'
              for p in self.missing]
    return '\n'.join(lines)


def pretraining_only(path: str) -> str | None:
  """Why a parameter path is left out of the encoder, or None if it belongs to it."""
  for rx, why in PRETRAINING_ONLY:
    if rx.fullmatch(path):
      return why
  return None


def is_mim_export(keys: Sequence[str]) -> bool:
  """Whether the keys of a native export are those of a MIM model (a decoder or mask token)."""
  return native.is_native(list(keys)) and any(
      k.startswith('params/') and pretraining_only(k.split('/', 1)[1]) for k in keys)


def _fit(path: str, value: np.ndarray, init: Any) -> tuple[np.ndarray, str | None]:
  """The checkpoint value in the target's shape (position embedding resampled) and dtype."""
  if (path == 'pos_embedding' and value.ndim == 3 and value.shape != tuple(init.shape)
      and value.shape[-1] == init.shape[-1] and math.isqrt(init.shape[1]) ** 2 == init.shape[1]):
    value = vit_import.resample_posemb(value, math.isqrt(init.shape[1]))
  if value.shape != tuple(init.shape):
    return value, f'shape mismatch: {path}: checkpoint {value.shape} vs model {tuple(init.shape)}'
  return np.asarray(value).astype(init.dtype, copy=False), None


def _split_file(path: readers.PathLike) -> tuple[dict[str, np.ndarray], list[str]]:
  """(params by path, problems) of a native export; other collections are problems."""
  variables = native.load_native(path)
  problems = [f'unexpected: collection {name!r} (a ViT has only params)'
              for name in sorted(variables) if name != 'params']
  return param_paths.flatten(variables.get('params', {})), problems


def import_mim_encoder(path: readers.PathLike, *, target_params: Mapping[str, Any],
                       dont_load: Sequence[str] = ()) -> tuple[dict[str, Any], MimImportReport]:
  """Loads the encoder of a MIM export into `target_params` (a classification ViT's).

  Args:
    path: the export (`.npz` of `fm_adapt.weights.native`).
    target_params: the ViT's initialised parameters (the head and dont_load paths keep them).
    dont_load: regexes of target paths that keep their initialisation (each must match one).

  Returns:
    (params shaped as target_params, the report).

  Raises:
    ValueError: a file that is no MIM export (naming the loader to use instead), or a dont_load
      regex that matches no parameter.
    vit_import.CheckpointMismatchError: a missing encoder parameter, an unexpected key or a
      shape difference (all of them, by path).
  """
  loaded, problems = _split_file(path)
  if not is_mim_export([native.MARKER] + [f'params/{p}' for p in loaded]):
    raise ValueError(f'{path} has no mask token or pixel decoder: it is not a MIM export. Load '
                     "it with config.model_load.name='fm_adapt'.")
  target = param_paths.flatten(dict(target_params))
  param_paths.check_patterns_match(list(dont_load), sorted(target),
                                   what='config.model_load.dont_load regex')
  skip = lambda p: any(re.fullmatch(rx, p) for rx in dont_load)
  report = MimImportReport(path=str(path), layout=LAYOUT)
  out = {}
  for p, init in target.items():
    if skip(p):
      out[p] = init
      report.kept_init.append(p)
      report.dropped += [p] if p in loaded else []
    elif p in loaded:
      out[p], problem = _fit(p, loaded[p], init)
      problems += [problem] if problem else []
      report.loaded[p] = f'params/{p}'
    elif HEAD.fullmatch(p):
      out[p] = init
      report.missing.append(p)
    else:
      problems.append(f'missing: {p} {tuple(init.shape)} is not in the checkpoint')
  for p in sorted(set(loaded) - set(target)):
    why = pretraining_only(p)
    if why:
      report.ignored[f'params/{p}'] = why
    else:
      problems.append(f'unexpected: params/{p} {loaded[p].shape} (not in the model)')
  if problems:
    raise vit_import.CheckpointMismatchError(
        f'{path} (MIM export) does not fit the ViT ({len(problems)} problem(s)); build the ViT '
        'with the configuration of the pretrained encoder:\n  ' + '\n  '.join(problems))
  return param_paths.unflatten(out), report


def load_mim_encoder(path: readers.PathLike, *, target_params: Mapping[str, Any],
                     dont_load: Sequence[str] = ()) -> dict[str, Any]:
  """`import_mim_encoder` that prints the report and returns the parameters (a LOADERS entry)."""
  params, report = import_mim_encoder(path, target_params=target_params, dont_load=dont_load)
  writer.console(report.summary())
  return params
