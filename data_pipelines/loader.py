"""grain loaders: seeded shuffling, per-example preprocessing, batching, sharding by process.

`make_loader(source, pp=..., batch_size=..., seed=..., shuffle=..., num_epochs=...)` returns a
`grain.DataLoader`; `iter(loader)` yields batches

  {'image': float32 [B, H, W, C] (or [B, D, H, W, C]),
   'label': int32 [B] (multiclass / ordinal) or int32 [B, L] (multilabel),
   'mask':  bool [B]: True for real examples, False for padding}

where B = batch_size // jax.process_count() is this process's share of the global batch. Every
batch has 'mask' (all True unless `pad_remainder` padded it), so evaluation code is the same for
every loader.

Order and augmentation are functions of (seed, position in the global stream), the stream being
epoch after epoch of a seeded permutation: each process reads every `process_count`-th element
of it, and each element's preprocessing rng comes from grain's per-record rng. So a run is
reproducible, independent of `worker_count`, and `it.get_state()` / `it.set_state(state)` on the
iterator resumes exactly where it stopped (keep the state in the checkpoint).

Training in whole epochs (`make_epoch_loader`): every epoch is a fresh seeded permutation of
the examples cut into ceil(N / batch_size) batches, the last one padded with masked examples, as
PyTorch's DataLoader (`shuffle=True, drop_last=False`) gives it a short batch. One compiled
shape serves every step; the loss and BatchNorm statistics ignore the padding (`mask`).

Workers (`worker_count > 0`) are separate processes: the entry point needs the
`if __name__ == '__main__':` guard and absl flags parsed (run under `absl.app.run`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import grain
import jax
import numpy as np
from absl import flags

from data_pipelines import pp as pp_lib


class MaskedSource(Sequence):
  """Adds 'mask': True to each example; indices past the real ones give padding (mask False).

  A padding example is a copy of example 0 with 'mask' False, so it has the real shapes and runs
  through the same preprocessing.
  """

  def __init__(self, source: Sequence[dict], length: int | None = None):
    self._source = source
    self._length = len(source) if length is None else length
    if self._length < len(source):
      raise ValueError(f'MaskedSource length {self._length} < source length {len(source)}.')

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < self._length:
      raise IndexError(f'Index {index} out of range for {self!r}.')
    real = index < len(self._source)
    example = self._source[index if real else 0]
    return {**example, 'mask': real}

  def __repr__(self) -> str:
    return f'MaskedSource({self._source!r}, length={self._length})'


class Preprocess(grain.transforms.RandomMap):
  """Applies a pp string with grain's per-record rng."""

  def __init__(self, pp: str):
    self._fn = pp_lib.parse(pp)

  def random_map(self, element: dict, rng: np.random.Generator) -> dict:
    return self._fn(element, rng)


class ToBatchDtypes(grain.transforms.Map):
  """Casts one example to the batch dtypes: image float32, label int32, mask bool."""

  def map(self, element: dict) -> dict:
    return {**element,
            'image': np.asarray(element['image'], dtype=np.float32),
            'label': np.asarray(element['label'], dtype=np.int32),
            'mask': np.asarray(element['mask'], dtype=np.bool_)}


def _per_process_batch(batch_size: int, process_count: int) -> int:
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(f'batch_size (global) {batch_size} must be a positive multiple of the '
                     f'number of processes {process_count}.')
  return batch_size // process_count


def _check_workers(worker_count: int) -> None:
  if worker_count < 0:
    raise ValueError(f'worker_count must be >= 0; got {worker_count}.')
  if worker_count and not flags.FLAGS.is_parsed():
    raise RuntimeError(
        'grain worker processes (worker_count > 0) read absl flags, which are not parsed: run the '
        'entry point under absl.app.run (or call absl.flags.FLAGS.mark_as_parsed()), with the '
        "`if __name__ == '__main__':` guard; or use worker_count=0.")


def make_loader(source: Sequence[dict], *, pp: str, batch_size: int, seed: int, shuffle: bool,
                num_epochs: int | None, drop_remainder: bool = True,
                pad_remainder: bool = False, worker_count: int = 0,
                shard_by_process: bool = True) -> grain.DataLoader:
  """Makes a grain DataLoader over `source` (e.g. from `datasets.get_dataset`).

  Args:
    source: random-access examples {'image', 'label'}.
    pp: preprocessing string for `pp.parse`, e.g. 'resize(64)|value_range(-1,1)|flip_lr'.
    batch_size: the GLOBAL batch size; each process gets batch_size // jax.process_count().
    seed: seeds shuffling and random preprocessing.
    shuffle: reshuffle the examples every epoch.
    num_epochs: passes over the data; None repeats forever.
    drop_remainder: drop the last, smaller batch (ignored with `pad_remainder`).
    pad_remainder: for evaluation (needs num_epochs=1): pad the data to a multiple of
      `batch_size` with masked copies of example 0, so every process gets the same number of
      full batches and every real example is seen exactly once.
    worker_count: grain worker processes (0: in this process).
    shard_by_process: each JAX process reads its own share; False: every process reads all.

  Raises:
    ValueError: for a batch size that the processes cannot share, or pad_remainder without
      num_epochs=1.
    RuntimeError: for worker_count > 0 before absl flags are parsed.
  """
  _check_workers(worker_count)
  process_count = jax.process_count() if shard_by_process else 1
  local_batch = _per_process_batch(batch_size, process_count)
  if pad_remainder:
    if num_epochs != 1:
      raise ValueError(f'pad_remainder=True is for one pass (num_epochs=1); got {num_epochs}.')
    length = math.ceil(len(source) / batch_size) * batch_size
    drop_remainder = False
  else:
    length = len(source)
  data = MaskedSource(source, length)
  sampler = grain.samplers.IndexSampler(
      num_records=len(data), shuffle=shuffle, num_epochs=num_epochs, seed=seed)
  shard_options = (grain.sharding.ShardByJaxProcess(drop_remainder=True) if shard_by_process
                   else grain.sharding.NoSharding())
  operations = [Preprocess(pp), ToBatchDtypes(),
                grain.transforms.Batch(local_batch, drop_remainder=drop_remainder)]
  return grain.DataLoader(data_source=data, sampler=sampler, operations=operations,
                          worker_count=worker_count, shard_options=shard_options)


