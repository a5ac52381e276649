"""A workdir belongs to one run: one process at a time, and the config it was started with.

  <workdir>/.lock         an exclusive `fcntl.flock` held while a process trains (holds its pid)
  <workdir>/config.json   the run's config, written once, when the workdir starts training

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
import json
import os
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any

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

_held: dict[str, int] = {}  # resolved workdir -> nesting depth of this process's lock


class WorkdirError(RuntimeError):
  """The workdir cannot be used for this run (busy, or trained with another config)."""


class WorkdirBusy(WorkdirError):
  """Another process holds the workdir's lock."""


class ConfigChanged(WorkdirError):
  """A resume with a config that differs from the workdir's `config.json`."""


@contextlib.contextmanager
def lock(workdir: str | os.PathLike, owner: bool = True) -> Iterator[None]:
  """Holds `<workdir>/.lock` exclusively; another process gets `WorkdirBusy` at once.

  Re-entrant within a process (a study locks a run's workdir, then trains it). The lock is
  released when the block ends or the process dies, so a stale `.lock` file blocks nothing.

  Args:
    workdir: the run's directory (created).
    owner: whether this process takes the lock: process 0 only on several JAX processes, which
      share one workdir.
  """
  workdir = pathlib.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  key = str(workdir.resolve())
  if not owner:
    yield
    return
  if key in _held:
    _held[key] += 1
    try:
      yield
    finally:
      _held[key] -= 1
    return
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
  _held[key] = 1
  try:
    yield
  finally:
    del _held[key]
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def has_progress(workdir: str | os.PathLike) -> bool:
  """Whether the workdir holds anything a run would resume or keep: checkpoints or results."""
  workdir = pathlib.Path(workdir)
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


def check_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict,
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
  workdir = pathlib.Path(workdir).absolute()
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


def _refusal(path: pathlib.Path, training: list[str], harmless: list[str]) -> str:
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
