"""Tests of data_pipelines.tfds_base: builds leave no temporary folders behind, failed or not,
and processes of one host that build one dataset at once take turns."""
import os
import pathlib
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
from PIL import Image

from data_pipelines import custom
from data_pipelines import medmnist
from data_pipelines import tfds_base

REPO = pathlib.Path(__file__).resolve().parents[2]


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


_BUILD_SCRIPT = '''
import pathlib, sys, time
from data_pipelines import custom, tfds_base
images, tfds_dir, go = sys.argv[1:]
generate = custom.ImageFolder._generate_examples
def slow(self, *args, **kwargs):  # Long enough for the two builds to overlap.
  for example in generate(self, *args, **kwargs):
    time.sleep(0.2)
    yield example
custom.ImageFolder._generate_examples = slow
config = custom.image_folder_config(pathlib.Path(images), 8, 1, {'train': 1.0})
builder = custom.ImageFolder(config=config, data_dir=tfds_dir)
while not pathlib.Path(go).exists():
  time.sleep(0.01)
tfds_base.prepare(builder)
print(custom.ImageFolder(config=config, data_dir=tfds_dir).info.splits['train'].num_examples)
'''


def test_two_processes_building_one_dataset_take_turns(tmp_path):
  """Runs of a sweep started together on one host: one builds, the other finds it built."""
  image_folder(tmp_path / 'images')
  env = {**os.environ, 'PYTHONPATH': str(REPO), 'XDG_CACHE_HOME': str(tmp_path / 'cache')}
  go, tfds_dir = tmp_path / 'go', tmp_path / 'tfds'
  procs = [subprocess.Popen([sys.executable, '-c', _BUILD_SCRIPT, str(tmp_path / 'images'),
                             str(tfds_dir), str(go)], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for _ in range(2)]
  time.sleep(1)
  go.touch()
  outputs = [proc.communicate(timeout=300) for proc in procs]
  assert [proc.returncode for proc in procs] == [0, 0], [err[-2000:] for _, err in outputs]
  assert [out.split()[-1] for out, _ in outputs] == ['6', '6']
  assert not list(tfds_dir.rglob('incomplete*'))
  assert list((tmp_path / 'cache' / 'fm_adapt' / 'locks').glob('tfds_build_*.lock'))
