"""Tests of the pretraining mixture: spec, weights, determinism, loader, and no held-out leakage.

The synthetic data directory holds official-layout MedMNIST files (their md5 and split sizes put
into the official tables, as tests/data_pipelines/test_medmnist.py does) and fake DRIVE,
CHASE_DB1 and Kvasir-SEG images, with planted leaks: training items byte-identical to held-out
ones, which the mixture must leave out. The leakage check computes the held-out sets itself
from the files (not through the module's split functions).
"""
import dataclasses
import hashlib
import math
import pathlib
import shutil

import numpy as np
import pytest
from PIL import Image

from data_pipelines import datasets
from data_pipelines import image_splits
from data_pipelines import loader
from data_pipelines import medmnist
from data_pipelines import npz
from data_pipelines import pretrain_mixture as pm

SHORT_SIDE = 24  # Of the fake large images (given in every large-image entry of SPEC).
SPEC = [dict(source='medmnist', flag='breastmnist', weight=2.0),
        dict(source='medmnist', flag='retinamnist', weight=1.0),
        dict(source='medmnist', flag='adrenalmnist3d', weight=1.0),
        dict(source='drive', weight=0.5, crops_per_image=4, short_side=SHORT_SIDE),
        dict(source='chase_db1', weight=0.5, crops_per_image=2, short_side=SHORT_SIDE),
        dict(source='kvasir_seg', weight=1.0, crops_per_image=1, short_side=SHORT_SIDE)]
VOLUMES = {'train': 6, 'val': 2, 'test': 3}
CUBE_SLICES = range(4, 12)  # Foreground slices of every fake volume (12.8 % of the pixels).


def digest(data) -> str:
  return hashlib.sha256(np.ascontiguousarray(data).tobytes()).hexdigest()


def file_digest(path) -> str:
  return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


# ----------------------------------------------------------------------------------------------
# The fake data directory.


def _volumes() -> dict[str, np.ndarray]:
  """28^3 volumes: a 10x10 square of value 100 + 10 k on slices k in CUBE_SLICES, placed by the
  volume's number; 3 pixels on slice 20 (0.4 %: dropped by the 1 % foreground filter)."""
  arrays, v = {}, 0
  for split, n in VOLUMES.items():
    images = np.zeros((n, 28, 28, 28), np.uint8)
    for i in range(n):
      r, c = v % 18, (3 * v) % 18
      for k in CUBE_SLICES:
        images[i, k, r:r + 10, c:c + 10] = 100 + 10 * k
      images[i, 20, 0, :3] = 255
      v += 1
    arrays[f'{split}_images'] = images
    arrays[f'{split}_labels'] = (np.arange(n) % 2).astype(np.uint8)[:, None]
  arrays['train_images'][2] = arrays['test_images'][1]  # Planted leak: a test volume.
  return arrays


def _official(root: pathlib.Path, flag: str, arrays: dict) -> dict:
  """Writes `arrays` at the official path of `flag`; returns the table entries that accept it."""
  path = root / 'medmnist' / medmnist.filename(flag, 28)
  path.parent.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(path, **arrays)
  sizes = {s: len(arrays[f'{s}_images']) for s in npz.SPLITS}
  return {flag: (path.name, npz.md5sum(path), sizes)}


def _accept(mp: pytest.MonkeyPatch, tables: dict) -> None:
  """Puts the fake files' md5 and split sizes into the official tables (undone by `mp`)."""
  for flag, (name, md5, sizes) in tables.items():
    mp.setitem(medmnist.MD5, name, md5)
    mp.setitem(medmnist.INFO, flag, {**medmnist.INFO[flag], 'n_samples': sizes})


def _image(path: pathlib.Path, rng: np.random.Generator, size=(30, 36)) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)


def _large_images(root: pathlib.Path) -> None:
  rng = np.random.default_rng(0)
  drive = root / 'retina_vessels' / 'DRIVE'
  for i in (21, 22, 23):
    _image(drive / 'training' / 'images' / f'{i}_training.tif', rng)
  for i in (1, 2):
    _image(drive / 'testing' / 'images' / f'{i:02d}_test.tif', rng)
  # Planted leak: a testing image byte-identical to a training one.
  shutil.copy(drive / 'training' / 'images' / '21_training.tif',
              drive / 'testing' / 'images' / '03_test.tif')
  for child in range(1, 15):
    for eye in 'LR':
      _image(root / 'retina_vessels' / 'CHASEDB1' / f'Image_{child:02d}{eye}.jpg', rng)
  for i in range(image_splits.KVASIR_IMAGES):
    _image(root / 'kvasir_seg' / 'Kvasir-SEG' / 'images' / f'cju{i:04d}.jpg', rng, (12, 16))


