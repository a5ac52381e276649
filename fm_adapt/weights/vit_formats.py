"""Name and layout rules from external ViT checkpoints to fm_adapt's ViT tree.

Each converter takes the flat {key: array} dict of a checkpoint and returns a
`Converted`: arrays under fm_adapt's '/'-joined parameter paths (see
`fm_adapt.models.vit`), in Flax layout, plus the checkpoint keys no rule used.

Layouts handled:
  big_vision  .npz of google-research/big_vision or google-research/vision_transformer:
              '/'-joined flax paths; attention kernels [D, H, dh] (out: [H, dh, D]);
              block sub-modules LayerNorm_0 / MultiHeadDotProductAttention_{0|1} /
              LayerNorm_{1|2} / MlpBlock_{0|3}; position embedding as 'pos_embedding'
              [1, N, D] or 'Transformer/posembed_input/pos_embedding' [1, 1+N, D];
              also scanned encoders ('Transformer/encoderblock/...' stacked on axis 0).
  timm        state dict of timm's VisionTransformer: fused 'attn.qkv' [3D, D],
              PyTorch layouts (Linear (out, in), Conv2d OIHW). Also its foundation-model
              options: LayerScale 'ls{1,2}.gamma', registers 'reg_token' (timm) or
              'register_tokens' (facebookresearch/dinov2 hub files, otherwise timm's names),
              'fc_norm' (global_pool='avg', MAE / RETFound), 'norm_pre' (pre_norm). MAE
              pretraining files also hold the decoder and 'mask_token': reported as ignored.
  hf          state dict of transformers' ViTModel / ViTForImageClassification
              (keys with or without the 'vit.' prefix).

A checkpoint's position embedding may start with rows of the prefix tokens ([1, 1+N, D] or
[1, 1+R+N, D]); `pos_embedding` gets the N patch rows. The class row becomes
`cls_pos_embedding` when the target model has one (`vit.Model(class_posemb=True)`, converters
called with class_posemb=True), else it is folded into the class token exactly
(cls = cls + pos[:, :1]); register rows are always folded (registers = registers +
pos[:, 1:1+R]): our model gives registers no position embedding.

Keys a layout knows to be no part of the image encoder (a CLIP text tower, an MAE decoder,
a masked-modelling token) are `ignored` with the reason, and reported, never silently dropped.
"""
import dataclasses
import math
import re
from typing import Callable

import numpy as np

CLS = 'cls'
CLS_POSEMB = 'cls_pos_embedding'
REGISTERS = 'registers'
POSEMB = 'pos_embedding'


@dataclasses.dataclass
class Converted:
  """A checkpoint in fm_adapt names.

  Attributes:
    params: '/'-joined fm_adapt path -> array in Flax layout.
    sources: fm_adapt path -> the checkpoint key(s) and shape(s) it came from.
    leftovers: checkpoint key -> shape, for keys that no rule used.
    ignored: checkpoint key -> why the layout leaves it out (not part of the image encoder).
  """
  params: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
  sources: dict[str, str] = dataclasses.field(default_factory=dict)
  leftovers: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
  ignored: dict[str, str] = dataclasses.field(default_factory=dict)

  def put(self, path: str, value: np.ndarray, source: str) -> None:
    """Stores one converted array; two keys mapping to one path is an error."""
    if path in self.params:
      raise ValueError(f'Checkpoint keys {self.sources[path]} and {source} both map '
                       f'to {path}; the checkpoint mixes layouts.')
    self.params[path] = value
    self.sources[path] = source


def torch_to_flax(value: np.ndarray) -> np.ndarray:
  """PyTorch layout -> Flax: Conv2d OIHW -> HWIO, Linear (out, in) -> (in, out)."""
  if value.ndim == 4:
    return np.transpose(value, (2, 3, 1, 0))
  if value.ndim == 2:
    return value.T
  return value


def _describe(key: str, value: np.ndarray) -> str:
  return f'{key!r} {tuple(value.shape)}'


def _is_square(n: int) -> bool:
  return n > 0 and math.isqrt(n) ** 2 == n


def has_posemb_prefix(length: int, num_patches: int | None) -> bool:
  """Whether a position embedding of `length` rows starts with a class-token row.

  Args:
    length: rows of the checkpoint's position embedding.
    num_patches: patch tokens of the target model, if known.
  """
  if num_patches is not None and length in (num_patches, num_patches + 1):
    return length == num_patches + 1
  return _is_square(length - 1) and not _is_square(length)


