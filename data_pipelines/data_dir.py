"""Where data lives: the data directory, the per-user cache, and whether a place may be written.

The data directory holds source files (`medmnist/<flag>.npz`, the user's own archives and image
folders). It is chosen, in this order, by a flag value, the environment variable
`FM_ADAPT_DATA_DIR`, or the per-user cache `$XDG_CACHE_HOME/fm_adapt/data`
(`~/.cache/fm_adapt/data` when `XDG_CACHE_HOME` is unset).
"""
from __future__ import annotations

import os
import pathlib
import stat

ENV_VAR = 'FM_ADAPT_DATA_DIR'


def cache_root() -> pathlib.Path:
  """The per-user cache of fm_adapt: `$XDG_CACHE_HOME/fm_adapt` or `~/.cache/fm_adapt`."""
  base = os.environ.get('XDG_CACHE_HOME') or pathlib.Path.home() / '.cache'
  return pathlib.Path(base).expanduser() / 'fm_adapt'


def cache_data_dir() -> pathlib.Path:
  """The last-resort data directory, `<cache_root>/data`."""
  return cache_root() / 'data'


def resolve_data_dir(flag_value: str | os.PathLike | None = None, *,
                     create_cache: bool = False) -> pathlib.Path:
  """Returns the data directory: the flag value, else `$FM_ADAPT_DATA_DIR`, else the cache.

  Args:
    flag_value: a directory given on the command line (or by the caller); wins when set.
    create_cache: create the cache directory when it is the one chosen and does not exist yet
      (used before downloading official files). A directory named by the flag or the environment
      is never created.

  Returns:
    The chosen directory, absolute.

  Raises:
    FileNotFoundError: if the chosen directory does not exist; the message names all three ways
      to set it.
  """
  if flag_value:
    path, origin = pathlib.Path(flag_value), 'given by the data_dir flag/argument'
  elif os.environ.get(ENV_VAR):
    path, origin = pathlib.Path(os.environ[ENV_VAR]), f'given by ${ENV_VAR}'
  else:
    path, origin = cache_data_dir(), 'the per-user cache (neither a flag nor $%s is set)' % ENV_VAR
    if create_cache:
      path.mkdir(parents=True, exist_ok=True)
  path = path.expanduser().absolute()
  if not path.is_dir():
    raise FileNotFoundError(
        f'Data directory {path} ({origin}) does not exist. Set the data directory in one of three '
        f'ways, first match wins: (1) the data_dir flag/argument, (2) the environment variable '
        f'{ENV_VAR}, (3) the per-user cache {cache_data_dir()} (created when official MedMNIST '
        f'files are downloaded).')
  return path


def is_writable(path: os.PathLike | str) -> bool:
  """Whether `path` (a directory, or its nearest existing parent) may be written.

  A directory whose mode has no write bit at all is treated as read-only even for root, who could
  write it anyway: shared, read-only data directories stay untouched when tests run as root.
  """
  path = pathlib.Path(path).absolute()
  while not path.exists():
    path = path.parent
  if not os.access(path, os.W_OK | os.X_OK):
    return False
  return bool(stat.S_IMODE(path.stat().st_mode) & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
