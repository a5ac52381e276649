"""Model zoo: every model is a Flax linen module chosen by name.

All models share one calling convention:
`logits, out = model.apply(variables, image, train=...)` with image [B, H, W, C] and `out` a
dict holding at least 'pre_logits' and 'logits'.

To add a model, import its module here and add one entry to MODELS.
"""
import dataclasses
from typing import Any

import flax.linen as nn

from fm_adapt.models import efficientnet
from fm_adapt.models import mim
from fm_adapt.models import resnet
from fm_adapt.models import vit

MODELS: dict[str, type[nn.Module]] = {
    'vit': vit.Model,
    'resnet': resnet.Model,
    'efficientnet': efficientnet.Model,
    'vit_mim': mim.Model,  # A ViT with a pixel decoder for masked image modelling; no head.
}

# Fields every linen Module has; they are not model configuration.
_MODULE_FIELDS = frozenset({'parent', 'name'})


def model_fields(cls: type[nn.Module]) -> dict[str, dataclasses.Field]:
  """The configuration fields of a model class, by name, in declaration order."""
  return {f.name: f for f in dataclasses.fields(cls)
          if f.init and f.name not in _MODULE_FIELDS}


def get_model(name: str, /, **kwargs: Any) -> nn.Module:
  """Builds the model registered under `name` from its configuration fields.

  Args:
    name: a key of MODELS.
    **kwargs: values for the model's dataclass fields (e.g. num_classes, variant).

  Returns:
    An unbound linen module.

  Raises:
    ValueError: for an unknown name, an unknown field or a missing required field; the
      message lists the valid names or fields.
  """
  if name not in MODELS:
    raise ValueError(f'Unknown model {name!r}; valid names: {sorted(MODELS)}.')
  cls = MODELS[name]
  fields = model_fields(cls)
  unknown = sorted(set(kwargs) - set(fields))
  if unknown:
    raise ValueError(f'Unknown field(s) {unknown} for model {name!r}; '
                     f'valid fields: {list(fields)}.')
  missing = [f for f, spec in fields.items() if f not in kwargs and _is_required(spec)]
  if missing:
    raise ValueError(f'Model {name!r} needs field(s) {missing}; valid fields: {list(fields)}.')
  return cls(**kwargs)


def _is_required(field: dataclasses.Field) -> bool:
  """Whether a dataclass field has no default."""
  return (field.default is dataclasses.MISSING
          and field.default_factory is dataclasses.MISSING)
