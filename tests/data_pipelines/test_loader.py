"""Tests of the grain loader: batch format, determinism, epochs, padding, sharding, state."""
import types

import jax
import numpy as np
import pytest
from absl import flags

from data_pipelines import loader


def indexed_source(n: int) -> list[dict]:
  """n examples whose image pixels and label are their index (mod 256 for the pixels)."""
  return [{'image': np.full((4, 4, 1), i % 256, np.uint8), 'label': i} for i in range(n)]


def make(source, **kwargs):
  defaults = dict(pp='', batch_size=8, seed=0, shuffle=False, num_epochs=1)
  return loader.make_loader(source, **{**defaults, **kwargs})


def labels_of(batches, masked=True):
  out = []
  for b in batches:
    out.extend(b['label'][b['mask']].tolist() if masked else b['label'].tolist())
  return out


def test_batch_format_on_a_built_dataset(binary_train):
  source, _ = binary_train
  batches = list(make(source, pp='resize(32)|gray_to_rgb|value_range(-1, 1)', batch_size=16))
  assert len(batches) == 40 // 16  # drop_remainder
  batch = batches[1]
  assert set(batch) == {'image', 'label', 'mask'}
  assert batch['image'].shape == (16, 32, 32, 3) and batch['image'].dtype == np.float32
  assert batch['label'].shape == (16,) and batch['label'].dtype == np.int32
  assert batch['mask'].dtype == np.bool_ and batch['mask'].all()
  assert -1 <= batch['image'].min() and batch['image'].max() <= 1
  np.testing.assert_array_equal(batch['label'], [source[i]['label'] for i in range(16, 32)])


def test_uint8_images_become_float32_unscaled(binary_train):
  source, _ = binary_train
  batch = next(iter(make(source, batch_size=4)))
  np.testing.assert_array_equal(batch['image'][0], source[0]['image'].astype(np.float32))


def test_multilabel_batches():
  source = [{'image': np.zeros((2, 2, 1), np.uint8), 'label': np.array([i % 2, 1, 0])}
            for i in range(6)]
  batch = next(iter(make(source, batch_size=6)))
  assert batch['label'].shape == (6, 3) and batch['label'].dtype == np.int32


def test_no_shuffle_keeps_order_and_drops_remainder():
  assert labels_of(make(indexed_source(30), batch_size=8)) == list(range(24))
  kept = list(make(indexed_source(30), batch_size=8, drop_remainder=False))
  assert [len(b['label']) for b in kept] == [8, 8, 8, 6]
  assert labels_of(kept) == list(range(30))


def test_shuffle_is_seeded_and_reshuffles_each_epoch():
  run = lambda seed: labels_of(make(indexed_source(40), shuffle=True, seed=seed, num_epochs=2))
  first = run(seed=1)
  assert first == run(seed=1)
  assert first != run(seed=2)
  epoch1, epoch2 = first[:40], first[40:]
  assert sorted(epoch1) == sorted(epoch2) == list(range(40))
  assert epoch1 != epoch2 and epoch1 != list(range(40))


def test_augmentation_is_deterministic_per_seed(binary_train):
  source, _ = binary_train
  images = lambda seed, shuffle: np.concatenate([b['image'] for b in make(
      source, pp='random_crop(24, pad=2)|flip_lr|rot90', batch_size=8, seed=seed,
      shuffle=shuffle, num_epochs=1)][:3])
  np.testing.assert_array_equal(images(5, True), images(5, True))
  same_order = images(5, False)
  np.testing.assert_array_equal(same_order, images(5, False))
  assert not np.array_equal(same_order, images(6, False))  # Only the augmentation differs.


def test_augmentation_differs_between_epochs():
  source = [{'image': np.arange(16, dtype=np.uint8).reshape(4, 4, 1), 'label': 0}] * 8
  batches = list(make(source, pp='rot90', batch_size=8, num_epochs=2))
  assert not np.array_equal(batches[0]['image'], batches[1]['image'])


def test_pad_remainder_masks_padding_and_sees_every_example_once():
  batches = list(make(indexed_source(30), batch_size=8, pad_remainder=True))
  assert len(batches) == 4 and all(len(b['label']) == 8 for b in batches)
  assert labels_of(batches) == list(range(30))
  assert [int(b['mask'].sum()) for b in batches] == [8, 8, 8, 6]


def test_pad_remainder_needs_one_epoch():
  with pytest.raises(ValueError, match='num_epochs=1'):
    make(indexed_source(10), pad_remainder=True, num_epochs=None)


def fake_processes(monkeypatch, index, count):
  monkeypatch.setattr(jax, 'process_index', lambda: index)
  monkeypatch.setattr(jax, 'process_count', lambda: count)


def test_batch_size_must_split_over_processes(monkeypatch):
  fake_processes(monkeypatch, 0, 3)
  with pytest.raises(ValueError, match='multiple of the number of processes 3'):
    make(indexed_source(10), batch_size=8)
  with pytest.raises(ValueError, match='positive'):
    make(indexed_source(10), batch_size=0, shard_by_process=False)


@pytest.mark.parametrize('shuffle, pad', [(True, False), (False, True)])
def test_processes_share_the_global_batch(monkeypatch, shuffle, pad):
  per_process = []
  for index in range(2):
    fake_processes(monkeypatch, index, 2)
    batches = list(make(indexed_source(37), batch_size=8, shuffle=shuffle, seed=4,
                        pad_remainder=pad, drop_remainder=True))
    assert all(b['label'].shape == (4,) for b in batches)  # 8 // 2 processes.
    per_process.append(batches)
  assert len(per_process[0]) == len(per_process[1])
  seen = [labels_of(p) for p in per_process]
  assert not set(seen[0]) & set(seen[1])
  if pad:  # Evaluation sees every example exactly once over both processes.
    assert sorted(seen[0] + seen[1]) == list(range(37))
  fake_processes(monkeypatch, 0, 1)
  whole = labels_of(make(indexed_source(37), batch_size=8, shuffle=shuffle, seed=4,
                         pad_remainder=pad))
  step0 = sorted(per_process[0][0]['label'].tolist() + per_process[1][0]['label'].tolist())
  assert step0 == sorted(whole[:8])  # Step 0 of both processes = global batch 0.


