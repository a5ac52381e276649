"""Tests of prompt tokens (fm_adapt.adapt.prompts) in the ViT: VPT-shallow, VPT-deep, EPT."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fm_adapt.adapt import masks, prompts
from fm_adapt.models import vit

IMAGE = np.random.default_rng(1).normal(size=(2, 8, 12, 3)).astype(np.float32)  # 6 patches.
NUM_PATCHES, WIDTH, DEPTH = 6, 32, 2


def _key(seed: int = 0) -> jax.Array:
  # unsafe_rbg compiles its sampler several times faster than threefry on CPU.
  return jax.random.key(seed, impl='unsafe_rbg')


def _model(prompt=None, **kw) -> vit.Model:
  return vit.Model(num_classes=3, variant='mu/4', prompt=prompt, **kw)


def _random_params(model: vit.Model, seed: int = 0) -> dict:
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(model.init, _key(), jax.ShapeDtypeStruct(IMAGE.shape, jnp.float32))
  return jax.tree.map(lambda x: (0.3 * rng.normal(size=x.shape)).astype(np.float32),
                      abstract['params'])


_JITTED = {}


def _apply(model: vit.Model, params: dict):
  """Jitted eval forward; one compile per model configuration for the whole module."""
  if repr(model) not in _JITTED:
    _JITTED[repr(model)] = jax.jit(model.apply)
  return _JITTED[repr(model)]({'params': params}, IMAGE)


def _without_prompt(params: dict) -> dict:
  return {k: v for k, v in params.items() if k != 'prompt'}


@pytest.mark.parametrize('kind', prompts.KINDS)
def test_zero_tokens_builds_the_base_parameter_tree(kind):
  abstract = jax.eval_shape(_model(dict(kind=kind, num_tokens=0)).init, _key(), IMAGE)
  base = jax.eval_shape(_model().init, _key(), IMAGE)
  assert jax.tree.structure(abstract) == jax.tree.structure(base)


def test_zero_tokens_is_exactly_the_base_model():
  params = _random_params(_model())
  base_logits, _ = _apply(_model(), params)
  logits, _ = _apply(_model(dict(kind='vpt_deep', num_tokens=0)), params)
  np.testing.assert_array_equal(logits, base_logits)


@pytest.mark.parametrize('kind, name, shape', [
    ('vpt_shallow', 'shallow', (1, 5, WIDTH)), ('vpt_deep', 'deep', (DEPTH, 5, WIDTH)),
    ('ept', 'ept', (DEPTH, NUM_PATCHES + 1, 5))])
@pytest.mark.parametrize('pool_type', ['tok', 'gap'])
def test_param_names_and_output_shapes(kind, name, shape, pool_type):
  model = _model(dict(kind=kind, num_tokens=5), pool_type=pool_type)
  if kind == 'ept' and pool_type == 'gap':
    shape = (DEPTH, NUM_PATCHES, 5)  # No class token.
  (logits, out), variables = jax.eval_shape(model.init_with_output, _key(), IMAGE)
  flat = masks.flatten(variables['params'])
  assert [p for p in flat if p.startswith('prompt')] == [f'prompt/{name}']
  assert flat[f'prompt/{name}'].shape == shape
  assert [p for p, m in masks.flatten(masks.make_mask(flat, 'prompt/.*')).items() if m] == [
      f'prompt/{name}']
  (_, base_out), _ = jax.eval_shape(_model(pool_type=pool_type).init_with_output, _key(), IMAGE)
  assert logits.shape == (2, 3)
  for key in base_out:  # The prompts are gone from every output.
    assert out[key].shape == base_out[key].shape, key


@pytest.mark.parametrize('kind', prompts.KINDS)
def test_nonzero_prompts_change_the_logits(kind):
  model = _model(dict(kind=kind, num_tokens=5))
  params = _random_params(model)
  logits, _ = _apply(model, params)
  base_logits, _ = _apply(_model(), _without_prompt(params))
  assert np.abs(logits - base_logits).max() > 1e-3


@jax.jit
def _block(params, x):
  return vit.Encoder1DBlock(mlp_dim=64, num_heads=2).apply({'params': params}, x)


def _oracle_vpt(params, deep: bool):
  """VPT written out by hand from the base model's pieces."""
  _, out = _apply(_model(), _without_prompt(params))
  table = params['prompt']['deep' if deep else 'shallow']
  tokens = lambda i: np.broadcast_to(table[i], (2, *table.shape[1:]))
  cls = np.broadcast_to(params['cls'], (2, 1, WIDTH))
  x = np.concatenate([cls, tokens(0), out['with_posemb']], axis=1)
  for i in range(DEPTH):
    if deep and i > 0:
      x = np.concatenate([x[:, :1], tokens(i), x[:, 1 + table.shape[1]:]], axis=1)
    x = _block(params['encoder'][f'block_{i}'], x)
  x = nn.LayerNorm(epsilon=1e-6).apply({'params': params['encoder']['norm']}, x)
  head = params['head']
  return x[:, 0] @ head['kernel'] + head['bias'], x


