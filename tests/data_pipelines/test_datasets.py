"""Tests of get_dataset: the data_cfg forms, specs, example format, build dirs and errors."""
import shutil

import numpy as np
import pytest
from PIL import Image

from data_pipelines import data_dir as data_dir_lib
from data_pipelines import datasets
from data_pipelines import npz


@pytest.mark.real_data('checks the official BreastMNIST metadata, md5 and split sizes')
def test_medmnist_spec_and_examples(shared_data_dir, tfds_dir):
  cfg = dict(name='medmnist', flag='breastmnist', size=28, tfds_dir=str(tfds_dir))
  source, spec = datasets.get_dataset(cfg, 'train', data_dir=shared_data_dir)
  assert spec.name == 'medmnist/breastmnist_28'
  assert spec.task == 'multiclass' and spec.num_classes == 2
  assert spec.class_names == ('malignant', 'normal, benign')
  assert spec.split_sizes == {'train': 546, 'val': 78, 'test': 156}
  assert spec.image_shape == (28, 28, 1) and spec.license == 'CC BY 4.0' and spec.official
  assert '28 px' in spec.variant and 'md5' in spec.variant
  assert len(source) == 546
  example = source[0]
  assert set(example) == {'image', 'label'}
  assert example['image'].dtype == np.uint8 and example['image'].shape == (28, 28, 1)
  assert type(example['label']) is int


def test_npz_spec_and_examples(binary_train, synthetic_medmnist):
  source, spec = binary_train
  binary = synthetic_medmnist['binary']
  assert spec.name.startswith('custom_npz/synthetic_binary_')
  assert spec.task == 'multiclass' and spec.num_classes == 2 and spec.class_names == ('0', '1')
  assert spec.split_sizes == {'train': 40, 'val': 20, 'test': 30}
  assert spec.image_shape == (28, 28, 1) and not spec.official
  assert spec.variant == (f'custom npz synthetic_binary.npz (md5 {npz.md5sum(binary.path)}), '
                          'not an official file')
  assert len(source) == 40
  arrays = binary.arrays()
  for i in (0, 39):
    example = source[i]
    assert set(example) == {'image', 'label'}
    assert example['image'].dtype == np.uint8 and example['image'].shape == (28, 28, 1)
    np.testing.assert_array_equal(example['image'][..., 0], arrays['train_images'][i])
    assert type(example['label']) is int and example['label'] == arrays['train_labels'][i, 0]


@pytest.mark.real_data("checks that the official RetinaMNIST task 'ordinal-regression' maps to "
                       "'ordinal', and its official test size")
def test_ordinal_rgb_medmnist(shared_data_dir, tfds_dir):
  cfg = dict(name='medmnist', flag='retinamnist', tfds_dir=str(tfds_dir), split='train')
  source, spec = datasets.get_dataset(cfg, 'test', data_dir=shared_data_dir)
  assert spec.task == 'ordinal' and spec.num_classes == 5 and spec.image_shape == (28, 28, 3)
  assert len(source) == 400  # The split argument wins over data_cfg['split'].


def test_ordinal_rgb_npz(synthetic_medmnist, tfds_dir):
  cfg = synthetic_medmnist['ordinal_rgb'].data_cfg(tfds_dir, split='train')
  source, spec = datasets.get_dataset(cfg, 'test')
  assert spec.task == 'ordinal' and spec.num_classes == 5 and spec.image_shape == (28, 28, 3)
  assert len(source) == 30  # The split argument wins over data_cfg['split'] (train: 40).
  assert source[0]['image'].shape == (28, 28, 3)


def test_npz_relative_to_data_dir(synthetic_medmnist, tfds_dir, monkeypatch):
  binary = synthetic_medmnist['binary']
  monkeypatch.setenv(data_dir_lib.ENV_VAR, str(binary.path.parent))
  cfg = dict(name='npz', path=binary.path.name, task='multiclass', class_names=None,
             tfds_dir=str(tfds_dir))
  source, spec = datasets.get_dataset(cfg, 'val')
  assert spec.split_sizes == {'train': 40, 'val': 20, 'test': 30}
  assert len(source) == 20 and not spec.official and 'not an official file' in spec.variant
  assert spec.name.startswith('custom_npz/synthetic_binary_')


def test_multilabel_examples(synthetic_medmnist, tfds_dir):
  chest_like = synthetic_medmnist['multilabel']
  names = [f'finding{j}' for j in range(14)]
  source, spec = datasets.get_dataset(chest_like.data_cfg(tfds_dir, class_names=names), 'test')
  assert spec.task == 'multilabel' and spec.class_names == tuple(names)
  assert spec.num_classes == 14 and len(source) == 30
  labels = chest_like.arrays()['test_labels']
  for i in (0, 29):
    label = source[i]['label']
    assert label.dtype == np.int64 and label.tolist() == labels[i].tolist()


def test_image_folder(tmp_path, synthetic_medmnist):
  arrays = synthetic_medmnist['ordinal_rgb'].arrays()
  images, labels = arrays['train_images'][:30], arrays['train_labels'][:30, 0]
  for i, (image, label) in enumerate(zip(images, labels)):
    folder = tmp_path / 'fundus' / f'grade{label}'
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(folder / f'{i}.jpg')
  cfg = dict(name='image_folder', path='fundus', image_size=16, seed=3,
             split_fractions={'train': 0.5, 'test': 0.5}, tfds_dir=str(tmp_path / 'tfds'))
  source, spec = datasets.get_dataset(cfg, 'train', data_dir=tmp_path)
  assert spec.image_shape == (16, 16, 3) and spec.task == 'multiclass'
  assert spec.class_names == tuple(f'grade{g}' for g in sorted(set(labels)))
  assert len(spec.class_names) == 5
  assert sum(spec.split_sizes.values()) == 30 and set(spec.split_sizes) == {'train', 'test'}
  assert source[0]['image'].shape == (16, 16, 3) and '16x16x3' in spec.variant


