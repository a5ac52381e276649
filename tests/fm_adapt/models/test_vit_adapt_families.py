"""Adaptation transforms on the foundation-model families (reduced models): LoRA, VPT, adapters,
BitFit and EPT attach to DINOv2 (with and without registers), MAE / RETFound and CLIP towers
exactly as to the original ViT. Zero-initialised transforms leave the features unchanged;
prompts keep the token layout ([cls, registers, patches]); the trainable counts are those of
the transform; the class token's own position embedding (class_posemb, as the catalogue builds
these families) is frozen wherever `pos_embedding` is."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fm_adapt.adapt import compose
from fm_adapt.models import vit
from fm_adapt.train import model_fns

FAMILIES = {
    'dinov2_reg': (dict(variant='mu/14', layerscale=1e-5, num_registers=2, posemb_grid=2,
                        posemb_resize='dinov2'), 28),
    'dinov2': (dict(variant='mu/14', layerscale=1e-5, class_posemb=True, posemb_grid=2,
                    posemb_resize='dinov2'), 28),
    'mae_retfound': (dict(variant='mu/16', pool_type='gap', class_token=True, class_posemb=True,
                          fc_norm=True, posemb_grid=2), 32),
    'clip': (dict(variant='mu/16', pre_norm=True, patch_bias=False, mlp_act='quick_gelu',
                  ln_epsilon=1e-5, proj_dim=8, class_posemb=True, posemb_grid=2), 32),
}
TRANSFORMS = {
    'lora': dict(name='lora', rank=2, targets='.*attn/(query|value)/kernel'),
    'adapter': dict(name='adapter', mode='parallel', dim=4),
    'bitfit': dict(name='bitfit'),
    'vpt_deep': dict(name='vpt', mode='deep', num_tokens=3),
    'ept': dict(name='ept', num_tokens=2),
}
ZERO_INIT = ('lora', 'adapter', 'bitfit')  # Equal to the base model at initialisation.


def _setup(family, transform):
  model_kwargs, size = FAMILIES[family]
  adaptation = compose.apply_transforms([TRANSFORMS[transform]], 'vit', model_kwargs)
  model = vit.Model(num_classes=3, head_zeroinit=False, **model_kwargs)
  images = np.random.default_rng(0).normal(size=(2, size, size, 3)).astype(np.float32)
  base = model.init(jax.random.key(0), images)['params']
  base = jax.tree_util.tree_map(  # Nonzero everywhere, LayerScale included.
      lambda x: x + 0.1 * jax.random.normal(jax.random.key(1), x.shape), base)
  params = adaptation.init_extra(base, jax.random.key(2))
  apply = model_fns.make_apply_fn(model)
  return adaptation, apply, base, params, images


@pytest.mark.parametrize('transform', list(TRANSFORMS))
@pytest.mark.parametrize('family', list(FAMILIES))
def test_transform_attaches_to_family(family, transform):
  adaptation, apply, base, params, images = _setup(family, transform)
  base_logits, base_out, _ = jax.jit(lambda p: apply(p, {}, images, train=False, rng=None))(base)
  adapted = jax.jit(lambda p: adaptation.wrap_apply(apply)(p, {}, images, train=False,
                                                           rng=None))
  logits, out, _ = adapted(params)
  assert out['encoded'].shape == base_out['encoded'].shape  # Prompts removed again.
  if transform in ZERO_INIT:
    np.testing.assert_allclose(logits, base_logits, atol=1e-5)
  else:
    assert float(jnp.abs(logits - base_logits).max()) > 1e-4
  trainable, total = compose.count_params(params, adaptation.trainable_patterns)
  extra = total - compose.count_params(base, ['.*'])[1]
  head = 8 * 3 + 3 if FAMILIES[family][0].get('proj_dim') else 32 * 3 + 3
  if transform == 'bitfit':
    assert extra == 0 and trainable > head
  else:
    assert extra > 0 and trainable == extra + head


def _block_0_input(adaptation, apply, params, images):
  """The tokens entering the first encoder block of the adapted model."""
  seen = {}

  def capture(next_fun, args, kwargs, context):
    if context.method_name == '__call__' and '/'.join(context.module.path) == 'encoder/block_0':
      seen['x'] = args[0]
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(capture):
    adaptation.wrap_apply(apply)(params, {}, images, train=False, rng=None)
  return np.asarray(seen['x'])


def test_prompts_go_after_the_class_token_and_the_registers():
  """[cls, registers, prompts, patches] on DINOv2-reg; EPT has a row for every one of them."""
  registers, patches = 2, 4  # FAMILIES['dinov2_reg']: 2 registers, 28 px at patch 14.
  adaptation, apply, base, params, images = _setup('dinov2_reg', 'vpt_deep')
  x = _block_0_input(adaptation, apply, params, images)
  prompt = np.asarray(params['prompt']['deep'][0])
  assert x.shape == (2, 1 + registers + len(prompt) + patches, 32)
  np.testing.assert_allclose(x[:, 0], np.broadcast_to(base['cls'][0, 0], (2, 32)))
  np.testing.assert_allclose(x[:, 1:1 + registers],
                             np.broadcast_to(base['registers'][0], (2, registers, 32)))
  np.testing.assert_allclose(x[:, 1 + registers:1 + registers + len(prompt)],
                             np.broadcast_to(prompt, (2, *prompt.shape)))
  _, _, _, ept_params, _ = _setup('dinov2_reg', 'ept')
  assert ept_params['prompt']['ept'].shape == (2, 1 + registers + patches, 2)  # [L, T, n]


def test_prompts_go_after_the_class_token_with_its_position_embedding():
  adaptation, apply, base, params, images = _setup('dinov2', 'vpt_deep')
  x = _block_0_input(adaptation, apply, params, images)
  prompt = np.asarray(params['prompt']['deep'][0])
  assert x.shape == (2, 1 + len(prompt) + 4, 32)
  cls = base['cls'][0, 0] + base['cls_pos_embedding'][0, 0]
  np.testing.assert_allclose(x[:, 0], np.broadcast_to(cls, (2, 32)), atol=1e-6)
  np.testing.assert_allclose(x[:, 1:1 + len(prompt)], np.broadcast_to(prompt, (2, *prompt.shape)))


@pytest.mark.parametrize('transform', list(TRANSFORMS))
def test_class_position_embedding_is_trained_exactly_where_pos_embedding_is(transform):
  """No transform trains it (nor `pos_embedding`): both stay frozen under every transform."""
  adaptation, _, _, params, _ = _setup('dinov2', transform)
  assert 'cls_pos_embedding' in params
  trainable = lambda path: any(re.fullmatch(p, path) for p in adaptation.trainable_patterns)
  assert not trainable('cls_pos_embedding') and not trainable('pos_embedding')


@pytest.mark.parametrize('name', sorted(compose.SCHEDULE_PRESETS))
def test_schedule_presets_treat_the_class_position_embedding_as_pos_embedding(name):
  rules = compose.preset(name, **({'k': 1, 'depth': 2} if name == 'last_k' else {}))
  rule = lambda path: next(r for r in rules if re.fullmatch(r[0], path))
  assert rule('cls_pos_embedding') == rule('pos_embedding')
  assert (rule('cls_pos_embedding')[1] is None) == (name != 'full')  # Frozen but in 'full'.
