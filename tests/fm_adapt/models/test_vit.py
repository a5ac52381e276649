"""Tests of fm_adapt.models.vit: variants, shapes, parameter layout, a numpy oracle."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from fm_adapt.models import vit

OUT_KEYS = {'stem', 'with_posemb', 'encoded', 'patch_tokens', 'pooled', 'pre_logits', 'logits'}


def _num_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def _abstract(model: vit.Model, shape: tuple[int, ...]):
  """eval_shape of init_with_output: (param shapes, logits shape, out shapes)."""
  image = jax.ShapeDtypeStruct(shape, jnp.float32)
  (logits, out), variables = jax.eval_shape(model.init_with_output, jax.random.key(0), image)
  return variables['params'], logits, out


def _random_params(model: vit.Model, shape: tuple[int, ...], seed: int = 0):
  """Random nonzero parameters of the right shapes, without running `init`.

  A real init compiles a threefry kernel per parameter shape (seconds on CPU), so tests that
  only need some parameter values draw them with numpy.
  """
  rng = np.random.default_rng(seed)
  params, _, _ = _abstract(model, shape)
  return jax.tree_util.tree_map(
      lambda x: (0.3 * rng.normal(size=x.shape)).astype(np.float32), params)


@pytest.mark.parametrize('size, dims', [
    ('mu', (32, 2, 64, 2)), ('Ti', (192, 12, 768, 3)), ('S', (384, 12, 1536, 6)),
    ('M', (512, 12, 2048, 8)), ('B', (768, 12, 3072, 12)), ('L', (1024, 24, 4096, 16))])
def test_decode_variant(size, dims):
  cfg = vit.decode_variant(f'{size}/14')
  assert (cfg['width'], cfg['depth'], cfg['mlp_dim'], cfg['num_heads']) == dims
  assert cfg['patch_size'] == 14


@pytest.mark.parametrize('variant', ['X/16', 'B', 'B/x', 'B/16/2', 'B/0', None])
def test_decode_variant_errors(variant):
  with pytest.raises(ValueError, match='mu.*Ti.*S.*M.*B.*L|positive'):
    vit.decode_variant(variant)


@pytest.mark.parametrize('size, pool_type', [
    ('Ti', 'tok'), ('S', 'tok'), ('M', 'tok'), ('B', 'tok'), ('L', 'tok'), ('Ti', 'gap')])
def test_shapes_abstract(size, pool_type):
  width = vit.SIZES[size][0]
  model = vit.Model(num_classes=7, variant=f'{size}/16', pool_type=pool_type)
  params, logits, out = _abstract(model, (2, 32, 48, 3))
  n, t = 6, 6 + (pool_type == 'tok')
  assert logits.shape == (2, 7)
  assert set(out) == OUT_KEYS
  for key in ('stem', 'with_posemb', 'patch_tokens'):
    assert out[key].shape == (2, n, width)
  assert out['encoded'].shape == (2, t, width)
  assert out['pre_logits'].shape == (2, width)
  assert params['pos_embedding'].shape == (1, n, width)
  assert ('cls' in params) == (pool_type == 'tok')


@pytest.mark.parametrize('num_classes', [None, 0])
def test_no_head(num_classes):
  model = vit.Model(num_classes=num_classes, variant='mu/4')
  params, logits, out = _abstract(model, (2, 8, 8, 3))
  assert 'head' not in params
  assert logits.shape == out['pre_logits'].shape == (2, 32)


def test_init_values():
  model = vit.Model(num_classes=3, variant='mu/4')
  # An unsafe_rbg key compiles init ~3x faster than threefry; its statistics are fine here.
  rng = jax.random.key(0, impl='unsafe_rbg')
  params = jax.jit(model.init)(rng, np.ones((1, 32, 32, 3), np.float32))['params']
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
  assert not np.any(params['head']['kernel']) and not np.any(params['cls'])
  assert 0.015 < np.std(params['pos_embedding']) < 0.025  # normal(0.02), 64*32 draws.
  np.testing.assert_array_equal(params['encoder']['block_0']['ln_attn']['scale'], 1.0)


def test_param_names_mu():
  model = vit.Model(num_classes=3, variant='mu/4')
  params, _, _ = _abstract(model, (1, 8, 8, 1))
  names = {'/'.join(k): v.shape for k, v in flax.traverse_util.flatten_dict(params).items()}
  expected = {'embedding/kernel': (4, 4, 1, 32), 'embedding/bias': (32,), 'cls': (1, 1, 32),
              'pos_embedding': (1, 4, 32), 'encoder/norm/scale': (32,),
              'encoder/norm/bias': (32,), 'head/kernel': (32, 3), 'head/bias': (3,)}
  for i in range(2):
    pre = f'encoder/block_{i}'
    for ln in ('ln_attn', 'ln_mlp'):
      expected |= {f'{pre}/{ln}/scale': (32,), f'{pre}/{ln}/bias': (32,)}
    for proj in ('query', 'key', 'value', 'out'):
      expected |= {f'{pre}/attn/{proj}/kernel': (32, 32), f'{pre}/attn/{proj}/bias': (32,)}
    expected |= {f'{pre}/mlp/fc1/kernel': (32, 64), f'{pre}/mlp/fc1/bias': (64,),
                 f'{pre}/mlp/fc2/kernel': (64, 32), f'{pre}/mlp/fc2/bias': (32,)}
  assert names == expected
  assert all(v.dtype == jnp.float32 for v in jax.tree_util.tree_leaves(params))


# Figures of timm's vit_{small,base,large}_patch16_224 with 1000 classes. timm's pos_embed also
# has a row for the class token, which our layout folds into `cls` (see vit.py): D fewer here.
@pytest.mark.parametrize('variant, timm_count', [
    ('S/16', 22_050_664), ('B/16', 86_567_656), ('L/16', 304_326_632)])
def test_param_count_matches_timm(variant, timm_count):
  params, _, _ = _abstract(vit.Model(num_classes=1000, variant=variant), (1, 224, 224, 3))
  width = vit.decode_variant(variant)['width']
  assert _num_params(params) + width == timm_count
  gap_params, _, _ = _abstract(
      vit.Model(num_classes=1000, variant=variant, pool_type='gap'), (1, 224, 224, 3))
  assert _num_params(gap_params) == timm_count - 2 * width  # Neither cls nor its posemb.


def test_input_errors():
  model = vit.Model(num_classes=3, variant='mu/4')
  with pytest.raises(ValueError, match='not divisible by the patch size 4'):
    model.init(jax.random.key(0), np.ones((1, 10, 8, 3), np.float32))
  with pytest.raises(ValueError, match=r'\[B, H, W, C\]'):
    model.init(jax.random.key(0), np.ones((8, 8, 3), np.float32))


@pytest.mark.parametrize('field, value, error, match', [
    ('pool_type', 'map', ValueError, "'tok', 'gap'"),
    ('posemb', 'none', ValueError, "'learn', 'sincos2d'"),
])
def test_config_errors(field, value, error, match):
  model = vit.Model(num_classes=3, variant='mu/4', **{field: value})
  with pytest.raises(error, match=match):
    model.init(jax.random.key(0), np.ones((1, 8, 8, 3), np.float32))


def test_sincos2d_has_no_pos_param():
  model = vit.Model(num_classes=3, variant='mu/4', posemb='sincos2d')
  params = _random_params(model, (1, 8, 12, 3))
  _, out = jax.jit(model.apply)({'params': params}, np.ones((1, 8, 12, 3), np.float32))
  assert 'pos_embedding' not in params
  expected = out['stem'] + vit.posemb_sincos_2d(2, 3, 32)
  np.testing.assert_allclose(out['with_posemb'], expected, atol=1e-6)


def _mu_model_and_params(**kw):
  """A mu model with random (nonzero) parameters and a random 1-channel image."""
  model = vit.Model(num_classes=4, variant='mu/4', **kw)
  image = np.random.default_rng(1).normal(size=(2, 12, 8, 1)).astype(np.float32)
  return model, _random_params(model, image.shape), image


def _np_layernorm(x, p):
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + 1e-6) * p['scale'] + p['bias']


def _np_dense(x, p):
  return x @ p['kernel'] + p['bias']


def _np_block(x, p, heads):
  b, t, d = x.shape
  y = _np_layernorm(x, p['ln_attn'])
  q, k, v = (_np_dense(y, p['attn'][n]).reshape(b, t, heads, -1).transpose(0, 2, 1, 3)
             for n in ('query', 'key', 'value'))
  logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d // heads)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  y = (w / w.sum(-1, keepdims=True)) @ v
  x = x + _np_dense(y.transpose(0, 2, 1, 3).reshape(b, t, d), p['attn']['out'])
  y = _np_dense(_np_layernorm(x, p['ln_mlp']), p['mlp']['fc1'])
  y = 0.5 * y * (1 + erf(y / np.sqrt(2)))  # Exact GELU.
  return x + _np_dense(y, p['mlp']['fc2'])


def _np_vit(params, image, patch, heads, pool_type):
  """Independent float64 numpy forward of the ViT layout documented in vit.py."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  b, h, w, c = image.shape
  x = image.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  x = x.reshape(b, -1, patch * patch * c) @ p['embedding']['kernel'].reshape(-1, 32)
  x = x + p['embedding']['bias'] + p['pos_embedding']
  if pool_type == 'tok':
    x = np.concatenate([np.broadcast_to(p['cls'], (b, 1, 32)), x], axis=1)
  for i in range(2):
    x = _np_block(x, p['encoder'][f'block_{i}'], heads)
  x = _np_layernorm(x, p['encoder']['norm'])
  pre_logits = x[:, 0] if pool_type == 'tok' else x.mean(1)
  return _np_dense(pre_logits, p['head'])


