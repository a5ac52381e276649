"""Datasets by config: `get_dataset(data_cfg, split) -> (source, spec)`.

`data_cfg` forms (`name` picks the kind in `DATASETS`; unknown names or keys fail at once with the
valid ones):
  dict(name='medmnist', flag='pneumoniamnist', size=28)         official file, md5-checked;
      optional: allow_download=True, mirror=None (base URL replacing the official record).
  dict(name='npz', path='medmnist_derived/x.npz', task='multiclass', class_names=None)
      your own MedMNIST-layout archive; optional num_classes. task: multiclass|multilabel|ordinal.
  dict(name='image_folder', path='my_images', image_size=64)    <path>/[<split>/]<class>/*.png
      optional: channels=3, split_fractions=None ({'train': .8, 'val': .1, 'test': .1}), seed=0,
      high_bit_depth='error': how images deeper than 8 bits (16-bit PNG / TIFF) become uint8:
      'error' (refused, naming the file), 'per_image', 'per_dataset' or 'full_range' (16-bit
      x // 256); never clipped (data_pipelines.images).
  dict(name='pretrain_mixture', image_size=28, channels=1)      unlabelled pretraining data: the
      training images of every source held, weighted (data_pipelines.pretrain_mixture); 'train'
      only (pretraining has no held-out split); label 0. optional: sources=None (a mixture spec;
      None: `pretrain_mixture.default_mixture`), seed=0, epoch_size=None.
Every TFDS form takes `tfds_dir` (where the TFDS dataset is built) and may carry `split` (a config
convenience; the `split` argument of `get_dataset` is what is loaded). Relative `path`s are
relative to the data directory (`data_dir.resolve_data_dir`); absolute ones are used as given.

The returned source is a random-access sequence (grain-ready) of
  {'image': uint8 (H, W, C) -- grey as (H, W, 1); (D, H, W, C) for volumes,
   'label': int (multiclass, ordinal) or int64 (L,) vector of 0/1 (multilabel)}.

Where the TFDS dataset is built (first use only; later uses read it):
  1. `data_cfg['tfds_dir']` when given;
  2. else `<data_dir>/tfds` when the dataset is already built there or that place is writable;
  3. else `<cache_root>/tfds` (`$XDG_CACHE_HOME/fm_adapt/tfds` or `~/.cache/fm_adapt/tfds`), e.g.
     for a read-only shared data directory. The choice is logged.
A directory whose mode has no write bit counts as read-only even for root.

In a multi-process job (`jax.distributed`), process 0 builds the dataset while the others wait
(`coordination.prepare_once`, up to $FM_ADAPT_DATA_PREPARE_TIMEOUT_S, default 3600 s); they then
read the copy process 0 built, so the TFDS directory must be shared by every host, or the
dataset built on every host before the run (a process that does not find it says so).
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from data_pipelines import coordination
from data_pipelines import custom
from data_pipelines import data_dir as data_dir_lib
from data_pipelines import medmnist
from data_pipelines import pretrain_mixture
from data_pipelines import tfds_base

TASKS = ('multiclass', 'multilabel', 'ordinal')
_MEDMNIST_TASKS = {
    'multi-class': 'multiclass',
    'binary-class': 'multiclass',
    medmnist.MULTI_LABEL_TASK: 'multilabel',
    'ordinal-regression': 'ordinal',
}


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What training and reports need to know about a dataset.

  Attributes:
    name: e.g. 'medmnist/pneumoniamnist_28' or 'npz/pneumoniamnist_subset_b_<hash>'.
    task: 'multiclass', 'multilabel' or 'ordinal' (ordinal is trained as multiclass).
    num_classes: classes (multiclass, ordinal) or labels (multilabel).
    class_names: one name per class or label.
    split_sizes: examples per split, e.g. {'train': 4708, 'val': 524, 'test': 624}.
    image_shape: shape of one image, (H, W, C) or (D, H, W, C).
    license: license of the data.
    variant: the data variant to record beside every result (source, size, md5).
    official: True only for md5-verified official benchmark files.
  """
  name: str
  task: str
  num_classes: int
  class_names: tuple[str, ...]
  split_sizes: Mapping[str, int]
  image_shape: tuple[int, ...]
  license: str
  variant: str
  official: bool = False


