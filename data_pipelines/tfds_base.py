"""The base of our TFDS builders, and how they are built, without TensorFlow.

TFDS builds and reads datasets without TensorFlow when every feature is a plain
`tfds.features.Tensor` and the file format is `array_record`. Two more things are needed and live
here:
  * `code_path` is None: TFDS would otherwise look for a `checksums.tsv` beside the builder's
    module through `importlib_resources`, which is not installed (and we check our own md5s).
  * Builders skip the global TFDS registry: they are instantiated directly, never by name, so
    their names cannot collide with TFDS's catalogue or community datasets.
  * `_info` returns `DatasetInfo` (ours): TFDS's own makes an empty `tmp*tfds` folder in the
    temporary directory every time a builder of an unbuilt dataset is made (to fetch metadata
    from its GCS bucket, which never holds our datasets) and never removes it.
A failed build leaves nothing behind (see `prepare`). Processes of one host that build the same
dataset at once (runs of a sweep started together) take turns: the first builds, the others then
find it built.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import pathlib
import tempfile
from collections.abc import Iterator

import tensorflow_datasets as tfds

from data_pipelines import data_dir as data_dir_lib

FILE_FORMAT = 'array_record'


class DatasetInfo(tfds.core.DatasetInfo):
  """`tfds.core.DatasetInfo` without the GCS metadata lookup (and its stray `tmp*tfds` folder)."""

  def initialize_from_bucket(self) -> None:
    """Our datasets are never in TFDS's bucket: nothing to fetch, no temporary folder."""


class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A `GeneratorBasedBuilder` that writes array_record files and needs no TensorFlow."""

  def __init__(self, **kwargs):
    kwargs.setdefault('file_format', FILE_FORMAT)
    super().__init__(**kwargs)
    if not isinstance(self.info, DatasetInfo):
      raise TypeError(f'{type(self).__name__}._info must return tfds_base.DatasetInfo, not '
                      f'{type(self.info).__name__} (which leaves tmp*tfds folders behind).')

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> None:
    """No package resources: no TFDS checksums file or metadata folder beside the code."""
    return None


def _new_dirs(builder: tfds.core.DatasetBuilder) -> list[pathlib.Path]:
  """The folders of `<data_dir>/<name>/<config>/` that do not exist yet, deepest first."""
  path, new = pathlib.Path(builder.data_dir).parent, []
  while not path.exists():
    new.append(path)
    path = path.parent
  return new


def prepare(builder: tfds.core.DatasetBuilder) -> None:
  """Builds `builder`'s dataset unless it is there already.

  TFDS writes into `<data_dir>/<name>/<config>/incomplete.*` and renames it to the versioned
  folder only when every split is written; on an error the incomplete folder is deleted, and so
  are the folders above it that this build created, when they are empty. TFDS's own download
  folder is a temporary directory removed afterwards (our builders fetch their sources
  themselves), also when the build fails or is interrupted.
  """
  if builder.is_prepared():
    return
  with _host_build_lock(builder):
    if not builder.is_prepared():  # Another process of this host may have built it meanwhile.
      _build(builder)


@contextlib.contextmanager
def _host_build_lock(builder: tfds.core.DatasetBuilder) -> Iterator[None]:
  """Holds an exclusive lock on this dataset among the processes of this host.

  Two processes building one dataset race (each renames its own `incomplete.*` folder onto the
  same version folder; all but the first fail). The lock file lives in the per-user cache
  (`<cache_root>/locks/`), named by a hash of the dataset's folder, so nothing is left in the
  data or temporary directory. Remote folders (`gs://`) are not locked: there the processes of a
  job build once by coordination. Where no lock file can be made the build goes on unlocked.
  """
  data_dir = os.fspath(builder.data_dir)
  if '://' in data_dir:
    yield
    return
  digest = hashlib.sha256(os.path.abspath(data_dir).encode()).hexdigest()[:16]
  path = data_dir_lib.cache_root() / 'locks' / f'tfds_build_{digest}.lock'
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = open(path, 'a', encoding='utf-8')  # pylint: disable=consider-using-with
  except OSError:
    yield
    return
  with lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)


def _build(builder: tfds.core.DatasetBuilder) -> None:
  """Builds the dataset; on any error removes the folders this build created."""
  new_dirs = _new_dirs(builder)
  try:
    with tempfile.TemporaryDirectory(prefix='fm_adapt_tfds_downloads_') as download_dir:
      builder.download_and_prepare(download_dir=download_dir)
  except BaseException:
    for path in new_dirs:
      try:
        os.rmdir(path)  # Only if empty: another process may be building there.
      except OSError:
        break
    raise
