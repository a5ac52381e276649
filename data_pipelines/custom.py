"""TFDS builders for the user's own data: a MedMNIST-layout `.npz`, or a folder per class.

Bring-your-own data without writing a builder:

* `npz_config(path, ...)` + `CustomNpz`: any `.npz` holding `train_images`, `train_labels` and
  optionally `val_*` / `test_*` (the MedMNIST layout). Images are uint8, one of (N, H, W) grey,
  (N, H, W, C) with C in {1, 3}, (N, D, H, W) volume (a 4-dim array whose last axis is not 1 or 3)
  or (N, D, H, W, C). Labels: (N,) or (N, 1) class indices for 'multiclass' / 'ordinal',
  (N, L) zeros and ones for 'multilabel'.
* `image_folder_config(root, ...)` + `ImageFolder`: `<root>/<split>/<class>/*.png|jpg` (splits
  among train / val / test), or `<root>/<class>/*` split by the caller's fractions with a seed
  (stratified by class). Images are decoded with PIL, converted to grey ('L') or RGB and resized
  (bilinear, aspect ratio not kept) to `image_size` (`images.load_image`).
  Images deeper than 8 bits (16-bit PNG / TIFF X-ray and CT exports, 32-bit int or float TIFF)
  are never clipped: the option `high_bit_depth` says how they are stored as uint8:
  'error' (default: refused, naming the file and the option), 'per_image' (each image's
  [min, max] onto 0..255), 'per_dataset' (the dataset's [min, max] onto 0..255, recorded in the
  metadata as `intensity_range`) or 'full_range' (16-bit only: x // 256). See `images`.
  A file that is not a whole image, has an unsupported mode or cannot be read is an error that
  names it.

Examples: {'image': uint8 (H, W, C) or (D, H, W, C), 'label': int64 scalar, or int64 (L,) for
'multilabel'}, in file order. Every source is checked (keys, shapes, dtypes, labels) before
anything is written. The config name is the file or folder name plus a short hash of the content
and the options, so two different sources never share a build directory.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pathlib
import re
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import images as images_lib
from data_pipelines import npz
from data_pipelines import tfds_base

TASKS = ('multiclass', 'multilabel', 'ordinal')
IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')
DEFAULT_FRACTIONS = {'train': 0.8, 'val': 0.1, 'test': 0.1}
USER_LICENSE = 'user data: see its source'


def _config_name(stem: str, fingerprint: object) -> str:
  """`<sanitized stem>_<10 hex of md5(fingerprint)>`."""
  clean = re.sub(r'[^a-z0-9_]+', '_', stem.lower()).strip('_') or 'data'
  digest = hashlib.md5(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()
  return f'{clean}_{digest[:10]}'


def _example_shape(raw: tuple[int, ...], path: os.PathLike | str) -> tuple[int, ...]:
  """Shape of one stored example (channel last) from one row of an images array."""
  if len(raw) == 2:
    return (*raw, 1)
  if len(raw) == 3:
    return raw if raw[-1] in (1, 3) else (*raw, 1)
  if len(raw) == 4 and raw[-1] in (1, 3):
    return raw
  raise ValueError(f'{path}: images of shape (N, {", ".join(map(str, raw))}) are not supported; '
                   'expected (N, H, W), (N, H, W, 1|3), (N, D, H, W) or (N, D, H, W, 1|3).')


def _label_info(labels: Mapping[str, np.ndarray], task: str, num_classes: int | None,
                class_names: Sequence[str] | None, path) -> tuple[int, tuple[str, ...]]:
  """Checks labels against the task; returns (num_classes, class_names)."""
  for split, y in labels.items():
    if y.dtype.kind not in 'iub':
      raise ValueError(f'{path}: {split}_labels has dtype {y.dtype}; expected integers.')
  if task == 'multilabel':
    widths = {y.shape[1] if y.ndim == 2 else None for y in labels.values()}
    if len(widths) != 1 or None in widths:
      raise ValueError(f'{path}: multilabel labels must be (N, L) with the same L in every split; '
                       f'got {[y.shape for y in labels.values()]}.')
    if any(((y != 0) & (y != 1)).any() for y in labels.values()):
      raise ValueError(f'{path}: multilabel labels must be 0 or 1.')
    found = widths.pop()
  else:
    if any(y.ndim > 2 or (y.ndim == 2 and y.shape[1] != 1) for y in labels.values()):
      raise ValueError(f'{path}: {task} labels must be (N,) or (N, 1) class indices; got '
                       f'{[y.shape for y in labels.values()]} (use task="multilabel" for (N, L)).')
    if any((y < 0).any() for y in labels.values() if y.size):
      raise ValueError(f'{path}: labels must be >= 0.')
    found = 1 + max(int(y.max()) for y in labels.values() if y.size)
  n = num_classes or (len(class_names) if class_names else found)
  if found > n or (task == 'multilabel' and found != n):
    raise ValueError(f'{path}: labels need {found} classes but {n} were given.')
  if class_names is not None and len(class_names) != n:
    raise ValueError(f'{path}: {len(class_names)} class_names given for {n} classes.')
  return n, tuple(class_names) if class_names else tuple(str(i) for i in range(n))


@dataclasses.dataclass(eq=False)
class NpzConfig(tfds.core.BuilderConfig):
  """A checked MedMNIST-layout archive and how to read its labels. Make it with `npz_config`."""
  path: str = ''
  md5: str = ''
  task: str = 'multiclass'
  num_classes: int = 0
  class_names: tuple[str, ...] = ()
  image_shape: tuple[int, ...] = ()
  splits: tuple[str, ...] = ()


def npz_config(path: os.PathLike | str, task: str = 'multiclass',
               class_names: Sequence[str] | None = None,
               num_classes: int | None = None) -> NpzConfig:
  """Checks an archive and returns the config to build it with `CustomNpz`.

  Args:
    path: the `.npz` (read with `allow_pickle=False`).
    task: 'multiclass' (default), 'ordinal' (integer grades) or 'multilabel'.
    class_names: names of the classes (labels); default '0', '1', ...
    num_classes: default: len(class_names), else inferred (1 + the largest label; the label width
      for 'multilabel').

  Raises:
    FileNotFoundError: if the file does not exist.
    ValueError: naming the expected layout, if keys, shapes, dtypes or labels do not fit.
  """
  path = pathlib.Path(path).absolute()
  if task not in TASKS:
    raise ValueError(f'Unknown task {task!r}; valid tasks: {list(TASKS)}.')
  if not path.is_file():
    raise FileNotFoundError(f'No .npz file at {path}.')
  headers = npz.read_headers(path)
  splits = npz.layout_splits(path, headers, required=('train',))
  raw_shapes = {headers[f'{s}_images'].shape[1:] for s in splits}
  if len(raw_shapes) != 1:
    raise ValueError(f'{path}: images differ in shape across splits: {sorted(raw_shapes)}.')
  for split in splits:
    images, labels = headers[f'{split}_images'], headers[f'{split}_labels']
    if images.dtype != np.uint8:
      raise ValueError(f'{path}: {split}_images is {images.dtype}; expected uint8 (0..255). '
                       'Convert with np.clip(x, 0, 255).astype(np.uint8) after scaling.')
    if labels.shape[:1] != images.shape[:1]:
      raise ValueError(f'{path}: {split}_images has {images.shape[0]} examples but '
                       f'{split}_labels has {labels.shape[0] if labels.shape else 0}.')
  image_shape = _example_shape(raw_shapes.pop(), path)
  labels = {s: npz.load_array(path, f'{s}_labels') for s in splits}
  n, names = _label_info(labels, task, num_classes, class_names, path)
  md5 = npz.md5sum(path)
  name = _config_name(path.stem, [md5, task, n, names])
  return NpzConfig(name=name, path=os.fspath(path), md5=md5, task=task, num_classes=n,
                   class_names=names, image_shape=image_shape, splits=splits,
                   description=f'{path.name} (md5 {md5}), {task}, {n} classes.')


def _features(image_shape: Sequence[int], label_shape: tuple[int, ...]):
  return tfds.features.FeaturesDict({
      'image': tfds.features.Tensor(shape=tuple(image_shape), dtype=np.uint8,
                                    encoding=tfds.features.Encoding.BYTES),
      'label': tfds.features.Tensor(shape=label_shape, dtype=np.int64),
  })


class CustomNpz(tfds_base.Builder, skip_registration=True):
  """A MedMNIST-layout `.npz` of the user's; pass `config=npz_config(path, ...)`."""

  name = 'custom_npz'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First version.'}

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    label_shape = (cfg.num_classes,) if cfg.task == 'multilabel' else ()
    metadata = tfds.core.MetadataDict(
        task=cfg.task, class_names=list(cfg.class_names), source=cfg.path, md5=cfg.md5,
        license=USER_LICENSE, official=False)
    return tfds_base.DatasetInfo(
        builder=self, description=cfg.description, features=_features(cfg.image_shape, label_shape),
        supervised_keys=('image', 'label'), license=USER_LICENSE, metadata=metadata,
        disable_shuffling=True)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Local file, checked by `npz_config`.
    return {split: self._generate_examples(split) for split in self.builder_config.splits}

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
    cfg = self.builder_config
    if npz.md5sum(cfg.path) != cfg.md5:
      raise ValueError(f'{cfg.path} changed since it was checked; make a new npz_config.')
    labels = npz.load_array(cfg.path, f'{split}_labels').astype(np.int64)
    if cfg.task != 'multilabel':
      labels = labels.reshape(-1)
    for i, image in enumerate(npz.iter_rows(cfg.path, f'{split}_images')):
      yield i, {'image': image.reshape(cfg.image_shape), 'label': labels[i]}