class ExampleSource(Sequence):
  """Random access to {'image', 'label'} examples of one split of a built TFDS dataset."""

  def __init__(self, tfds_source: Sequence[dict], name: str, split: str, multilabel: bool):
    self._source = tfds_source
    self._name = name
    self._split = split
    self._multilabel = multilabel

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    example = self._source[index]
    label = example['label']
    return {'image': np.asarray(example['image'], dtype=np.uint8),
            'label': np.asarray(label, np.int64) if self._multilabel else int(label)}

  def __repr__(self) -> str:
    # Stable across runs: grain checks it when an iterator state is restored.
    return f'ExampleSource(name={self._name!r}, split={self._split!r}, len={len(self)})'


@dataclasses.dataclass(frozen=True)
class _Kind:
  """A data_cfg kind: its required and optional keys and how to make its builder."""
  required: tuple[str, ...]
  optional: Mapping[str, Any]
  make: Callable[[dict, pathlib.Path | None], Callable[[pathlib.Path], tfds.core.DatasetBuilder]]
  needs_data_dir: Callable[[dict], bool]
  # Kinds that are no TFDS dataset: (cfg, split, data_dir) -> (source, spec); `make` unused.
  get: Callable[[dict, str, pathlib.Path | None], tuple[Sequence[dict], DatasetSpec]] | None = None


def _resolve_path(value: str | os.PathLike, data_dir: pathlib.Path | None) -> pathlib.Path:
  path = pathlib.Path(value).expanduser()
  return path if path.is_absolute() else data_dir / path


def _make_medmnist(cfg: dict, data_dir: pathlib.Path | None):
  config = f'{cfg["flag"]}_{cfg["size"]}'
  medmnist.check_flag_size(cfg['flag'], cfg['size'])
  return lambda tfds_dir: medmnist.MedMNIST(
      config=config, data_dir=tfds_dir, source_dir=data_dir, base_url=cfg['mirror'],
      allow_download=cfg['allow_download'])


def _make_npz(cfg: dict, data_dir: pathlib.Path | None):
  config = custom.npz_config(_resolve_path(cfg['path'], data_dir), task=cfg['task'],
                             class_names=cfg['class_names'], num_classes=cfg['num_classes'])
  return lambda tfds_dir: custom.CustomNpz(config=config, data_dir=tfds_dir)


def _make_image_folder(cfg: dict, data_dir: pathlib.Path | None):
  config = custom.image_folder_config(
      _resolve_path(cfg['path'], data_dir), image_size=cfg['image_size'],
      channels=cfg['channels'], split_fractions=cfg['split_fractions'], seed=cfg['seed'],
      high_bit_depth=cfg['high_bit_depth'])
  return lambda tfds_dir: custom.ImageFolder(config=config, data_dir=tfds_dir)


def _relative_path(cfg: dict) -> bool:
  return not pathlib.Path(cfg['path']).expanduser().is_absolute()


def _get_pretrain_mixture(cfg: dict, split: str, data_dir: pathlib.Path | None):
  """The mixture and its spec: one class ('unlabelled'), every label 0."""
  if split != 'train':
    raise ValueError(f"The 'pretrain_mixture' data has only a 'train' split (training images of "
                     f"every source, unlabelled); pretraining has no held-out split, so split "
                     f"{split!r} does not exist. Evaluate on a dataset itself (e.g. "
                     f"dict(name='medmnist', flag=...)).")
  mixture = pretrain_mixture.build(cfg['sources'], data_dir, image_size=cfg['image_size'],
                                   channels=cfg['channels'], seed=cfg['seed'],
                                   epoch_size=cfg['epoch_size'])
  spec = DatasetSpec(
      name=f'pretrain_mixture/{mixture.fingerprint()}', task='multiclass', num_classes=1,
      class_names=('unlabelled',), split_sizes={'train': len(mixture)},
      image_shape=(cfg['image_size'], cfg['image_size'], cfg['channels']),
      license=mixture.license(), variant=mixture.variant())
  return mixture, spec


