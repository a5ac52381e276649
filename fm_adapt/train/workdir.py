"""A workdir belongs to one run: one process at a time, and the config it was started with.

  <workdir>/.lock         an exclusive `fcntl.flock` held while a process trains (holds its pid)
  <workdir>/config.json   the run's config, written once, when the workdir starts training

A workdir is a local path or a `gs://` URI (`etils.epath`; orbax writes checkpoints to both). An
object store has no locks: a `gs://` workdir is not locked, with a warning that says so.

A resume compares the config with `config.json`. A difference that changes training is refused
with the differing keys; the keys in `HARMLESS_KEYS` (logging, checkpoint cadence, where the
data lives, evaluation batch size) change nothing a checkpoint depends on, and are accepted
with `allow_harmless_changes=True` (`--allow_harmless_changes`). `config.json` keeps the
original values. A key missing from an older `config.json` (written before the key existed) is
accepted, with a warning, when the config holds the key's `base_config()` default (or, for a key
whose earlier behaviour differs from that default, the value in `IMPLIED_BEFORE_KEY`).
"""
from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
from collections.abc import Iterator, Mapping
from typing import Any

from etils import epath
import ml_collections

from fm_adapt import config as config_lib
from fm_adapt.train import files
from fm_adapt.train import writer as writer_lib

LOCK_NAME = ".lock"
CONFIG_NAME = "config.json"
# Keys whose change on resume leaves the training trajectory and the selection of the best
# checkpoint as they were (`eval_every` is not here: it changes which steps compete for best).
HARMLESS_KEYS = ("log_every", "progress", "keep_ckpts", "checkpoint_every", "data_dir",
                 "description", "input.worker_count", "input.eval_batch_size")

# Keys added after workdirs were written whose earlier behaviour is not today's default: a
# config.json without the key was trained with this value (the loader carried batches across
# epochs before `input.last_batch` existed).
IMPLIED_BEFORE_KEY = {"input.last_batch": "carry"}

# Packages a workdir URI's scheme needs, with what needs them: etils.epath reads and writes gs://
# through fsspec (gcsfs; or TensorFlow's gfile when TensorFlow is installed), and orbax asks
# google-cloud-storage about the bucket before it lists checkpoints.
SCHEME_PACKAGES = {"gs": {"gcsfs": "etils.epath (fsspec)", "google.cloud.storage": "orbax"}}
_PIP_NAMES = {"google.cloud.storage": "google-cloud-storage"}

_held: dict[str, int] = {}  # resolved workdir -> nesting depth of this process's lock


class WorkdirError(RuntimeError):
  """The workdir cannot be used for this run (busy, or trained with another config)."""


class WorkdirBusy(WorkdirError):
  """Another process holds the workdir's lock."""


class ConfigChanged(WorkdirError):
  """A resume with a config that differs from the workdir's `config.json`."""


def _installed(module: str) -> bool:
  try:
    return importlib.util.find_spec(module) is not None
  except ModuleNotFoundError:  # A missing parent package ('google' for 'google.cloud.storage').
    return False


def missing_packages(workdir: epath.PathLike) -> dict[str, str]:
  """The packages (pip name -> what needs it) that a workdir URI's scheme needs and lacks."""
  scheme = os.fspath(workdir).split("://", 1)[0]
  needed = SCHEME_PACKAGES.get(scheme, {})
  if scheme == "gs" and _installed("tensorflow"):  # epath then uses TensorFlow's gfile.
    needed = {k: v for k, v in needed.items() if k != "gcsfs"}
  return {_PIP_NAMES.get(m, m): why for m, why in needed.items() if not _installed(m)}


def check_storage(workdir: epath.PathLike) -> None:
  """Refuses a workdir on storage a run cannot use, before anything is written.

  Raises:
    WorkdirError: a URI scheme other than gs:// (orbax writes checkpoints to local paths and
      gs:// only), or a gs:// workdir without the packages that reach it (naming the install).
  """
  if files.is_local(workdir):
    return
  scheme = os.fspath(workdir).split("://", 1)[0]
  if scheme not in SCHEME_PACKAGES:
    raise WorkdirError(
        f"The workdir {workdir} is on {scheme}://, where orbax cannot write checkpoints: use a "
        f"local path or one of {', '.join(s + '://' for s in SCHEME_PACKAGES)}.")
  missing = missing_packages(workdir)
  if missing:
    raise WorkdirError(
        f"The workdir {workdir} needs {', '.join(f'{p} (for {w})' for p, w in missing.items())}: "
        f"pip install {' '.join(missing)}")


@contextlib.contextmanager
def lock(workdir: epath.PathLike, owner: bool = True) -> Iterator[None]:
  """Holds `<workdir>/.lock` exclusively; another process gets `WorkdirBusy` at once.

  Re-entrant within a process (a study locks a run's workdir, then trains it). The lock is
  released when the block ends or the process dies, so a stale `.lock` file blocks nothing.
  A workdir on an object store (`gs://`) is not locked: `fcntl` locks exist on local
  filesystems only; a warning says so once per outermost `lock`.

  Args:
    workdir: the run's directory (created).
    owner: whether this process takes the lock: process 0 only on several JAX processes, which
      share one workdir.
  """
  workdir = files.as_path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  local = files.is_local(workdir)
  key = os.path.realpath(workdir) if local else os.fspath(workdir)
  if not owner:
    yield
    return
  if not local and key not in _held:
    writer_lib.console(
        f"Warning: {workdir} is not on a local filesystem, so it is not locked (fcntl locks "
        "work on local disks only): make sure no other process trains this workdir.")
  outermost = local and key not in _held
  fd = _flock(workdir) if outermost else None
  _held[key] = _held.get(key, 0) + 1
  try:
    yield
  finally:
    _held[key] -= 1
    if not _held[key]:
      del _held[key]
    if fd is not None:
      fcntl.flock(fd, fcntl.LOCK_UN)
      os.close(fd)