def _prefix_rows(length: int, num_patches: int | None, num_registers: int) -> int:
  """How many leading rows of a position embedding belong to the class token / registers."""
  if num_patches is not None and length - num_patches in (0, 1, 1 + num_registers):
    return length - num_patches
  if has_posemb_prefix(length, num_patches):
    return 1
  if num_registers and _is_square(length - 1 - num_registers) and not _is_square(length):
    return 1 + num_registers
  return 0


def _fold_into(out: Converted, path: str, rows: np.ndarray, what: str) -> None:
  token = out.params[path]
  out.params[path] = (token.astype(np.float32) + rows.astype(np.float32)).astype(token.dtype)
  out.sources[path] += f' + {what} of {out.sources[POSEMB]}'


def fold_cls_posemb(out: Converted, num_patches: int | None, class_posemb: bool = False
                    ) -> None:
  """Takes the prefix rows off the position embedding: the class row into `cls_pos_embedding`
  (class_posemb=True) or folded into `cls`, register rows folded into `registers`; exact."""
  if POSEMB not in out.params:
    return
  pos = out.params[POSEMB]
  if pos.ndim != 3:
    return
  num_registers = out.params[REGISTERS].shape[1] if REGISTERS in out.params else 0
  prefix = _prefix_rows(pos.shape[1], num_patches, num_registers)
  if not prefix:
    return
  if CLS not in out.params:
    raise ValueError(
        f'The position embedding {out.sources[POSEMB]} has a class-token row but the '
        'checkpoint has no class token to fold it into.')
  if class_posemb:
    out.put(CLS_POSEMB, pos[:, :1], f'row 0 of {out.sources[POSEMB]}')
  else:
    _fold_into(out, CLS, pos[:, :1], 'row 0')
  if prefix > 1:
    _fold_into(out, REGISTERS, pos[:, 1:prefix], f'rows 1:{prefix}')
  out.params[POSEMB] = pos[:, prefix:]
  out.sources[POSEMB] += f' rows {prefix}:'


def _convert_by_rules(arrays: dict[str, np.ndarray],
                      rules: list[tuple[re.Pattern, Callable[..., list]]],
                      ignore: list[tuple[re.Pattern, str]] = ()) -> Converted:
  """Applies the first matching rule to each key; unmatched keys are leftovers.

  A rule is (regex, fn); fn(value, *groups) returns [(path, array), ...]. A key matching an
  `ignore` (regex, reason) pair and no rule is recorded as ignored with the reason.
  """
  out = Converted()
  for key, value in arrays.items():
    reason = next((why for pattern, why in ignore if pattern.fullmatch(key)), None)
    if reason is not None:
      out.ignored[key] = reason
      continue
    for pattern, fn in rules:
      match = pattern.fullmatch(key)
      if match:
        for path, converted in fn(np.asarray(value), *match.groups()):
          out.put(path, converted, _describe(key, value))
        break
    else:
      out.leftovers[key] = tuple(np.shape(value))
  return out


def _rule(pattern: str, fn: Callable[..., list]) -> tuple[re.Pattern, Callable]:
  return re.compile(pattern), fn


def _torch_leaf(value: np.ndarray, kind: str) -> str:
  """fm_adapt leaf name of a PyTorch 'weight'/'bias' of a Linear, Conv or LayerNorm."""
  if kind == 'bias':
    return 'bias'
  return 'kernel' if value.ndim >= 2 else 'scale'


def _to(path: str) -> Callable[..., list]:
  """A rule that stores a PyTorch weight/bias under `path`/{kernel|scale|bias}.

  `path` may use {0} for the first regex group (the block index); the last
  group is 'weight' or 'bias'.
  """
  def fn(value, *groups):
    prefix = path.format(*groups)
    return [(f'{prefix}/{_torch_leaf(value, groups[-1])}', torch_to_flax(value))]
  return fn


def _as_is(path: str) -> Callable[..., list]:
  return lambda value, *groups: [(path.format(*groups), value)]


def _split_qkv(value: np.ndarray, index: str, kind: str) -> list:
  """timm's fused qkv: weight [3D, D] or bias [3D] -> query, key, value."""
  parts = np.split(value, 3, axis=0)
  leaf = 'kernel' if kind == 'weight' else 'bias'
  return [(f'encoder/block_{index}/attn/{name}/{leaf}', torch_to_flax(part))
          for name, part in zip(('query', 'key', 'value'), parts)]


