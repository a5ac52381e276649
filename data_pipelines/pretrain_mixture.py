"""Pretraining data: a weighted mixture of the TRAINING images of every dataset held, unlabelled.

A mixture spec is a list of sources, each a dict with a `source` name and a `weight` (> 0,
default 1.0; only the ratios matter) and the source's options (defaults as below):

  [dict(source='medmnist', flag='pneumoniamnist', size=28, weight=68.6),
   dict(source='medmnist', flag='adrenalmnist3d', size=28, weight=34.5, min_foreground=0.01),
   dict(source='drive', weight=4.5, crops_per_image=10, crop_scale=(0.25, 1.0), short_side=256),
   dict(source='chase_db1', weight=4.5), dict(source='kvasir_seg', weight=29.7)]

Sources and what is pooled from each (never a validation or test image):
  medmnist    the `train_images` of the official file `<data_dir>/medmnist/<flag>[_<size>].npz`,
              md5- and layout-checked (`medmnist.ensure_source`; no download). 3D flags give
              axial slices: slice k of a volume is `volume[k]` along its first axis (D of the
              project's (D, H, W) layout; MedMNIST does not document the orientation), kept when
              more than `min_foreground` (default 0.01; 0: any) of its pixels are nonzero. On
              AdrenalMNIST3D (binary shape masks) 1 % keeps 9,932 of 33,264 slices at 28 px and
              23,427 of 76,032 at 64 px; empty slices are never kept.
              Held out: the file's val and test arrays (every slice of their volumes).
  drive       DRIVE `retina_vessels/DRIVE/training/images/*.tif` (20); held out: `testing/`.
  chase_db1   CHASE_DB1 `retina_vessels/CHASEDB1/Image_NN{L,R}.jpg`, NN 01-10 (the common
              split: first 20 images, children 1-10); held out: NN 11-14 (the last 8).
  kvasir_seg  Kvasir-SEG `kvasir_seg/Kvasir-SEG/images/*.jpg`, which has no official split: the
              ids sorted, permuted by `np.random.default_rng(0)`, the first 880
              pooled, the last 120 held out (`image_splits.kvasir_split`; no other module
              defined one).
Besides the split, every pooled item is hashed (sha256 of its shape and bytes; of the file bytes
for image files) and dropped when it equals any held-out item of any source in the mixture: the
official PneumoniaMNIST train array holds 10 images (8 distinct) byte-identical to val images,
and BreastMNIST's train one image identical to a test image; these are dropped (and logged).

Large images (DRIVE, CHASE_DB1, Kvasir-SEG) are decoded once (`images.load_image`, PIL bilinear)
with their shorter side reduced to `short_side` (default 256; never enlarged) and kept in memory
in the model's channels. Each draw is a square crop whose side is a uniform fraction in
`crop_scale` (default (0.25, 1.0)) of the shorter side, at a uniform place, resized to the
model's resolution. `crops_per_image` (default 10) crops per image count as the source's items.

Output (`PretrainMixture`): a random-access source of {'image': uint8 (S, S, C), 'label': 0}
(the label is a dummy: MIM objectives ignore it), S = `image_size`, C = `channels`. Every item is
resized to S x S with PIL bilinear (`pp.resize`); channels: grey -> RGB repeats the grey plane
(`pp.gray_to_rgb`), RGB -> grey is PIL's 'L' conversion (ITU-R 601-2 luma), as `load_image`.

Sampling by weight: source s gets a quota q_s = round(E * w_s / sum(w)) of the E entries of an
epoch (largest remainders, so the quotas sum to E); its entries cycle through seeded
permutations of its items (no item twice before every item once). E defaults to
ceil(max_s size_s * sum(w) / w_s), the smallest epoch whose exact shares cover every source's
items, so an epoch shows every pooled item at least once and sources with larger weight shares
repeat; a smaller `epoch_size` subsamples (a fixed subset for a seed). The entries are then
permuted. Entry i's source, item and crop are functions of (seed, i) alone (the crop rng is
`default_rng([seed, source, draw])`), so a loader (`loader.make_loader` / `make_epoch_loader`)
iterating it with a seed is deterministic and resumes exactly. The loader's pp string may add
augmentation (flip_lr, ...) on top.

Building reads every source once: on a 2-core CPU the default mixture of the shared data
directory takes about 9 s at 28 px grey and 20 s at 64 px RGB, most of it decoding Kvasir-SEG.
Memory: the stored images take about 80 MiB at 28 px grey (process: 190 MB) and 300 MiB at
64 px RGB (process: 420 MB), mostly Kvasir-SEG at `short_side` 256.

`default_mixture(data_dir, image_size)` lists every source present: each MedMNIST flag held, at
the smallest size held >= image_size (else the largest held), and every large-image dataset
found; weights are sqrt(distinct training images), volumes counted once (temperature sampling
with exponent 1/2, as in multilingual pretraining mixtures: large sources dominate less).
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import numbers
import os
import pathlib
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from absl import logging
from PIL import Image

from data_pipelines import image_splits
from data_pipelines import images
from data_pipelines import medmnist
from data_pipelines import npz
from data_pipelines import pp as pp_lib

DEFAULT_MIN_FOREGROUND = 0.01
DEFAULT_SHORT_SIDE = 256
_CROP_OPTIONS = {'weight': 1.0, 'crops_per_image': 10, 'crop_scale': (0.25, 1.0),
                 'short_side': DEFAULT_SHORT_SIDE}
# Per source: required keys and optional keys with defaults.
SOURCES: dict[str, tuple[tuple[str, ...], dict[str, Any]]] = {
    'medmnist': (('flag',), {'size': 28, 'weight': 1.0, 'min_foreground': None}),
    **{name: ((), _CROP_OPTIONS) for name in image_splits.SPLITS},
}
def item_hash(image: np.ndarray) -> bytes:
  """sha256 of an array's shape, dtype and bytes: equal arrays, equal hashes."""
  image = np.ascontiguousarray(image)
  return hashlib.sha256(f'{image.shape}{image.dtype}'.encode() + image.tobytes()).digest()


