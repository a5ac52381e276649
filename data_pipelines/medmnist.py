"""The official MedMNIST v2 / MedMNIST+ collection as a TFDS builder, md5-checked.

Files are read from `<data_dir>/medmnist/<flag>.npz` (28 px) or `<flag>_<size>.npz` (64, 128,
224 px; 3D flags: 64 only), the official file names, or downloaded from the official record
(zenodo 10519652) into that place when missing (`download.fetch`: nothing is left behind when the
download fails or is stopped by Ctrl-C / SIGTERM). A file is used only when its md5 equals the
official one (`MD5`) and its arrays have the official keys, dtypes, shapes and split sizes
(`INFO`); both are checked before anything is written. A file that fails the md5 check is not the
benchmark: load it as a custom dataset instead (`data_pipelines.custom`, data_cfg name 'npz').

Examples (one TFDS config per flag and size, named `<flag>_<size>`, e.g. `pneumoniamnist_28`):
  image: uint8, (H, W, C) for 2D flags (C = 1 for grey, 3 for colour), (D, H, W, 1) for 3D flags.
  label: int64 scalar (class index) for multi-class, binary-class and ordinal-regression flags;
    int64 vector of 14 zeros/ones for chestmnist (multi-label).
The examples keep the order of the official arrays (example i of a split is row i of the file).
Class names, the task, the license and the file's md5 and URL are in `builder.info.metadata`.

The tables below (task, class names, channels, split sizes, license, md5) are transcribed from
`medmnist/info.py` (`INFO`) of the official `medmnist` package, version 3.0.2 (PyPI wheel
medmnist-3.0.2-py3-none-any.whl); that package is not a dependency. The short `modality` strings
follow Table 1 of the MedMNIST v2 paper.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from data_pipelines import data_dir as data_dir_lib
from data_pipelines import download
from data_pipelines import npz
from data_pipelines import tfds_base

OFFICIAL_BASE_URL = 'https://zenodo.org/records/10519652/files'
HOMEPAGE = 'https://medmnist.com/'
SIZES_2D = (28, 64, 128, 224)
SIZES_3D = (28, 64)
CC_BY = 'CC BY 4.0'
CC_BY_NC = 'CC BY-NC 4.0'
CITATION = """@article{medmnistv2,
  title={MedMNIST v2-A large-scale lightweight benchmark for 2D and 3D biomedical image
         classification},
  author={Yang, Jiancheng and Shi, Rui and Wei, Donglai and Liu, Zequan and Zhao, Lin and
          Ke, Bilian and Pfister, Hanspeter and Ni, Bingbing},
  journal={Scientific Data}, volume={10}, number={1}, pages={41}, year={2023}}"""

# Official md5 of every file, keyed by file name. Looked up at call time, so tests may
# monkeypatch an entry to accept a file of their own.
MD5 = {
    'pathmnist.npz': 'a8b06965200029087d5bd730944a56c1',
    'pathmnist_64.npz': '55aa9c1e0525abe5a6b9d8343a507616',
    'pathmnist_128.npz': 'ac42d08fb904d92c244187169d1fd1d9',
    'pathmnist_224.npz': '2c51a510bcdc9cf8ddb2af93af1eadec',
    'chestmnist.npz': '02c8a6516a18b556561a56cbdd36c4a8',
    'chestmnist_64.npz': '9de6cd0b934ebb5b7426cfba5efbae16',
    'chestmnist_128.npz': 'db107e5590b27930b62dbaf558aebee3',
    'chestmnist_224.npz': '45bd33e6f06c3e8cdb481c74a89152aa',
    'dermamnist.npz': '0744692d530f8e62ec473284d019b0c7',
    'dermamnist_64.npz': 'b70a2f5635c6199aeaa28c31d7202e1f',
    'dermamnist_128.npz': '2defd784463fa5243564e855ed717de1',
    'dermamnist_224.npz': '8974907d8e169bef5f5b96bc506ae45d',
    'octmnist.npz': 'c68d92d5b585d8d81f7112f81e2d0842',
    'octmnist_64.npz': 'e229e9440236b774d9f0dfef9d07bdaf',
    'octmnist_128.npz': '0a97e76651ace45c5d943ee3f65b63ae',
    'octmnist_224.npz': 'abc493b6d529d5de7569faaef2773ba3',
    'pneumoniamnist.npz': '28209eda62fecd6e6a2d98b1501bb15f',
    'pneumoniamnist_64.npz': '8f4eceb4ccffa70c672198ea285246c6',
    'pneumoniamnist_128.npz': '05b46931834c231683c68f40c47b2971',
    'pneumoniamnist_224.npz': 'd6a3c71de1b945ea11211b03746c1fe1',
    'retinamnist.npz': 'bd4c0672f1bba3e3a89f0e4e876791e4',
    'retinamnist_64.npz': 'afda852cc34dcda56f86ad2b2457dbcc',
    'retinamnist_128.npz': 'e48e916a24454daf90583d4e6efb1a18',
    'retinamnist_224.npz': 'eae7e3b6f3fcbda4ae613ebdcbe35348',
    'breastmnist.npz': '750601b1f35ba3300ea97c75c52ff8f6',
    'breastmnist_64.npz': '742edef2a1fd1524b2efff4bd7ba9364',
    'breastmnist_128.npz': '363e4b3f8d712e9b5de15470a2aaadf1',
    'breastmnist_224.npz': 'b56378a6eefa9fed602bb16d192d4c8b',
    'bloodmnist.npz': '7053d0359d879ad8a5505303e11de1dc',
    'bloodmnist_64.npz': '2b94928a2ae4916078ca51e05b6b800b',
    'bloodmnist_128.npz': 'adace1e0ed228fccda1f39692059dd4c',
    'bloodmnist_224.npz': 'b718ff6835fcbdb22ba9eacccd7b2601',
    'tissuemnist.npz': 'ebe78ee8b05294063de985d821c1c34b',
    'tissuemnist_64.npz': '123ece2eba09d0aa5d698fda57103344',
    'tissuemnist_128.npz': '61b955355d7425a89687b06cca3ce0c2',
    'tissuemnist_224.npz': 'b077128c4a949f0a4eb01517f9037b9c',
    'organamnist.npz': '68e3f8846a6bd62f0c9bf841c0d9eacc',
    'organamnist_64.npz': '2dcccc29b88e6da5a01161ef20cda288',
    'organamnist_128.npz': 'eeae80d0a227a8d099027e1b3cfd3b60',
    'organamnist_224.npz': '50747347e05c87dd3aaf92c49f9f3170',
    'organcmnist.npz': 'b9ceb9546e10131b32923c5bbeaea2b1',
    'organcmnist_64.npz': '3ce34a8724ea6f548e6db4744d03b6a9',
    'organcmnist_128.npz': '773c1f009daa3fe5d9a2a201b2a7ed94',
    'organcmnist_224.npz': '050f5e875dc056f6768abf94ec9995d1',
    'organsmnist.npz': '9ab87b696fb54e2a387ebe992d6ed5f1',
    'organsmnist_64.npz': '53a6d115339d874c25e309a994ff46d3',
    'organsmnist_128.npz': 'ded0c5fa01a95dc4978b956f613e9b8e',
    'organsmnist_224.npz': 'b354719e553fbbb2513d5533f52a4cb1',
    'organmnist3d.npz': 'a0c5a1ff56af4f155c46d46fbb45a2fe',
    'organmnist3d_64.npz': '58a2205adf14a9d0a189cb06dc78bf10',
    'nodulemnist3d.npz': '8755a7e9e05a4d9ce80a24c3e7a256f3',
    'nodulemnist3d_64.npz': 'c47c5b7d457bf6332200d2ea6d64ecd8',
    'adrenalmnist3d.npz': 'bbd3c5a5576322bc4cdfea780653b1ce',
    'adrenalmnist3d_64.npz': '17721accfe9fb005146a47d33bc54b2f',
    'fracturemnist3d.npz': '6aa7b0143a6b42da40027a9dda61302f',
    'fracturemnist3d_64.npz': 'f01d7e6316aedf4210da0da5b7437b42',
    'vesselmnist3d.npz': 'b41fd4f7e7e2feedddb201585ecafa1b',
    'vesselmnist3d_64.npz': '6bb274a8846e1097066dcd64e2c4520f',
    'synapsemnist3d.npz': '1235b78a3cd6280881dd7850a78eadb6',
    'synapsemnist3d_64.npz': '43bd14ebf3af9d3dd072446fedc14d5e',
}

# Per flag: task and class names as the official INFO gives them, image channels, split sizes,
# license, the sizes released, and whether images are 3D volumes.
INFO = {
    'pathmnist': dict(
        task='multi-class', modality='colon pathology', n_channels=3,
        n_samples=dict(train=89996, val=10004, test=7180), license=CC_BY,
        sizes=SIZES_2D, is_3d=False,
        labels=('adipose', 'background', 'debris', 'lymphocytes', 'mucus', 'smooth muscle',
            'normal colon mucosa', 'cancer-associated stroma',
            'colorectal adenocarcinoma epithelium')),
    'chestmnist': dict(
        task='multi-label, binary-class', modality='chest X-ray', n_channels=1,
        n_samples=dict(train=78468, val=11219, test=22433), license=CC_BY,
        sizes=SIZES_2D, is_3d=False,
        labels=('atelectasis', 'cardiomegaly', 'effusion', 'infiltration', 'mass', 'nodule',
            'pneumonia', 'pneumothorax', 'consolidation', 'edema', 'emphysema', 'fibrosis',
            'pleural', 'hernia')),
    'dermamnist': dict(
        task='multi-class', modality='dermatoscope', n_channels=3,
        n_samples=dict(train=7007, val=1003, test=2005), license=CC_BY_NC,
        sizes=SIZES_2D, is_3d=False,
        labels=('actinic keratoses and intraepithelial carcinoma', 'basal cell carcinoma',
            'benign keratosis-like lesions', 'dermatofibroma', 'melanoma', 'melanocytic nevi',
            'vascular lesions')),
    'octmnist': dict(
        task='multi-class', modality='retinal OCT', n_channels=1,
        n_samples=dict(train=97477, val=10832, test=1000), license=CC_BY,
        sizes=SIZES_2D, is_3d=False,
        labels=('choroidal neovascularization', 'diabetic macular edema', 'drusen', 'normal')),
    'pneumoniamnist': dict(
        task='binary-class', modality='chest X-ray', n_channels=1,
        n_samples=dict(train=4708, val=524, test=624), license=CC_BY,
        sizes=SIZES_2D, is_3d=False,
        labels=('normal', 'pneumonia')),
    'retinamnist': dict(
        task='ordinal-regression', modality='fundus camera', n_channels=3,
        n_samples=dict(train=1080, val=120, test=400), license=CC_BY,
        sizes=SIZES_2D, is_3d=False,
        labels=('0', '1', '2', '3', '4')),
    'breastmnist': dict(
        task='binary-class', modality='breast ultrasound', n_channels=1,
        n_samples=dict(train=546, val=78, test=156), license=CC_BY,
        sizes=SIZES_2D, is_3d=False,
        labels=('malignant', 'normal, benign')),
    'bloodmnist': dict(
        task='multi-class', modality='blood cell microscope', n_channels=3,
        n_samples=dict(train=11959, val=1712, test=3421), license=CC_BY,
        sizes=SIZES_2D, is_3d=False,
        labels=('basophil', 'eosinophil', 'erythroblast',
            'immature granulocytes(myelocytes, metamyelocytes and promyelocytes)', 'lymphocyte',
            'monocyte', 'neutrophil', 'platelet')),
    'tissuemnist': dict(
        task='multi-class', modality='kidney cortex microscope', n_channels=1,
        n_samples=dict(train=165466, val=23640, test=47280), license=CC_BY,
        sizes=SIZES_2D, is_3d=False,
        labels=('Collecting Duct, Connecting Tubule', 'Distal Convoluted Tubule',
            'Glomerular endothelial cells', 'Interstitial endothelial cells', 'Leukocytes',
            'Podocytes', 'Proximal Tubule Segments', 'Thick Ascending Limb')),
    'organamnist': dict(
        task='multi-class', modality='abdominal CT', n_channels=1,
        n_samples=dict(train=34561, val=6491, test=17778), license=CC_BY,
        sizes=SIZES_2D, is_3d=False,
        labels=('bladder', 'femur-left', 'femur-right', 'heart', 'kidney-left', 'kidney-right',
            'liver', 'lung-left', 'lung-right', 'pancreas', 'spleen')),
    'organcmnist': dict(
        task='multi-class', modality='abdominal CT', n_channels=1,
        n_samples=dict(train=12975, val=2392, test=8216), license=CC_BY,
        sizes=SIZES_2D, is_3d=False,
        labels=('bladder', 'femur-left', 'femur-right', 'heart', 'kidney-left', 'kidney-right',
            'liver', 'lung-left', 'lung-right', 'pancreas', 'spleen')),
    'organsmnist': dict(
        task='multi-class', modality='abdominal CT', n_channels=1,
        n_samples=dict(train=13932, val=2452, test=8827), license=CC_BY,
        sizes=SIZES_2D, is_3d=False,
        labels=('bladder', 'femur-left', 'femur-right', 'heart', 'kidney-left', 'kidney-right',
            'liver', 'lung-left', 'lung-right', 'pancreas', 'spleen')),
    'organmnist3d': dict(
        task='multi-class', modality='abdominal CT', n_channels=1,
        n_samples=dict(train=971, val=161, test=610), license=CC_BY,
        sizes=SIZES_3D, is_3d=True,
        labels=('liver', 'kidney-right', 'kidney-left', 'femur-right', 'femur-left', 'bladder',
            'heart', 'lung-right', 'lung-left', 'spleen', 'pancreas')),
    'nodulemnist3d': dict(
        task='binary-class', modality='chest CT', n_channels=1,
        n_samples=dict(train=1158, val=165, test=310), license=CC_BY,
        sizes=SIZES_3D, is_3d=True,
        labels=('benign', 'malignant')),
    'adrenalmnist3d': dict(
        task='binary-class', modality='shape from abdominal CT', n_channels=1,
        n_samples=dict(train=1188, val=98, test=298), license=CC_BY,
        sizes=SIZES_3D, is_3d=True,
        labels=('normal', 'hyperplasia')),
    'fracturemnist3d': dict(
        task='multi-class', modality='chest CT', n_channels=1,
        n_samples=dict(train=1027, val=103, test=240), license=CC_BY,
        sizes=SIZES_3D, is_3d=True,
        labels=('buckle rib fracture', 'nondisplaced rib fracture', 'displaced rib fracture')),
    'vesselmnist3d': dict(
        task='binary-class', modality='shape from brain MRA', n_channels=1,
        n_samples=dict(train=1335, val=191, test=382), license=CC_BY,
        sizes=SIZES_3D, is_3d=True,
        labels=('vessel', 'aneurysm')),
    'synapsemnist3d': dict(
        task='binary-class', modality='electron microscope', n_channels=1,
        n_samples=dict(train=1230, val=177, test=352), license=CC_BY,
        sizes=SIZES_3D, is_3d=True,
        labels=('inhibitory synapse', 'excitatory synapse')),
}

MULTI_LABEL_TASK = 'multi-label, binary-class'


class NotOfficialFileError(ValueError):
  """A file at an official MedMNIST path is not the official file (md5 or layout differs)."""


def check_flag_size(flag: str, size: int) -> None:
  """Raises ValueError listing the valid choices if `flag` or `size` is not released."""
  if flag not in INFO:
    raise ValueError(f'Unknown MedMNIST flag {flag!r}; valid flags: {sorted(INFO)}.')
  if size not in INFO[flag]['sizes']:
    raise ValueError(f'MedMNIST {flag} is released at sizes {INFO[flag]["sizes"]}, not {size!r}.')


def filename(flag: str, size: int) -> str:
  """The official file name: `<flag>.npz` at 28 px, `<flag>_<size>.npz` otherwise."""
  check_flag_size(flag, size)
  return f'{flag}.npz' if size == 28 else f'{flag}_{size}.npz'


def official_url(flag: str, size: int, base_url: str = OFFICIAL_BASE_URL) -> str:
  """The download URL of one file (the official record unless `base_url` names a mirror)."""
  return f'{base_url.rstrip("/")}/{filename(flag, size)}?download=1'


def image_shape(flag: str, size: int) -> tuple[int, ...]:
  """Shape of one stored image: (S, S, C) for 2D flags, (S, S, S, 1) for 3D flags."""
  check_flag_size(flag, size)
  if INFO[flag]['is_3d']:
    return (size, size, size, 1)
  return (size, size, INFO[flag]['n_channels'])


def num_labels(flag: str) -> int:
  """Label columns in the official arrays: the number of labels for multi-label, else 1."""
  info = INFO[flag]
  return len(info['labels']) if info['task'] == MULTI_LABEL_TASK else 1


def _raw_image_shape(flag: str, size: int) -> tuple[int, ...]:
  """Shape of one image as stored in the official arrays (no channel axis for grey / 3D)."""
  shape = image_shape(flag, size)
  return shape if shape[-1] == 3 else shape[:-1]


def _not_official(path: pathlib.Path, flag: str, size: int, problem: str) -> NotOfficialFileError:
  return NotOfficialFileError(
      f'{path} is not the official MedMNIST file {filename(flag, size)} ({flag} at {size} px): '
      f'{problem}. Official results can only be reported on the official file (download it from '
      f'{official_url(flag, size)}). To train on this file as your own data, use it as a custom '
      f"dataset instead: data_cfg=dict(name='npz', path='{path}') (data_pipelines.custom).")


def verify_md5(path: os.PathLike | str, flag: str, size: int) -> str:
  """Checks that a file has the official md5 of (flag, size); returns the md5.

  Raises:
    NotOfficialFileError: giving the expected and the actual md5, the path, and how to use the file
      as a custom dataset instead.
  """
  path = pathlib.Path(path)
  expected = MD5[filename(flag, size)]
  got = npz.md5sum(path)
  if got != expected:
    raise _not_official(path, flag, size, f'md5 is {got}, expected {expected}')
  return got


def check_layout(path: os.PathLike | str, flag: str, size: int) -> None:
  """Checks keys, dtypes, shapes, split sizes and label values against `INFO`.

  Raises:
    NotOfficialFileError: naming what differs.
  """
  path = pathlib.Path(path)
  info = INFO[flag]
  try:
    headers = npz.read_headers(path)
    npz.layout_splits(path, headers)
  except ValueError as e:
    raise _not_official(path, flag, size, str(e)) from e
  for split in npz.SPLITS:
    n = info['n_samples'][split]
    want = {f'{split}_images': ((n, *_raw_image_shape(flag, size)), np.dtype(np.uint8)),
            f'{split}_labels': ((n, num_labels(flag)), np.dtype(np.uint8))}
    for key, (shape, dtype) in want.items():
      got = headers[key]
      if got.shape != shape or got.dtype != dtype:
        raise _not_official(path, flag, size, f'{key} is {got.dtype}{list(got.shape)}, '
                            f'expected {dtype}{list(shape)}')
    labels = npz.load_array(path, f'{split}_labels')
    high = 2 if info['task'] == MULTI_LABEL_TASK else len(info['labels'])
    if labels.size and labels.max() >= high:
      raise _not_official(path, flag, size, f'{split}_labels holds {labels.max()}, '
                          f'expected values below {high}')


def ensure_source(flag: str, size: int, data_dir: os.PathLike | str, *,
                  base_url: str | None = None, allow_download: bool = True) -> pathlib.Path:
  """Returns the verified official file of (flag, size), downloading it when missing.

  Args:
    flag: a MedMNIST flag, e.g. 'pneumoniamnist'.
    size: image size, one of `INFO[flag]['sizes']`.
    data_dir: the data directory; the file is `<data_dir>/medmnist/<filename(flag, size)>`.
    base_url: a mirror of the official record to download from (default: the official one).
    allow_download: download when the file is missing; else raise FileNotFoundError.

  Raises:
    NotOfficialFileError: if the file (local or downloaded) is not the official one.
    FileNotFoundError: if the file is missing and may not be downloaded.
    PermissionError: if it must be downloaded into a read-only data directory.
    OSError: if the download fails.
    download.Interrupted: on SIGINT / SIGTERM during the download (its partial file removed).
  """
  path = pathlib.Path(data_dir) / 'medmnist' / filename(flag, size)
  url = official_url(flag, size, base_url or OFFICIAL_BASE_URL)
  if not path.exists():
    if not allow_download:
      raise FileNotFoundError(f'{path} does not exist and downloads are off; download {url} '
                              f'and put it there.')
    if not data_dir_lib.is_writable(path.parent):
      raise PermissionError(f'{path} is missing and {path.parent} is read-only; point the data '
                            f'directory at a writable place or put the file there by hand.')
    try:
      download.fetch(url, path, MD5[filename(flag, size)])
    except download.ChecksumError as e:
      raise NotOfficialFileError(f'{e} Expected the official MedMNIST file '
                                 f'{filename(flag, size)}.') from e
  else:
    verify_md5(path, flag, size)
  check_layout(path, flag, size)
  return path


@dataclasses.dataclass(eq=False)
class MedMNISTConfig(tfds.core.BuilderConfig):
  """One flag at one size."""
  flag: str = ''
  size: int = 28


def _builder_configs() -> list[MedMNISTConfig]:
  return [MedMNISTConfig(name=f'{flag}_{size}', flag=flag, size=size,
                         description=f'MedMNIST {flag} ({info["modality"]}) at {size} px.')
          for flag, info in INFO.items() for size in info['sizes']]


class MedMNIST(tfds_base.Builder, skip_registration=True):
  """The official MedMNIST v2 collection; config `<flag>_<size>`, splits train / val / test."""

  name = 'medmnist'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'MedMNIST v2 and MedMNIST+ files of zenodo record 10519652.'}
  BUILDER_CONFIGS = _builder_configs()

  def __init__(self, *, source_dir: os.PathLike | str, base_url: str | None = None,
               allow_download: bool = True, **kwargs):
    """Makes the builder.

    Args:
      source_dir: the data directory holding `medmnist/<file>` (not the TFDS directory).
      base_url: a mirror of the official record for downloads.
      allow_download: download missing files.
      **kwargs: for `tfds.core.GeneratorBasedBuilder` (`config`, `data_dir`).
    """
    self._source_dir = pathlib.Path(source_dir)
    self._base_url = base_url
    self._allow_download = allow_download
    self._source: pathlib.Path | None = None
    super().__init__(**kwargs)
    self._original_state.update(source_dir=os.fspath(source_dir), base_url=base_url,
                                allow_download=allow_download)

  def _info(self) -> tfds.core.DatasetInfo:
    flag, size = self.builder_config.flag, self.builder_config.size
    info = INFO[flag]
    multi_label = info['task'] == MULTI_LABEL_TASK
    features = tfds.features.FeaturesDict({
        'image': tfds.features.Tensor(shape=image_shape(flag, size), dtype=np.uint8,
                                      encoding=tfds.features.Encoding.BYTES),
        'label': tfds.features.Tensor(shape=(len(info['labels']),) if multi_label else (),
                                      dtype=np.int64),
    })
    metadata = tfds.core.MetadataDict(
        flag=flag, size=size, task=info['task'], class_names=list(info['labels']),
        license=info['license'], modality=info['modality'], md5=MD5[filename(flag, size)],
        url=official_url(flag, size), official=True)
    return tfds_base.DatasetInfo(
        builder=self, description=self.builder_config.description, features=features,
        supervised_keys=('image', 'label'), homepage=HOMEPAGE, citation=CITATION,
        license=info['license'], metadata=metadata, disable_shuffling=True)

  def _verified_source(self) -> pathlib.Path:
    if self._source is None:
      self._source = ensure_source(self.builder_config.flag, self.builder_config.size,
                                   self._source_dir, base_url=self._base_url,
                                   allow_download=self._allow_download)
    return self._source

  def download_and_prepare(self, **kwargs) -> None:
    """Verifies the source file (md5, layout) first, then builds as TFDS does."""
    if not self.is_prepared():
      self._verified_source()
    super().download_and_prepare(**kwargs)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # The source is fetched and verified by `ensure_source`.
    path = self._verified_source()
    return {split: self._generate_examples(path, split) for split in npz.SPLITS}

  def _generate_examples(self, path: pathlib.Path, split: str) -> Iterator[tuple[int, dict]]:
    shape = image_shape(self.builder_config.flag, self.builder_config.size)
    multi_label = INFO[self.builder_config.flag]['task'] == MULTI_LABEL_TASK
    labels = npz.load_array(path, f'{split}_labels').astype(np.int64)
    for i, image in enumerate(npz.iter_rows(path, f'{split}_images')):
      label = labels[i] if multi_label else labels[i, 0]
      yield i, {'image': image.reshape(shape), 'label': label}
