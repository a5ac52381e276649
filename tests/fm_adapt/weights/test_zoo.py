"""The foundation-model catalogue: parameter counts at full size (fm_adapt's eval_shape against
the reference libraries' own models: their count, and which of their parameters their forward
pass uses), names and specs, and a whole 'zoo:' import on reduced models."""
import dataclasses
import functools

import jax
import numpy as np
import pytest

from fm_adapt.weights import zoo


@pytest.mark.parametrize('name', sorted(zoo.ENTRIES))
def test_eval_shape_count_is_the_catalogue_count(name):
  """fm_adapt's count (no torch needed); the reference side is checked below."""
  entry = zoo.ENTRIES[name]
  assert zoo.count_params(zoo.abstract_params(entry)) == entry.params


# Each catalogue entry's reference at full size: (build, forward to the features fm_adapt gives).

def _timm(name, **kw):
  build = lambda ref: ref.load('timm').create_model(name, pretrained=False, num_classes=0, **kw)
  return build, lambda module, x: module(x)  # Pooled pre-logits.


def _open_clip(config):
  def build(ref):
    open_clip = ref.load('open_clip')
    return open_clip.model.CLIP(**open_clip.get_model_config(config)).visual
  return build, lambda module, x: module(x)  # The projected image embedding.


def _build_hf_dinov2(ref):
  transformers = ref.load('transformers')
  return transformers.Dinov2Model(transformers.Dinov2Config(
      hidden_size=768, num_hidden_layers=12, num_attention_heads=12, image_size=518,
      patch_size=14))


_hf_dinov2 = (_build_hf_dinov2, lambda module, x: module(pixel_values=x).last_hidden_state)


def _hf_clip(patch):
  def build(ref):
    transformers = ref.load('transformers')
    return transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        image_size=224, patch_size=patch, projection_dim=512, hidden_act='quick_gelu'))
  return build, lambda module, x: module(pixel_values=x).image_embeds


def _build_biomedclip(ref):
  open_clip = ref.load('open_clip')
  return open_clip.timm_model.TimmModel('vit_base_patch16_224', embed_dim=512, image_size=224,
                                        pool='', proj='linear')


_biomedclip = (_build_biomedclip, lambda module, x: module(x))

REFERENCES = {
    'dinov2_vits14': _timm('vit_small_patch14_dinov2'),
    'dinov2_vitb14': _timm('vit_base_patch14_dinov2'),
    'dinov2_vitl14': _timm('vit_large_patch14_dinov2'),
    'dinov2_vits14_reg': _timm('vit_small_patch14_reg4_dinov2'),
    'dinov2_vitb14_reg': _timm('vit_base_patch14_reg4_dinov2'),
    'dinov2_vitl14_reg': _timm('vit_large_patch14_reg4_dinov2'),
    'rad_dino': _hf_dinov2,
    'uni': _timm('vit_large_patch16_224', init_values=1e-5, dynamic_img_size=True),
    'retfound_cfp': _timm('vit_large_patch16_224', global_pool='avg'),
    'retfound_oct': _timm('vit_large_patch16_224', global_pool='avg'),
    'biomedclip': _biomedclip,
    'clip_vitb16_openai': _open_clip('ViT-B-16-quickgelu'),
    'clip_vitl14_openai': _open_clip('ViT-L-14-quickgelu'),
    'clip_vitb16_openai_hf': _hf_clip(16),
    'plip': _hf_clip(32),
    'chexzero': _open_clip('ViT-B-32-quickgelu'),
}


def test_every_entry_has_a_reference_check():
  assert set(REFERENCES) == set(zoo.ENTRIES)


def _unused_parameters(module, forward, image_size, torch):
  """(name, size) of the module's parameters that no gradient of its output reaches."""
  for p in module.parameters():
    p.grad = None
    p.requires_grad_(True)
  forward(module, torch.empty(1, 3, image_size, image_size)).sum().backward()
  return tuple((n, p.numel()) for n, p in module.named_parameters() if p.grad is None)


@pytest.mark.parametrize('name', sorted(REFERENCES))
def test_eval_shape_count_is_the_reference_librarys_count_of_used_parameters(name, reference):
  """The reference library's own model at full size: its parameter count is the catalogue's
  reference_params; a forward and backward pass at the entry's image size finds the parameters
  its forward does not use (no gradient); fm_adapt's eval_shape count is exactly the rest."""
  torch = reference.load('torch')
  entry = zoo.ENTRIES[name]
  build, forward = REFERENCES[name]
  with torch.device('meta'):  # Shapes only: full-size models, their passes, without memory.
    module = build(reference)
    total = sum(p.numel() for p in module.parameters())
    unused = _unused_parameters(module, forward, entry.image_size, torch)
  assert total == entry.reference_params
  assert unused == entry.unused
  used = total - sum(size for _, size in unused)
  assert zoo.count_params(zoo.abstract_params(entry)) == used == entry.params


def test_unknown_names_list_the_catalogue(tmp_path):
  with pytest.raises(ValueError, match=r"Unknown foundation model 'retfund'.*'retfound_cfp'"):
    zoo.get('retfund')
  with pytest.raises(ValueError, match=r"Unknown foundation model 'retfund'.*'dinov2_vitb14'"):
    zoo.parse_spec('zoo:retfund:/data/x.pth')
  with pytest.raises(ValueError, match=r"'weights.pth' is not a published name.*zoo:NAME:"):
    zoo.parse_spec(f'zoo:{tmp_path}/weights.pth')
  with pytest.raises(ValueError, match="'zoo:NAME:PATH'"):
    zoo.parse_spec('/data/RETFound_cfp_weights.pth')


