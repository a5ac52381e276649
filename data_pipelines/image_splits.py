"""Train and held-out image files of DRIVE, CHASE_DB1 and Kvasir-SEG in the data directory.

Layouts (as `<data_dir>/README.md` describes them) and splits:
  DRIVE       `retina_vessels/DRIVE/training/images/*.tif` (20) train; `testing/images/*.tif`
              (20) held out: the dataset's own split.
  CHASE_DB1   `retina_vessels/CHASEDB1/Image_NN{L,R}.jpg`: children 01-10 (the first 20 images,
              the common split) train; children 11-14 (the last 8) held out.
  Kvasir-SEG  `kvasir_seg/Kvasir-SEG/images/*.jpg` (1000) has no official split: the ids sorted,
              permuted by `np.random.default_rng(KVASIR_SPLIT_SEED=0)`, the first 880 train, the
              last 120 held out. All 1000 are required, else images would move between parts.
`SPLITS[name](data_dir)` returns (train files, held-out files); a dataset without its training
images is a FileNotFoundError naming the files expected and where to get them.
"""
from __future__ import annotations

import os
import pathlib

import numpy as np

KVASIR_SPLIT_SEED = 0
KVASIR_IMAGES, KVASIR_HELD_OUT = 1000, 120
CHASE_TRAIN_CHILDREN, CHASE_CHILDREN = range(1, 11), range(1, 15)
_HOW_TO_GET = {
    'drive': 'DRIVE (Staal et al., IEEE TMI 2004; https://drive.grand-challenge.org), its '
             'training/ and testing/ folders as released',
    'chase_db1': 'CHASE_DB1 (Fraz et al., IEEE TBME 2012; '
                 'https://blogs.kingston.ac.uk/retinal/chasedb1), the 28 Image_NN{L,R}.jpg files',
    'kvasir_seg': 'Kvasir-SEG (Jha et al., MMM 2020; https://datasets.simula.no/kvasir-seg), '
                  'all 1000 images of images/',
}
LICENSES = {'drive': 'DRIVE terms (research use)', 'chase_db1': 'CHASE_DB1 terms (research use)',
            'kvasir_seg': 'Kvasir-SEG terms (research and education)'}


def _missing(source: str, expected: str) -> FileNotFoundError:
  return FileNotFoundError(
      f'{source}: no training images at {expected}. Put {_HOW_TO_GET[source]} there (the '
      'data directory\'s README names the layout), or leave the source out.')


def drive_root(data_dir: pathlib.Path) -> pathlib.Path:
  """The DRIVE folder of a data directory."""
  return data_dir / 'retina_vessels' / 'DRIVE'


def drive_split(data_dir: os.PathLike | str) -> tuple[list[pathlib.Path], list[pathlib.Path]]:
  """DRIVE's (training, testing) image files: `training/images/*.tif`, `testing/images/*.tif`."""
  root = drive_root(pathlib.Path(data_dir))
  train = sorted((root / 'training' / 'images').glob('*.tif'))
  if not train:
    raise _missing('drive', str(root / 'training' / 'images' / '*.tif'))
  return train, sorted((root / 'testing' / 'images').glob('*.tif'))


def chase_root(data_dir: pathlib.Path) -> pathlib.Path:
  """The CHASE_DB1 folder of a data directory."""
  return data_dir / 'retina_vessels' / 'CHASEDB1'


def chase_split(data_dir: os.PathLike | str) -> tuple[list[pathlib.Path], list[pathlib.Path]]:
  """CHASE_DB1's (train, test) files: children 1-10 (the first 20 images), children 11-14."""
  root = chase_root(pathlib.Path(data_dir))
  def names(children):
    return [root / f'Image_{c:02d}{eye}.jpg' for c in children for eye in 'LR']
  train = names(CHASE_TRAIN_CHILDREN)
  absent = [p.name for p in train if not p.is_file()]
  if absent:
    raise _missing('chase_db1', f'{root} (missing: {", ".join(absent)})')
  held = [p for p in names(CHASE_CHILDREN) if p not in train and p.is_file()]
  return train, held


def kvasir_dir(data_dir: pathlib.Path) -> pathlib.Path:
  """The Kvasir-SEG image folder of a data directory."""
  return data_dir / 'kvasir_seg' / 'Kvasir-SEG' / 'images'


def kvasir_split(data_dir: os.PathLike | str) -> tuple[list[pathlib.Path], list[pathlib.Path]]:
  """Kvasir-SEG's fixed seeded split: (880 train, 120 held-out) image files.

  The 1000 ids are sorted and permuted by `np.random.default_rng(KVASIR_SPLIT_SEED)`; the first
  880 are train, the last 120 held out. All 1000 images are required: a partial copy would move
  images between the parts.

  Raises:
    FileNotFoundError: if the folder does not hold exactly `KVASIR_IMAGES` images.
  """
  folder = kvasir_dir(pathlib.Path(data_dir))
  files = sorted(folder.glob('*.jpg'))
  if not files:
    raise _missing('kvasir_seg', str(folder / '*.jpg'))
  if len(files) != KVASIR_IMAGES:
    raise FileNotFoundError(
        f'{folder} holds {len(files)} images; the fixed Kvasir-SEG split needs all '
        f'{KVASIR_IMAGES} ({_HOW_TO_GET["kvasir_seg"]}), else images would move between train '
        'and held-out.')
  order = np.random.default_rng(KVASIR_SPLIT_SEED).permutation(len(files))
  cut = KVASIR_IMAGES - KVASIR_HELD_OUT
  return [files[i] for i in order[:cut]], [files[i] for i in order[cut:]]


SPLITS = {'drive': drive_split, 'chase_db1': chase_split, 'kvasir_seg': kvasir_split}
ROOTS = {'drive': drive_root, 'chase_db1': chase_root, 'kvasir_seg': kvasir_dir}