@dataclasses.dataclass(frozen=True)
class FakeData:
  root: pathlib.Path
  planted: tuple[str, ...]  # Origins of the planted training items that equal held-out ones.
  tables: dict  # {flag: (file name, md5, split sizes)} of the fake official files.


@pytest.fixture(scope='module')
def fake_files(synthetic_medmnist, tmp_path_factory) -> FakeData:
  """The fake data directory, written once."""
  root = tmp_path_factory.mktemp('pretrain_data')
  breast = synthetic_medmnist['binary'].arrays()
  breast['train_images'][3] = breast['val_images'][0]
  retina = synthetic_medmnist['ordinal_rgb'].arrays()
  retina['train_images'][5] = retina['test_images'][2]
  tables = {**_official(root, 'breastmnist', breast), **_official(root, 'retinamnist', retina),
            **_official(root, 'adrenalmnist3d', _volumes())}
  _large_images(root)
  medmnist_dir = root / 'medmnist'
  planted = (f'{medmnist_dir / "breastmnist.npz"} train_images[3]',
             f'{medmnist_dir / "retinamnist.npz"} train_images[5]',
             *(f'{medmnist_dir / "adrenalmnist3d.npz"} train_images[2] slice {k}'
               for k in CUBE_SLICES),
             str(root / 'retina_vessels' / 'DRIVE' / 'training' / 'images' / '21_training.tif'))
  return FakeData(root, planted, tables)


@pytest.fixture()
def fake(fake_files, monkeypatch) -> FakeData:
  """The fake data directory, its MedMNIST files accepted as official for one test."""
  _accept(monkeypatch, fake_files.tables)
  return fake_files


@pytest.fixture(scope='module')
def mixture(fake_files) -> pm.PretrainMixture:
  """SPEC at 28 px grey, seed 0 (built once)."""
  with pytest.MonkeyPatch.context() as mp:
    _accept(mp, fake_files.tables)
    return pm.build(SPEC, fake_files.root, image_size=28, channels=1, seed=0)


# ----------------------------------------------------------------------------------------------
# The leakage check: independent of the module's split functions.


def kvasir_held_out(images_dir: pathlib.Path) -> list[pathlib.Path]:
  """The README's fixed split: sorted ids, permuted by default_rng(0); the last 120 held out."""
  files = sorted(images_dir.glob('*.jpg'))
  order = np.random.default_rng(0).permutation(len(files))
  return [files[i] for i in order[880:]]


def held_out_files(data_dir: pathlib.Path) -> list[pathlib.Path]:
  """DRIVE testing images, CHASE_DB1's last 8 (children 11-14), Kvasir-SEG's held-out 120."""
  drive = sorted((data_dir / 'retina_vessels' / 'DRIVE' / 'testing' / 'images').glob('*.tif'))
  chase = sorted((data_dir / 'retina_vessels' / 'CHASEDB1').glob('Image_*.jpg'))[20:]
  kvasir = kvasir_held_out(data_dir / 'kvasir_seg' / 'Kvasir-SEG' / 'images')
  return drive + chase + kvasir


def held_out_digests(data_dir: pathlib.Path, short_side: int, channels: int) -> set[str]:
  """Digests of every val/test image of every MedMNIST file (every slice of 3D volumes), of every
  held-out image file, and of those files decoded as the mixture decodes its images."""
  found = set()
  for path in sorted((data_dir / 'medmnist').glob('*.npz')):
    with np.load(path, allow_pickle=False) as arrays:
      for split in ('val', 'test'):
        for image in arrays[f'{split}_images']:
          found.update(digest(plane) for plane in (image if '3d' in path.name else [image]))
  for path in held_out_files(data_dir):
    found.add(file_digest(path))
    found.add(digest(pm.load_reduced(path, short_side, channels)))
  return found


