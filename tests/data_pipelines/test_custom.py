"""Tests of the bring-your-own-data builders: MedMNIST-layout .npz and image folders."""
import re

import numpy as np
import pytest
from PIL import Image

from data_pipelines import custom
from data_pipelines import tfds_base


@pytest.fixture(scope='module')
def binary(synthetic_medmnist):
  """The synthetic binary set (40/20/30 grey 28x28 examples)."""
  return synthetic_medmnist['binary']


@pytest.fixture(scope='module')
def breast(binary):
  """The arrays of the synthetic binary set (BreastMNIST's layout)."""
  return binary.arrays()


def build_npz(path, tfds_dir, **kwargs):
  builder = custom.CustomNpz(config=custom.npz_config(path, **kwargs), data_dir=tfds_dir)
  tfds_base.prepare(builder)
  return builder


def split_sizes(builder):
  return {name: split.num_examples for name, split in builder.info.splits.items()}


def test_npz_builder_on_a_medmnist_layout_file(binary, tfds_dir):
  builder = build_npz(binary.path, tfds_dir)
  assert split_sizes(builder) == {'train': 40, 'val': 20, 'test': 30}
  cfg = builder.builder_config
  assert re.fullmatch(r'synthetic_binary_[0-9a-f]{10}', cfg.name)
  assert cfg.num_classes == 2 and cfg.class_names == ('0', '1') and cfg.task == 'multiclass'
  assert builder.info.metadata['official'] is False
  with np.load(binary.path, allow_pickle=False) as d:
    for split in ('train', 'test'):
      source = builder.as_data_source(split)
      images, labels = d[f'{split}_images'], d[f'{split}_labels']
      for i in (0, 17, len(source) - 1):
        np.testing.assert_array_equal(source[i]['image'][..., 0], images[i])
        assert source[i]['label'] == labels[i, 0]


def test_config_names_differ_by_file_and_options(synthetic_medmnist, binary):
  other = synthetic_medmnist['ordinal_rgb'].path
  names = {custom.npz_config(binary.path).name, custom.npz_config(other).name,
           custom.npz_config(binary.path, class_names=['normal', 'tumour']).name,
           custom.npz_config(binary.path, task='ordinal').name}
  assert len(names) == 4
  assert custom.npz_config(binary.path).name == custom.npz_config(binary.path).name


def test_same_stem_other_content_gets_another_name(tmp_path, breast):
  first, second = tmp_path / 'a' / 'data.npz', tmp_path / 'b' / 'data.npz'
  for path, n in ((first, 10), (second, 11)):
    path.parent.mkdir()
    np.savez(path, train_images=breast['train_images'][:n], train_labels=breast['train_labels'][:n])
  assert custom.npz_config(first).name != custom.npz_config(second).name


def test_train_only_rgb_and_class_names(tmp_path, synthetic_medmnist):
  arrays = synthetic_medmnist['ordinal_rgb'].arrays()
  images, labels = arrays['train_images'][:25], arrays['train_labels'][:25]
  path = tmp_path / 'retina_small.npz'
  np.savez_compressed(path, train_images=images, train_labels=labels[:, 0])
  names = ['g0', 'g1', 'g2', 'g3', 'g4']
  builder = build_npz(path, tmp_path / 'tfds', task='ordinal', class_names=names)
  assert split_sizes(builder) == {'train': 25}
  assert builder.info.metadata['class_names'] == names
  assert builder.builder_config.task == 'ordinal'
  source = builder.as_data_source('train')
  for i in (3, 24):
    np.testing.assert_array_equal(source[i]['image'], images[i])
    assert source[i]['label'] == labels[i, 0]


def test_multilabel(tmp_path, breast):
  labels = np.stack([breast['train_labels'][:40, 0], 1 - breast['train_labels'][:40, 0],
                     np.zeros(40, np.uint8)], axis=1)
  path = tmp_path / 'multi.npz'
  np.savez(path, train_images=breast['train_images'][:40], train_labels=labels,
           test_images=breast['test_images'][:8], test_labels=labels[:8])
  builder = build_npz(path, tmp_path / 'tfds', task='multilabel')
  assert builder.builder_config.num_classes == 3
  example = builder.as_data_source('train')[7]
  assert example['label'].shape == (3,)
  np.testing.assert_array_equal(example['label'], labels[7])


def test_multilabel_file_with_14_labels(synthetic_medmnist, tfds_dir):
  chest_like = synthetic_medmnist['multilabel']
  builder = build_npz(chest_like.path, tfds_dir, task='multilabel')
  assert builder.builder_config.num_classes == 14
  labels = chest_like.arrays()['val_labels']
  source = builder.as_data_source('val')
  for i in (0, 19):
    assert source[i]['label'].shape == (14,)
    np.testing.assert_array_equal(source[i]['label'], labels[i])


