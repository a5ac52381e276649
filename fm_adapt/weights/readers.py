"""Reads checkpoint files that users hand us into flat {name: numpy array} dicts.

Checkpoints come from other people, so nothing here unpickles: `.npz` is read
with `allow_pickle=False`, `.pth` with `torch.load(weights_only=True)` (torch is
optional: `pip install fm_adapt[torch]`), `.safetensors` with safetensors. A file
that needs pickle is refused with `PickleRefusedError`, which says what to
convert it to.

A path is local, or a URI such as `gs://bucket/w.safetensors` (read through `etils.epath`, whole
into memory: those files are not memory-mapped).
"""
import argparse
import io
import os
import pathlib
import pickle
from typing import Any

from etils import epath
import ml_dtypes
import numpy as np
import safetensors
import safetensors.numpy

PathLike = str | os.PathLike
# A local file's name, or a URI's bytes: what np.load, safetensors and torch.load read.
Source = str | io.BytesIO

NPZ_SUFFIXES = ('.npz',)
SAFETENSORS_SUFFIXES = ('.safetensors',)
TORCH_SUFFIXES = ('.pth', '.pt', '.bin')
PICKLE_SUFFIXES = ('.pkl', '.pickle', '.joblib')
SUPPORTED_SUFFIXES = NPZ_SUFFIXES + SAFETENSORS_SUFFIXES + TORCH_SUFFIXES

# Classes a `.pth` may hold beside tensors, allowed to torch.load(weights_only=True): the MAE and
# RETFound training code (`util/misc.py` `save_model`) pickles its argparse arguments into every
# checkpoint it writes, and the released RETFound weights carry them. A Namespace is a plain bag
# of attributes: rebuilding it runs no code from the file (torch's `safe_globals` mechanism).
SAFE_GLOBALS = (argparse.Namespace,)

_CONVERT_HINT = (
    'Unpickling a file from elsewhere can run arbitrary code, so fm_adapt never '
    'does it. Convert the checkpoint to .safetensors (safetensors.numpy.save_file '
    'or safetensors.torch.save_file of the state dict) or to a plain numeric .npz '
    '(numpy.savez of the arrays) on a machine you trust, and load that.')


class PickleRefusedError(ValueError):
  """A checkpoint needs pickle to load; it is refused."""


def suffix(path: PathLike) -> str:
  """The lower-cased file extension, e.g. '.npz'."""
  return pathlib.PurePath(os.fspath(path)).suffix.lower()


def as_path(path: PathLike) -> pathlib.Path | epath.Path:
  """A local path as `pathlib.Path`; a URI ('gs://...') as `etils.epath.Path`, kept whole."""
  return epath.Path(path) if '://' in os.fspath(path) else pathlib.Path(path)


def _source(path: pathlib.Path | epath.Path) -> Source:
  """What the format readers open: a local file by name, a URI's bytes read through epath."""
  return str(path) if isinstance(path, pathlib.Path) else io.BytesIO(path.read_bytes())


def read_arrays(path: PathLike) -> dict[str, np.ndarray]:
  """Reads every array of a checkpoint file, keyed by its name in the file.

  Args:
    path: a `.npz`, `.safetensors`, or (with torch installed) `.pth`/`.pt`/`.bin`
      file holding a flat dict of arrays (a state dict).

  Raises:
    PickleRefusedError: the file needs pickle (a `.pkl`, an object array, a
      `.pth` holding Python objects).
    ValueError: an unsupported extension.
    FileNotFoundError: no such file.
  """
  path = as_path(path)
  ext = suffix(path)
  if ext in PICKLE_SUFFIXES:
    raise PickleRefusedError(f'{path}: {ext} files are pickles. {_CONVERT_HINT}')
  if ext not in SUPPORTED_SUFFIXES:
    raise ValueError(f'{path}: unsupported checkpoint extension {ext!r}; '
                     f'supported: {list(SUPPORTED_SUFFIXES)}.')
  if not path.is_file():
    raise FileNotFoundError(f'No checkpoint file at {path}.')
  if ext in NPZ_SUFFIXES:
    return _read_npz(path)
  if ext in SAFETENSORS_SUFFIXES:
    source = _source(path)
    try:
      if isinstance(source, str):
        return safetensors.numpy.load_file(source)
      return safetensors.numpy.load(source.getvalue())
    except Exception as e:  # pylint: disable=broad-except  # SafetensorError, OSError, ...
      raise _unreadable(path, e) from None
  return _read_torch(path)


def _unreadable(path: pathlib.Path | epath.Path, error: Exception) -> ValueError:
  """The error for a file that is cut short or not what its extension says."""
  first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
  return ValueError(
      f'{path}: not a readable {suffix(path)} checkpoint ({first_line}); '
      f'{_size(path)} bytes. Is the download complete? Compare its size and '
      'checksum with the published file, or fetch it again.')


