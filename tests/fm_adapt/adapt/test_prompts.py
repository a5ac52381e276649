"""Tests of prompt tokens (fm_adapt.adapt.prompts) on the ViT: VPT-shallow, VPT-deep, EPT."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fm_adapt.adapt import prompts
from fm_adapt import param_paths
from fm_adapt.models import vit
from fm_adapt.train import model_fns

IMAGE = np.random.default_rng(1).normal(size=(2, 8, 12, 3)).astype(np.float32)  # 6 patches.
NUM_PATCHES, WIDTH, DEPTH = 6, 32, 2


def _key(seed: int = 0) -> jax.Array:
  # unsafe_rbg compiles its sampler several times faster than threefry on CPU.
  return jax.random.key(seed, impl='unsafe_rbg')


def _model(**kw) -> vit.Model:
  return vit.Model(num_classes=3, variant='mu/4', **kw)


def _random_params(model: vit.Model, prompt=None, seed: int = 0) -> dict:
  """Random base parameters from numpy, plus a random prompt tree of `prompts.init`'s shapes."""
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(model.init, _key(), jax.ShapeDtypeStruct(IMAGE.shape, jnp.float32))
  abstract = abstract['params']
  if prompt is not None:
    tree = jax.eval_shape(lambda p: prompts.init(p, prompt, _key()), abstract)
    abstract = dict(abstract, prompt=tree)
  return jax.tree.map(lambda x: (0.3 * rng.normal(size=x.shape)).astype(np.float32), abstract)


_JITTED = {}


def _apply(model: vit.Model, prompt, params: dict, train: bool = False, rng=None):
  """Jitted forward; one compile per model and prompt configuration for the whole module."""
  key = (repr(model), repr(prompt), train)
  if key not in _JITTED:
    fn = prompts.wrap_apply_fn(model_fns.make_apply_fn(model), prompt)
    _JITTED[key] = jax.jit(lambda p, r: fn(p, {}, IMAGE, train=train, rng=r)[:2])
  return _JITTED[key](params, rng)


def _without_prompt(params: dict) -> dict:
  return {k: v for k, v in params.items() if k != 'prompt'}


def test_zero_tokens_adds_nothing_and_is_the_base_model():
  params = _random_params(_model())
  assert prompts.init(params, dict(kind='vpt_deep', num_tokens=0), _key()) == {}
  apply_fn = model_fns.make_apply_fn(_model())
  assert prompts.wrap_apply_fn(apply_fn, dict(kind='ept', num_tokens=0)) is apply_fn


@pytest.mark.parametrize('kind, name, shape', [
    ('vpt_shallow', 'shallow', (1, 5, WIDTH)), ('vpt_deep', 'deep', (DEPTH, 5, WIDTH)),
    ('ept', 'ept', (DEPTH, NUM_PATCHES + 1, 5))])
@pytest.mark.parametrize('pool_type', ['tok', 'gap'])
def test_param_names_and_output_shapes(kind, name, shape, pool_type):
  model, prompt = _model(pool_type=pool_type), dict(kind=kind, num_tokens=5)
  if kind == 'ept' and pool_type == 'gap':
    shape = (DEPTH, NUM_PATCHES, 5)  # No class token.
  base = jax.eval_shape(model.init, _key(), IMAGE)['params']
  tree = jax.eval_shape(lambda p: prompts.init(p, prompt, _key()), base)
  assert param_paths.flatten(tree) == {name: jax.ShapeDtypeStruct(shape, jnp.float32)}
  params = dict(base, prompt=tree)
  assert [p for p, m in param_paths.flatten(param_paths.make_mask(params, 'prompt/.*')).items() if m] == [
      f'prompt/{name}']
  fn = prompts.wrap_apply_fn(model_fns.make_apply_fn(model), prompt)
  logits, out, _ = jax.eval_shape(lambda p: fn(p, {}, IMAGE, train=False, rng=None), params)
  (_, base_out), _ = jax.eval_shape(model.init_with_output, _key(), IMAGE)
  assert logits.shape == (2, 3)
  for key in base_out:  # The prompts are gone from every output.
    assert out[key].shape == base_out[key].shape, key