def test_volumes(tmp_path, synthetic_medmnist):
  arrays = synthetic_medmnist['volume'].arrays()
  images, labels = arrays['val_images'][:6], arrays['val_labels'][:6]
  path = tmp_path / 'vol.npz'
  np.savez(path, train_images=images, train_labels=labels)
  builder = build_npz(path, tmp_path / 'tfds')
  example = builder.as_data_source('train')[2]
  assert example['image'].shape == (28, 28, 28, 1)
  np.testing.assert_array_equal(example['image'][..., 0], images[2])
  assert example['label'] == labels[2, 0]


def save_npz(path, breast, **overrides):
  arrays = {'train_images': breast['train_images'][:20],
            'train_labels': breast['train_labels'][:20],
            'val_images': breast['val_images'][:5], 'val_labels': breast['val_labels'][:5]}
  arrays.update(overrides)
  np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
  return path


@pytest.mark.parametrize('overrides, kwargs, message', [
    ({'train_images': None, 'train_labels': None}, {},
     'lacks train_images or train_labels; expected the MedMNIST layout: train_images, '
     'train_labels, val_images, val_labels, test_images, test_labels'),
    ({'val_labels': None}, {}, 'lacks val_images or val_labels'),
    ({'extra': np.zeros(3)}, {}, r"unexpected arrays \['extra'\]"),
    ({'train_images': np.zeros((20, 28, 28), np.float32)}, {}, 'expected uint8'),
    ({'train_labels': np.zeros((19, 1), np.uint8)}, {}, 'has 20 examples but train_labels has 19'),
    ({'val_images': np.zeros((5, 32, 32), np.uint8)}, {}, 'differ in shape across splits'),
    ({'train_labels': np.zeros((20, 1), np.float32)}, {}, 'expected integers'),
    ({'train_labels': np.full((20, 2), 2, np.uint8), 'val_labels': np.ones((5, 2), np.uint8)},
     {'task': 'multilabel'}, 'multilabel labels must be 0 or 1'),
    ({'train_labels': np.ones((20, 2), np.uint8)}, {'task': 'multilabel'},
     r'must be \(N, L\) with the same L in every split'),
    ({'train_labels': np.ones((20, 2), np.uint8)}, {}, r'must be \(N,\) or \(N, 1\)'),
    ({}, {'task': 'regression'}, "Unknown task 'regression'"),
    ({}, {'num_classes': 1}, 'labels need 2 classes but 1 were given'),
    ({}, {'num_classes': 2, 'class_names': ['a', 'b', 'c']}, '3 class_names given for 2 classes'),
    ({'train_images': np.zeros((20, 28, 28, 5, 2, 2), np.uint8), 'val_images': None,
      'val_labels': None}, {}, 'not supported'),
])
def test_npz_errors(tmp_path, breast, overrides, kwargs, message):
  path = save_npz(tmp_path / 'bad.npz', breast, **overrides)
  with pytest.raises(ValueError, match=message):
    custom.npz_config(path, **kwargs)


def test_npz_refuses_pickled_arrays(tmp_path, breast):
  path = save_npz(tmp_path / 'pickled.npz', breast,
                  train_labels=np.array([{'label': 0}] * 20, dtype=object))
  with pytest.raises(ValueError, match='pickle'):
    custom.npz_config(path)


def test_npz_not_a_zip(tmp_path):
  path = tmp_path / 'x.npz'
  path.write_bytes(b'not a zip')
  with pytest.raises(ValueError, match='not an .npz archive'):
    custom.npz_config(path)
  with pytest.raises(FileNotFoundError):
    custom.npz_config(tmp_path / 'missing.npz')


def write_folder(root, breast, split_level=True, per_class=4):
  """PNGs of BreastMNIST-layout images: <root>/[<split>/]<class>/<i>.png; returns them by path."""
  written = {}
  splits = ('train', 'test') if split_level else ('train',)
  for split in splits:
    images, labels = breast[f'{split}_images'], breast[f'{split}_labels'][:, 0]
    for label, class_name in enumerate(('malignant', 'normal')):
      folder = root / split / class_name if split_level else root / class_name
      folder.mkdir(parents=True)
      for i in np.flatnonzero(labels == label)[:per_class]:
        Image.fromarray(images[i]).save(folder / f'{i:04d}.png')
        written[(split, class_name, f'{i:04d}.png')] = images[i]
  return written


def test_image_folder_with_splits(tmp_path, breast):
  written = write_folder(tmp_path / 'images', breast)
  config = custom.image_folder_config(tmp_path / 'images', image_size=28, channels=1)
  builder = custom.ImageFolder(config=config, data_dir=tmp_path / 'tfds')
  tfds_base.prepare(builder)
  assert split_sizes(builder) == {'train': 8, 'test': 8}
  assert builder.info.metadata['class_names'] == ['malignant', 'normal']
  source = builder.as_data_source('train')
  for i, (relpath, label) in enumerate(config.files['train']):
    _, class_name, name = relpath.split('/')
    assert label == ['malignant', 'normal'].index(class_name)
    assert source[i]['label'] == label
    np.testing.assert_array_equal(source[i]['image'][..., 0], written[('train', class_name, name)])