def pooled_digests(mixture: pm.PretrainMixture) -> list[tuple[str, str]]:
  """(digest, origin) of the stored item of every entry (file bytes too for image files)."""
  first = {}
  for i in range(len(mixture)):
    first.setdefault(mixture.origin(i), i)
  found = []
  for (name, origin), i in first.items():
    stored = mixture.stored(i)
    if name.startswith('medmnist/'):
      # As in the file: grey images and slices without the channel axis.
      found.append((digest(stored[..., 0] if stored.shape[-1] == 1 else stored), origin))
    else:
      found += [(file_digest(origin), origin), (digest(stored), origin)]
  return found


def leaks(mixture: pm.PretrainMixture, data_dir: pathlib.Path, short_side: int) -> list[str]:
  held = held_out_digests(data_dir, short_side, mixture.channels)
  return sorted({origin for d, origin in pooled_digests(mixture) if d in held})


def test_no_val_or_test_image_enters_the_pool(mixture, fake):
  assert leaks(mixture, fake.root, SHORT_SIDE) == []
  excluded = [origin for pool in mixture.pools for origin in pool.excluded]
  assert sorted(excluded) == sorted(fake.planted)


def test_leak_check_finds_the_planted_leaks_when_nothing_is_left_out(fake, monkeypatch):
  monkeypatch.setattr(pm, '_drop_held_out', lambda pool, held_out: None)
  leaky = pm.build(SPEC, fake.root, image_size=28, channels=1, seed=0)
  assert leaks(leaky, fake.root, SHORT_SIDE) == sorted(fake.planted)


# ----------------------------------------------------------------------------------------------
# Sizes, weights, shapes.


def test_pools_hold_the_training_items_only(mixture):
  items = {s['name']: (s['items'], s['excluded'], s['size']) for s in mixture.summary()}
  kept_slices = (VOLUMES['train'] - 1) * len(CUBE_SLICES)
  assert items == {'medmnist/breastmnist_28': (39, 1, 39), 'medmnist/retinamnist_28': (39, 1, 39),
                   'medmnist/adrenalmnist3d_28': (kept_slices, len(CUBE_SLICES), kept_slices),
                   'drive': (2, 1, 8), 'chase_db1': (20, 0, 40), 'kvasir_seg': (880, 0, 880)}
  chase = [pathlib.Path(o).name for o in mixture.pools[4].origins]
  assert chase == [f'Image_{c:02d}{e}.jpg' for c in range(1, 11) for e in 'LR']


def _entries_by_source(mixture) -> dict[str, int]:
  counts = {}
  for i in range(len(mixture)):
    name = mixture.origin(i)[0]
    counts[name] = counts.get(name, 0) + 1
  return counts


@pytest.mark.parametrize('epoch_size', [None, 500])
def test_entries_follow_the_weights(fake, epoch_size):
  pools = pm.load_pools(SPEC, fake.root, channels=1)
  weights = np.array([e['weight'] for e in SPEC])
  mix = pm.PretrainMixture(pools, weights, image_size=28, channels=1, seed=0,
                           epoch_size=epoch_size)
  counts = _entries_by_source(mix)
  assert counts == {s['name']: s['entries'] for s in mix.summary()}
  exact = weights / weights.sum() * len(mix)
  assert np.abs(np.array([counts[p.name] for p in pools]) - exact).max() < 1
  if epoch_size is None:  # The smallest epoch whose exact shares cover every source's items.
    sizes = np.array([p.size for p in pools])
    assert len(mix) == math.ceil((sizes / (weights / weights.sum())).max())
    assert all(counts[p.name] >= p.size for p in pools)
    # Every stored item appears: a source's entries cycle through all its items.
    for pool in pools:
      seen = {mix.origin(i)[1] for i in range(len(mix)) if mix.origin(i)[0] == pool.name}
      assert seen == set(pool.origins)
  else:
    assert len(mix) == 500


def test_examples_are_uint8_at_the_model_resolution(fake):
  for size, channels in [(28, 1), (20, 3)]:
    mix = pm.build(SPEC, fake.root, image_size=size, channels=channels, seed=1)
    for i in range(0, len(mix), 7):
      example = mix[i]
      assert set(example) == {'image', 'label'} and example['label'] == 0
      assert example['image'].dtype == np.uint8
      assert example['image'].shape == (size, size, channels)


