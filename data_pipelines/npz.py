"""Reading and checking `.npz` archives in the MedMNIST layout, without pickle.

An archive in the MedMNIST layout holds `<split>_images` and `<split>_labels` for the splits
`train`, `val` and `test`. This module reads the `.npy` headers of the members (shape and dtype)
without decompressing the data, streams images one example at a time (so a 224 px archive never
has to fit in memory), and computes file md5s. It never unpickles anything: an object array is
refused with an error.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import pathlib
import zipfile
from collections.abc import Iterator, Mapping

import numpy as np

SPLITS = ('train', 'val', 'test')
_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class ArrayHeader:
  """Shape and dtype of one array stored in an archive."""
  shape: tuple[int, ...]
  dtype: np.dtype


def md5sum(path: os.PathLike | str) -> str:
  """Returns the hex md5 of a file, read in 1 MiB chunks."""
  digest = hashlib.md5()
  with open(path, 'rb') as f:
    for chunk in iter(lambda: f.read(_CHUNK), b''):
      digest.update(chunk)
  return digest.hexdigest()


def _read_header(f) -> ArrayHeader:
  """Reads the `.npy` header from an open member, leaving `f` at the first data byte."""
  version = np.lib.format.read_magic(f)
  if version == (1, 0):
    shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(f)
  elif version == (2, 0):
    shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(f)
  else:
    raise ValueError(f'Unsupported .npy format version {version}.')
  if dtype.hasobject:
    raise ValueError('holds Python objects, which can only be read with pickle; pickle is never '
                     'used on data files. Save plain numeric arrays (uint8 images, integer '
                     'labels).')
  if fortran_order and len(shape) > 1:
    raise ValueError('is stored in Fortran order; save it with np.ascontiguousarray first.')
  return ArrayHeader(tuple(int(d) for d in shape), dtype)


def read_headers(path: os.PathLike | str) -> dict[str, ArrayHeader]:
  """Returns {key: ArrayHeader} for every array in an `.npz`, reading headers only.

  Raises:
    ValueError: if the file is not a zip archive of `.npy` members or a member holds objects.
  """
  path = pathlib.Path(path)
  try:
    archive = zipfile.ZipFile(path)
  except zipfile.BadZipFile as e:
    raise ValueError(f'{path} is not an .npz archive (not a zip file).') from e
  headers = {}
  with archive:
    for member in archive.namelist():
      if not member.endswith('.npy'):
        raise ValueError(f'{path} holds {member!r}, which is not a .npy array.')
      with archive.open(member) as f:
        try:
          headers[member[:-len('.npy')]] = _read_header(f)
        except ValueError as e:
          raise ValueError(f'Array {member[:-4]!r} in {path} {e}') from e
  return headers


def load_array(path: os.PathLike | str, key: str) -> np.ndarray:
  """Loads one array of an `.npz` (with `allow_pickle=False`)."""
  with np.load(path, allow_pickle=False) as data:
    return data[key]


def iter_rows(path: os.PathLike | str, key: str) -> Iterator[np.ndarray]:
  """Yields `array[i]` for each i of one array of an `.npz`, decompressing as it goes."""
  with zipfile.ZipFile(path) as archive, archive.open(f'{key}.npy') as f:
    header = _read_header(f)
    row_shape = header.shape[1:]
    row_bytes = int(np.prod(row_shape, dtype=np.int64)) * header.dtype.itemsize
    for i in range(header.shape[0]):
      buf = f.read(row_bytes)
      if len(buf) != row_bytes:
        raise ValueError(f'{path}: array {key!r} ends early at row {i} of {header.shape[0]}.')
      yield np.frombuffer(buf, dtype=header.dtype).reshape(row_shape)


def layout_splits(path: os.PathLike | str, headers: Mapping[str, ArrayHeader],
                  required: tuple[str, ...] = SPLITS) -> tuple[str, ...]:
  """Checks the key names of a MedMNIST-layout archive and returns the splits it holds.

  Args:
    path: the archive (for messages).
    headers: its `read_headers`.
    required: splits that must be present; the others of `SPLITS` are optional.

  Returns:
    The splits present, in `SPLITS` order.

  Raises:
    ValueError: naming the expected keys, if a key is unknown, a split is missing or only one of
      its images/labels pair is present.
  """
  expected = [f'{s}_{kind}' for s in SPLITS for kind in ('images', 'labels')]
  want = ', '.join(expected)
  unknown = sorted(set(headers) - set(expected))
  if unknown:
    raise ValueError(f'{path} has unexpected arrays {unknown}; expected the MedMNIST layout: '
                     f'{want} (splits {list(required)} required).')
  present = []
  for split in SPLITS:
    pair = [f'{split}_images' in headers, f'{split}_labels' in headers]
    if all(pair):
      present.append(split)
    elif any(pair) or split in required:
      raise ValueError(f'{path} lacks {split}_images or {split}_labels; expected the MedMNIST '
                       f'layout: {want} (splits {list(required)} required).')
  return tuple(present)
