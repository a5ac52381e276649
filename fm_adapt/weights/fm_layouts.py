"""Name and layout rules of the foundation-model checkpoints outside timm's ViT layout.

Each converter takes a checkpoint's flat {key: array} dict and returns a
`vit_formats.Converted` in fm_adapt's ViT names (see `fm_adapt.models.vit`); the class
token's position row becomes `cls_pos_embedding` (class_posemb=True) or is folded into `cls`,
as in `vit_formats`. timm's own layout (DINOv2 / DINOv2-reg / MAE / RETFound / UNI as timm or
facebookresearch/dinov2 save them) is `vit_formats.from_timm`.

  hf_dinov2  transformers' `Dinov2Model` / `Dinov2WithRegistersModel` (RAD-DINO), keys with or
             without the 'dinov2.' prefix: LayerScale 'layer_scale{1,2}.lambda1', registers
             'embeddings.register_tokens'; 'embeddings.mask_token' is ignored (pretraining only).
  open_clip  an open_clip image tower, alone or inside a whole CLIP state dict ('visual.'
             prefix; every other key is the text tower and is ignored): OpenAI-style
             `VisionTransformer` (conv1 without bias, class_embedding [D], positional_embedding
             [1+N, D], ln_pre, resblocks with nn.MultiheadAttention's fused in_proj, optional
             ls_{1,2}.gamma, ln_post, proj [D, P] used as x @ proj), or a `TimmModel` tower
             (BiomedCLIP: 'trunk.' holds a timm ViT, 'head.proj.weight' the bias-free
             projection).
  retfound   timm's layout as MAE / RETFound pretraining saves it, read into a global-pool
             model with `fc_norm` as RETFound fine-tunes it: the encoder's final 'norm' is
             ignored (reported), fc_norm starts fresh (dont_load it), as RETFound's
             main_finetune.py does (its load_state_dict(strict=False) drops 'norm' silently).
  hf_clip    transformers' `CLIPVisionModel` / `CLIPVisionModelWithProjection` / `CLIPModel`
             ('vision_model.' keys; 'pre_layrnorm' [sic]; q/k/v/out_proj; post_layernorm;
             'visual_projection.weight'); text keys are ignored.
"""
import re

import numpy as np

from fm_adapt.weights import vit_formats as vf

_BLOCK = 'encoder/block_{0}'
TEXT_TOWER = 'the CLIP text tower or contrastive head, no part of the image encoder'


def _token(path: str):
  """A [D] class embedding -> [1, 1, D]."""
  return lambda value: [(path, value.reshape(1, 1, -1))]


def _posemb_rows(value: np.ndarray) -> list:
  """A [T, D] position table -> [1, T, D]."""
  return [(vf.POSEMB, value.reshape(1, *value.shape[-2:]))]


def _prefixed(prefix: str, rules: list[tuple[str, object]]) -> list:
  return [vf._rule(prefix + pattern, fn) for pattern, fn in rules]  # pylint: disable=protected-access


_DINO_LAYER = r'encoder\.layer\.(\d+)\.'
_HF_DINOV2_RULES = _prefixed(r'(?:dinov2\.)?', [
    (r'embeddings\.cls_token', vf._as_is(vf.CLS)),
    (r'embeddings\.register_tokens', vf._as_is(vf.REGISTERS)),
    (r'embeddings\.position_embeddings', vf._as_is(vf.POSEMB)),
    (r'embeddings\.patch_embeddings\.projection\.(weight|bias)', vf._to('embedding')),
    (_DINO_LAYER + r'norm1\.(weight|bias)', vf._to(_BLOCK + '/ln_attn')),
    (_DINO_LAYER + r'attention\.attention\.(query|key|value)\.(weight|bias)',
     lambda v, i, name, kind: vf._to(_BLOCK + f'/attn/{name}')(v, i, kind)),
    (_DINO_LAYER + r'attention\.output\.dense\.(weight|bias)', vf._to(_BLOCK + '/attn/out')),
    (_DINO_LAYER + r'layer_scale1\.lambda1', vf._as_is(_BLOCK + '/ls_attn/scale')),
    (_DINO_LAYER + r'norm2\.(weight|bias)', vf._to(_BLOCK + '/ln_mlp')),
    (_DINO_LAYER + r'mlp\.(fc1|fc2)\.(weight|bias)',
     lambda v, i, fc, kind: vf._to(_BLOCK + f'/mlp/{fc}')(v, i, kind)),
    (_DINO_LAYER + r'layer_scale2\.lambda1', vf._as_is(_BLOCK + '/ls_mlp/scale')),
    (r'layernorm\.(weight|bias)', vf._to('encoder/norm')),
])
_HF_DINOV2_IGNORE = [(re.compile(r'(?:dinov2\.)?embeddings\.mask_token'), vf.MASK_TOKEN)]

