"""Shared pytest fixtures: the real shared files (skipped when absent) and synthetic MedMNIST data.

Real files. Tests that need the official files under ../shared (MedMNIST archives, pretrained
weights) carry `@pytest.mark.real_data('<why the real files are needed>')` and take the
`shared_data_dir` or `shared_weights_dir` fixture. Without `FM_ADAPT_DATA_DIR` they are skipped
with that reason and how to provide the files; CI sets it (.ci/run), so they run there. A test
that takes one of these fixtures without the marker gets it added, so that
`pytest -m "not real_data"` selects exactly the tests that run without ../shared.

Synthetic data. `synthetic_medmnist` writes small MedMNIST-layout archives once per session (the
official keys `train_images`, `train_labels`, `val_*`, `test_*`; uint8 images; uint8 labels of
shape (N, 1), or (N, L) for multi-label), with fixed seeds and labels that follow the image, so a
model can learn them. Load them with the 'npz' dataset kind (`SyntheticSet.data_cfg`).
"""
import dataclasses
import os
import pathlib

import numpy as np
import pytest

# XLA's backend (LLVM) optimisation is off for every test process: the tests' programs are small
# and mostly compiled once, so compiling is most of their cost (tests/fm_adapt/{models,adapt}:
# 166 s -> 130 s on 2 cores). Set before JAX starts its CPU backend; tests that start processes
# with an XLA_FLAGS of their own add $FM_ADAPT_TEST_XLA_FLAGS to it.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ["FM_ADAPT_TEST_XLA_FLAGS"] = TEST_XLA_FLAGS
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

DATA_ENV = "FM_ADAPT_DATA_DIR"
WEIGHTS_ENV = "FM_ADAPT_WEIGHTS_DIR"
_NO_DATA_DIR = (f"Needs the official files of ../shared/data and ${DATA_ENV} is unset: "
                f"`export {DATA_ENV}=../shared/data` (the directory holding medmnist/; CI sets "
                "it).")
_NO_WEIGHTS_DIR = (f"Needs the pretrained weights of ../shared/weights and neither ${DATA_ENV} nor "
                   f"${WEIGHTS_ENV} is set: `export {DATA_ENV}=../shared/data` (weights are read "
                   f"from ../shared/weights; CI sets it) or `export {WEIGHTS_ENV}=<dir>`.")
_SHARED_FIXTURES = ("shared_data_dir", "shared_weights_dir")


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "real_data(reason): needs the official files under ../shared (MedMNIST "
      f"archives, pretrained weights); skipped with the reason when ${DATA_ENV} is unset. "
      "Deselect with -m 'not real_data'.")


def _marker_reason(item) -> str:
  """The reason of an item's real_data marker; an error if it has none."""
  marker = item.get_closest_marker("real_data")
  reason = marker.args[0] if len(marker.args) == 1 and not marker.kwargs else None
  if not isinstance(reason, str) or not reason.strip():
    raise pytest.UsageError(f"{item.nodeid}: write @pytest.mark.real_data('<why the official "
                            f"files are needed>'), one reason string; got args={marker.args}, "
                            f"kwargs={marker.kwargs}.")
  return reason


@pytest.hookimpl(tryfirst=True)  # Before `-m` deselects by marker.
def pytest_collection_modifyitems(items):
  """Marks every test that takes a shared-files fixture real_data; checks the markers given;
  skips the real_data tests that need the data directory when none is set, saying why; puts
  the long tests first (`_LONG_MODULES`)."""
  for item in items:
    fixtures = getattr(item, "fixturenames", ())
    used = [name for name in _SHARED_FIXTURES if name in fixtures]
    if item.get_closest_marker("real_data") is None:
      if not used:
        continue
      item.add_marker(pytest.mark.real_data(f"takes the {used[0]} fixture"))
    reason = _marker_reason(item)
    if not used:
      raise pytest.UsageError(f"{item.nodeid} is marked real_data but takes neither "
                              f"{' nor '.join(_SHARED_FIXTURES)}; take the fixture it needs or "
                              "drop the marker.")
    if "shared_data_dir" in fixtures and not os.environ.get(DATA_ENV):
      item.add_marker(pytest.mark.skip(reason=f"{reason}. {_NO_DATA_DIR}"))
    elif "shared_weights_dir" in fixtures and not (os.environ.get(DATA_ENV) or
                                                   os.environ.get(WEIGHTS_ENV)):
      item.add_marker(pytest.mark.skip(reason=f"{reason}. {_NO_WEIGHTS_DIR}"))
  _long_modules_first(items)


