"""Shared pytest fixtures."""
import os
import pathlib

import pytest


@pytest.fixture(scope="session")
def shared_data_dir() -> pathlib.Path:
  """The real-data directory named by FM_ADAPT_DATA_DIR (CI sets it to ../shared/data)."""
  value = os.environ.get("FM_ADAPT_DATA_DIR")
  if not value:
    raise RuntimeError(
        "Set FM_ADAPT_DATA_DIR to the shared data directory (the one holding medmnist/, "
        "medmnist_derived/, ...), e.g. `export FM_ADAPT_DATA_DIR=../shared/data`.")
  path = pathlib.Path(value).expanduser().resolve()
  if not path.is_dir():
    raise RuntimeError(f"FM_ADAPT_DATA_DIR={value} is not a directory.")
  return path


@pytest.fixture(scope="session")
def shared_weights_dir(shared_data_dir) -> pathlib.Path:
  """Pretrained weights kept next to the data (../shared/weights), or FM_ADAPT_WEIGHTS_DIR."""
  value = os.environ.get("FM_ADAPT_WEIGHTS_DIR")
  path = pathlib.Path(value) if value else shared_data_dir.parent / "weights"
  if not path.is_dir():
    raise RuntimeError(f"No weights directory at {path}; set FM_ADAPT_WEIGHTS_DIR.")
  return path
