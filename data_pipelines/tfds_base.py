"""The base of our TFDS builders, and how they are built, without TensorFlow.

TFDS builds and reads datasets without TensorFlow when every feature is a plain
`tfds.features.Tensor` and the file format is `array_record`. Two more things are needed and live
here:
  * `code_path` is None: TFDS would otherwise look for a `checksums.tsv` beside the builder's
    module through `importlib_resources`, which is not installed (and we check our own md5s).
  * Builders skip the global TFDS registry: they are instantiated directly, never by name, so
    their names cannot collide with TFDS's catalogue or community datasets.
"""
from __future__ import annotations

import tempfile

import tensorflow_datasets as tfds

FILE_FORMAT = 'array_record'


class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A `GeneratorBasedBuilder` that writes array_record files and needs no TensorFlow."""

  def __init__(self, **kwargs):
    kwargs.setdefault('file_format', FILE_FORMAT)
    super().__init__(**kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> None:
    """No package resources: no TFDS checksums file or metadata folder beside the code."""
    return None


def prepare(builder: tfds.core.DatasetBuilder) -> None:
  """Builds `builder`'s dataset unless it is there already.

  TFDS writes into `<data_dir>/<name>/<config>/incomplete.*` and renames it to the versioned
  folder only when every split is written; on an error the incomplete folder is deleted. TFDS's
  own download folder is a temporary directory removed afterwards (our builders fetch their
  sources themselves).
  """
  if builder.is_prepared():
    return
  with tempfile.TemporaryDirectory(prefix='fm_adapt_tfds_downloads_') as download_dir:
    builder.download_and_prepare(download_dir=download_dir)
