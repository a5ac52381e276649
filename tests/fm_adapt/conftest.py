"""A tiny synthetic MedMNIST-layout dataset and run config for training tests (no shared data).

28x28 grey images whose brightness follows the label: 64 train, 32 val, 32 test. The
`one_class_val` variant has a validation split of one class (its AUC is undefined).

Tests that use it share a persistent XLA compilation cache for the session (in-process, and via
`tiny_env` for subprocesses): the tiny runs compile the same programs, and a cached compile
takes a fraction of a second instead of seconds.
"""
import os
import pathlib
import textwrap

import jax
import ml_collections
import numpy as np
import pytest


def _write_npz(path: pathlib.Path, one_class_val: bool) -> None:
  rng = np.random.default_rng(0)
  arrays = {}
  for split, n in (("train", 64), ("val", 32), ("test", 32)):
    labels = np.arange(n)[:, None] % 2
    if split == "val" and one_class_val:
      labels = np.zeros((n, 1), np.int64)
    noise = rng.integers(0, 160, size=(n, 28, 28))
    arrays[f"{split}_images"] = (noise + 60 * labels[:, :, None]).astype(np.uint8)
    arrays[f"{split}_labels"] = labels
  np.savez(path, **arrays)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> dict[str, str]:
  """Paths of the synthetic archives and of their directory (the data dir; TFDS builds there)."""
  root = tmp_path_factory.mktemp("tiny_data")
  for key, value in _cache_settings(root / "xla_cache").items():
    jax.config.update(key.lower(), value)
  for name, one_class in (("tiny", False), ("one_class_val", True)):
    _write_npz(root / f"{name}.npz", one_class)
  return {"tiny": str(root / "tiny.npz"), "one_class_val": str(root / "one_class_val.npz"),
          "root": str(root)}


def _cache_settings(directory: pathlib.Path) -> dict[str, object]:
  return {"JAX_COMPILATION_CACHE_DIR": str(directory),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": 0,
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": 0}


@pytest.fixture()
def tiny_env(tiny_data) -> dict[str, str]:
  """The environment of a subprocess that trains a tiny run (CPU, the shared XLA cache)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[2]))
  env.update({k: str(v) for k, v in
              _cache_settings(pathlib.Path(tiny_data["root"]) / "xla_cache").items()})
  return env


def tiny_config_text(data_path: str, root: str) -> str:
  """Python source of `get_config(arg=None)`: a 4-step ViT-mu/7 run on `data_path`, data dir
  `root`."""
  return textwrap.dedent(f"""
      from fm_adapt import config as config_lib

      def get_config(arg=None):
        config = config_lib.base_config()
        config.model = dict(variant="mu/7", pool_type="gap")
        config.input.update(dict(
            data=dict(name="npz", path={data_path!r}, tfds_dir={root + "/tfds"!r}),
            pp="value_range(-1,1)", batch_size=16, eval_batch_size=32))
        config.evals.val = dict(name="classification", split="val")
        config.evals.test = dict(name="classification", split="test", periodic=False)
        config.total_steps = 4
        config.eval_every = 2
        config.checkpoint_every = 2
        config.log_every = 1
        config.progress = False
        config.data_dir = {root!r}
        return config
  """)


@pytest.fixture()
def tiny_config(tiny_data):
  """Returns `make(data='tiny', **overrides) -> ConfigDict` of a 4-step run."""

  def make(data: str = "tiny", **overrides) -> ml_collections.ConfigDict:
    namespace = {}
    exec(tiny_config_text(tiny_data[data], tiny_data["root"]), namespace)  # pylint: disable=exec-used
    config = namespace["get_config"]()
    for key, value in overrides.items():
      setattr(config, key, value)
    return config

  return make


@pytest.fixture()
def tiny_experiment(tiny_data, tmp_path):
  """Returns `write(sweep_source='') -> path` of an experiment file of the tiny run."""

  def write(sweep: str = "") -> pathlib.Path:
    path = tmp_path / "tiny_experiment.py"
    path.write_text(tiny_config_text(tiny_data["tiny"], tiny_data["root"]) +
                    textwrap.dedent(sweep))
    return path

  return write