_COMMON = {'tfds_dir': None, 'split': None}
DATASETS: dict[str, _Kind] = {
    'medmnist': _Kind(('flag',), {'size': 28, 'allow_download': True, 'mirror': None, **_COMMON},
                      _make_medmnist, lambda cfg: True),
    'npz': _Kind(('path',), {'task': 'multiclass', 'class_names': None, 'num_classes': None,
                             **_COMMON}, _make_npz, _relative_path),
    'image_folder': _Kind(('path', 'image_size'), {'channels': 3, 'split_fractions': None,
                                                   'seed': 0, 'high_bit_depth': 'error',
                                                   **_COMMON},
                          _make_image_folder, _relative_path),
    'pretrain_mixture': _Kind(('image_size', 'channels'), {'sources': None, 'seed': 0,
                                                          'epoch_size': None, 'split': None},
                              None, lambda cfg: True, get=_get_pretrain_mixture),
}


def _checked_cfg(data_cfg: Mapping[str, Any]) -> tuple[_Kind, dict]:
  """Validates kind and keys; returns the kind and the config with defaults filled in."""
  cfg = dict(data_cfg)
  name = cfg.pop('name', None)
  if name not in DATASETS:
    raise ValueError(f'Unknown dataset name {name!r} in data_cfg; valid names: {sorted(DATASETS)}.')
  kind = DATASETS[name]
  valid = [*kind.required, *kind.optional]
  unknown = sorted(set(cfg) - set(valid))
  missing = [k for k in kind.required if k not in cfg]
  if unknown or missing:
    raise ValueError(f'data_cfg for {name!r}: unknown keys {unknown}, missing keys {missing}; '
                     f'valid keys: name, {", ".join(valid)} '
                     f'(required: {", ".join(kind.required)}).')
  return kind, {**kind.optional, **cfg, 'name': name}


def _data_dir(kind: _Kind, cfg: dict, given: pathlib.Path | str | None) -> pathlib.Path | None:
  """The data directory, or None when the config needs none and none is set."""
  create = cfg['name'] == 'medmnist' and cfg['allow_download']
  try:
    return data_dir_lib.resolve_data_dir(given, create_cache=create)
  except FileNotFoundError:
    if kind.needs_data_dir(cfg) or given:
      raise
    return None


_ANNOUNCED: set[str] = set()


def _builder(make_builder, cfg: dict, data_dir: pathlib.Path | None) -> tfds.core.DatasetBuilder:
  """Makes the builder in the TFDS directory chosen as the module docstring says, and logs it."""
  if cfg['tfds_dir']:
    tfds_dir = pathlib.Path(cfg['tfds_dir']).expanduser().absolute()
    builder, why = make_builder(tfds_dir), "data_cfg['tfds_dir']"
  else:
    why = 'no data directory'
    # Only look into <data_dir>/tfds when it exists or can be made (TFDS warns otherwise).
    if data_dir is not None and ((data_dir / 'tfds').is_dir() or data_dir_lib.is_writable(
        data_dir / 'tfds')):
      builder = make_builder(data_dir / 'tfds')
      if builder.is_prepared() or data_dir_lib.is_writable(data_dir / 'tfds'):
        logging.info('TFDS dataset %s/%s at %s (in the data directory).', builder.name,
                     builder.builder_config.name, builder.data_dir)
        return builder
      why = f'the data directory {data_dir} is read-only'
    tfds_dir = data_dir_lib.cache_root() / 'tfds'
    builder = make_builder(tfds_dir)
  if not builder.is_prepared() and not data_dir_lib.is_writable(tfds_dir):
    raise PermissionError(f'Cannot build the TFDS dataset in read-only {tfds_dir} ({why}); set '
                          f"data_cfg['tfds_dir'] to a writable directory.")
  # A fallback deserves attention, once per dataset and process.
  first = builder.data_dir not in _ANNOUNCED
  _ANNOUNCED.add(builder.data_dir)
  level = logging.WARNING if first and not cfg['tfds_dir'] else logging.INFO
  logging.log(level, 'TFDS dataset %s/%s at %s (%s).', builder.name, builder.builder_config.name,
              builder.data_dir, why)
  return builder


