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