# Epochs a `num_epochs=None` stream provides: far more than any run takes, small enough that
# the stream length stays a machine integer.
_FOREVER_EPOCHS = 2**24


class EpochStream(Sequence):
  """Epoch after epoch of a seeded permutation of `source`, each padded to whole batches.

  Global position k of the stream (all processes together) is in epoch k // L at position
  k % L, where L = ceil(N / batch_size) * batch_size; positions >= N are padding (a copy of
  example 0 with 'mask' False). Process p of P reads, for its j-th local example, the global
  position of local batch j // b, row p * b + j % b (b = batch_size // P), so the processes'
  step-s batches together are global batch s, whatever P is.

  Examples carry 'stream_position' (k) so that their augmentation is a function of
  (seed, k) alone, not of the process layout.
  """

  def __init__(self, source: Sequence[dict], *, batch_size: int, seed: int, shuffle: bool,
               num_epochs: int | None, process_index: int = 0, process_count: int = 1):
    if len(source) == 0:
      raise ValueError('The training split has no examples.')
    self._source = source
    self._batch_size = batch_size
    self._local_batch = _per_process_batch(batch_size, process_count)
    self._process_index = process_index
    self._seed = seed
    self._shuffle = shuffle
    self.batches_per_epoch = math.ceil(len(source) / batch_size)
    self._per_epoch = self.batches_per_epoch * batch_size
    epochs = _FOREVER_EPOCHS if num_epochs is None else num_epochs
    self._length = epochs * self.batches_per_epoch * self._local_batch
    self._orders: dict[int, np.ndarray] = {}

  def __len__(self) -> int:
    return self._length

  def global_position(self, local_index: int) -> int:
    """The stream position of this process's `local_index`-th example."""
    step, row = divmod(local_index, self._local_batch)
    return step * self._batch_size + self._process_index * self._local_batch + row

  def _order(self, epoch: int) -> np.ndarray:
    if epoch not in self._orders:
      n = len(self._source)
      order = (np.random.default_rng([self._seed, epoch]).permutation(n) if self._shuffle
               else np.arange(n))
      self._orders = {epoch: order}  # One epoch at a time is read.
    return self._orders[epoch]

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < self._length:
      raise IndexError(f'Index {index} out of range for an EpochStream of {self._length}.')
    position = self.global_position(index)
    epoch, offset = divmod(position, self._per_epoch)
    real = offset < len(self._source)
    example = self._source[int(self._order(epoch)[offset]) if real else 0]
    return {**example, 'mask': real, 'stream_position': position}

  def __repr__(self) -> str:
    return (f'EpochStream({self._source!r}, batch_size={self._batch_size}, seed={self._seed}, '
            f'shuffle={self._shuffle})')


class PreprocessAtPosition(grain.transforms.Map):
  """Applies a pp string with an rng seeded by (seed, the example's stream position)."""

  def __init__(self, pp: str, seed: int):
    self._fn = pp_lib.parse(pp)
    self._seed = seed

  def map(self, element: dict) -> dict:
    element = dict(element)
    position = element.pop('stream_position')
    return self._fn(element, np.random.default_rng([self._seed, position]))


def make_epoch_loader(source: Sequence[dict], *, pp: str, batch_size: int, seed: int,
                      shuffle: bool = True, num_epochs: int | None = None,
                      worker_count: int = 0) -> grain.DataLoader:
  """A training loader of whole epochs, each ending in a padded, masked batch.

  Every batch has `batch_size // jax.process_count()` rows per process and 'mask' (False on
  padding). Order and augmentation are functions of (seed, epoch, position), independent of the
  number of processes and workers, and `iter(loader).get_state()` resumes exactly.

  Args:
    source: random-access examples {'image', 'label'}.
    pp: preprocessing string for `pp.parse`.
    batch_size: the GLOBAL batch size.
    seed: seeds the per-epoch permutations and the augmentation.
    shuffle: a new permutation every epoch (else the source order).
    num_epochs: epochs to provide; None: as many as asked for.
    worker_count: grain worker processes (0: in this process).

  Raises:
    ValueError: for an empty source or a batch the processes cannot share.
    RuntimeError: for worker_count > 0 before absl flags are parsed.
  """
  _check_workers(worker_count)
  stream = EpochStream(source, batch_size=batch_size, seed=seed, shuffle=shuffle,
                       num_epochs=num_epochs, process_index=jax.process_index(),
                       process_count=jax.process_count())
  sampler = grain.samplers.IndexSampler(num_records=len(stream), shuffle=False, num_epochs=1,
                                        seed=seed)
  operations = [PreprocessAtPosition(pp, seed), ToBatchDtypes(),
                grain.transforms.Batch(batch_size // jax.process_count(), drop_remainder=True)]
  return grain.DataLoader(data_source=stream, sampler=sampler, operations=operations,
                          worker_count=worker_count, shard_options=grain.sharding.NoSharding())