def file_hash(path: os.PathLike | str) -> bytes:
  """sha256 of a file's bytes."""
  return hashlib.sha256(pathlib.Path(path).read_bytes()).digest()


# ----------------------------------------------------------------------------------------------
# The spec.


def _check_weight(where: str, weight: Any) -> None:
  ok = isinstance(weight, numbers.Real) and not isinstance(weight, bool)
  if not ok or not math.isfinite(weight) or weight <= 0:
    raise ValueError(f'{where}: weight must be a positive finite number; got {weight!r}.')


def _check_crop_options(where: str, entry: dict) -> None:
  for key in ('crops_per_image', 'short_side'):
    value = entry[key]
    if not _positive_int(value):
      raise ValueError(f'{where}: {key} must be a positive int; got {value!r}.')
  scale = entry['crop_scale']
  if (not isinstance(scale, (tuple, list)) or len(scale) != 2 or
      not 0 < scale[0] <= scale[1] <= 1):
    raise ValueError(f'{where}: crop_scale must be (lo, hi) with 0 < lo <= hi <= 1 (fractions '
                     f'of the shorter side); got {scale!r}.')
  entry['crop_scale'] = (float(scale[0]), float(scale[1]))


def _checked_entry(i: int, raw: Any) -> dict:
  """One spec entry with defaults filled in; raises ValueError naming what is wrong."""
  if not hasattr(raw, 'items'):
    raise ValueError(f'Mixture entry {i} must be a dict like dict(source=..., weight=...); '
                     f'got {raw!r}.')
  entry = dict(raw.items())
  name = entry.pop('source', None)
  if name not in SOURCES:
    raise ValueError(f'Mixture entry {i}: unknown source {name!r}; valid sources: '
                     f'{sorted(SOURCES)}.')
  required, optional = SOURCES[name]
  unknown = sorted(set(entry) - set(required) - set(optional))
  missing = [k for k in required if k not in entry]
  if unknown or missing:
    raise ValueError(f'Mixture entry {i} ({name}): unknown keys {unknown}, missing keys '
                     f'{missing}; valid keys: source, {", ".join([*required, *optional])}.')
  entry = {'source': name, **optional, **entry}
  where = f'Mixture entry {i} ({_label(entry)})'
  _check_weight(where, entry['weight'])
  if name == 'medmnist':
    medmnist.check_flag_size(entry['flag'], entry['size'])
    if not medmnist.INFO[entry['flag']]['is_3d']:
      if entry['min_foreground'] is not None:
        raise ValueError(f'{where}: min_foreground selects slices of 3D flags; '
                         f'{entry["flag"]} is 2D. Remove it.')
      return entry
    if entry['min_foreground'] is None:
      entry['min_foreground'] = DEFAULT_MIN_FOREGROUND
    if not 0 <= entry['min_foreground'] < 1:
      raise ValueError(f'{where}: min_foreground must be in [0, 1); got '
                       f'{entry["min_foreground"]!r}.')
  else:
    _check_crop_options(where, entry)
  return entry


