"""Fixtures of the data-pipeline tests: small datasets built once per session in tmp dirs."""
import pathlib

import pytest

from data_pipelines import datasets


@pytest.fixture(scope='session')
def tfds_dir(tmp_path_factory) -> pathlib.Path:
  """One TFDS build directory for the session (datasets are built on first use only)."""
  return tmp_path_factory.mktemp('tfds')


@pytest.fixture(scope='session')
def binary_train(synthetic_medmnist, tfds_dir):
  """(source, spec) of the train split of the synthetic binary set (40 examples, 28x28 grey)."""
  return datasets.get_dataset(synthetic_medmnist['binary'].data_cfg(tfds_dir), 'train')


@pytest.fixture()
def no_proxy(monkeypatch):
  """Keeps urllib away from any proxy for the local test server."""
  for var in ('http_proxy', 'HTTP_PROXY', 'https_proxy', 'HTTPS_PROXY', 'all_proxy', 'ALL_PROXY'):
    monkeypatch.delenv(var, raising=False)
  monkeypatch.setenv('no_proxy', '127.0.0.1,localhost')