_OC_BLOCK = r'transformer\.resblocks\.(\d+)\.'
_OPEN_CLIP_RULES = [vf._rule(pattern, fn) for pattern, fn in [  # pylint: disable=protected-access
    (r'class_embedding', lambda v: _token(vf.CLS)(v)),
    (r'positional_embedding', _posemb_rows),
    (r'conv1\.weight', lambda v: [('embedding/kernel', vf.torch_to_flax(v))]),
    (r'ln_pre\.(weight|bias)', vf._to('ln_pre')),
    (_OC_BLOCK + r'ln_1\.(weight|bias)', vf._to(_BLOCK + '/ln_attn')),
    (_OC_BLOCK + r'attn\.in_proj_(weight|bias)', vf._split_qkv),
    (_OC_BLOCK + r'attn\.out_proj\.(weight|bias)', vf._to(_BLOCK + '/attn/out')),
    (_OC_BLOCK + r'ls_1\.gamma', vf._as_is(_BLOCK + '/ls_attn/scale')),
    (_OC_BLOCK + r'ln_2\.(weight|bias)', vf._to(_BLOCK + '/ln_mlp')),
    (_OC_BLOCK + r'mlp\.c_fc\.(weight|bias)', vf._to(_BLOCK + '/mlp/fc1')),
    (_OC_BLOCK + r'mlp\.c_proj\.(weight|bias)', vf._to(_BLOCK + '/mlp/fc2')),
    (_OC_BLOCK + r'ls_2\.gamma', vf._as_is(_BLOCK + '/ls_mlp/scale')),
    (r'ln_post\.(weight|bias)', vf._to('encoder/norm')),
    (r'proj', lambda v: [('proj/kernel', v)]),  # Used as x @ proj: already [D, P].
]]
_TIMM_TOWER_RULES = vf._TIMM_RULES + [  # pylint: disable=protected-access
    vf._rule(r'head\.proj\.weight', lambda v: [('proj/kernel', vf.torch_to_flax(v))])]

_HF_CLIP_LAYER = r'encoder\.layers\.(\d+)\.'
_HF_CLIP_ATTN = {'q': 'query', 'k': 'key', 'v': 'value', 'out': 'out'}
_HF_CLIP_RULES = _prefixed(r'(?:vision_model\.)?', [
    (r'embeddings\.class_embedding', lambda v: _token(vf.CLS)(v)),
    (r'embeddings\.patch_embedding\.weight',
     lambda v: [('embedding/kernel', vf.torch_to_flax(v))]),
    (r'embeddings\.position_embedding\.weight', _posemb_rows),
    (r'pre_layrnorm\.(weight|bias)', vf._to('ln_pre')),
    (_HF_CLIP_LAYER + r'layer_norm1\.(weight|bias)', vf._to(_BLOCK + '/ln_attn')),
    (_HF_CLIP_LAYER + r'self_attn\.(q|k|v|out)_proj\.(weight|bias)',
     lambda v, i, name, kind: vf._to(_BLOCK + f'/attn/{_HF_CLIP_ATTN[name]}')(v, i, kind)),
    (_HF_CLIP_LAYER + r'layer_norm2\.(weight|bias)', vf._to(_BLOCK + '/ln_mlp')),
    (_HF_CLIP_LAYER + r'mlp\.(fc1|fc2)\.(weight|bias)',
     lambda v, i, fc, kind: vf._to(_BLOCK + f'/mlp/{fc}')(v, i, kind)),
    (r'post_layernorm\.(weight|bias)', vf._to('encoder/norm')),
]) + [vf._rule(r'visual_projection\.weight',  # pylint: disable=protected-access
               lambda v: [('proj/kernel', vf.torch_to_flax(v))])]