def test_image_folder_resizes_and_converts(tmp_path, breast):
  written = write_folder(tmp_path / 'images', breast, per_class=2)
  config = custom.image_folder_config(tmp_path / 'images', image_size=(32, 40), channels=3)
  builder = custom.ImageFolder(config=config, data_dir=tmp_path / 'tfds')
  tfds_base.prepare(builder)
  image = builder.as_data_source('test')[0]['image']
  assert image.shape == (32, 40, 3) and image.dtype == np.uint8
  relpath = config.files['test'][0][0]
  original = written[tuple(relpath.split('/'))]
  want = np.asarray(Image.fromarray(original).resize((40, 32), Image.Resampling.BILINEAR))
  for c in range(3):
    np.testing.assert_array_equal(image[..., c], want)


def test_image_folder_split_by_fractions(tmp_path, breast):
  write_folder(tmp_path / 'images', breast, split_level=False, per_class=10)
  fractions = {'train': 0.6, 'val': 0.2, 'test': 0.2}
  config = custom.image_folder_config(tmp_path / 'images', 28, 1, fractions, seed=1)
  assert {s: len(f) for s, f in config.files.items()} == {'train': 12, 'val': 4, 'test': 4}
  for split, files in config.files.items():  # Stratified: each class split alike.
    assert [label for _, label in files].count(0) == len(files) // 2
  all_files = sorted(f for files in config.files.values() for f, _ in files)
  assert len(all_files) == len(set(all_files)) == 20
  again = custom.image_folder_config(tmp_path / 'images', 28, 1, fractions, seed=1)
  other = custom.image_folder_config(tmp_path / 'images', 28, 1, fractions, seed=2)
  assert again.files == config.files and again.name == config.name
  assert other.files != config.files and other.name != config.name
  builder = custom.ImageFolder(config=config, data_dir=tmp_path / 'tfds')
  tfds_base.prepare(builder)
  assert split_sizes(builder) == {'train': 12, 'val': 4, 'test': 4}


@pytest.mark.parametrize('layout, kwargs, message', [
    ('mixed', {}, 'mixes split folders'),
    ('split', {'split_fractions': {'train': 1.0}}, 'already has split folders'),
    ('flat', {'split_fractions': {'train': 0.5, 'val': 0.2}}, 'sum to 1'),
    ('flat', {'split_fractions': {'training': 1.0}}, 'split_fractions must map'),
    ('flat', {'channels': 4}, 'channels must be 1'),
    ('flat', {'image_size': 0}, 'image_size must be'),
    ('empty_class', {}, "Class folder 'empty' .* holds no"),
    ('no_classes', {}, 'has no class folders'),
])
def test_image_folder_errors(tmp_path, breast, layout, kwargs, message):
  root = tmp_path / 'images'
  if layout in ('flat', 'empty_class'):
    write_folder(root, breast, split_level=False, per_class=2)
  elif layout in ('split', 'mixed'):
    write_folder(root, breast, per_class=2)
  else:
    root.mkdir()
  if layout == 'mixed':
    (root / 'extra').mkdir()
  if layout == 'empty_class':
    (root / 'empty').mkdir()
  with pytest.raises(ValueError, match=message):
    custom.image_folder_config(root, **{'image_size': 28, **kwargs})


def test_image_folder_missing_root(tmp_path):
  with pytest.raises(FileNotFoundError):
    custom.image_folder_config(tmp_path / 'missing', 28)


def ramp16(lo=0, hi=65535):
  """A 64x64 uint16 ramp in row-major order over [lo, hi] (4096 distinct values)."""
  return np.linspace(lo, hi, 64 * 64).round().astype(np.uint16).reshape(64, 64)


def write_16_bit_folder(root):
  """<root>/<class>/: a full-range 16-bit PNG, the same as TIFF, and a narrow 16-bit TIFF."""
  for class_name, name, array in (('a', 'full.png', ramp16()), ('b', 'full.tif', ramp16()),
                                  ('b', 'narrow.tif', ramp16(1000, 5000))):
    (root / class_name).mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(root / class_name / name)
    with Image.open(root / class_name / name) as image:
      assert image.mode == 'I;16'  # Written and read back at 16 bits.
  return {'a/full.png': ramp16(), 'b/full.tif': ramp16(), 'b/narrow.tif': ramp16(1000, 5000)}