def _flock(workdir: epath.Path) -> int:
  """Takes `<workdir>/.lock` (a local workdir) and writes this process's pid into it."""
  path = workdir / LOCK_NAME
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except BlockingIOError:
    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "(pid not yet written)"
    os.close(fd)
    raise WorkdirBusy(
        f"The workdir {workdir} is in use by process {holder} (it holds {path}). Wait for it "
        "to finish or stop it; to train another run at the same time use another --workdir."
    ) from None
  os.ftruncate(fd, 0)
  os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
  return fd


def has_progress(workdir: epath.PathLike) -> bool:
  """Whether the workdir holds anything a run would resume or keep: checkpoints or results."""
  workdir = files.as_path(workdir)
  steps = [p for d in ("ckpt", "best") if (workdir / d).is_dir()
           for p in (workdir / d).iterdir() if p.name.isdigit()]
  return bool(steps) or (workdir / "results.json").exists()


def _plain(config: Mapping[str, Any] | ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as `config.json` holds it (JSON values: tuples as lists, NaN as null)."""
  if isinstance(config, ml_collections.ConfigDict):
    config = config.to_dict()
  return json.loads(files.dumps(config))


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """'a.b.c' -> value for the leaves of nested dicts (empty dicts hold no keys)."""
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(_flatten(value, name + "."))
    else:
      out[name] = value
  return out


def _harmless(key: str) -> bool:
  return any(key == h or key.startswith(h + ".") for h in HARMLESS_KEYS)


def config_differences(stored: Mapping[str, Any], current: Mapping[str, Any]
                       ) -> tuple[list[str], list[str], list[str]]:
  """Compares a stored `config.json` with a config, key by dotted key.

  Returns:
    (changes that alter training, harmless changes, keys absent from the stored config that hold
    their `base_config()` default, or their `IMPLIED_BEFORE_KEY` value), each as
    'key: stored X, now Y' lines.
  """
  stored, current = _flatten(_plain(stored)), _flatten(_plain(current))
  defaults = dict(_flatten(_plain(config_lib.base_config())), **IMPLIED_BEFORE_KEY)
  missing = object()
  training, harmless, defaulted = [], [], []
  for key in sorted(set(stored) | set(current)):
    old, new = stored.get(key, missing), current.get(key, missing)
    if old == new:
      continue
    line = (f"{key}: stored {'(absent)' if old is missing else json.dumps(old)}, now "
            f"{'(absent)' if new is missing else json.dumps(new)}")
    if old is missing and key in defaults and defaults[key] == new:
      defaulted.append(line)
    elif _harmless(key):
      harmless.append(line)
    else:
      training.append(line)
  return training, harmless, defaulted


def check_config(workdir: epath.PathLike, config: ml_collections.ConfigDict,
                 allow_harmless_changes: bool = False, write: bool = True) -> None:
  """Writes `config.json` for a fresh workdir; on resume, refuses a config that differs.

  A workdir is fresh until it holds a checkpoint or results (`has_progress`): a run that
  failed before saving anything may be started again with another config.

  Args:
    workdir: the run's directory.
    config: the run's config.
    allow_harmless_changes: accept changes of `HARMLESS_KEYS` on resume.
    write: whether this process writes `config.json` (process 0).

  Raises:
    ConfigChanged: listing the differing keys, and how to proceed.
  """
  workdir = files.as_path(workdir)
  path = workdir / CONFIG_NAME
  if not path.exists() or not has_progress(workdir):
    if write:
      files.write_json(path, _plain(config))
    return
  try:
    stored = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ConfigChanged(f"{path} is not valid JSON ({e}); restore it, or use a fresh --workdir."
                        ) from None
  training, harmless, defaulted = config_differences(stored, config)
  if training or (harmless and not allow_harmless_changes):
    raise ConfigChanged(_refusal(path, training, harmless))
  for line in defaulted:
    writer_lib.console(f"Warning: {path} predates a config key; taking its default ({line}).")
  for line in harmless:
    writer_lib.console(f"Resuming with a harmless config change ({line}).")


def _refusal(path: epath.Path, training: list[str], harmless: list[str]) -> str:
  lines = [f"The config differs from the one this workdir was trained with ({path}):"]
  lines += [f"  {line}" for line in training]
  lines += [f"  {line}  [harmless]" for line in harmless]
  if training:
    lines.append("A resume cannot change training: run with the stored values (e.g. "
                 "--config.<key>=<stored value>), or use a fresh --workdir for the new config.")
  if harmless:
    lines.append(f"Changes of {', '.join(HARMLESS_KEYS)} are harmless: pass "
                 "--allow_harmless_changes to resume with them.")
  return "\n".join(lines)