@pytest.fixture(scope="session")
def shared_data_dir() -> pathlib.Path:
  """The real-data directory named by FM_ADAPT_DATA_DIR (CI sets it to ../shared/data).

  Skips when FM_ADAPT_DATA_DIR is unset; a value that is not a directory is an error.
  """
  value = os.environ.get(DATA_ENV)
  if not value:
    pytest.skip(_NO_DATA_DIR)
  path = pathlib.Path(value).expanduser().resolve()
  if not path.is_dir():
    raise RuntimeError(f"{DATA_ENV}={value} is not a directory; point it at the shared data "
                       "directory (the one holding medmnist/), e.g. ../shared/data.")
  return path


@pytest.fixture(scope="session")
def shared_weights_dir() -> pathlib.Path:
  """Pretrained weights: FM_ADAPT_WEIGHTS_DIR, else `weights/` beside FM_ADAPT_DATA_DIR.

  Skips when neither variable is set; a named directory that does not exist is an error.
  """
  if os.environ.get(WEIGHTS_ENV):
    path, origin = pathlib.Path(os.environ[WEIGHTS_ENV]), f"${WEIGHTS_ENV}"
  elif os.environ.get(DATA_ENV):
    data = os.environ[DATA_ENV]
    path = pathlib.Path(data).expanduser().resolve().parent / "weights"
    origin = f"beside ${DATA_ENV}={data}"
  else:
    pytest.skip(f"needs the pretrained weights of ../shared/weights, and neither ${DATA_ENV} nor "
                f"${WEIGHTS_ENV} is set; provide them with `export {DATA_ENV}=../shared/data` "
                f"(weights are read from ../shared/weights) or `export {WEIGHTS_ENV}=<dir>`.")
  path = path.expanduser().resolve()
  if not path.is_dir():
    raise RuntimeError(f"No weights directory at {path} ({origin}); set {WEIGHTS_ENV}.")
  return path


@dataclasses.dataclass(frozen=True)
class SyntheticSet:
  """One synthetic archive in the MedMNIST layout.

  Attributes:
    path: the absolute path of the `.npz`.
    like: the official flag whose layout (image shape, label columns, dtypes) it copies.
    task: its task for the 'npz' dataset kind: 'multiclass', 'ordinal' or 'multilabel'.
    num_classes: classes, or labels for multi-label.
    split_sizes: examples per split.
    image_shape: one example as `datasets.get_dataset` gives it, (H, W, C) or (D, H, W, 1).
  """
  path: pathlib.Path
  like: str
  task: str
  num_classes: int
  split_sizes: dict[str, int]
  image_shape: tuple[int, ...]

  def arrays(self) -> dict[str, np.ndarray]:
    """Every array of the archive, by key."""
    with np.load(self.path, allow_pickle=False) as data:
      return {key: data[key] for key in data.files}

  def data_cfg(self, tfds_dir: os.PathLike | str, **overrides) -> dict:
    """The data_cfg of the 'npz' kind for this archive, built in `tfds_dir`."""
    return dict(name="npz", path=str(self.path), task=self.task, tfds_dir=str(tfds_dir),
                **overrides)


_SIZES_2D = {"train": 40, "val": 20, "test": 30}
_SIZES_3D = {"train": 20, "val": 10, "test": 12}
_GRID = (2, 7)  # Multi-label: one label per cell of a 2 x 7 grid of 14 x 4 pixel cells.


def _noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
  return rng.integers(0, 120, size=shape)


def _binary(rng, n):
  """Grey 28x28; class 1 has a bright 10x10 square (+120) at a random place."""
  labels = rng.permutation(np.arange(n) % 2)
  images = _noise(rng, (n, 28, 28))
  for i in np.flatnonzero(labels):
    r, c = rng.integers(0, 19, size=2)
    images[i, r:r + 10, c:c + 10] += 120
  return images, labels[:, None]


def _ordinal_rgb(rng, n):
  """RGB 28x28, grades 0..4: red rises by 30 a grade, blue falls by 30 a grade."""
  labels = rng.permutation(np.arange(n) % 5)
  images = _noise(rng, (n, 28, 28, 3))
  images[..., 0] += 30 * labels[:, None, None]
  images[..., 2] += 30 * (4 - labels[:, None, None])
  return images, labels[:, None]


def _multilabel(rng, n):
  """Grey 28x28, 14 labels: label j is 1 when grid cell j is bright (+120)."""
  rows, cols = _GRID
  labels = (rng.random((n, rows * cols)) < 0.4).astype(np.int64)
  images = _noise(rng, (n, 28, 28))
  for i, j in zip(*np.nonzero(labels)):
    r, c = divmod(j, cols)
    images[i, r * 14:(r + 1) * 14, c * 4:(c + 1) * 4] += 120
  return images, labels