def _size(path: pathlib.Path | epath.Path) -> int:
  """The file's size in bytes (epath's stat says `length`, os.stat `st_size`)."""
  stat = path.stat()
  return stat.st_size if isinstance(path, pathlib.Path) else stat.length


def list_keys(path: PathLike) -> list[str]:
  """The array names in a checkpoint, reading no array data where the format allows."""
  path = as_path(path)
  ext = suffix(path)
  if ext in NPZ_SUFFIXES and path.is_file():
    with _open_npz(path) as npz:
      return list(npz.files)
  if ext in SAFETENSORS_SUFFIXES and path.is_file() and isinstance(path, pathlib.Path):
    try:
      with safetensors.safe_open(str(path), framework='numpy') as f:
        return list(f.keys())
    except Exception as e:  # pylint: disable=broad-except
      raise _unreadable(path, e) from None
  return list(read_arrays(path))


def _read_npz(path: pathlib.Path | epath.Path) -> dict[str, np.ndarray]:
  with _open_npz(path) as npz:
    try:
      return {name: npz[name] for name in npz.files}
    except ValueError as e:
      _raise_if_pickle(e, path)
      raise


def _open_npz(path: pathlib.Path | epath.Path) -> Any:
  """np.load without pickle, checked to be an archive of named arrays."""
  try:
    npz = np.load(_source(path), allow_pickle=False)
  except ValueError as e:
    _raise_if_pickle(e, path)
    raise
  if not hasattr(npz, 'files'):
    raise ValueError(f'{path}: a single array, not an .npz archive of named arrays.')
  return npz


def _raise_if_pickle(error: ValueError, path: pathlib.Path | epath.Path) -> None:
  if 'pickle' in str(error).lower():
    raise PickleRefusedError(
        f'{path}: holds pickled Python objects ({error}). {_CONVERT_HINT}') from None


def _import_torch() -> Any:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(
        'Reading .pth/.pt/.bin checkpoints needs PyTorch, which fm_adapt does not '
        'depend on. Install it (`pip install fm_adapt[torch]` or `pip install torch`), '
        'or convert the file to .safetensors / .npz elsewhere.') from None
  return torch


def _read_torch(path: pathlib.Path | epath.Path) -> dict[str, np.ndarray]:
  torch = _import_torch()
  # Before 2.6, torch.load(weights_only=True) can still run code from a crafted file.
  version = str(torch.__version__)
  if tuple(int(p) for p in version.split('+')[0].split('.')[:2]) < (2, 6):
    raise ImportError(
        f'{path}: torch {version} is installed, and torch.load(weights_only=True) before '
        'torch 2.6 can run code hidden in a crafted checkpoint (CVE-2025-32434), so '
        'fm_adapt does not read .pth files with it. Upgrade: `pip install "torch>=2.6"` '
        '(or `pip install "fm_adapt[torch]"`), or convert the file to .safetensors / .npz '
        'on a machine you trust.')
  try:
    with torch.serialization.safe_globals(list(SAFE_GLOBALS)):
      obj = torch.load(_source(path), map_location='cpu', weights_only=True)
  except pickle.UnpicklingError as e:
    first_line = str(e).strip().splitlines()[0] if str(e).strip() else ''
    raise PickleRefusedError(
        f'{path}: holds Python objects beyond tensors, so it loads only with full '
        f'pickle (torch.load weights_only=True said: {first_line}). '
        f'{_CONVERT_HINT}') from None
  except (RuntimeError, EOFError, OSError) as e:  # A cut-short zip archive, or not one.
    raise _unreadable(path, e) from None
  state = _find_state_dict(obj, path, torch)
  return {name: _tensor_to_numpy(tensor, torch) for name, tensor in state.items()}


def _find_state_dict(obj: Any, path: pathlib.Path | epath.Path, torch: Any) -> dict[str, Any]:
  """The flat name -> tensor dict, also when wrapped as {'state_dict': ...}."""
  def is_state_dict(d: Any) -> bool:
    return isinstance(d, dict) and d and all(
        isinstance(v, torch.Tensor) for v in d.values())
  if is_state_dict(obj):
    return obj
  for wrapper in ('state_dict', 'model', 'model_state_dict'):
    if isinstance(obj, dict) and is_state_dict(obj.get(wrapper)):
      return obj[wrapper]
  raise ValueError(f'{path}: not a state dict of tensors (got {type(obj).__name__}'
                   + (f' with keys {sorted(obj)[:10]}' if isinstance(obj, dict) else '')
                   + ').')


def _tensor_to_numpy(tensor: Any, torch: Any) -> np.ndarray:
  tensor = tensor.detach().cpu()
  if tensor.dtype == torch.bfloat16:
    return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
  return tensor.numpy()