_BLOCK = 'encoder/block_{0}'
_TIMM_RULES = [
    _rule(r'cls_token', _as_is(CLS)),
    _rule(r'(?:reg_token|register_tokens)', _as_is(REGISTERS)),
    _rule(r'pos_embed', _as_is(POSEMB)),
    _rule(r'patch_embed\.proj\.(weight|bias)', _to('embedding')),
    _rule(r'norm_pre\.(weight|bias)', _to('ln_pre')),
    _rule(r'blocks\.(\d+)\.ls1\.gamma', _as_is(_BLOCK + '/ls_attn/scale')),
    _rule(r'blocks\.(\d+)\.ls2\.gamma', _as_is(_BLOCK + '/ls_mlp/scale')),
    _rule(r'blocks\.(\d+)\.norm1\.(weight|bias)', _to(_BLOCK + '/ln_attn')),
    _rule(r'blocks\.(\d+)\.attn\.qkv\.(weight|bias)', _split_qkv),
    _rule(r'blocks\.(\d+)\.attn\.proj\.(weight|bias)', _to(_BLOCK + '/attn/out')),
    _rule(r'blocks\.(\d+)\.norm2\.(weight|bias)', _to(_BLOCK + '/ln_mlp')),
    _rule(r'blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)',
          lambda v, i, fc, kind: _to(_BLOCK + f'/mlp/{fc}')(v, i, kind)),
    _rule(r'norm\.(weight|bias)', _to('encoder/norm')),
    _rule(r'fc_norm\.(weight|bias)', _to('fc_norm')),
    _rule(r'head\.(weight|bias)', _to('head')),
]
MAE_DECODER = 'the MAE pretraining decoder, no part of the encoder'
MASK_TOKEN = 'the masked-image-modelling token of pretraining, unused by the encoder'
_TIMM_IGNORE = [
    (re.compile(r'decoder_.*'), MAE_DECODER),
    (re.compile(r'mask_token'), MASK_TOKEN),
]

_HF_LAYER = r'(?:vit\.)?encoder\.layer\.(\d+)\.'
_HF_RULES = [
    _rule(r'(?:vit\.)?embeddings\.cls_token', _as_is(CLS)),
    _rule(r'(?:vit\.)?embeddings\.position_embeddings', _as_is(POSEMB)),
    _rule(r'(?:vit\.)?embeddings\.patch_embeddings\.projection\.(weight|bias)',
          _to('embedding')),
    _rule(_HF_LAYER + r'layernorm_before\.(weight|bias)', _to(_BLOCK + '/ln_attn')),
    _rule(_HF_LAYER + r'attention\.attention\.(query|key|value)\.(weight|bias)',
          lambda v, i, name, kind: _to(_BLOCK + f'/attn/{name}')(v, i, kind)),
    _rule(_HF_LAYER + r'attention\.output\.dense\.(weight|bias)',
          _to(_BLOCK + '/attn/out')),
    _rule(_HF_LAYER + r'layernorm_after\.(weight|bias)', _to(_BLOCK + '/ln_mlp')),
    _rule(_HF_LAYER + r'intermediate\.dense\.(weight|bias)', _to(_BLOCK + '/mlp/fc1')),
    _rule(_HF_LAYER + r'output\.dense\.(weight|bias)', _to(_BLOCK + '/mlp/fc2')),
    _rule(r'(?:vit\.)?layernorm\.(weight|bias)', _to('encoder/norm')),
    _rule(r'classifier\.(weight|bias)', _to('head')),
]


def _bv_heads(value: np.ndarray, name: str, leaf: str) -> int | None:
  """Heads in a big_vision attention array; None if it has no head axis."""
  if name == 'out':
    return value.shape[0] if leaf == 'kernel' and value.ndim == 3 else None
  if leaf == 'kernel':
    return value.shape[1] if value.ndim == 3 else None
  return value.shape[0] if value.ndim == 2 else None


def _bv_attention(num_heads: int | None) -> Callable[..., list]:
  """big_vision attention: q/k/v kernel [D, H, dh] -> [D, D]; out [H, dh, D] -> [D, D]."""
  def fn(value, index, name, leaf):
    path = f'encoder/block_{index}/attn/{name}/{leaf}'
    heads = _bv_heads(value, name, leaf)
    if num_heads is not None and heads is not None and heads != num_heads:
      raise ValueError(f'{path}: the checkpoint has {heads} heads (shape '
                       f'{value.shape}), but num_heads={num_heads}.')
    if leaf == 'bias':
      return [(path, value.reshape(-1))]
    if name == 'out':
      return [(path, value.reshape(-1, value.shape[-1]))]
    return [(path, value.reshape(value.shape[0], -1))]
  return fn


