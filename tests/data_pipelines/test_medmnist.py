"""Tests of the official MedMNIST builder: tables, md5 checks, layout checks, download."""
import contextlib
import functools
import http.server
import pathlib
import shutil
import threading

import numpy as np
import pytest

from data_pipelines import medmnist
from data_pipelines import npz
from data_pipelines import tfds_base

FLAGS_2D = ('pathmnist', 'chestmnist', 'dermamnist', 'octmnist', 'pneumoniamnist', 'retinamnist',
            'breastmnist', 'bloodmnist', 'tissuemnist', 'organamnist', 'organcmnist',
            'organsmnist')
FLAGS_3D = ('organmnist3d', 'nodulemnist3d', 'adrenalmnist3d', 'fracturemnist3d',
            'vesselmnist3d', 'synapsemnist3d')
SHARED_FILES = ('pneumoniamnist.npz', 'breastmnist.npz', 'retinamnist.npz', 'adrenalmnist3d.npz',
                'adrenalmnist3d_64.npz')


def build(flag, data_dir, tfds_dir, size=28, **kwargs):
  builder = medmnist.MedMNIST(config=f'{flag}_{size}', source_dir=data_dir, data_dir=tfds_dir,
                              **kwargs)
  tfds_base.prepare(builder)
  return builder


def files_under(path: pathlib.Path) -> list[pathlib.Path]:
  return sorted(p for p in path.rglob('*') if p.is_file()) if path.exists() else []


@contextlib.contextmanager
def http_server(directory: pathlib.Path):
  """Serves `directory` on 127.0.0.1 (an ephemeral port); yields the base URL."""
  handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
  handler.log_message = lambda *args: None
  server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  try:
    yield f'http://127.0.0.1:{server.server_address[1]}'
  finally:
    server.shutdown()
    server.server_close()


def test_info_covers_every_flag_and_size():
  assert set(medmnist.INFO) == set(FLAGS_2D + FLAGS_3D)
  assert len(medmnist.MD5) == 12 * 4 + 6 * 2
  for flag in FLAGS_2D:
    assert medmnist.INFO[flag]['sizes'] == (28, 64, 128, 224)
  for flag in FLAGS_3D:
    assert medmnist.INFO[flag]['sizes'] == (28, 64)
    assert medmnist.image_shape(flag, 64) == (64, 64, 64, 1)
  assert len(medmnist.MedMNIST.BUILDER_CONFIGS) == 60


def test_info_entries_from_the_official_table():
  info = medmnist.INFO
  assert info['chestmnist']['task'] == 'multi-label, binary-class'
  assert len(info['chestmnist']['labels']) == 14 and medmnist.num_labels('chestmnist') == 14
  assert info['retinamnist']['task'] == 'ordinal-regression'
  assert info['pneumoniamnist']['task'] == 'binary-class'
  assert info['pathmnist']['task'] == 'multi-class' and len(info['pathmnist']['labels']) == 9
  assert info['dermamnist']['license'] == 'CC BY-NC 4.0'
  assert {i['license'] for f, i in info.items() if f != 'dermamnist'} == {'CC BY 4.0'}
  assert info['breastmnist']['n_samples'] == {'train': 546, 'val': 78, 'test': 156}
  assert info['breastmnist']['labels'] == ('malignant', 'normal, benign')
  assert medmnist.image_shape('retinamnist', 64) == (64, 64, 3)
  assert medmnist.image_shape('pneumoniamnist', 224) == (224, 224, 1)
  assert medmnist.MD5['pneumoniamnist.npz'] == '28209eda62fecd6e6a2d98b1501bb15f'
  assert medmnist.MD5['pathmnist_224.npz'] == '2c51a510bcdc9cf8ddb2af93af1eadec'


def test_file_names_and_urls():
  assert medmnist.filename('pathmnist', 28) == 'pathmnist.npz'
  assert medmnist.filename('pathmnist', 64) == 'pathmnist_64.npz'
  assert (medmnist.official_url('pathmnist', 64) ==
          'https://zenodo.org/records/10519652/files/pathmnist_64.npz?download=1')
  assert (medmnist.official_url('breastmnist', 28, 'http://mirror/x/') ==
          'http://mirror/x/breastmnist.npz?download=1')


@pytest.mark.parametrize('flag, size, message', [
    ('cifarmnist', 28, "Unknown MedMNIST flag 'cifarmnist'; valid flags: .*'pathmnist'"),
    ('adrenalmnist3d', 128, r'sizes \(28, 64\)'),
    ('pathmnist', 32, 'released at sizes'),
])
def test_bad_flag_or_size(flag, size, message):
  with pytest.raises(ValueError, match=message):
    medmnist.filename(flag, size)


@pytest.mark.real_data('checks the official md5 and layout (keys, dtypes, split sizes) of the '
                       'shared files')
