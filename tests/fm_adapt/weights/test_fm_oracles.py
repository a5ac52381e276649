"""Foundation-model importers against the reference libraries themselves.

For each family the reference model is built by its own library (timm, open_clip,
transformers) with the family's architecture options at reduced width and depth, all its
parameters drawn at random (so LayerScale, norms and position rows all matter), saved as users
have it (.safetensors and a .pth state dict read with weights_only=True), imported into
fm_adapt's ViT, and run on the same images: the features must agree within 1e-4 (float32) at
the native resolution and at an interpolated, non-square one (the position embedding resized
the way the family resizes it). Families whose position embedding has a class-token row are
built as the catalogue builds them, with the row as its own parameter (class_posemb=True,
never resized); 'timm_dinov2_folded' checks the default, the row folded into the class token.
"""
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fm_adapt import weights
from fm_adapt.models import vit

ATOL = 1e-4
WIDTH, DEPTH, HEADS = 32, 2, 2  # fm_adapt's 'mu' size; the references are built to match.


@dataclasses.dataclass
class Case:
  """One family: how to build and run the reference, and fm_adapt's configuration of it."""
  build: Callable[..., Any]  # (ref, monkeypatch) -> torch module
  features: Callable[..., dict]  # (module, images NCHW torch, ref) -> {our out key: array}
  state_dict: Callable[..., dict]  # module -> the state dict users have
  layout: str
  model: dict
  native: tuple[int, int]
  other: tuple[int, int]
  ignored: tuple[str, ...] = ()


def _randomize(module, torch, seed=0):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in module.parameters():
      p.copy_(0.3 * torch.randn(p.shape, generator=gen))
  return module.eval()


# --- timm: DINOv2, DINOv2 with registers, MAE / RETFound (global average pool + fc_norm).

def _timm(name, img_size, **kw):
  def build(ref, monkeypatch):
    del monkeypatch
    timm = ref.load('timm')
    return timm.create_model(name, pretrained=False, num_classes=0, img_size=img_size,
                             embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_ratio=2,
                             dynamic_img_size=True, **kw)
  return build


def _timm_features(module, x, ref):
  del ref
  tokens = module.forward_features(x)
  return {'encoded': tokens, 'pre_logits': module.forward_head(tokens, pre_logits=True)}


def _mae_state_dict(module):
  """RETFound / MAE pretraining files also hold the decoder and the mask token."""
  sd = dict(module.state_dict())
  sd['mask_token'] = sd['cls_token'].clone()
  sd['decoder_embed.weight'] = sd['patch_embed.proj.bias'][None].clone()
  return sd


# --- Hugging Face Dinov2Model / Dinov2WithRegistersModel (RAD-DINO).

def _hf_dinov2(registers):
  def build(ref, monkeypatch):
    del monkeypatch
    transformers = ref.load('transformers')
    kw = dict(hidden_size=WIDTH, num_hidden_layers=DEPTH, num_attention_heads=HEADS,
              mlp_ratio=2, image_size=56, patch_size=14, layerscale_value=1e-5)
    if registers:
      return transformers.Dinov2WithRegistersModel(
          transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **kw))
    return transformers.Dinov2Model(transformers.Dinov2Config(**kw))
  return build


def _hf_dinov2_features(module, x, ref):
  del ref
  out = module(pixel_values=x)
  return {'encoded': out.last_hidden_state, 'pre_logits': out.pooler_output}


# --- open_clip: an OpenAI-style CLIP (QuickGELU), and BiomedCLIP's timm tower.

_TEXT = dict(context_length=8, vocab_size=64, width=16, heads=2, layers=1)


def _open_clip_cfg(image_size):
  return dict(layers=DEPTH, width=WIDTH, head_width=WIDTH // HEADS, mlp_ratio=2, patch_size=16,
              image_size=image_size)


def _open_clip(ref, monkeypatch):
  del monkeypatch
  open_clip = ref.load('open_clip')
  return open_clip.model.CLIP(embed_dim=8, vision_cfg=_open_clip_cfg(32), text_cfg=_TEXT,
                              quick_gelu=True)