@pytest.mark.parametrize('kind', ['vpt_shallow', 'vpt_deep'])
def test_vpt_matches_hand_written_oracle(kind):
  model = _model(dict(kind=kind, num_tokens=3))
  params = _random_params(model)
  logits, out = _apply(model, params)
  expected, tokens = _oracle_vpt(params, deep=kind == 'vpt_deep')
  np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(out['encoded'], np.concatenate([tokens[:, :1], tokens[:, 4:]], 1),
                             atol=1e-5)


def _np_ept_attention(q, k, v, prompt):
  q, k, v, prompt = (np.asarray(a, np.float64) for a in (q, k, v, prompt))
  b, t, h, d = q.shape
  logits = np.einsum('bqhd,bkhd->bhqk', q, k) / np.sqrt(d)
  full = np.concatenate([logits, np.broadcast_to(prompt, (b, h, t, prompt.shape[-1]))], -1)
  weights = np.exp(full - full.max(-1, keepdims=True))
  weights = weights / weights.sum(-1, keepdims=True)
  return np.einsum('bhqk,bkhd->bqhd', weights[..., :t], v)


def test_ept_attention_matches_numpy_and_is_patchwise_scaling():
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(2, 5, 3, 4)).astype(np.float32) for _ in range(3))
  prompt = rng.normal(size=(5, 7)).astype(np.float32)
  got = prompts.ept_attention(q, k, v, prompt)
  np.testing.assert_allclose(got, _np_ept_attention(q, k, v, prompt), atol=1e-6)
  # Equivalently: plain attention scaled per token by Z / (Z + sum_k exp(prompt)).
  logits = np.einsum('bqhd,bkhd->bhqk', q, k) / 2.0
  z = np.exp(logits).sum(-1)  # [b, h, t]
  factor = (z / (z + np.exp(prompt).sum(-1))).transpose(0, 2, 1)[..., None]
  plain = jax.nn.dot_product_attention(q, k, v)
  np.testing.assert_allclose(got, plain * factor, atol=1e-6)


def test_ept_with_vanishing_prompts_equals_base():
  model = _model(dict(kind='ept', num_tokens=5))
  params = _random_params(model)
  params['prompt']['ept'] = np.full_like(params['prompt']['ept'], -1e4)  # exp() == 0.
  np.testing.assert_allclose(_apply(model, params)[0],
                             _apply(_model(), _without_prompt(params))[0], atol=1e-6)


def test_prompt_init_follows_vpt_and_ept():
  deep = prompts.PromptParams('vpt_deep', 50, DEPTH, WIDTH, 7, fan_in=48).init(_key())
  values = np.asarray(deep['params']['deep'])
  bound = math.sqrt(6 / (48 + WIDTH))
  assert values.shape == (DEPTH, 50, WIDTH) and np.abs(values).max() <= bound
  assert np.abs(values).max() > 0.9 * bound  # Uniform over the whole interval.
  ept = prompts.PromptParams('ept', 50, DEPTH, WIDTH, 7, fan_in=48).init(_key())
  assert 0.015 < np.std(ept['params']['ept']) < 0.025  # normal(0.02), 700 draws.


def test_prompt_dropout_in_training():
  model = _model(dict(kind='vpt_deep', num_tokens=2, dropout=0.5))
  params = _random_params(model)
  run = jax.jit(lambda r: model.apply({'params': params}, IMAGE, train=True,
                                      rngs={'dropout': r})[0])
  assert not np.array_equal(run(jax.random.key(0)), run(jax.random.key(1)))


@pytest.mark.parametrize('prompt, match', [
    (dict(kind='vpt', num_tokens=2), r"'vpt_shallow', 'vpt_deep', 'ept'"),
    (dict(num_tokens=2), r"Unknown prompt kind None"),
    (dict(kind='vpt_deep', num_tokens=2, length=3), r"\['length'\].*valid keys"),
    (dict(kind='vpt_deep', num_tokens=-1), 'int >= 0'),
    (dict(kind='ept', num_tokens=2, dropout=0.1), 'not to EPT'),
])
def test_prompt_config_errors(prompt, match):
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(_model(prompt).init, _key(), IMAGE)