def test_channels_grey_to_rgb_repeats_and_rgb_to_grey_is_luma(fake, mixture):
  rgb = pm.build(SPEC[:1], fake.root, image_size=28, channels=3)
  image = rgb[0]['image']
  np.testing.assert_array_equal(image[..., 0], rgb.stored(0)[..., 0])
  assert (image == image[..., :1]).all()
  retina = [i for i in range(len(mixture)) if mixture.origin(i)[0] == 'medmnist/retinamnist_28']
  stored = mixture.stored(retina[0])
  assert stored.shape == (28, 28, 3)
  np.testing.assert_array_equal(mixture[retina[0]]['image'][..., 0],
                                np.asarray(Image.fromarray(stored).convert('L')))


def test_slices_of_volumes_need_foreground(fake):
  spec = [dict(source='medmnist', flag='adrenalmnist3d', min_foreground=0.0)]
  mix = pm.build(spec, fake.root, image_size=28, channels=1)
  # Slice 20 (3 pixels) passes at 0, and equals slice 20 of every held-out volume: left out.
  assert mix.summary()[0]['items'] == (VOLUMES['train'] - 1) * len(CUBE_SLICES)
  assert len(mix.pools[0].excluded) == VOLUMES['train'] + len(CUBE_SLICES)


# ----------------------------------------------------------------------------------------------
# Determinism and the loader.


def test_same_seed_same_entries_in_any_order_other_seed_other_entries(fake, mixture):
  again = pm.build(SPEC, fake.root, image_size=28, channels=1, seed=0)
  assert len(again) == len(mixture) and repr(again) == repr(mixture)
  assert again.fingerprint() == mixture.fingerprint()
  for i in reversed(range(len(mixture))):
    np.testing.assert_array_equal(again[i]['image'], mixture[i]['image'])
  other = pm.PretrainMixture(mixture.pools, [e['weight'] for e in SPEC], image_size=28,
                             channels=1, seed=1)
  assert other.fingerprint() != mixture.fingerprint()
  assert [other.origin(i) for i in range(50)] != [mixture.origin(i) for i in range(50)]


def test_crops_differ_between_entries_of_one_image(mixture):
  drive = [i for i in range(len(mixture)) if mixture.origin(i)[0] == 'drive']
  first = mixture.origin(drive[0])[1]
  crops = {digest(mixture[i]['image']) for i in drive if mixture.origin(i)[1] == first}
  assert len(crops) > 1


def test_get_dataset_and_loader_are_deterministic_and_resume(fake):
  cfg = dict(name='pretrain_mixture', image_size=16, channels=3, sources=SPEC, seed=2)
  source, spec = datasets.get_dataset(cfg, 'train', fake.root)
  assert spec.split_sizes == {'train': len(source)} and spec.image_shape == (16, 16, 3)
  assert spec.num_classes == 1 and not spec.official
  assert 'training splits only' in spec.variant and 'CC BY 4.0' in spec.license

  def batches(src, state=None, n=3):
    it = iter(loader.make_loader(src, pp='value_range(-1, 1)', batch_size=8, seed=5,
                                 shuffle=True, num_epochs=1))
    if state is not None:
      it.set_state(state)
    return it, [next(it) for _ in range(n)]

  it, first = batches(source)
  state = it.get_state()
  _, rest = batches(source, n=5)
  rebuilt, _ = datasets.get_dataset(cfg, 'train', fake.root)
  _, resumed = batches(rebuilt, state, n=2)
  for a, b in zip(first + resumed, rest):
    np.testing.assert_array_equal(a['image'], b['image'])
  assert first[0]['image'].shape == (8, 16, 16, 3) and (first[0]['label'] == 0).all()


def test_default_mixture_lists_every_source_held(fake):
  spec = pm.default_mixture(fake.root, image_size=28)
  sqrt = lambda n: round(math.sqrt(n), 2)
  assert spec == [
      dict(source='medmnist', flag='retinamnist', size=28, weight=sqrt(40)),
      dict(source='medmnist', flag='breastmnist', size=28, weight=sqrt(40)),
      dict(source='medmnist', flag='adrenalmnist3d', size=28, weight=sqrt(VOLUMES['train'])),
      dict(source='drive', weight=sqrt(3)), dict(source='chase_db1', weight=sqrt(20)),
      dict(source='kvasir_seg', weight=sqrt(880))]
  source, _ = datasets.get_dataset(dict(name='pretrain_mixture', image_size=28, channels=1),
                                   'train', fake.root)
  assert len(source) == len(pm.build(spec, fake.root, image_size=28, channels=1))