def _bv_rules(num_heads: int | None) -> list:
  block = r'Transformer/encoderblock_(\d+)/'
  return [
      _rule(r'cls', _as_is(CLS)),
      _rule(r'(?:Transformer/posembed_input/|Transformer/)?pos_embedding',
            _as_is(POSEMB)),
      _rule(r'embedding/(kernel|bias)', _as_is('embedding/{0}')),
      _rule(block + r'LayerNorm_0/(scale|bias)', _as_is(_BLOCK + '/ln_attn/{1}')),
      _rule(block + r'MultiHeadDotProductAttention_[01]/(query|key|value|out)/'
            r'(kernel|bias)', _bv_attention(num_heads)),
      _rule(block + r'LayerNorm_[12]/(scale|bias)', _as_is(_BLOCK + '/ln_mlp/{1}')),
      _rule(block + r'MlpBlock_[03]/Dense_([01])/(kernel|bias)',
            lambda v, i, dense, leaf: [
                (f'encoder/block_{i}/mlp/fc{int(dense) + 1}/{leaf}', v)]),
      _rule(r'Transformer/encoder_norm/(scale|bias)', _as_is('encoder/norm/{0}')),
      _rule(r'head/(kernel|bias)', _as_is('head/{0}')),
  ]


def _unscan(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Splits a scanned encoder ('Transformer/encoderblock/...', depth on axis 0)."""
  scanned = 'Transformer/encoderblock/'
  out = {}
  for key, value in arrays.items():
    if key.startswith(scanned):
      rest = key[len(scanned):]
      for i, layer in enumerate(value):
        out[f'Transformer/encoderblock_{i}/{rest}'] = layer
    else:
      out[key] = value
  return out


def _strip_params_prefix(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A whole saved train state ('params/...', 'opt/...') -> just its params."""
  if not any(key.startswith('params/') for key in arrays):
    return arrays
  return {key[len('params/'):]: v for key, v in arrays.items()
          if key.startswith('params/')}


def from_big_vision(arrays: dict[str, np.ndarray], *, num_heads: int | None = None,
                    num_patches: int | None = None, class_posemb: bool = False) -> Converted:
  """Converts a big_vision / vision_transformer .npz (see module docstring).

  Args (of every converter):
    arrays: the checkpoint's flat {key: array}.
    num_heads: the expected number of heads (checked where the layout stores heads).
    num_patches: patch tokens of the target's position embedding, if known.
    class_posemb: the target keeps the class row as `cls_pos_embedding` (else it is folded).
  """
  arrays = _unscan(_strip_params_prefix(arrays))
  out = _convert_by_rules(arrays, _bv_rules(num_heads))
  fold_cls_posemb(out, num_patches, class_posemb)
  return out


def from_timm(arrays: dict[str, np.ndarray], *, num_heads: int | None = None,
              num_patches: int | None = None, class_posemb: bool = False) -> Converted:
  """Converts a timm VisionTransformer state dict (num_heads is not needed)."""
  del num_heads
  out = _convert_by_rules(arrays, _TIMM_RULES, _TIMM_IGNORE)
  fold_cls_posemb(out, num_patches, class_posemb)
  return out


def from_hf(arrays: dict[str, np.ndarray], *, num_heads: int | None = None,
            num_patches: int | None = None, class_posemb: bool = False) -> Converted:
  """Converts a Hugging Face ViTModel / ViTForImageClassification state dict."""
  del num_heads
  out = _convert_by_rules(arrays, _HF_RULES)
  fold_cls_posemb(out, num_patches, class_posemb)
  return out


CONVERTERS: dict[str, Callable[..., Converted]] = {
    'big_vision': from_big_vision,
    'timm': from_timm,
    'hf': from_hf,
}


def detect_layout(keys: list[str]) -> str | None:
  """'big_vision', 'timm' or 'hf' from a checkpoint's key names; None if unknown."""
  if any(k.startswith(('Transformer/', 'params/Transformer/')) or k == 'embedding/kernel'
         for k in keys):
    return 'big_vision'
  if any('embeddings.patch_embeddings' in k or '.attention.attention.' in k for k in keys):
    return 'hf'
  if any(k.startswith(('patch_embed.', 'blocks.')) for k in keys):
    return 'timm'
  return None