def _label(entry: Mapping[str, Any]) -> str:
  """'medmnist/pneumoniamnist_28', 'drive', ...: the source's name in reports."""
  if entry['source'] == 'medmnist':
    return f'medmnist/{entry["flag"]}_{entry["size"]}'
  return entry['source']


def check_spec(sources: Sequence[Mapping[str, Any]]) -> list[dict]:
  """Validates a mixture spec; returns its entries with defaults filled in.

  Raises:
    ValueError: for an empty spec, an unknown source (listing the valid ones), unknown or missing
      keys, a weight that is not positive, bad crop options, or a source named twice.
  """
  if isinstance(sources, (str, bytes)) or not isinstance(sources, Sequence) or not sources:
    raise ValueError('A mixture spec is a non-empty list of dict(source=..., weight=...); got '
                     f'{sources!r}. default_mixture(data_dir, image_size) lists what is held.')
  entries = [_checked_entry(i, raw) for i, raw in enumerate(sources)]
  labels = [_label(e) for e in entries]
  twice = sorted({label for label in labels if labels.count(label) > 1})
  if twice:
    raise ValueError(f'Mixture sources named more than once: {twice}; give each once and set its '
                     'weight.')
  return entries


# ----------------------------------------------------------------------------------------------
# The default mixture.


def medmnist_files(data_dir: os.PathLike | str) -> list[tuple[str, int]]:
  """(flag, size) of every file under `<data_dir>/medmnist/` with an official MedMNIST name."""
  folder = pathlib.Path(data_dir) / 'medmnist'
  return [(flag, size) for flag, info in medmnist.INFO.items() for size in info['sizes']
          if (folder / medmnist.filename(flag, size)).is_file()]


def default_mixture(data_dir: os.PathLike | str, image_size: int = 28) -> list[dict]:
  """The default spec over every source the data directory holds (module docstring).

  Raises:
    FileNotFoundError: if the data directory holds none of the sources, or a dataset's folder is
      there without its training images (naming what is missing).
  """
  data_dir = pathlib.Path(data_dir)
  by_flag: dict[str, list[int]] = {}
  for flag, size in medmnist_files(data_dir):
    by_flag.setdefault(flag, []).append(size)
  spec = []
  for flag, sizes in by_flag.items():
    size = min([s for s in sizes if s >= image_size] or [max(sizes)])
    path = data_dir / 'medmnist' / medmnist.filename(flag, size)
    count = npz.read_headers(path)['train_images'].shape[0]
    spec.append(dict(source='medmnist', flag=flag, size=size, weight=_sqrt_weight(count)))
  for source, split in image_splits.SPLITS.items():
    if not image_splits.ROOTS[source](data_dir).is_dir():
      logging.info('Default mixture: no %s (no %s).', source, image_splits.ROOTS[source](data_dir))
      continue
    train, _ = split(data_dir)  # A folder that is there but incomplete is an error.
    spec.append(dict(source=source, weight=_sqrt_weight(len(train))))
  if not spec:
    raise FileNotFoundError(f'The data directory {data_dir} holds no pretraining source: no '
                            'official MedMNIST file in medmnist/, no DRIVE, CHASE_DB1 or '
                            'Kvasir-SEG images (see data_pipelines.pretrain_mixture).')
  return spec