def _open_clip_features(module, x, ref):
  """The image tower at the model's size; at another size, a model built for it and loaded
  with open_clip's own resize_pos_embed (how open_clip moves a checkpoint to a new size)."""
  size = tuple(x.shape[-2:])
  if size != tuple(module.visual.image_size):
    open_clip, torch = ref.load('open_clip'), ref.load('torch')
    other = open_clip.model.CLIP(embed_dim=8, vision_cfg=_open_clip_cfg(size), text_cfg=_TEXT,
                                 quick_gelu=True)
    sd = dict(module.state_dict())
    open_clip.model.resize_pos_embed(sd, other)
    other.load_state_dict(sd)
    module = other.eval()
    del torch
  module.visual.output_tokens = True
  pooled, tokens = module.visual(x)
  return {'pre_logits': pooled, 'patch_tokens': tokens}


def _biomedclip(ref, monkeypatch):
  """open_clip's TimmModel as BiomedCLIP configures it (vit_base_patch16_224, timm_pool='',
  timm_proj='linear'), its timm trunk built at reduced width and depth. TimmModel does not
  pass image_size to timm: the trunk keeps its 224-px (14x14) position grid."""
  open_clip, timm = ref.load('open_clip'), ref.load('timm')
  monkeypatch.setattr(timm, 'create_model', functools.partial(
      timm.create_model, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, mlp_ratio=2))
  vision = dict(timm_model_name='vit_base_patch16_224', timm_model_pretrained=False,
                timm_pool='', timm_proj='linear', image_size=32)
  return open_clip.model.CLIP(embed_dim=8, vision_cfg=vision, text_cfg=_TEXT)


def _biomedclip_features(module, x, ref):
  del ref
  trunk = module.visual.trunk
  trunk.set_input_size(img_size=tuple(x.shape[-2:]))  # timm's resample_abs_pos_embed.
  tokens = trunk.forward_features(x)
  return {'encoded': tokens, 'pre_logits': module.visual(x)}


# --- Hugging Face CLIPVisionModelWithProjection.

def _hf_clip(ref, monkeypatch):
  del monkeypatch
  transformers = ref.load('transformers')
  return transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
      hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=DEPTH,
      num_attention_heads=HEADS, image_size=32, patch_size=16, projection_dim=8,
      hidden_act='quick_gelu'))


def _hf_clip_features(module, x, ref):
  del ref
  out = module(pixel_values=x, interpolate_pos_encoding=True)
  # last_hidden_state is before post_layernorm; fm_adapt's 'encoded' is after it.
  encoded = module.vision_model.post_layernorm(out.last_hidden_state)
  return {'encoded': encoded, 'pre_logits': out.image_embeds}


_CLIP = dict(pre_norm=True, patch_bias=False, mlp_act='quick_gelu', ln_epsilon=1e-5, proj_dim=8,
             class_posemb=True)