def test_state_restore_continues_with_the_next_batch(binary_train):
  source, _ = binary_train
  kwargs = dict(pp='random_crop(24, pad=2)|flip_lr', batch_size=8, seed=7, shuffle=True,
                num_epochs=None)
  uninterrupted = iter(make(source, **kwargs))
  for _ in range(7):  # Past the end of the first epoch (5 batches).
    next(uninterrupted)
  state = uninterrupted.get_state()
  expected = [next(uninterrupted) for _ in range(3)]
  resumed = iter(make(source, **kwargs))
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    np.testing.assert_array_equal(got['image'], want['image'])
    np.testing.assert_array_equal(got['label'], want['label'])


def test_state_of_another_loader_is_refused(binary_train):
  source, _ = binary_train
  it = iter(make(source, batch_size=8, seed=1, shuffle=True, num_epochs=None))
  next(it)
  other = iter(make(source, batch_size=8, seed=2, shuffle=True, num_epochs=None))
  with pytest.raises(ValueError, match='sampler'):
    other.set_state(it.get_state())


def test_workers_need_parsed_flags(monkeypatch):
  unparsed = types.SimpleNamespace(FLAGS=types.SimpleNamespace(is_parsed=lambda: False))
  monkeypatch.setattr(loader, 'flags', unparsed)
  with pytest.raises(RuntimeError, match='absl.app.run'):
    make(indexed_source(8), worker_count=1)


def test_worker_process_gives_the_same_batches(binary_train):
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # As absl.app.run does in an entry point.
  source, _ = binary_train
  kwargs = dict(pp='random_crop(24, pad=2)|flip_lr|rot90', batch_size=8, seed=3, shuffle=True,
                num_epochs=1)
  in_process = [(b['image'].copy(), b['label'].copy()) for b in make(source, **kwargs)]
  in_worker = [(b['image'].copy(), b['label'].copy())
               for b in make(source, worker_count=1, **kwargs)]
  assert len(in_worker) == len(in_process) == 40 // 8
  for (a_image, a_label), (b_image, b_label) in zip(in_process, in_worker):
    np.testing.assert_array_equal(a_image, b_image)
    np.testing.assert_array_equal(a_label, b_label)


def epoch_batches(source, n, **kwargs):
  defaults = dict(pp='', batch_size=8, seed=0)
  it = iter(loader.make_epoch_loader(source, **{**defaults, **kwargs}))
  return [next(it) for _ in range(n)]


def test_epoch_loader_pads_the_last_batch_of_every_epoch():
  """30 examples, batch 8: 4 batches an epoch, the 4th with 6 real rows (as PyTorch's 8,8,8,6)."""
  batches = epoch_batches(indexed_source(30), 8, shuffle=True, seed=3)
  assert all(b['label'].shape == (8,) for b in batches)
  assert [int(b['mask'].sum()) for b in batches] == [8, 8, 8, 6] * 2
  first, second = labels_of(batches[:4]), labels_of(batches[4:])
  assert sorted(first) == sorted(second) == list(range(30))  # Every example once an epoch.
  assert first != second  # A new permutation every epoch.
  assert not batches[3]['mask'][6:].any()


def test_epoch_loader_is_seeded_and_unshuffled_keeps_order():
  a = labels_of(epoch_batches(indexed_source(20), 6, seed=5))
  b = labels_of(epoch_batches(indexed_source(20), 6, seed=5))
  c = labels_of(epoch_batches(indexed_source(20), 6, seed=6))
  assert a == b and a != c
  assert labels_of(epoch_batches(indexed_source(20), 3, shuffle=False)) == list(range(20))


def test_epoch_loader_processes_share_the_global_batch_and_augmentation(monkeypatch):
  pp_string = 'random_crop(3)|flip_lr'
  whole = epoch_batches(indexed_source(37), 10, batch_size=8, seed=4, pp=pp_string)
  per_process = []
  for index in range(2):
    fake_processes(monkeypatch, index, 2)
    per_process.append(epoch_batches(indexed_source(37), 10, batch_size=8, seed=4,
                                     pp=pp_string))
  for step, want in enumerate(whole):
    got = [per_process[p][step] for p in range(2)]
    for key in ('image', 'label', 'mask'):
      np.testing.assert_array_equal(np.concatenate([g[key] for g in got]), want[key])


def test_epoch_loader_state_resumes_across_epochs():
  kwargs = dict(pp='random_crop(3)|flip_lr', batch_size=8, seed=2)
  it = iter(loader.make_epoch_loader(indexed_source(30), **kwargs))
  for _ in range(6):  # Into the second epoch.
    next(it)
  state = it.get_state()
  want = [next(it) for _ in range(4)]
  resumed = iter(loader.make_epoch_loader(indexed_source(30), **kwargs))
  resumed.set_state(state)
  for expected in want:
    got = next(resumed)
    for key in ('image', 'label', 'mask'):
      np.testing.assert_array_equal(got[key], expected[key])


def test_epoch_loader_refuses_an_empty_source():
  with pytest.raises(ValueError, match='no examples'):
    loader.make_epoch_loader([], pp='', batch_size=8, seed=0)