def test_read_only_data_dir_falls_back_to_cache(tmp_path, synthetic_medmnist, monkeypatch):
  read_only = tmp_path / 'shared'
  read_only.mkdir()
  shutil.copy(synthetic_medmnist['binary'].path, read_only / 'mine.npz')
  read_only.chmod(0o555)
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  try:
    _, spec = datasets.get_dataset(dict(name='npz', path='mine.npz'), 'test', data_dir=read_only)
  finally:
    read_only.chmod(0o755)
  assert not (read_only / 'tfds').exists()
  config_name = spec.name.split('/')[1]
  assert (tmp_path / 'cache' / 'fm_adapt' / 'tfds' / 'custom_npz' / config_name).is_dir()
  assert spec.split_sizes['test'] == 30


def test_writable_data_dir_builds_inside(tmp_path, synthetic_medmnist):
  shutil.copy(synthetic_medmnist['binary'].path, tmp_path / 'mine.npz')
  _, spec = datasets.get_dataset(dict(name='npz', path='mine.npz'), 'val', data_dir=tmp_path)
  config_name = spec.name.split('/')[1]
  assert (tmp_path / 'tfds' / 'custom_npz' / config_name / '1.0.0').is_dir()


@pytest.mark.parametrize('cfg, message', [
    (dict(name='cifar10'),
     r"Unknown dataset name 'cifar10'.*\['image_folder', 'medmnist', 'npz', 'pretrain_mixture'\]"),
    (dict(flag='breastmnist'), 'Unknown dataset name None'),
    (dict(name='medmnist', flag='breastmnist', resolution=28),
     r"unknown keys \['resolution'\].*valid keys: name, flag, size"),
    (dict(name='medmnist'), r"missing keys \['flag'\]"),
    (dict(name='npz', file='x.npz'), r"unknown keys \['file'\], missing keys \['path'\]"),
    (dict(name='image_folder', path='x'), r"missing keys \['image_size'\]"),
    (dict(name='medmnist', flag='breastmnist', size=32), 'released at sizes'),
    (dict(name='medmnist', flag='mnist'), 'Unknown MedMNIST flag'),
])
def test_bad_configs(cfg, message, tmp_path):
  with pytest.raises(ValueError, match=message):
    datasets.get_dataset(cfg, 'train', data_dir=tmp_path)
  assert list(tmp_path.iterdir()) == []  # Refused before anything is written.


def test_unknown_split(synthetic_medmnist, tfds_dir):
  cfg = synthetic_medmnist['binary'].data_cfg(tfds_dir)
  with pytest.raises(ValueError, match=r"Unknown split 'validation'.*\['train', 'val', 'test'\]"):
    datasets.get_dataset(cfg, 'validation')
  source, _ = datasets.get_dataset(cfg, 'train[:10]')
  assert len(source) == 10


def test_missing_data_dir_for_relative_path(tmp_path, monkeypatch):
  monkeypatch.delenv(data_dir_lib.ENV_VAR, raising=False)
  monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'cache'))
  with pytest.raises(FileNotFoundError, match=data_dir_lib.ENV_VAR):
    datasets.get_dataset(dict(name='npz', path='some/file.npz'), 'train')


def test_missing_npz(tmp_path):
  with pytest.raises(FileNotFoundError, match='nothing_here.npz'):
    datasets.get_dataset(dict(name='npz', path='nothing_here.npz'), 'train', data_dir=tmp_path)


@pytest.mark.parametrize('policy', ['per_image', 'per_dataset'])
def test_image_folder_16_bit_through_get_dataset(tmp_path, policy):
  ramp = np.linspace(0, 65535, 32 * 32).round().astype(np.uint16).reshape(32, 32)
  for class_name, lo in (('a', 0), ('b', 1)):
    (tmp_path / 'ct' / class_name).mkdir(parents=True)
    Image.fromarray(ramp // (1 + lo)).save(tmp_path / 'ct' / class_name / 'slice.tif')
  cfg = dict(name='image_folder', path='ct', image_size=32, channels=1, high_bit_depth=policy,
             split_fractions={'train': 1.0}, tfds_dir=str(tmp_path / 'tfds'))
  source, spec = datasets.get_dataset(cfg, 'train', data_dir=tmp_path)
  image = source[0]['image'][..., 0]
  assert image.dtype == np.uint8 and len(np.unique(image)) > 200
  assert f'deeper than 8 bits rescaled {policy}' in spec.variant
  assert ('over [0, 65535]' in spec.variant) == (policy == 'per_dataset')
  with pytest.raises(ValueError, match=r"slice.tif.*high_bit_depth"):
    datasets.get_dataset({**cfg, 'high_bit_depth': 'error'}, 'train', data_dir=tmp_path)
  with pytest.raises(ValueError, match="Unknown high_bit_depth 'clip'"):
    datasets.get_dataset({**cfg, 'high_bit_depth': 'clip'}, 'train', data_dir=tmp_path)