@pytest.mark.parametrize('pool_type', ['tok', 'gap'])
def test_mu_forward_matches_numpy_oracle(pool_type):
  model, params, image = _mu_model_and_params(pool_type=pool_type)  # Non-square, 1 channel.
  logits, out = jax.jit(model.apply)({'params': params}, image)
  n, t = 6, 6 + (pool_type == 'tok')
  assert set(out) == OUT_KEYS
  assert out['stem'].shape == out['patch_tokens'].shape == (2, n, 32)
  assert out['encoded'].shape == (2, t, 32)
  assert logits.shape == out['logits'].shape == (2, 4) and logits.dtype == jnp.float32
  np.testing.assert_array_equal(out['patch_tokens'], out['encoded'][:, -n:])
  if pool_type == 'gap':
    np.testing.assert_allclose(out['pre_logits'], out['patch_tokens'].mean(1), atol=1e-6)
  else:
    np.testing.assert_array_equal(out['pre_logits'], out['encoded'][:, 0])
  expected = _np_vit(params, image.astype(np.float64), 4, 2, pool_type)
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_jit_deterministic_given_dropout_rng():
  model, params, image = _mu_model_and_params(dropout=0.2)
  apply = jax.jit(lambda p, x, r: model.apply({'params': p}, x, train=True,
                                              rngs={'dropout': r})[0])
  a, b = apply(params, image, jax.random.key(0)), apply(params, image, jax.random.key(0))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, apply(params, image, jax.random.key(1)))


