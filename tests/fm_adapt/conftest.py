"""The tiny training data and run configs of the fm_adapt tests (no shared data needed).

The data is the `binary` set of the session fixture `synthetic_medmnist` (tests/conftest.py):
28x28 grey images, class 1 with a bright square, 40 train, 20 val, 30 test. `one_class_val`
is the same archive with a validation split of class 0 only (its AUC is undefined).

Tests that use it share a persistent XLA compilation cache for the session (in-process, and via
`tiny_env` for subprocesses): the tiny runs compile the same programs, and a cached compile
takes a fraction of a second instead of seconds.
"""
import os
import pathlib
import socket
import subprocess
import sys
import textwrap
import time

import jax
import ml_collections
import numpy as np
import pytest


def _write_one_class_val(source: pathlib.Path, path: pathlib.Path) -> None:
  """`source` with the validation examples of class 1 left out."""
  with np.load(source, allow_pickle=False) as data:
    arrays = {key: data[key] for key in data.files}
  keep = arrays["val_labels"][:, 0] == 0
  for key in ("val_images", "val_labels"):
    arrays[key] = arrays[key][keep]
  np.savez(path, **arrays)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, synthetic_medmnist) -> dict:
  """The synthetic archives, their directory (the data dir; TFDS builds in `<root>/tfds`) and
  the split sizes of 'tiny' and the XLA cache: {'tiny', 'one_class_val', 'root': str,
  'sizes': {split: n}, 'xla_cache': path}."""
  binary = synthetic_medmnist["binary"]
  root = tmp_path_factory.mktemp("tiny_data")
  for key, value in _cache_settings(_xla_cache_dir(root, tmp_path_factory)).items():
    jax.config.update(key.lower(), value)
  _write_one_class_val(binary.path, root / "one_class_val.npz")
  return {"tiny": str(binary.path), "one_class_val": str(root / "one_class_val.npz"),
          "root": str(root), "sizes": dict(binary.split_sizes),
          "xla_cache": _xla_cache_dir(root, tmp_path_factory)}


def _xla_cache_dir(root: pathlib.Path, tmp_path_factory) -> pathlib.Path:
  """The session's XLA cache: in `root`, or shared by the workers of `pytest -n` (one run)."""
  if os.environ.get("PYTEST_XDIST_WORKER"):  # basetemp is <run>/popen-gw<N>: share <run>.
    return tmp_path_factory.getbasetemp().parent / "xla_cache"
  return root / "xla_cache"


def _cache_settings(directory: pathlib.Path) -> dict[str, object]:
  """The persistent XLA cache in `directory`. A size limit turns on JAX's file lock around each
  read and write: without it a process may read an entry another one is still writing (the
  processes of a test, pytest's workers), and a torn executable aborts the reader."""
  return {"JAX_COMPILATION_CACHE_DIR": str(directory),
          "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": 0,
          "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": 0,
          "JAX_COMPILATION_CACHE_MAX_SIZE": 1 << 34}