def _sqrt_weight(count: int) -> float:
  return round(math.sqrt(count), 2)


# ----------------------------------------------------------------------------------------------
# Pools: the training items of one source, and the hashes of its held-out items.


@dataclasses.dataclass
class Pool:
  """The pooled training items of one source.

  Attributes:
    name: e.g. 'medmnist/pneumoniamnist_28' or 'drive'.
    items: uint8 (H, W, C) images: MedMNIST items as stored (their own channels), large images
      reduced and in the model's channels.
    origins: per item, where it comes from ('train_images[12]', 'train_images[3] slice 14', or
      the file path).
    hashes: per item, the `item_hash` of the stored item, or the `file_hash` of the file.
    held_out: hashes of the source's held-out items (all of them, whatever their foreground).
    license: the source's license.
    crop: (crop_scale, crops_per_image) for large images; None for whole items.
    excluded: origins of training items dropped as equal to a held-out item.
  """
  name: str
  items: list[np.ndarray]
  origins: list[str]
  hashes: list[bytes]
  held_out: set[bytes]
  license: str
  crop: tuple[tuple[float, float], int] | None = None
  excluded: list[str] = dataclasses.field(default_factory=list)

  @property
  def size(self) -> int:
    """Items an epoch must hold to show each once (crops_per_image per large image)."""
    return len(self.items) * (self.crop[1] if self.crop else 1)


def _volume_slices(path: pathlib.Path, key: str, shape: tuple[int, ...], min_foreground: float):
  """Yields (volume index, slice index, slice (H, W, 1)) of the volumes of one array."""
  for v, volume in enumerate(npz.iter_rows(path, key)):
    volume = volume.reshape(shape[:-1])
    for k, plane in enumerate(volume):
      if np.count_nonzero(plane) > min_foreground * plane.size:
        yield v, k, plane[..., None].copy()  # Not a view: the volume is freed.


def _medmnist_pool(entry: dict, data_dir: pathlib.Path) -> Pool:
  flag, size = entry['flag'], entry['size']
  path = medmnist.ensure_source(flag, size, data_dir, allow_download=False)
  shape = medmnist.image_shape(flag, size)
  pool = Pool(_label(entry), [], [], [], set(), license=medmnist.INFO[flag]['license'])
  if medmnist.INFO[flag]['is_3d']:
    for split in ('val', 'test'):  # Every slice, whatever its foreground.
      pool.held_out.update(item_hash(s) for _, _, s in
                           _volume_slices(path, f'{split}_images', shape, -1))
    for v, k, plane in _volume_slices(path, 'train_images', shape, entry['min_foreground']):
      pool.items.append(plane)
      pool.origins.append(f'{path} train_images[{v}] slice {k}')
    pool.hashes = [item_hash(item) for item in pool.items]
    return pool
  for split in ('val', 'test'):
    held = npz.load_array(path, f'{split}_images').reshape(-1, *shape)
    pool.held_out.update(item_hash(image) for image in held)
  pool.items = list(npz.load_array(path, 'train_images').reshape(-1, *shape))
  pool.origins = [f'{path} train_images[{i}]' for i in range(len(pool.items))]
  pool.hashes = [item_hash(item) for item in pool.items]
  return pool