def _prepared(builder: tfds.core.DatasetBuilder, make_builder, data_cfg: Mapping[str, Any],
              root: pathlib.Path | None) -> tfds.core.DatasetBuilder:
  """`builder`'s dataset, built once per job (by process 0) and found by this process.

  Raises:
    FileNotFoundError: when process 0 built the dataset but this process does not find it
      (no shared filesystem), saying how to build it on every host.
  """
  was_prepared = builder.is_prepared()
  name = f'{builder.name}/{builder.builder_config.name}/{builder.version}'
  # Every process takes part, also where the dataset is there: process 0 always posts.
  built_at = coordination.prepare_once(lambda: tfds_base.prepare(builder), name,
                                       builder.data_dir)
  if was_prepared:
    return builder
  # A builder made before its dataset existed has no splits: read what was built.
  builder = make_builder(pathlib.Path(builder.data_dir).parents[2])
  if not builder.is_prepared():
    command = (f'python -c "from data_pipelines import datasets; datasets.get_dataset('
               f'{dict(data_cfg)!r}, \'train\', {str(root) if root else None!r})"')
    raise FileNotFoundError(
        f'Process 0 built the dataset {name} in {built_at}, but process {jax.process_index()} '
        f'does not find it in {builder.data_dir}: the TFDS directory must be one filesystem '
        f'shared by every host (set data_cfg[\'tfds_dir\'] to a shared directory), or the '
        f'dataset built on every host before the run (run `{command}` once on each host, or '
        f'copy {built_at} to {builder.data_dir} there).')
  return builder


def _check_split(split: str, builder: tfds.core.DatasetBuilder) -> None:
  available = list(builder.info.splits)
  for part in split.split('+'):
    base = re.sub(r'\[.*\]$', '', part.strip())
    if base not in available:
      raise ValueError(f'Unknown split {split!r} for {builder.name}/{builder.builder_config.name}; '
                       f'available splits: {available} (TFDS slices like "train[:10%]" work).')


def _spec(builder: tfds.core.DatasetBuilder, cfg: dict) -> DatasetSpec:
  info, meta, bcfg = builder.info, builder.info.metadata, builder.builder_config
  class_names = tuple(meta['class_names'])
  if cfg['name'] == 'medmnist':
    task = _MEDMNIST_TASKS[meta['task']]
    variant = (f'official MedMNIST v2 {bcfg.flag} at {bcfg.size} px '
               f'({medmnist.filename(bcfg.flag, bcfg.size)}, md5 {meta["md5"]})')
  elif cfg['name'] == 'npz':
    task = meta['task']
    variant = f'custom npz {pathlib.Path(bcfg.path).name} (md5 {bcfg.md5}), not an official file'
  else:
    task = meta['task']
    h, w = bcfg.image_size
    variant = f'image folder {bcfg.root} resized to {h}x{w}x{bcfg.channels}'
    if bcfg.high_bit_depth != 'error':
      variant += f', deeper than 8 bits rescaled {bcfg.high_bit_depth}'
      if meta.get('intensity_range'):
        variant += ' over [{:g}, {:g}]'.format(*meta['intensity_range'])
  return DatasetSpec(
      name=f'{builder.name}/{bcfg.name}', task=task, num_classes=len(class_names),
      class_names=class_names,
      split_sizes={name: s.num_examples for name, s in info.splits.items()},
      image_shape=tuple(info.features['image'].shape), license=meta['license'], variant=variant,
      official=bool(meta.get('official', False)))


def get_dataset(data_cfg: Mapping[str, Any], split: str,
                data_dir: pathlib.Path | str | None = None) -> tuple[Sequence[dict], DatasetSpec]:
  """Returns a random-access source of one split and the dataset's spec, building it if needed.

  Args:
    data_cfg: one of the forms of the module docstring.
    split: 'train', 'val' or 'test' (TFDS slicing such as 'train[:100]' works too).
    data_dir: the data directory (e.g. a --data_dir flag); default `$FM_ADAPT_DATA_DIR`, then the
      per-user cache (see `data_dir.resolve_data_dir`).

  Raises:
    ValueError: for an unknown kind, unknown or missing keys, a bad file or an unknown split.
    FileNotFoundError: when the data directory or a source is missing, or (several processes)
      when process 0 built the dataset where this process cannot see it.
    coordination.PrepareTimeoutError, coordination.PrepareFailedError: (several processes) when
      process 0 did not build the dataset in time, or failed to.
  """
  kind, cfg = _checked_cfg(data_cfg)
  root = _data_dir(kind, cfg, data_dir)
  if kind.get is not None:
    return kind.get(cfg, split, root)
  make_builder = kind.make(cfg, root)
  builder = _prepared(_builder(make_builder, cfg, root), make_builder, data_cfg, root)
  _check_split(split, builder)
  spec = _spec(builder, cfg)
  source = ExampleSource(builder.as_data_source(split), spec.name, split,
                         multilabel=spec.task == 'multilabel')
  return source, spec