def test_specs_by_name_and_by_published_file_name():
  entry, path = zoo.parse_spec('zoo:uni:/w/pytorch_model.bin')
  assert entry.name == 'uni' and str(path) == '/w/pytorch_model.bin'
  entry, path = zoo.parse_spec('zoo:/w/RETFound_cfp_weights.pth')
  assert entry.name == 'retfound_cfp' and path == '/w/RETFound_cfp_weights.pth'
  # A URI keeps its '//', named or found by its published file name.
  assert zoo.parse_spec('zoo:uni:gs://b/w/pytorch_model.bin')[1] == 'gs://b/w/pytorch_model.bin'
  entry, path = zoo.parse_spec('zoo:gs://b/RETFound_cfp_weights.pth')
  assert entry.name == 'retfound_cfp' and path == 'gs://b/RETFound_cfp_weights.pth'
  assert zoo.entry_for_file('x/dinov2_vitl14_reg4_pretrain.pth').name == 'dinov2_vitl14_reg'
  assert zoo.model_config('rad_dino')['posemb_resize'] == 'bicubic'
  assert '| `biomedclip` |' in zoo.table()
  assert '| 86,579,712 | transformers 5.17.0 Dinov2Model (ViT-B/14, 518 px) (86,580,480; ' \
      'unused: embeddings.mask_token (768)) |' in zoo.table()


# --- A whole import on reduced models: the catalogue's entries with 'mu' width and depth.

def _reduce(entry, patch, image_size):
  model = dict(entry.model, variant=f'mu/{patch}', posemb_grid=image_size // patch)
  model.pop('proj_dim', None)
  return dataclasses.replace(entry, model=model, image_size=image_size)


@pytest.fixture()
def reduced_zoo(monkeypatch):
  reduced = {'retfound_cfp': _reduce(zoo.ENTRIES['retfound_cfp'], 16, 32),
             'dinov2_vits14': _reduce(zoo.ENTRIES['dinov2_vits14'], 14, 28),
             'dinov2_vits14_reg': _reduce(zoo.ENTRIES['dinov2_vits14_reg'], 14, 28)}
  monkeypatch.setattr(zoo, 'ENTRIES', reduced)
  monkeypatch.setattr(zoo, '_ENTRIES', list(reduced.values()))
  return reduced


def _randomize(module, torch):
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for p in module.parameters():
      p.copy_(0.3 * torch.randn(p.shape, generator=gen))
  return module.eval()


def _mu_timm(timm, name, img_size, **kw):
  return timm.create_model(name, pretrained=False, num_classes=0, img_size=img_size,
                           embed_dim=32, depth=2, num_heads=2, mlp_ratio=2, **kw)


def test_retfound_by_file_name_matches_retfounds_own_fine_tuning_model(
    reduced_zoo, reference, tmp_path):
  """RETFound's main_finetune: the MAE encoder's weights into a global-pool ViT whose fc_norm
  starts fresh and whose final norm is dropped (strict=False there; reported here)."""
  torch, timm = reference.load('torch'), reference.load('timm')
  pretrain = _randomize(_mu_timm(timm, 'vit_large_patch16_224', 32), torch)  # Has `norm`.
  sd = dict(pretrain.state_dict())
  sd['mask_token'] = torch.zeros(1, 1, 32)
  sd['decoder_pred.weight'] = torch.zeros(8, 32)
  path = tmp_path / 'RETFound_cfp_weights.pth'
  torch.save({'model': sd}, str(path))
  model, variables, report = zoo.build(f'zoo:{path}', num_classes=5)
  assert set(report.ignored) == {'mask_token', 'decoder_pred.weight', 'norm.weight',
                                 'norm.bias'}
  assert not report.dropped
  assert sorted(report.kept_init) == ['fc_norm/bias', 'fc_norm/scale', 'head/bias',
                                      'head/kernel']
  finetune = _mu_timm(timm, 'vit_large_patch16_224', 32, global_pool='avg').eval()
  missing, unexpected = finetune.load_state_dict(sd, strict=False)
  assert set(missing) == {'fc_norm.weight', 'fc_norm.bias'}
  images = np.random.default_rng(0).normal(size=(2, 3, 32, 32)).astype(np.float32)
  with torch.no_grad():
    expected = finetune.forward_head(finetune.forward_features(torch.from_numpy(images)),
                                     pre_logits=True).numpy()
  _, out = jax.jit(functools.partial(model.apply))(variables, images.transpose(0, 2, 3, 1))
  np.testing.assert_allclose(np.asarray(out['pre_logits']), expected, atol=1e-4, rtol=0)
  assert out['logits'].shape == (2, 5)
  assert 'mask_token' in unexpected


def test_a_file_of_another_catalogue_model_says_which_one(reduced_zoo, reference, tmp_path):
  torch, timm = reference.load('torch'), reference.load('timm')
  reg = _mu_timm(timm, 'vit_small_patch14_reg4_dinov2', 28)
  path = tmp_path / 'dinov2.pth'
  torch.save(reg.state_dict(), str(path))
  assert [e.name for e in zoo.looks_like(path)] == ['dinov2_vits14_reg']
  with pytest.raises(zoo.vit_import.CheckpointMismatchError) as error:
    zoo.build(f'zoo:dinov2_vits14:{path}')
  message = str(error.value)
  assert "is not a 'dinov2_vits14' checkpoint" in message
  assert f'zoo:dinov2_vits14_reg:{path}' in message
  assert 'unexpected: registers' in message
  _, variables, _ = zoo.build(f'zoo:dinov2_vits14_reg:{path}')
  assert variables['params']['registers'].shape == (1, 4, 32)