def load_reduced(path: os.PathLike | str, short_side: int, channels: int) -> np.ndarray:
  """Decodes an image file to uint8 (H, W, channels), its shorter side at most `short_side`."""
  with Image.open(path) as image:
    width, height = image.size
  scale = min(1.0, short_side / min(height, width))
  size = (max(1, round(height * scale)), max(1, round(width * scale)))
  return images.load_image(path, size, channels)


def _image_pool(entry: dict, data_dir: pathlib.Path, channels: int) -> Pool:
  train, held = image_splits.SPLITS[entry['source']](data_dir)
  pool = Pool(_label(entry), [], [str(p) for p in train], [file_hash(p) for p in train],
              {file_hash(p) for p in held}, license=image_splits.LICENSES[entry['source']],
              crop=(entry['crop_scale'], entry['crops_per_image']))
  pool.items = [load_reduced(p, entry['short_side'], channels) for p in train]
  return pool


def _drop_held_out(pool: Pool, held_out: set[bytes]) -> None:
  """Removes the pool's items whose hash is among `held_out` (in place)."""
  keep = [i for i, h in enumerate(pool.hashes) if h not in held_out]
  pool.excluded = [pool.origins[i] for i in range(len(pool.items)) if pool.hashes[i] in held_out]
  pool.items, pool.origins, pool.hashes = ([seq[i] for i in keep] for seq in
                                           (pool.items, pool.origins, pool.hashes))
  if pool.excluded:
    logging.warning('Pretraining mixture: %d training item(s) of %s equal a held-out item and are '
                    'left out: %s', len(pool.excluded), pool.name, pool.excluded)
  if not pool.items:
    raise ValueError(f'Mixture source {pool.name}: no training item is left (all equal held-out '
                     'items or none passes the foreground filter).')


def load_pools(sources: Sequence[Mapping[str, Any]], data_dir: os.PathLike | str,
               channels: int) -> list[Pool]:
  """Reads every source of a spec, leaving out items equal to any source's held-out items."""
  _check_channels(channels)
  data_dir = pathlib.Path(data_dir)
  pools = [_medmnist_pool(e, data_dir) if e['source'] == 'medmnist' else
           _image_pool(e, data_dir, channels) for e in check_spec(sources)]
  held_out = set().union(*(pool.held_out for pool in pools))
  for pool in pools:
    _drop_held_out(pool, held_out)
  return pools


# ----------------------------------------------------------------------------------------------
# The mixture.


def _positive_int(value: Any) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value > 0


def check_output(image_size: int, channels: int) -> None:
  """Raises ValueError unless image_size is a positive int and channels 1 or 3."""
  if not _positive_int(image_size):
    raise ValueError(f'image_size must be a positive int (the model\'s resolution); got '
                     f'{image_size!r}.')
  _check_channels(channels)


def _check_channels(channels: int) -> None:
  if channels not in (1, 3) or isinstance(channels, bool):
    raise ValueError(f'channels must be 1 (grey) or 3 (RGB), as the model takes; got '
                     f'{channels!r}.')


def _quotas(weights: np.ndarray, sizes: np.ndarray, epoch_size: int | None) -> np.ndarray:
  """Entries per source: shares of the epoch by weight, largest remainders (module docstring)."""
  share = weights / weights.sum()
  if epoch_size is not None:
    return _largest_remainder(share, epoch_size)
  epoch_size = int(np.ceil(np.max(sizes / share)))
  while (quotas := _largest_remainder(share, epoch_size)).min() < 1 or (quotas < sizes).any():
    epoch_size += 1  # Only when float rounding left a quota one short.
  return quotas


def _largest_remainder(share: np.ndarray, total: int) -> np.ndarray:
  """Integers proportional to `share` that sum to `total` (largest remainders get the rest)."""
  exact = share * total
  quotas = np.floor(exact).astype(np.int64)
  quotas[np.argsort(-(exact - quotas), kind='stable')[:total - quotas.sum()]] += 1
  return quotas