@pytest.mark.parametrize('name', SHARED_FILES)
def test_official_shared_files_pass_md5_and_layout(shared_data_dir, name):
  flag, _, size = name[:-4].partition('_')
  size = int(size or 28)
  path = shared_data_dir / 'medmnist' / name
  assert medmnist.verify_md5(path, flag, size) == medmnist.MD5[name]
  medmnist.check_layout(path, flag, size)


@pytest.mark.real_data('builds the official BreastMNIST file and checks its metadata, sizes and '
                       'examples against the file')
def test_builder_accepts_official_breastmnist(shared_data_dir, tfds_dir):
  builder = build('breastmnist', shared_data_dir, tfds_dir)
  splits = builder.info.splits
  assert {s: splits[s].num_examples for s in ('train', 'val', 'test')} == {
      'train': 546, 'val': 78, 'test': 156}
  meta = builder.info.metadata
  assert meta['class_names'] == ['malignant', 'normal, benign']
  assert meta['task'] == 'binary-class' and meta['license'] == 'CC BY 4.0'
  assert meta['md5'] == medmnist.MD5['breastmnist.npz'] and meta['official']
  source = builder.as_data_source('val')
  with np.load(shared_data_dir / 'medmnist' / 'breastmnist.npz', allow_pickle=False) as d:
    images, labels = d['val_images'], d['val_labels']
  for i in (0, 41, 77):  # Examples keep the order of the file.
    assert source[i]['image'].shape == (28, 28, 1) and source[i]['image'].dtype == np.uint8
    np.testing.assert_array_equal(source[i]['image'][..., 0], images[i])
    assert source[i]['label'] == labels[i, 0]


@pytest.mark.real_data('builds the official AdrenalMNIST3D file and checks its test size and '
                       'volumes against the file')
def test_builder_3d_volumes(shared_data_dir, tfds_dir):
  builder = build('adrenalmnist3d', shared_data_dir, tfds_dir)
  source = builder.as_data_source('test')
  assert len(source) == 298
  assert source[0]['image'].shape == (28, 28, 28, 1)
  with np.load(shared_data_dir / 'medmnist' / 'adrenalmnist3d.npz', allow_pickle=False) as d:
    np.testing.assert_array_equal(source[5]['image'][..., 0], d['test_images'][5])


def as_official(synthetic, data_dir: pathlib.Path) -> pathlib.Path:
  """Copies a synthetic set to the official path of the flag it mimics; returns that path."""
  dest = data_dir / 'medmnist' / medmnist.filename(synthetic.like, 28)
  dest.parent.mkdir(parents=True, exist_ok=True)
  shutil.copy(synthetic.path, dest)
  return dest


def accept_in_tables(monkeypatch, synthetic) -> None:
  """Puts a synthetic set's md5 and split sizes into the official tables of its flag."""
  monkeypatch.setitem(medmnist.MD5, medmnist.filename(synthetic.like, 28),
                      npz.md5sum(synthetic.path))
  monkeypatch.setitem(medmnist.INFO, synthetic.like,
                      {**medmnist.INFO[synthetic.like], 'n_samples': synthetic.split_sizes})


