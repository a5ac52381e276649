"""Tests of data_pipelines.tfds_base: builds leave no temporary folders behind, failed or not."""
import tempfile

import numpy as np
import pytest
from PIL import Image

from data_pipelines import custom
from data_pipelines import medmnist
from data_pipelines import tfds_base


@pytest.fixture()
def temp_dir(tmp_path, monkeypatch):
  """A fresh, empty temporary directory for everything that uses `tempfile` (TFDS too)."""
  path = tmp_path / 'tmp'
  path.mkdir()
  monkeypatch.setattr(tempfile, 'tempdir', str(path))
  return path


def image_folder(root, broken=False):
  """A tiny 2-class PNG folder; `broken` makes one file a truncated PNG."""
  for class_name in ('a', 'b'):
    (root / class_name).mkdir(parents=True)
    for i in range(3):
      noise = np.random.default_rng(i).integers(0, 256, (12, 12), np.uint8)
      Image.fromarray(noise).save(root / class_name / f'{i}.png')
  if broken:
    path = root / 'b' / '2.png'
    path.write_bytes(path.read_bytes()[:60])
  return custom.image_folder_config(root, 8, 1, {'train': 1.0})


def test_build_leaves_no_temporary_folders(tmp_path, temp_dir):
  builder = custom.ImageFolder(config=image_folder(tmp_path / 'images'),
                               data_dir=tmp_path / 'tfds')
  tfds_base.prepare(builder)
  assert builder.info.splits['train'].num_examples == 6
  again = custom.ImageFolder(config=builder.builder_config, data_dir=tmp_path / 'tfds')
  tfds_base.prepare(again)
  assert list(temp_dir.iterdir()) == []  # TFDS made a tmp*tfds folder per builder.


def test_failed_build_leaves_nothing(tmp_path, temp_dir):
  (tmp_path / 'tfds').mkdir()
  builder = custom.ImageFolder(config=image_folder(tmp_path / 'images', broken=True),
                               data_dir=tmp_path / 'tfds')
  with pytest.raises(ValueError, match='2.png'):
    tfds_base.prepare(builder)
  assert list(temp_dir.iterdir()) == []
  assert list((tmp_path / 'tfds').rglob('*')) == []
  assert (tmp_path / 'tfds').is_dir()  # Existed before the build: kept.


def test_failed_build_removes_only_the_folders_it_made(tmp_path, temp_dir):
  tfds_dir = tmp_path / 'new' / 'tfds'
  builder = custom.ImageFolder(config=image_folder(tmp_path / 'images', broken=True),
                               data_dir=tfds_dir)
  with pytest.raises(ValueError):
    tfds_base.prepare(builder)
  assert not (tmp_path / 'new').exists() and list(temp_dir.iterdir()) == []


def test_every_builder_makes_no_temporary_folder(tmp_path, temp_dir):
  medmnist.MedMNIST(config='breastmnist_28', source_dir=tmp_path, data_dir=tmp_path / 'tfds')
  custom.ImageFolder(config=image_folder(tmp_path / 'images'), data_dir=tmp_path / 'tfds')
  arrays = {'train_images': np.zeros((4, 8, 8), np.uint8), 'train_labels': np.arange(4) % 2}
  np.savez(tmp_path / 'x.npz', **arrays)
  custom.CustomNpz(config=custom.npz_config(tmp_path / 'x.npz'), data_dir=tmp_path / 'tfds')
  assert list(temp_dir.iterdir()) == []


def test_a_builder_must_use_our_dataset_info(tmp_path, temp_dir):  # TFDS litters temp_dir.
  class Plain(tfds_base.Builder, skip_registration=True):
    VERSION = '1.0.0'

    def _info(self):
      return tfds_base.tfds.core.DatasetInfo(builder=self)

    def _split_generators(self, dl_manager):
      return {}

    def _generate_examples(self):
      yield from ()

  with pytest.raises(TypeError, match='must return tfds_base.DatasetInfo'):
    Plain(data_dir=tmp_path)