# ----------------------------------------------------------------------------------------------
# Errors.


@pytest.mark.parametrize('sources, error, message', [
    ([], ValueError, 'non-empty list'),
    ([dict(source='imagenet')], ValueError,
     r"unknown source 'imagenet'; valid sources: \['chase_db1', 'drive', 'kvasir_seg', "
     r"'medmnist'\]"),
    ([dict(source='drive', weight=0)], ValueError, 'weight must be a positive'),
    ([dict(source='drive', weight=-1.0)], ValueError, 'weight must be a positive'),
    ([dict(source='drive', crop_size=3)], ValueError, r"unknown keys \['crop_size'\]"),
    ([dict(source='medmnist')], ValueError, r"missing keys \['flag'\]"),
    ([dict(source='medmnist', flag='breastmnist', min_foreground=0.1)], ValueError,
     'min_foreground selects slices of 3D flags'),
    ([dict(source='drive', crop_scale=(0.5, 2))], ValueError, 'crop_scale'),
    ([dict(source='drive'), dict(source='drive', weight=2)], ValueError, 'more than once'),
    ([dict(source='medmnist', flag='pneumoniamnist')], FileNotFoundError,
     r'pneumoniamnist\.npz does not exist.*zenodo'),
])
def test_bad_specs_are_named(fake, sources, error, message):
  with pytest.raises(error, match=message):
    pm.build(sources, fake.root, image_size=28, channels=1)


def test_missing_large_image_sources_say_what_is_expected(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'DRIVE/training/images/\*\.tif.*grand-challenge'):
    pm.build([dict(source='drive')], tmp_path, image_size=28, channels=1)
  with pytest.raises(FileNotFoundError, match=r'missing: Image_01L\.jpg.*CHASE_DB1'):
    pm.build([dict(source='chase_db1')], tmp_path, image_size=28, channels=1)
  folder = tmp_path / 'kvasir_seg' / 'Kvasir-SEG' / 'images'
  for i in range(5):
    _image(folder / f'{i}.jpg', np.random.default_rng(i), (8, 8))
  with pytest.raises(FileNotFoundError, match='holds 5 images.*needs all 1000'):
    pm.build([dict(source='kvasir_seg')], tmp_path, image_size=28, channels=1)
  with pytest.raises(FileNotFoundError, match='holds 5 images'):  # Not skipped by the default.
    pm.default_mixture(tmp_path)
  with pytest.raises(FileNotFoundError, match='holds no pretraining source'):
    pm.default_mixture(tmp_path / 'kvasir_seg')


def test_only_a_train_split(fake):
  cfg = dict(name='pretrain_mixture', image_size=28, channels=1, sources=SPEC[:1])
  for split in ('val', 'test'):
    with pytest.raises(ValueError, match='pretraining has no held-out split'):
      datasets.get_dataset(cfg, split, fake.root)
  with pytest.raises(ValueError, match=r"missing keys \['channels'\]"):
    datasets.get_dataset(dict(name='pretrain_mixture', image_size=28), 'train', fake.root)


# ----------------------------------------------------------------------------------------------
# The real files.


@pytest.mark.real_data('proves on the real files that no val/test image of any dataset is pooled')
def test_no_held_out_image_of_the_real_data_is_pooled(shared_data_dir):
  train, held = image_splits.kvasir_split(shared_data_dir)
  assert len(train) == 880 and len(held) == 120 and not set(train) & set(held)
  assert held == kvasir_held_out(shared_data_dir / 'kvasir_seg' / 'Kvasir-SEG' / 'images')
  mix = pm.build(None, shared_data_dir, image_size=28, channels=1)
  sizes = {s['name']: (s['items'], s['excluded']) for s in mix.summary()}
  assert sizes['medmnist/pneumoniamnist_28'] == (4698, 10)  # 8 val images, 2 of them twice.
  assert sizes['medmnist/breastmnist_28'] == (545, 1)
  assert sizes['medmnist/retinamnist_28'] == (1080, 0)
  assert sizes['medmnist/adrenalmnist3d_28'] == (9932, 0)
  assert sizes['drive'] == (20, 0) and sizes['chase_db1'] == (20, 0)
  assert sizes['kvasir_seg'] == (880, 0)
  assert leaks(mix, shared_data_dir, pm.DEFAULT_SHORT_SIDE) == []