@pytest.fixture()
def tiny_env(tiny_data) -> dict[str, str]:
  """The environment of a subprocess that trains a tiny run (1 CPU device, the shared XLA
  cache)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1 "
             + os.environ["FM_ADAPT_TEST_XLA_FLAGS"],
             PYTHONPATH=str(pathlib.Path(__file__).resolve().parents[2]))
  env.update({k: str(v) for k, v in _cache_settings(tiny_data["xla_cache"]).items()})
  return env


def tiny_data_source(data_path: str, root: str) -> str:
  """Python source of the lines that point `config` at `data_path`, data dir `root`."""
  return textwrap.dedent(f"""
      config.input.data = dict(name="npz", path={data_path!r}, tfds_dir={root + "/tfds"!r})
      config.data_dir = {root!r}
  """)


def tiny_config_text(data_path: str, root: str) -> str:
  """Python source of `get_config(arg=None)`: a 4-step ViT-mu/7 run on `data_path`, data dir
  `root`."""
  return textwrap.dedent("""
      from fm_adapt import config as config_lib

      def get_config(arg=None):
        config = config_lib.base_config()
        config.model = dict(variant="mu/7", pool_type="gap")
        config.input.update(dict(pp="value_range(-1,1)", batch_size=16, eval_batch_size=32))
        config.evals.val = dict(name="classification", split="val")
        config.evals.test = dict(name="classification", split="test", periodic=False)
        config.total_steps = 4
        config.eval_every = 2
        config.checkpoint_every = 2
        config.log_every = 1
        config.progress = False
  """) + textwrap.indent(tiny_data_source(data_path, root), "  ") + "  return config\n"


def quickstart_config_text(data_path: str, root: str) -> str:
  """Python source of `get_config(arg=None)`: experiments/quickstart.py:runlocal (a 4-step
  ViT-mu/7 with flip_lr, AdamW, warm-up and cosine decay) on `data_path`, data dir `root`."""
  return textwrap.dedent("""
      from experiments import quickstart

      def get_config(arg=None):
        config = quickstart.get_config("runlocal")
  """) + textwrap.indent(tiny_data_source(data_path, root), "  ") + "  return config\n"


def _load_config(source: str) -> ml_collections.ConfigDict:
  namespace = {}
  exec(source, namespace)  # pylint: disable=exec-used
  return namespace["get_config"]()


@pytest.fixture()
def tiny_config(tiny_data):
  """Returns `make(data='tiny', **overrides) -> ConfigDict` of a 4-step run."""

  def make(data: str = "tiny", **overrides) -> ml_collections.ConfigDict:
    config = _load_config(tiny_config_text(tiny_data[data], tiny_data["root"]))
    for key, value in overrides.items():
      setattr(config, key, value)
    return config

  return make


@pytest.fixture()
def quickstart_config(tiny_data):
  """Returns `make() -> ConfigDict`: experiments/quickstart.py:runlocal on the tiny data."""
  return lambda: _load_config(quickstart_config_text(tiny_data["tiny"], tiny_data["root"]))


@pytest.fixture()
def tiny_experiment(tiny_data, tmp_path):
  """Returns `write(sweep_source='', quickstart=False) -> path` of an experiment file of the
  tiny run (or, with `quickstart`, of experiments/quickstart.py:runlocal on the tiny data)."""

  def write(sweep: str = "", quickstart: bool = False) -> pathlib.Path:
    path = tmp_path / ("tiny_quickstart.py" if quickstart else "tiny_experiment.py")
    text = quickstart_config_text if quickstart else tiny_config_text
    path.write_text(text(tiny_data["tiny"], tiny_data["root"]) + textwrap.dedent(sweep))
    return path

  return write


def free_port() -> int:
  """A TCP port on 127.0.0.1 that nothing listens on now."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class ProcessGroup:
  """Local processes joined into one JAX job on 127.0.0.1 (`jax.distributed`, gloo on CPU)."""

  def __init__(self, env: dict[str, str], cwd: pathlib.Path):
    self._env = env
    self._cwd = cwd
    self.procs: list[subprocess.Popen] = []

  def start(self, module: str, args: list[str], num_processes: int = 2,
            devices_per_process: int = 2, timeout_s: int = 120) -> list[subprocess.Popen]:
    """Starts `python -m module args` as processes 0..n-1 of one job; their output goes to
    `<logs>/process_<i>.log` (`self.log(i)`)."""
    port = free_port()
    env = dict(self._env, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process} "
               + os.environ["FM_ADAPT_TEST_XLA_FLAGS"])
    self.procs = []
    for i in range(num_processes):
      command = [sys.executable, "-m", module, *args, f"--coordinator_address=127.0.0.1:{port}",
                 f"--num_processes={num_processes}", f"--process_id={i}",
                 f"--initialization_timeout={timeout_s}"]
      log = open(self._log_path(i), "w")  # pylint: disable=consider-using-with
      self.procs.append(subprocess.Popen(command, cwd=self._cwd, env=env, stdout=log,
                                         stderr=subprocess.STDOUT))
      log.close()
    return self.procs

  def _log_path(self, i: int) -> pathlib.Path:
    return pathlib.Path(self._env["FM_ADAPT_TEST_LOGS"]) / f"process_{i}.log"

  def log(self, i: int) -> str:
    return self._log_path(i).read_text()

  def tail(self, i: int, chars: int = 4000) -> str:
    """The end of process i's log for a failure message, without the list of loaded extension
    modules that a fatal error appends (it would hide the error itself)."""
    lines = [line for line in self.log(i).splitlines()
             if not line.startswith("Extension modules:")]
    return "\n".join(lines)[-chars:]

  def wait(self, timeout_s: float = 600) -> list[int]:
    """Waits for every process; returns their exit statuses (a timeout kills them and fails)."""
    deadline = time.time() + timeout_s
    for proc in self.procs:
      try:
        proc.wait(timeout=max(deadline - time.time(), 1))
      except subprocess.TimeoutExpired:
        self.kill()
        pytest.fail("processes did not finish in time; logs:\n" +
                    "\n".join(self.tail(i) for i in range(len(self.procs))))
    return [p.returncode for p in self.procs]

  def kill(self) -> None:
    for proc in self.procs:
      if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture()
def process_group(tiny_env, tmp_path):
  """A `ProcessGroup` with the tiny runs' environment; its processes are killed at teardown."""
  logs = tmp_path / "process_logs"
  logs.mkdir()
  group = ProcessGroup(dict(tiny_env, FM_ADAPT_TEST_LOGS=str(logs)),
                       pathlib.Path(__file__).resolve().parents[2])
  yield group
  group.kill()