def build_folder(root, tfds_dir, **kwargs):
  config = custom.image_folder_config(root, **{'image_size': 64, 'channels': 1,
                                               'split_fractions': {'train': 1.0}, **kwargs})
  builder = custom.ImageFolder(config=config, data_dir=tfds_dir)
  tfds_base.prepare(builder)
  source = builder.as_data_source('train')
  return builder, {relpath: source[i]['image'][..., 0]
                   for i, (relpath, _) in enumerate(config.files['train'])}


@pytest.mark.parametrize('policy', ['per_image', 'per_dataset', 'full_range'])
def test_image_folder_keeps_the_range_of_16_bit_png_and_tiff(tmp_path, policy):
  written = write_16_bit_folder(tmp_path / 'xray')
  builder, stored = build_folder(tmp_path / 'xray', tmp_path / 'tfds', high_bit_depth=policy)
  assert builder.info.metadata['high_bit_depth'] == policy
  for relpath in ('a/full.png', 'b/full.tif'):
    flat = stored[relpath].reshape(-1)
    assert len(np.unique(flat)) > 200, relpath  # Clipping to 8 bits kept 17 values.
    assert (np.diff(flat.astype(int)) >= 0).all(), relpath  # Order kept.
    assert flat.min() == 0 and flat.max() == 255 and (flat == 255).mean() < 0.01
  narrow = stored['b/narrow.tif']
  if policy == 'per_image':
    assert narrow.min() == 0 and narrow.max() == 255
  elif policy == 'per_dataset':
    assert builder.info.metadata['intensity_range'] == [0.0, 65535.0]
    np.testing.assert_array_equal(
        narrow, np.round(written['b/narrow.tif'] / 65535 * 255).astype(np.uint8))
  else:
    np.testing.assert_array_equal(narrow, written['b/narrow.tif'] // 256)


def test_per_dataset_range_is_kept_when_the_dataset_is_read_again(tmp_path):
  write_16_bit_folder(tmp_path / 'xray')
  build_folder(tmp_path / 'xray', tmp_path / 'tfds', high_bit_depth='per_dataset')
  config = custom.image_folder_config(tmp_path / 'xray', 64, 1, {'train': 1.0},
                                      high_bit_depth='per_dataset')
  again = custom.ImageFolder(config=config, data_dir=tmp_path / 'tfds')
  assert again.is_prepared() and again.info.metadata['intensity_range'] == [0.0, 65535.0]


def test_image_folder_refuses_16_bit_by_default_and_writes_nothing(tmp_path):
  write_16_bit_folder(tmp_path / 'xray')
  with pytest.raises(custom.images_lib.ImageFileError) as e:
    build_folder(tmp_path / 'xray', tmp_path / 'tfds')
  message = str(e.value)
  assert str(tmp_path / 'xray' / 'a' / 'full.png') in message
  assert 'high_bit_depth' in message and 'per_dataset' in message
  assert not (tmp_path / 'tfds').exists() or list((tmp_path / 'tfds').rglob('*')) == []


def test_policy_is_part_of_the_config_name(tmp_path):
  write_16_bit_folder(tmp_path / 'xray')
  names = {custom.image_folder_config(tmp_path / 'xray', 64, high_bit_depth=p).name
           for p in ('error', 'per_image', 'per_dataset', 'full_range')}
  assert len(names) == 4
  with pytest.raises(ValueError, match="Unknown high_bit_depth 'clip'"):
    custom.image_folder_config(tmp_path / 'xray', 64, high_bit_depth='clip')


def truncate(path):
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])


def garble(path):
  path.write_bytes(b'not an image at all' * 20)


def lab(path):
  Image.new('LAB', (8, 8), (50, 10, 10)).save(path, format='TIFF')


@pytest.mark.parametrize('damage, message', [
    (truncate, 'not a whole image PIL can decode.*truncated'),
    (garble, 'not a whole image PIL can decode'),
    (lab, "PIL mode 'LAB', which is not supported"),
    (lambda path: path.unlink(), 'Cannot read image file'),
])
def test_image_folder_errors_name_the_file(tmp_path, damage, message):
  root = tmp_path / 'images'
  for class_name in ('a', 'b'):
    (root / class_name).mkdir(parents=True)
    for i in range(2):
      noise = np.random.default_rng(i).integers(0, 256, (16, 16), np.uint8)
      Image.fromarray(noise).save(root / class_name / f'{i}.png')
  config = custom.image_folder_config(root, 8, 1, {'train': 1.0})
  bad = root / 'b' / '1.png'
  damage(bad)  # After the scan: found when the image is decoded.
  builder = custom.ImageFolder(config=config, data_dir=tmp_path / 'tfds')
  with pytest.raises((ValueError, OSError), match=message) as e:
    tfds_base.prepare(builder)
  assert str(bad) in str(e.value)
  assert list((tmp_path / 'tfds').rglob('*')) == []  # A failed build leaves nothing.