def _loss_and_grads(model, params, image):
  loss = lambda p: jnp.mean(model.apply({'params': p}, image)[0] ** 2)
  return jax.jit(jax.value_and_grad(loss))(params)


def test_grads_finite_and_remat_equal():
  model, params, image = _mu_model_and_params()
  loss, grads = _loss_and_grads(model, params, image)
  remat_loss, remat_grads = _loss_and_grads(model.clone(remat=True), params, image)
  assert np.isfinite(loss)
  assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))
  assert all(np.any(g) for g in jax.tree_util.tree_leaves(grads))
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                         remat_grads, grads)


def test_remat_same_param_tree():
  shapes = lambda m: jax.tree_util.tree_map(lambda x: x.shape,
                                            _abstract(m, (1, 8, 8, 3))[0])
  model = vit.Model(num_classes=3, variant='mu/4')
  assert shapes(model) == shapes(model.clone(remat=True))


def test_bfloat16_compute():
  model, params, image = _mu_model_and_params(dtype=jnp.bfloat16)
  abstract_params, _, _ = _abstract(model, image.shape)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(abstract_params))
  logits, out = jax.jit(model.apply)({'params': params}, image)
  assert logits.dtype == jnp.float32
  assert out['encoded'].dtype == jnp.bfloat16
  reference = _np_vit(params, image.astype(np.float64), 4, 2, 'tok')
  np.testing.assert_allclose(logits, reference, rtol=0.05, atol=0.05)