def _volume(rng, n):
  """28x28x28 grey volumes; class 1 has a bright 10x10x10 cube (+120) at a random place."""
  labels = rng.permutation(np.arange(n) % 2)
  images = _noise(rng, (n, 28, 28, 28))
  for i in np.flatnonzero(labels):
    d, r, c = rng.integers(0, 19, size=3)
    images[i, d:d + 10, r:r + 10, c:c + 10] += 120
  return images, labels[:, None]


# name: (make, like, task, num_classes, split sizes, example shape, seed)
_SETS = {
    "binary": (_binary, "breastmnist", "multiclass", 2, _SIZES_2D, (28, 28, 1), 0),
    "ordinal_rgb": (_ordinal_rgb, "retinamnist", "ordinal", 5, _SIZES_2D, (28, 28, 3), 1),
    "multilabel": (_multilabel, "chestmnist", "multilabel", 14, _SIZES_2D, (28, 28, 1), 2),
    "volume": (_volume, "adrenalmnist3d", "multiclass", 2, _SIZES_3D, (28, 28, 28, 1), 3),
}


def _every_class_present(labels: np.ndarray, num_classes: int) -> bool:
  if labels.shape[1] > 1:  # Multi-label: every label both 0 and 1.
    return bool((labels.min(0) == 0).all() and (labels.max(0) == 1).all())
  return len(np.unique(labels)) == num_classes


def _write_set(path: pathlib.Path, make, num_classes: int, sizes: dict[str, int],
               seed: int) -> None:
  rng = np.random.default_rng(seed)
  arrays = {}
  for split, n in sizes.items():
    images, labels = make(rng, n)
    if not _every_class_present(labels, num_classes):
      raise AssertionError(f"{path.name} {split}: a class or label value is missing; change the "
                           "seed or the size.")
    arrays[f"{split}_images"] = images.astype(np.uint8)
    arrays[f"{split}_labels"] = labels.astype(np.uint8)
  np.savez_compressed(path, **arrays)


@pytest.fixture(scope="session")
def synthetic_medmnist(tmp_path_factory) -> dict[str, SyntheticSet]:
  """Small synthetic MedMNIST-layout archives, written once per session into a tmp directory.

  Returns:
    {'binary': grey 28x28, 2 classes (like breastmnist),
     'ordinal_rgb': RGB 28x28, 5 ordinal grades (like retinamnist),
     'multilabel': grey 28x28, 14 labels (like chestmnist),
     'volume': 28x28x28 grey volumes, 2 classes (like adrenalmnist3d)}; each a `SyntheticSet`
    at `<dir>/synthetic_<name>.npz`. 2D sets hold 40/20/30 train/val/test examples, the volumes
    20/10/12. Every split holds every class (every label both 0 and 1).
  """
  root = tmp_path_factory.mktemp("synthetic_medmnist")
  sets = {}
  for name, (make, like, task, num_classes, sizes, shape, seed) in _SETS.items():
    path = root / f"synthetic_{name}.npz"
    _write_set(path, make, num_classes, sizes, seed)
    sets[name] = SyntheticSet(path=path, like=like, task=task, num_classes=num_classes,
                              split_sizes=dict(sizes), image_shape=shape)
  return sets


# Modules whose tests train through subprocesses or whole studies: a minute or more of a 2-core
# CI box each. They are collected first, so that `pytest -n 2` starts them at once and the many
# short tests fill both workers at the end (collected last they ran together at the end, one
# worker waiting on the other).
_LONG_MODULES = (
    "tests/fm_adapt/train/test_multiprocess.py",
    "tests/fm_adapt/train/test_stacked_loop.py",
    "tests/fm_adapt/train/test_loop.py",
    "tests/experiments/test_adaptation_study.py",
    "tests/experiments/test_medmnist_v2_table.py",
    "tests/fm_adapt/train/test_pretrained.py",
    "tests/fm_adapt/train/test_step.py",
    "tests/fm_adapt/train/test_multiprocess_data.py",
    "tests/experiments/test_fm_transfer.py",
)


def _long_modules_first(items) -> None:
  """Puts the tests of `_LONG_MODULES` first, in that order (the rest keep theirs)."""
  rank = {module: i for i, module in enumerate(_LONG_MODULES)}
  position = {id(item): n for n, item in enumerate(items)}
  items.sort(key=lambda item: (rank.get(item.nodeid.split("::")[0], len(rank)),
                               position[id(item)]))