def _cycled(n: int, quota: int, rng: np.random.Generator) -> np.ndarray:
  """`quota` indices into n items: seeded permutations back to back, cut at `quota`."""
  rounds = -(-quota // n)
  return np.concatenate([rng.permutation(n) for _ in range(rounds)])[:quota]


class PretrainMixture(Sequence):
  """Random access to the mixture's entries, {'image': uint8 (S, S, C), 'label': 0}."""

  def __init__(self, pools: Sequence[Pool], weights: Sequence[float], *, image_size: int,
               channels: int, seed: int = 0, epoch_size: int | None = None):
    """Makes the entry table (module docstring).

    Args:
      pools: the sources' items (`load_pools`).
      weights: one positive weight per pool.
      image_size: S, the model's resolution.
      channels: C, 1 (grey) or 3 (RGB).
      seed: fixes the table and every crop.
      epoch_size: entries; None: the smallest that shows every item at least once.
    """
    check_output(image_size, channels)
    if epoch_size is not None and (not _positive_int(epoch_size) or epoch_size < len(pools)):
      raise ValueError(f'epoch_size must be an int >= the number of sources ({len(pools)}) or '
                       f'None (every item at least once); got {epoch_size!r}.')
    self.pools, self.image_size, self.channels, self.seed = list(pools), image_size, channels, seed
    self._resize = pp_lib.resize(image_size)
    self.weights = np.asarray(weights, np.float64)
    self.quotas = _quotas(self.weights, np.array([p.size for p in pools]), epoch_size)
    if (self.quotas == 0).any():
      raise ValueError(f'epoch_size {epoch_size} leaves no entry to sources '
                       f'{[p.name for p, q in zip(pools, self.quotas) if q == 0]}; raise it.')
    source = np.repeat(np.arange(len(pools)), self.quotas)
    item = np.concatenate([_cycled(p.size, q, np.random.default_rng([seed, s]))
                           for s, (p, q) in enumerate(zip(pools, self.quotas))])
    order = np.random.default_rng([seed, len(pools)]).permutation(len(source))
    # draw: the entry's position within its source, the key of its crop.
    draw = np.concatenate([np.arange(q) for q in self.quotas])
    self._source, self._item, self._draw = source[order], item[order], draw[order]

  def __len__(self) -> int:
    return len(self._source)

  def _locate(self, index: int) -> tuple[int, int, int]:
    if not 0 <= index < len(self):
      raise IndexError(f'Index {index} out of range for a mixture of {len(self)} entries.')
    return int(self._source[index]), int(self._item[index]), int(self._draw[index])

  def _stored_index(self, index: int) -> tuple[Pool, int]:
    s, item, _ = self._locate(index)
    pool = self.pools[s]
    return pool, item // pool.crop[1] if pool.crop else item

  def origin(self, index: int) -> tuple[str, str]:
    """(source name, origin of the stored item) of entry `index`."""
    pool, i = self._stored_index(index)
    return pool.name, pool.origins[i]

  def stored(self, index: int) -> np.ndarray:
    """The stored item of entry `index` before crop and resize (a MedMNIST image or slice as
    in its file; a large image decoded and reduced)."""
    pool, i = self._stored_index(index)
    return pool.items[i]

  def __getitem__(self, index: int) -> dict[str, Any]:
    s, item, draw = self._locate(index)
    pool = self.pools[s]
    if pool.crop is None:
      image = pool.items[item]
    else:
      rng = np.random.default_rng([self.seed, s, draw])
      image = random_square_crop(pool.items[item // pool.crop[1]], pool.crop[0], rng)
    return {'image': self._fit(image), 'label': 0}

  def _fit(self, image: np.ndarray) -> np.ndarray:
    """Resizes to S x S and converts the channels (module docstring)."""
    if image.shape[-1] == 3 and self.channels == 1:
      image = np.asarray(Image.fromarray(image).convert('L'))[..., None]
    example = self._resize({'image': image}, None)
    if self.channels == 3:
      example = pp_lib.gray_to_rgb()(example, None)
    return np.ascontiguousarray(example['image'], dtype=np.uint8)

  def summary(self) -> list[dict[str, Any]]:
    """Per source: name, items, size (items x crops), left out, weight, entries, share."""
    return [dict(name=p.name, items=len(p.items), size=p.size, excluded=len(p.excluded),
                 weight=float(w), entries=int(q), share=round(float(q) / len(self), 4))
            for p, w, q in zip(self.pools, self.weights, self.quotas)]

  def license(self) -> str:
    """The sources' licenses, '; '-joined."""
    return '; '.join(sorted({f'{p.name}: {p.license}' for p in self.pools}))

  def variant(self) -> str:
    """The data variant to record beside results: sources, entries, resolution, seed."""
    parts = ', '.join(f'{s["name"]} {s["entries"]}' for s in self.summary())
    return (f'pretraining mixture of training splits only ({parts}; {len(self)} entries) at '
            f'{self.image_size} px x {self.channels} channels, seed {self.seed}, '
            f'fingerprint {self.fingerprint()}')

  def fingerprint(self) -> str:
    """12 hex digits of sha256 over the items' hashes and the table: equal data, equal print."""
    digest = hashlib.sha256(repr(self).encode())
    for pool in self.pools:
      digest.update(b''.join(pool.hashes))
    for table in (self._source, self._item, self._draw):
      digest.update(np.ascontiguousarray(table, np.int64).tobytes())
    return digest.hexdigest()[:12]

  def __repr__(self) -> str:
    # Stable across runs: grain checks it when an iterator state is restored.
    names = ', '.join(f'{p.name}:{q}' for p, q in zip(self.pools, self.quotas))
    return (f'PretrainMixture([{names}], image_size={self.image_size}, channels={self.channels}, '
            f'seed={self.seed})')


def random_square_crop(image: np.ndarray, scale: tuple[float, float],
                       rng: np.random.Generator) -> np.ndarray:
  """A square crop of side uniform in `scale` x the shorter side, at a uniform place."""
  height, width = image.shape[:2]
  side = max(1, round(rng.uniform(*scale) * min(height, width)))
  top = int(rng.integers(height - side + 1))
  left = int(rng.integers(width - side + 1))
  return image[top:top + side, left:left + side]


def build(sources: Sequence[Mapping[str, Any]] | None, data_dir: os.PathLike | str, *,
          image_size: int, channels: int, seed: int = 0,
          epoch_size: int | None = None) -> PretrainMixture:
  """Reads the sources and makes the mixture; logs its sizes and how long it took.

  Args:
    sources: a mixture spec (module docstring); None: `default_mixture(data_dir, image_size)`.
    data_dir: the data directory.
    image_size: the model's resolution S.
    channels: 1 or 3.
    seed: fixes which entries and crops the mixture holds.
    epoch_size: entries; None: the smallest that shows every item at least once.

  Raises:
    ValueError: for a bad spec (`check_spec`) or arguments.
    FileNotFoundError: for a source that is missing, naming the files expected and how to get
      them.
    medmnist.NotOfficialFileError: for a file at an official MedMNIST path that is not official.
  """
  start = time.perf_counter()
  check_output(image_size, channels)
  sources = default_mixture(data_dir, image_size) if sources is None else sources
  entries = check_spec(sources)
  pools = load_pools(entries, data_dir, channels)
  mixture = PretrainMixture(pools, [e['weight'] for e in entries], image_size=image_size,
                            channels=channels, seed=seed, epoch_size=epoch_size)
  lines = [f'  {s["name"]}: {s["items"]} items ({s["excluded"]} equal to held-out items left '
           f'out), weight {s["weight"]:g}, {s["entries"]} entries ({100 * s["share"]:.1f} %)'
           for s in mixture.summary()]
  logging.info('Pretraining mixture of %d entries at %d px x %d channels, built in %.1f s:\n%s',
               len(mixture), image_size, channels, time.perf_counter() - start, '\n'.join(lines))
  return mixture