_HF_CLIP_IGNORE = [
    (re.compile(r'text_model\..*|text_projection\.weight|logit_scale'), TEXT_TOWER),
    (re.compile(r'(?:vision_model\.)?embeddings\.position_ids'),
     'a buffer of position indices 0..T-1, not a weight'),
]


def from_hf_dinov2(arrays: dict[str, np.ndarray], *, num_heads: int | None = None,
                   num_patches: int | None = None, class_posemb: bool = False
                   ) -> vf.Converted:
  """Converts a transformers Dinov2Model / Dinov2WithRegistersModel state dict."""
  del num_heads
  out = vf._convert_by_rules(arrays, _HF_DINOV2_RULES, _HF_DINOV2_IGNORE)  # pylint: disable=protected-access
  vf.fold_cls_posemb(out, num_patches, class_posemb)
  return out


def from_open_clip(arrays: dict[str, np.ndarray], *, num_heads: int | None = None,
                   num_patches: int | None = None, class_posemb: bool = False
                   ) -> vf.Converted:
  """Converts an open_clip image tower (alone, or the 'visual.' part of a whole CLIP)."""
  del num_heads
  ignored = {}
  if any(key.startswith('visual.') for key in arrays):
    ignored = {key: TEXT_TOWER for key in arrays if not key.startswith('visual.')}
    arrays = {key[len('visual.'):]: v for key, v in arrays.items() if key.startswith('visual.')}
  if any(key.startswith('trunk.') for key in arrays):  # A TimmModel tower (BiomedCLIP).
    arrays = {key[len('trunk.'):] if key.startswith('trunk.') else key: v
              for key, v in arrays.items()}
    out = vf._convert_by_rules(arrays, _TIMM_TOWER_RULES, vf._TIMM_IGNORE)  # pylint: disable=protected-access
  else:
    out = vf._convert_by_rules(arrays, _OPEN_CLIP_RULES)  # pylint: disable=protected-access
  out.ignored.update(ignored)
  vf.fold_cls_posemb(out, num_patches, class_posemb)
  return out


MAE_FINAL_NORM = ("the MAE encoder's final norm; RETFound's global-pool model replaces it "
                  'with a freshly initialised fc_norm')


def from_retfound(arrays: dict[str, np.ndarray], *, num_heads: int | None = None,
                  num_patches: int | None = None, class_posemb: bool = False
                  ) -> vf.Converted:
  """timm / MAE keys for a global-pool + fc_norm model; the final 'norm' is ignored."""
  del num_heads
  ignore = [(re.compile(r'norm\.(weight|bias)'), MAE_FINAL_NORM)] + vf._TIMM_IGNORE  # pylint: disable=protected-access
  out = vf._convert_by_rules(arrays, vf._TIMM_RULES, ignore)  # pylint: disable=protected-access
  vf.fold_cls_posemb(out, num_patches, class_posemb)
  return out


def from_hf_clip(arrays: dict[str, np.ndarray], *, num_heads: int | None = None,
                 num_patches: int | None = None, class_posemb: bool = False
                 ) -> vf.Converted:
  """Converts a transformers CLIPVisionModel(WithProjection) / CLIPModel state dict."""
  del num_heads
  out = vf._convert_by_rules(arrays, _HF_CLIP_RULES, _HF_CLIP_IGNORE)  # pylint: disable=protected-access
  vf.fold_cls_posemb(out, num_patches, class_posemb)
  return out


CONVERTERS = {
    'hf_dinov2': from_hf_dinov2,
    'open_clip': from_open_clip,
    'hf_clip': from_hf_clip,
    'retfound': from_retfound,
}


def detect_layout(keys: list[str]) -> str | None:
  """'hf_dinov2', 'open_clip' or 'hf_clip' from a checkpoint's key names; None otherwise."""
  if any('.layer_scale1.lambda1' in k or k.endswith('embeddings.mask_token')
         or re.fullmatch(r'(?:dinov2\.)?encoder\.layer\.\d+\.norm1\.weight', k) for k in keys):
    return 'hf_dinov2'
  if any(k.startswith('vision_model.') or k == 'embeddings.class_embedding' for k in keys):
    return 'hf_clip'
  if any(k.startswith(('visual.', 'conv1.', 'trunk.')) or k == 'class_embedding'
         for k in keys):
    return 'open_clip'
  return None