CASES = {
    'timm_dinov2': Case(
        _timm('vit_small_patch14_dinov2', 56), _timm_features, lambda m: m.state_dict(),
        'timm', dict(variant='mu/14', layerscale=1e-5, class_posemb=True, posemb_grid=4),
        (56, 56), (28, 42)),
    'timm_dinov2_folded': Case(
        _timm('vit_small_patch14_dinov2', 56), _timm_features, lambda m: m.state_dict(),
        'timm', dict(variant='mu/14', layerscale=1e-5, posemb_grid=4), (56, 56), (42, 28)),
    'timm_dinov2_reg4': Case(
        _timm('vit_small_patch14_reg4_dinov2', 56), _timm_features, lambda m: m.state_dict(),
        'timm', dict(variant='mu/14', layerscale=1e-5, num_registers=4, posemb_grid=4),
        (56, 56), (42, 28)),
    'timm_mae_retfound': Case(
        _timm('vit_large_patch16_224', 32, global_pool='avg'), _timm_features, _mae_state_dict,
        'timm', dict(variant='mu/16', pool_type='gap', class_token=True, class_posemb=True,
                     fc_norm=True, posemb_grid=2), (32, 32), (48, 64),
        ignored=('mask_token', 'decoder_embed.weight')),
    'hf_dinov2': Case(
        _hf_dinov2(0), _hf_dinov2_features, lambda m: m.state_dict(), 'hf_dinov2',
        dict(variant='mu/14', layerscale=1e-5, class_posemb=True, posemb_grid=4,
             posemb_resize='bicubic'),
        (56, 56), (28, 42), ignored=('embeddings.mask_token',)),
    'hf_dinov2_registers': Case(
        _hf_dinov2(2), _hf_dinov2_features, lambda m: m.state_dict(), 'hf_dinov2',
        dict(variant='mu/14', layerscale=1e-5, num_registers=2, class_posemb=True,
             posemb_grid=4),
        (56, 56), (28, 42), ignored=('embeddings.mask_token',)),
    'open_clip': Case(
        _open_clip, _open_clip_features, lambda m: m.state_dict(), 'open_clip',
        dict(variant='mu/16', posemb_grid=2, **_CLIP), (32, 32), (48, 64),
        ignored=('logit_scale', 'text_projection', 'token_embedding.weight')),
    'open_clip_timm_biomedclip': Case(
        _biomedclip, _biomedclip_features, lambda m: m.state_dict(), 'open_clip',
        dict(variant='mu/16', posemb_grid=14, proj_dim=8, class_posemb=True), (224, 224),
        (48, 64),
        ignored=('logit_scale',)),
    'hf_clip': Case(
        _hf_clip, _hf_clip_features, lambda m: m.state_dict(), 'hf_clip',
        dict(variant='mu/16', posemb_grid=2, posemb_resize='bicubic', **_CLIP),
        (32, 32), (48, 64)),
}


def _save(torch, state_dict, tmp_path):
  """The state dict as .safetensors and as a .pth, as the families publish them."""
  safetensors_torch = pytest.importorskip('safetensors.torch')
  state_dict = {k: v.detach().contiguous() for k, v in state_dict.items()}
  st, pth = tmp_path / 'model.safetensors', tmp_path / 'model.pth'
  safetensors_torch.save_file(state_dict, str(st))
  torch.save(state_dict, str(pth))
  return st, pth


@pytest.mark.parametrize('name', list(CASES))
def test_features_match_reference_library(name, reference, tmp_path, monkeypatch):
  case = CASES[name]
  torch = reference.load('torch')
  module = _randomize(case.build(reference, monkeypatch), torch)
  st, pth = _save(torch, case.state_dict(module), tmp_path)
  model = vit.Model(num_classes=None, **case.model)
  target = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, *case.native, 3), jnp.float32))['params']
  params, report = weights.import_vit(st, format='auto', target_params=target)
  params_pth, _ = weights.import_vit(pth, format=case.layout, target_params=target)
  assert report.layout == case.layout
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, params_pth)
  assert set(case.ignored) <= set(report.ignored)
  assert len(report.loaded) == len(jax.tree_util.tree_leaves(target))
  if case.model.get('class_posemb'):  # The class row is its own parameter, not folded.
    assert 'row 0 of' in report.loaded['cls_pos_embedding']
    assert ' + ' not in report.loaded['cls']
  else:  # Folded into the class token where the file has a class row (timm's reg4 has none).
    assert 'cls_pos_embedding' not in params
    assert (' + row 0 of ' in report.loaded['cls']) == (name == 'timm_dinov2_folded')
  assert not report.problems and not report.kept_init
  apply = jax.jit(model.apply)
  rng = np.random.default_rng(0)
  for size in (case.native, case.other):
    images = rng.normal(size=(2, 3, *size)).astype(np.float32)
    with torch.no_grad():
      expected = case.features(module, torch.from_numpy(images), reference)
    _, out = apply({'params': params}, images.transpose(0, 2, 3, 1))
    for key, value in expected.items():
      np.testing.assert_allclose(np.asarray(out[key]), value.numpy(), atol=ATOL, rtol=0,
                                 err_msg=f'{name} {key} at {size}')