@pytest.mark.parametrize('kind', prompts.KINDS)
def test_nonzero_prompts_change_the_logits(kind):
  prompt = dict(kind=kind, num_tokens=5)
  params = _random_params(_model(), prompt)
  logits, _ = _apply(_model(), prompt, params)
  base_logits, _ = jax.jit(_model().apply)({'params': _without_prompt(params)}, IMAGE)
  assert np.abs(logits - base_logits).max() > 1e-3


@jax.jit
def _block(params, x):
  return vit.Encoder1DBlock(mlp_dim=64, num_heads=2).apply({'params': params}, x)


def _oracle_vpt(params, deep: bool):
  """VPT written out by hand from the base model's pieces."""
  _, out = jax.jit(_model().apply)({'params': _without_prompt(params)}, IMAGE)
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
  prompt = dict(kind=kind, num_tokens=3)
  params = _random_params(_model(), prompt)
  logits, out = _apply(_model(), prompt, params)
  expected, tokens = _oracle_vpt(params, deep=kind == 'vpt_deep')
  np.testing.assert_allclose(logits, expected, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(out['encoded'], np.concatenate([tokens[:, :1], tokens[:, 4:]], 1),
                             atol=1e-5)


def test_vpt_deep_and_ept_under_remat_equal_plain():
  for prompt in (dict(kind='vpt_deep', num_tokens=3), dict(kind='ept', num_tokens=3)):
    params = _random_params(_model(), prompt)
    np.testing.assert_allclose(_apply(_model(remat=True), prompt, params)[0],
                               _apply(_model(), prompt, params)[0], atol=1e-6)


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
  prompt = dict(kind='ept', num_tokens=5)
  params = _random_params(_model(), prompt)
  params['prompt']['ept'] = np.full_like(params['prompt']['ept'], -1e4)  # exp() == 0.
  np.testing.assert_allclose(_apply(_model(), prompt, params)[0],
                             jax.jit(_model().apply)({'params': _without_prompt(params)},
                                                     IMAGE)[0], atol=1e-6)


def test_ept_uses_each_blocks_row():
  prompt = dict(kind='ept', num_tokens=2)
  params = _random_params(_model(), prompt)
  logits = _apply(_model(), prompt, params)[0]
  for row in range(DEPTH):
    changed = jax.tree.map(np.copy, params)
    changed['prompt']['ept'][row] += 1.0
    assert np.abs(_apply(_model(), prompt, changed)[0] - logits).max() > 1e-4, row


def test_prompt_init_follows_vpt_and_ept():
  base = _random_params(_model())  # fan-in 4 * 4 * 3 = 48, 7 tokens with the class token.
  deep = np.asarray(prompts.init(base, dict(kind='vpt_deep', num_tokens=50), _key())['deep'])
  bound = math.sqrt(6 / (48 + WIDTH))
  assert deep.shape == (DEPTH, 50, WIDTH) and np.abs(deep).max() <= bound
  assert np.abs(deep).max() > 0.9 * bound  # Uniform over the whole interval.
  ept = prompts.init(base, dict(kind='ept', num_tokens=50), _key())['ept']
  assert ept.shape == (DEPTH, 7, 50)
  assert 0.015 < np.std(ept) < 0.025  # normal(0.02), 700 draws.


def test_prompt_dropout_in_training_only():
  model, prompt = _model(), dict(kind='vpt_deep', num_tokens=2, dropout=0.5)
  params = _random_params(model, prompt)
  train = lambda r: _apply(model, prompt, params, train=True, rng=r)[0]
  assert not np.array_equal(train(jax.random.key(0)), train(jax.random.key(1)))
  evaluate = _apply(model, prompt, params)[0]
  np.testing.assert_allclose(evaluate, _apply(model, dict(prompt, dropout=0.0), params)[0])


def test_gradients_reach_every_prompt_row():
  prompt = dict(kind='vpt_deep', num_tokens=2)
  params = _random_params(_model(), prompt)
  fn = prompts.wrap_apply_fn(model_fns.make_apply_fn(_model()), prompt)
  grads = jax.jit(jax.grad(lambda p: fn(p, {}, IMAGE, train=False, rng=None)[0].sum()))(params)
  assert all(np.abs(grads['prompt']['deep'][i]).max() > 0 for i in range(DEPTH))


@pytest.mark.parametrize('prompt, match', [
    (dict(kind='vpt', num_tokens=2), r"'vpt_shallow', 'vpt_deep', 'ept'"),
    (dict(num_tokens=2), r"Unknown prompt kind None"),
    (dict(kind='vpt_deep', num_tokens=2, length=3), r"\['length'\].*valid keys"),
    (dict(kind='vpt_deep', num_tokens=-1), 'int >= 0'),
    (dict(kind='ept', num_tokens=2, dropout=0.1), 'not to EPT'),
])
def test_prompt_config_errors(prompt, match):
  with pytest.raises(ValueError, match=match):
    prompts.init(_random_params(_model()), prompt, _key())


def test_layout_errors():
  sincos = jax.eval_shape(_model(posemb='sincos2d').init, _key(), IMAGE)['params']
  with pytest.raises(ValueError, match=r"EPT .*'pos_embedding'.*posemb='learn'"):
    prompts.init(sincos, dict(kind='ept', num_tokens=2), _key())
  assert prompts.init(sincos, dict(kind='vpt_deep', num_tokens=2), _key())['deep'].shape == (
      DEPTH, 2, WIDTH)
  with pytest.raises(ValueError, match=r"ViT-layout model .*'embedding/kernel'"):
    prompts.init({'stem': {'conv': {'kernel': np.zeros((3, 3, 3, 8))}}},
                 dict(kind='vpt_deep', num_tokens=2), _key())
  fn = prompts.wrap_apply_fn(model_fns.make_apply_fn(_model()), dict(kind='ept', num_tokens=2))
  with pytest.raises(ValueError, match=r"needs a top-level 'prompt' subtree"):
    fn(_random_params(_model()), {}, IMAGE, train=False, rng=None)


def test_ept_prompt_of_another_image_size_fails_clearly():
  prompt = dict(kind='ept', num_tokens=2)
  params = dict(_random_params(_model()), prompt={'ept': np.zeros((DEPTH, 13, 2), np.float32)})
  fn = prompts.wrap_apply_fn(model_fns.make_apply_fn(_model()), prompt)
  with pytest.raises(ValueError, match=r'EPT prompt \(2, 13, 2\).*over 7 tokens'):
    fn(params, {}, IMAGE, train=False, rng=None)


def test_ept_token_count_comes_from_the_image_run_not_the_stored_grid():
  """A position embedding stored at 3x3 (posemb_grid, resized at run time) on 8x12 images (2x3
  patches): T = 1 + 6 from image_shape; the stored grid's 1 + 9 does not fit and says why."""
  model, prompt = _model(posemb_grid=3), dict(kind='ept', num_tokens=2)
  base = jax.eval_shape(model.init, _key(), IMAGE)['params']
  assert base['pos_embedding'].shape == (1, 9, WIDTH)
  tree = prompts.init(base, prompt, _key(), image_shape=IMAGE.shape[1:])
  assert tree['ept'].shape == (DEPTH, NUM_PATCHES + 1, 2)
  fn = prompts.wrap_apply_fn(model_fns.make_apply_fn(model), prompt)
  logits, _, _ = jax.eval_shape(lambda p: fn(p, {}, IMAGE, train=False, rng=None),
                                dict(base, prompt=tree))
  assert logits.shape == (2, 3)
  stored = jax.eval_shape(lambda p: prompts.init(p, prompt, _key()), base)
  with pytest.raises(ValueError, match=r'over 7 tokens .*image_shape='):
    jax.eval_shape(lambda p: fn(p, {}, IMAGE, train=False, rng=None), dict(base, prompt=stored))
  sincos = jax.eval_shape(_model(posemb='sincos2d').init, _key(), IMAGE)['params']
  assert prompts.init(sincos, prompt, _key(), image_shape=(8, 12, 3))['ept'].shape == (
      DEPTH, NUM_PATCHES + 1, 2)
  with pytest.raises(ValueError, match=r'Image size 8x10 is not divisible by the patch size 4x4'):
    prompts.init(base, prompt, _key(), image_shape=(8, 10, 3))