@dataclasses.dataclass(eq=False)
class ImageFolderConfig(tfds.core.BuilderConfig):
  """A scanned image folder and its split plan. Make it with `image_folder_config`."""
  root: str = ''
  image_size: tuple[int, int] = (64, 64)
  channels: int = 3
  high_bit_depth: str = 'error'
  class_names: tuple[str, ...] = ()
  files: dict[str, tuple[tuple[str, int], ...]] = dataclasses.field(default_factory=dict,
                                                                     repr=False)


def _image_files(folder: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in folder.iterdir()
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _subdirs(folder: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith('.'))


def _scan_classes(folder: pathlib.Path) -> dict[str, list[pathlib.Path]]:
  """{class name: image files} of a folder with one sub-folder per class."""
  return {d.name: _image_files(d) for d in _subdirs(folder)}


def _split_stratified(per_class: Mapping[int, list[pathlib.Path]],
                      fractions: Mapping[str, float], seed: int):
  """Splits each class's files by `fractions` after a seeded shuffle."""
  rng = np.random.default_rng(seed)
  names = list(fractions)
  cuts = np.cumsum([fractions[s] for s in names])
  plan = {s: [] for s in names}
  for label, files in sorted(per_class.items()):
    order = rng.permutation(len(files))
    bounds = [0, *np.round(cuts * len(files)).astype(int)]
    bounds[-1] = len(files)
    for s, lo, hi in zip(names, bounds[:-1], bounds[1:]):
      plan[s].extend((files[i], label) for i in sorted(order[lo:hi]))
  return plan


def _check_fractions(fractions: Mapping[str, float]) -> dict[str, float]:
  if not fractions or set(fractions) - set(npz.SPLITS) or 'train' not in fractions:
    raise ValueError(f'split_fractions must map "train" and optionally "val", "test" to '
                     f'fractions; got {dict(fractions or {})}.')
  if any(f < 0 for f in fractions.values()) or abs(sum(fractions.values()) - 1) > 1e-6:
    raise ValueError(f'split_fractions must be >= 0 and sum to 1; got {dict(fractions)}.')
  return {s: float(fractions[s]) for s in npz.SPLITS if s in fractions}


def _plan(root: pathlib.Path, fractions: Mapping[str, float] | None, seed: int):
  """Returns (class_names, {split: [(file, label)]}) for an image folder."""
  top = _subdirs(root)
  split_dirs = [d for d in top if d.name in npz.SPLITS]
  if split_dirs and len(split_dirs) != len(top):
    raise ValueError(f'{root} mixes split folders {[d.name for d in split_dirs]} with other '
                     f'folders; expected <root>/<train|val|test>/<class>/ or <root>/<class>/.')
  if split_dirs:
    if fractions is not None:
      raise ValueError(f'{root} already has split folders; do not pass split_fractions.')
    scanned = {d.name: _scan_classes(d) for d in split_dirs}
  else:
    scanned = {None: _scan_classes(root)}
  class_names = sorted({c for per_split in scanned.values() for c in per_split})
  if not class_names:
    raise ValueError(f'{root} has no class folders; expected <root>/[<split>/]<class>/*.png|jpg.')
  index = {c: i for i, c in enumerate(class_names)}
  per_split = {s: {index[c]: files for c, files in per_class.items()}
               for s, per_class in scanned.items()}
  for c in class_names:
    if not any(per_split[s].get(index[c]) for s in per_split):
      raise ValueError(f'Class folder {c!r} of {root} holds no {"/".join(IMAGE_SUFFIXES)} files.')
  if None in per_split:
    return class_names, _split_stratified(per_split[None], _check_fractions(
        fractions or DEFAULT_FRACTIONS), seed)
  return class_names, {s: [(f, label) for label, files in sorted(per_split[s].items())
                           for f in files] for s in per_split}


def image_folder_config(root: os.PathLike | str, image_size: int | Sequence[int],
                        channels: int = 3, split_fractions: Mapping[str, float] | None = None,
                        seed: int = 0, high_bit_depth: str = 'error') -> ImageFolderConfig:
  """Scans a class-per-folder image tree and returns the config to build it with `ImageFolder`.

  Args:
    root: `<root>/<split>/<class>/*` (split among train, val, test) or `<root>/<class>/*`.
    image_size: output size, an int or (height, width).
    channels: 1 (grey, PIL mode 'L') or 3 (RGB).
    split_fractions: for a folder without split level, e.g. {'train': .8, 'val': .1, 'test': .1}
      (the default); each class is split by these fractions after a shuffle seeded by `seed`.
    seed: seed of that shuffle.
    high_bit_depth: how images deeper than 8 bits are stored as uint8: 'error' (refuse them),
      'per_image', 'per_dataset' or 'full_range' (module docstring of `images`).

  Raises:
    FileNotFoundError: if `root` is not a directory.
    ValueError: on a layout or argument that does not fit (the message says what is expected).
  """
  root = pathlib.Path(root).absolute()
  if not root.is_dir():
    raise FileNotFoundError(f'No image folder at {root}.')
  size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
  if len(size) != 2 or not all(isinstance(s, int) and s > 0 for s in size):
    raise ValueError(f'image_size must be a positive int or (height, width); got {image_size!r}.')
  if channels not in (1, 3):
    raise ValueError(f'channels must be 1 (grey) or 3 (RGB); got {channels!r}.')
  images_lib.check_high_bit_depth(high_bit_depth)
  class_names, plan = _plan(root, split_fractions, seed)
  files = {s: tuple((f.relative_to(root).as_posix(), label) for f, label in items)
           for s, items in plan.items()}
  listing = {s: [(f, label, (root / f).stat().st_size) for f, label in items]
             for s, items in files.items()}
  name = _config_name(root.name, [listing, size, channels, high_bit_depth])
  counts = {s: len(v) for s, v in files.items()}
  return ImageFolderConfig(
      name=name, root=os.fspath(root), image_size=size, channels=channels,
      high_bit_depth=high_bit_depth, class_names=tuple(class_names), files=files,
      description=f'Image folder {root.name}: {len(class_names)} classes, {counts}, '
                  f'resized to {size[0]}x{size[1]}x{channels}, images deeper than 8 bits: '
                  f'{high_bit_depth}.')


class ImageFolder(tfds_base.Builder, skip_registration=True):
  """A class-per-folder image tree; pass `config=image_folder_config(root, ...)`."""

  name = 'image_folder'
  VERSION = tfds.core.Version('1.1.0')
  RELEASE_NOTES = {'1.0.0': 'First version.',
                   '1.1.0': 'Images deeper than 8 bits are rescaled by `high_bit_depth` or '
                            'refused; 1.0.0 clipped them at 255.'}

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    metadata = tfds.core.MetadataDict(
        task='multiclass', class_names=list(cfg.class_names), source=cfg.root,
        image_size=list(cfg.image_size), high_bit_depth=cfg.high_bit_depth,
        intensity_range=None, license=USER_LICENSE, official=False)
    return tfds_base.DatasetInfo(
        builder=self, description=cfg.description,
        features=_features((*cfg.image_size, cfg.channels), ()),
        supervised_keys=('image', 'label'), license=USER_LICENSE, metadata=metadata,
        disable_shuffling=True)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # Local files.
    cfg = self.builder_config
    value_range = None
    if cfg.high_bit_depth == 'per_dataset':  # One pass over every split before writing.
      value_range = images_lib.value_range(pathlib.Path(cfg.root) / relpath
                                           for files in cfg.files.values() for relpath, _ in files)
      self.info.metadata['intensity_range'] = None if value_range is None else list(value_range)
    return {split: self._generate_examples(split, value_range) for split in cfg.files}

  def _generate_examples(self, split: str, value_range: tuple[float, float] | None
                         ) -> Iterator[tuple[int, dict]]:
    cfg = self.builder_config
    for i, (relpath, label) in enumerate(cfg.files[split]):
      image = images_lib.load_image(pathlib.Path(cfg.root) / relpath, cfg.image_size,
                                    cfg.channels, cfg.high_bit_depth, value_range)
      yield i, {'image': image, 'label': np.int64(label)}