@pytest.mark.parametrize('name', ['binary', 'ordinal_rgb', 'multilabel', 'volume'])
def test_builder_reads_every_kind_of_file_in_its_order(synthetic_medmnist, tmp_path, monkeypatch,
                                                       name):
  synthetic = synthetic_medmnist[name]
  as_official(synthetic, tmp_path / 'data')
  accept_in_tables(monkeypatch, synthetic)
  builder = build(synthetic.like, tmp_path / 'data', tmp_path / 'tfds')
  assert {s: builder.info.splits[s].num_examples for s in npz.SPLITS} == synthetic.split_sizes
  info = medmnist.INFO[synthetic.like]
  assert builder.info.metadata['class_names'] == list(info['labels'])
  assert builder.info.metadata['task'] == info['task']
  arrays = synthetic.arrays()
  for split in npz.SPLITS:
    source = builder.as_data_source(split)
    for i in (0, len(source) // 2, len(source) - 1):
      image = source[i]['image']
      assert image.shape == synthetic.image_shape and image.dtype == np.uint8
      np.testing.assert_array_equal(image.reshape(arrays[f'{split}_images'][i].shape),
                                    arrays[f'{split}_images'][i])
      want = arrays[f'{split}_labels'][i]
      if synthetic.task == 'multilabel':
        np.testing.assert_array_equal(source[i]['label'], want)
      else:
        assert np.ndim(source[i]['label']) == 0 and source[i]['label'] == want[0]


def test_other_file_is_rejected_and_nothing_is_written(synthetic_medmnist, tmp_path):
  data_dir = tmp_path / 'data'
  fake = as_official(synthetic_medmnist['binary'], data_dir)
  tfds_dir = tmp_path / 'tfds'
  with pytest.raises(medmnist.NotOfficialFileError) as e:
    build('breastmnist', data_dir, tfds_dir)
  message = str(e.value)
  assert str(fake) in message
  assert medmnist.MD5['breastmnist.npz'] in message  # expected
  assert npz.md5sum(fake) in message  # got
  assert 'not the official MedMNIST file' in message and "name='npz'" in message
  assert files_under(tfds_dir) == []
  assert files_under(data_dir) == [fake]


def test_file_accepted_once_its_md5_is_in_the_table(synthetic_medmnist, tmp_path, monkeypatch):
  binary = synthetic_medmnist['binary']
  data_dir = tmp_path / 'data'
  as_official(binary, data_dir)
  monkeypatch.setitem(medmnist.INFO, 'breastmnist',
                      {**medmnist.INFO['breastmnist'], 'n_samples': binary.split_sizes})
  with pytest.raises(medmnist.NotOfficialFileError, match='md5'):
    build('breastmnist', data_dir, tmp_path / 'tfds')
  monkeypatch.setitem(medmnist.MD5, 'breastmnist.npz', npz.md5sum(binary.path))
  builder = build('breastmnist', data_dir, tmp_path / 'tfds')
  assert builder.info.splits['test'].num_examples == 30


def test_layout_is_checked_after_the_md5(synthetic_medmnist, tmp_path, monkeypatch):
  data_dir = tmp_path / 'data'
  fake = as_official(synthetic_medmnist['binary'], data_dir)
  monkeypatch.setitem(medmnist.MD5, 'breastmnist.npz', npz.md5sum(fake))
  with pytest.raises(medmnist.NotOfficialFileError, match=r'train_images is uint8\[40, 28, 28\]'
                     r', expected uint8\[546, 28, 28\]'):
    build('breastmnist', data_dir, tmp_path / 'tfds')
  assert files_under(tmp_path / 'tfds') == []


@pytest.mark.parametrize('labels, message', [
    (np.full((40, 2), 1, np.uint8), r'train_labels is uint8\[40, 2\], expected uint8\[40, 1\]'),
    (np.full((40, 1), 2, np.uint8), 'train_labels holds 2, expected values below 2'),
])
def test_layout_checks_labels(synthetic_medmnist, tmp_path, monkeypatch, labels, message):
  binary = synthetic_medmnist['binary']
  path = tmp_path / 'data' / 'medmnist' / 'breastmnist.npz'
  path.parent.mkdir(parents=True)
  np.savez_compressed(path, **{**binary.arrays(), 'train_labels': labels})
  monkeypatch.setitem(medmnist.MD5, 'breastmnist.npz', npz.md5sum(path))
  monkeypatch.setitem(medmnist.INFO, 'breastmnist',
                      {**medmnist.INFO['breastmnist'], 'n_samples': binary.split_sizes})
  with pytest.raises(medmnist.NotOfficialFileError, match=message):
    build('breastmnist', tmp_path / 'data', tmp_path / 'tfds')
  assert files_under(tmp_path / 'tfds') == []


def test_download_from_local_server(synthetic_medmnist, tmp_path, monkeypatch, no_proxy):
  binary = synthetic_medmnist['binary']
  accept_in_tables(monkeypatch, binary)
  served = as_official(binary, tmp_path / 'served').parent
  data_dir = tmp_path / 'data'
  data_dir.mkdir()
  with http_server(served) as url:
    builder = build('breastmnist', data_dir, tmp_path / 'tfds', base_url=url)
  dest = data_dir / 'medmnist' / 'breastmnist.npz'
  assert files_under(data_dir) == [dest]  # No temporary file left.
  assert npz.md5sum(dest) == medmnist.MD5['breastmnist.npz'] == npz.md5sum(binary.path)
  assert builder.info.splits['train'].num_examples == 40


def test_download_with_wrong_md5_leaves_nothing(synthetic_medmnist, tmp_path, no_proxy):
  served = as_official(synthetic_medmnist['binary'], tmp_path / 'served').parent
  data_dir = tmp_path / 'data'
  data_dir.mkdir()
  with http_server(served) as url, pytest.raises(medmnist.NotOfficialFileError, match='md5'):
    build('breastmnist', data_dir, tmp_path / 'tfds', base_url=url)
  assert files_under(data_dir) == [] and files_under(tmp_path / 'tfds') == []


def test_download_failure_says_where_to_put_the_file(tmp_path, no_proxy):
  data_dir = tmp_path / 'data'
  data_dir.mkdir()
  with http_server(tmp_path) as url, pytest.raises(OSError, match='put it at'):
    medmnist.ensure_source('breastmnist', 28, data_dir, base_url=url)  # 404.
  assert files_under(data_dir) == []


def test_missing_file_without_download(tmp_path):
  with pytest.raises(FileNotFoundError, match='breastmnist.npz'):
    medmnist.ensure_source('breastmnist', 28, tmp_path, allow_download=False)


def test_no_download_into_read_only_data_dir(tmp_path):
  data_dir = tmp_path / 'data'
  data_dir.mkdir()
  data_dir.chmod(0o555)
  try:
    with pytest.raises(PermissionError, match='read-only'):
      medmnist.ensure_source('breastmnist', 28, data_dir)
  finally:
    data_dir.chmod(0o755)
