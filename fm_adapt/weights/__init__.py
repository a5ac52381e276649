"""Pretrained-checkpoint importers, chosen by name (`config.model_load.name`).

    from fm_adapt import weights
    variables = weights.load('efficientnet_lite0', 'efficientnet-lite0-57934424.npz')
    params = weights.load('timm', 'vit_s16.safetensors', target_params=init, dont_load=['head/.*'])
    params = weights.load('vit_b16.npz', target_params=init)   # name detected from the keys

The foundation-model layouts (DINOv2, MAE / RETFound, CLIP / BiomedCLIP towers) load
with 'timm', 'retfound', 'hf_dinov2', 'open_clip' or 'hf_clip' into a ViT configured for the
family;
`fm_adapt.weights.zoo` knows that configuration for each published model.

LOADERS maps a name to a function `fn(path, **kwargs)`. The EfficientNet loader
returns dict(params=..., batch_stats=...); the ViT loaders return params (see
`vit_import.load_vit_checkpoint` for their keyword arguments).
"""
import functools
import os
import pathlib
from typing import Any, Callable

from fm_adapt.weights import efficientnet_lite
from fm_adapt.weights import mim_encoder
from fm_adapt.weights import native
from fm_adapt.weights import readers
from fm_adapt.weights import vit_import
from fm_adapt.weights import zoo  # pylint: disable=unused-import  # weights.zoo: the catalogue.

PickleRefusedError = readers.PickleRefusedError
CheckpointMismatchError = vit_import.CheckpointMismatchError
load_efficientnet_lite0 = efficientnet_lite.load_efficientnet_lite0
load_vit_checkpoint = vit_import.load_vit_checkpoint
import_vit = vit_import.import_vit
ImportReport = vit_import.ImportReport
resample_posemb = vit_import.resample_posemb

LOADERS: dict[str, Callable[..., Any]] = {
    'efficientnet_lite0': efficientnet_lite.load_efficientnet_lite0,
    'fm_adapt': native.load_native,  # fm_adapt's own export: full variables
    'fm_adapt_mim': mim_encoder.load_mim_encoder,  # a MIM export's encoder into a ViT
    'vit': vit_import.load_vit_checkpoint,  # layout detected from the keys
    'big_vision': functools.partial(vit_import.load_vit_checkpoint, format='big_vision'),
    'timm': functools.partial(vit_import.load_vit_checkpoint, format='timm'),
    'hf': functools.partial(vit_import.load_vit_checkpoint, format='hf'),
    'pth': functools.partial(vit_import.load_vit_checkpoint, format='pth'),
    'hf_dinov2': functools.partial(vit_import.load_vit_checkpoint, format='hf_dinov2'),
    'open_clip': functools.partial(vit_import.load_vit_checkpoint, format='open_clip'),
    'hf_clip': functools.partial(vit_import.load_vit_checkpoint, format='hf_clip'),
    'retfound': functools.partial(vit_import.load_vit_checkpoint, format='retfound'),
}


def load(name_or_path: str | os.PathLike, path: str | os.PathLike | None = None,
         /, **kwargs: Any) -> Any:
  """Loads a checkpoint with the loader of a name, or the one its keys show.

  Args:
    name_or_path: a key of LOADERS (then `path` is the file), or the file itself
      (then the loader is 'fm_adapt' for our exports, 'efficientnet_lite0' for
      EfficientNet-PyTorch keys, else 'vit' with its layout detected from the keys).
    path: the file, when the first argument is a loader name.
    **kwargs: passed to the loader.

  Raises:
    ValueError: an unknown name, or a first argument that is neither a loader name nor
      a file (the message lists the names).
  """
  if isinstance(name_or_path, str) and name_or_path in LOADERS:
    if path is None:
      raise ValueError(f'load({name_or_path!r}, path): the checkpoint path is missing.')
    return LOADERS[name_or_path](path, **kwargs)
  if path is not None or not pathlib.Path(name_or_path).is_file():
    raise ValueError(f'{str(name_or_path)!r} is neither a checkpoint loader name (valid: '
                     f'{sorted(LOADERS)}) nor an existing file.')
  return LOADERS[detect_name(name_or_path)](name_or_path, **kwargs)


def detect_name(path: str | os.PathLike) -> str:
  """'fm_adapt_mim' for our MIM pretraining exports, 'fm_adapt' for our other exports,
  'efficientnet_lite0' for EfficientNet-PyTorch key names, else 'vit'."""
  keys = readers.list_keys(path)
  if mim_encoder.is_mim_export(list(keys)):
    return 'fm_adapt_mim'
  if native.is_native(list(keys)):
    return 'fm_adapt'
  return 'efficientnet_lite0' if '_conv_stem.weight' in keys else 'vit'
