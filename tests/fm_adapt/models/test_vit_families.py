"""The foundation-model options of fm_adapt.models.vit (LayerScale, registers, ln_pre, QuickGELU,
fc_norm, projection, bias-free patch embedding, a stored position grid, the class token's own
position embedding) against an independent numpy forward, their parameter trees, and their
configuration errors. The reference libraries' own models are the oracle in
tests/fm_adapt/weights/test_fm_oracles.py."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import erf

from fm_adapt.models import posemb_resize
from fm_adapt.models import vit

WIDTH, HEADS = 32, 2


def _abstract_params(model, shape):
  image = jax.ShapeDtypeStruct(shape, jnp.float32)
  return jax.eval_shape(model.init, jax.random.key(0), image)['params']


def _random_params(model, shape, seed=0):
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda x: (0.3 * rng.normal(size=x.shape)).astype(np.float32),
                                _abstract_params(model, shape))


def _flat_shapes(params):
  return {'/'.join(k.key for k in path): tuple(v.shape)
          for path, v in jax.tree_util.tree_flatten_with_path(params)[0]}


def _ln(x, p, eps):
  mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * p['scale'] + p['bias']


def _dense(x, p):
  return x @ p['kernel'] + p.get('bias', 0.)


def _block(x, p, eps, act):
  b, t, d = x.shape
  ls = lambda name, y: y * p[name]['scale'] if name in p else y
  y = _ln(x, p['ln_attn'], eps)
  q, k, v = (_dense(y, p['attn'][n]).reshape(b, t, HEADS, -1).transpose(0, 2, 1, 3)
             for n in ('query', 'key', 'value'))
  logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(d // HEADS)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  y = ((w / w.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
  x = x + ls('ls_attn', _dense(y, p['attn']['out']))
  y = _dense(_ln(x, p['ln_mlp'], eps), p['mlp']['fc1'])
  y = y / (1 + np.exp(-1.702 * y)) if act == 'quick_gelu' else 0.5 * y * (1 + erf(y / np.sqrt(2)))
  return x + ls('ls_mlp', _dense(y, p['mlp']['fc2']))


def _np_vit(params, image, patch, *, pool, eps, act, fc_norm, registers):
  """float64 numpy forward of the layout documented in vit.py, with the family options."""
  p = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64), params)
  b, h, w, c = image.shape
  x = image.reshape(b, h // patch, patch, w // patch, patch, c).transpose(0, 1, 3, 2, 4, 5)
  x = x.reshape(b, -1, patch * patch * c) @ p['embedding']['kernel'].reshape(-1, WIDTH)
  x = x + p['embedding'].get('bias', 0.) + p['pos_embedding']
  n = x.shape[1]
  prefix = [p['cls'] + p.get('cls_pos_embedding', 0.)] if 'cls' in p else []
  prefix += [p['registers']] if 'registers' in p else []
  x = np.concatenate([np.broadcast_to(t, (b, t.shape[1], WIDTH)) for t in prefix] + [x], 1)
  assert x.shape[1] == n + ('cls' in p) + registers
  if 'ln_pre' in p:
    x = _ln(x, p['ln_pre'], eps)
  for i in range(2):
    x = _block(x, p['encoder'][f'block_{i}'], eps, act)
  if not fc_norm:
    x = _ln(x, p['encoder']['norm'], eps)
  pooled = x[:, 0] if pool == 'tok' else x[:, -n:].mean(1)
  if fc_norm:
    pooled = _ln(pooled, p['fc_norm'], eps)
  if 'proj' in p:
    pooled = pooled @ p['proj']['kernel']
  return x, pooled


FAMILIES = {
    'dinov2_reg': dict(layerscale=1e-5, num_registers=3),
    'mae': dict(pool_type='gap', class_token=True, class_posemb=True, fc_norm=True),
    'clip': dict(pre_norm=True, patch_bias=False, mlp_act='quick_gelu', ln_epsilon=1e-5,
                 proj_dim=8, class_posemb=True),
    'dinov2': dict(layerscale=1e-5, class_posemb=True),
    'gap_registers_no_cls': dict(pool_type='gap', num_registers=2, layerscale=0.1),
}


@pytest.mark.parametrize('family', list(FAMILIES))
def test_family_forward_matches_numpy(family):
  kw = FAMILIES[family]
  model = vit.Model(num_classes=None, variant='mu/7', **kw)
  image = np.random.default_rng(1).normal(size=(2, 14, 21, 3)).astype(np.float32)
  params = _random_params(model, image.shape)
  _, out = jax.jit(model.apply)({'params': params}, image)
  encoded, pooled = _np_vit(params, image, 7, pool=kw.get('pool_type', 'tok'),
                            eps=kw.get('ln_epsilon', 1e-6), act=kw.get('mlp_act', 'gelu'),
                            fc_norm=kw.get('fc_norm', False),
                            registers=kw.get('num_registers', 0))
  np.testing.assert_allclose(out['encoded'], encoded, atol=2e-5, rtol=1e-4)
  np.testing.assert_allclose(out['pre_logits'], pooled, atol=2e-5, rtol=1e-4)
  assert out['patch_tokens'].shape == (2, 6, WIDTH)


def test_family_param_trees():
  shapes = _flat_shapes(_abstract_params(vit.Model(None, 'mu/7', **FAMILIES['dinov2_reg']),
                                         (1, 14, 14, 3)))
  assert shapes['registers'] == (1, 3, WIDTH) and shapes['cls'] == (1, 1, WIDTH)
  assert 'cls_pos_embedding' not in shapes  # class_posemb defaults to False.
  assert shapes['encoder/block_1/ls_attn/scale'] == shapes['encoder/block_1/ls_mlp/scale'] == (
      WIDTH,)
  shapes = _flat_shapes(_abstract_params(vit.Model(None, 'mu/7', **FAMILIES['mae']),
                                         (1, 14, 14, 3)))
  assert 'cls' in shapes and 'fc_norm/scale' in shapes and 'encoder/norm/scale' not in shapes
  assert shapes['cls_pos_embedding'] == (1, 1, WIDTH)
  assert not any('/ls_' in k for k in shapes)
  shapes = _flat_shapes(_abstract_params(vit.Model(None, 'mu/7', **FAMILIES['clip']),
                                         (1, 14, 14, 3)))
  assert shapes['proj/kernel'] == (WIDTH, 8) and 'ln_pre/scale' in shapes
  assert 'embedding/bias' not in shapes and 'proj/bias' not in shapes


def test_layerscale_starts_at_its_init_value():
  model = vit.Model(None, 'mu/7', layerscale=1e-5)
  params = model.init(jax.random.key(0), jnp.zeros((1, 14, 14, 3)))['params']
  np.testing.assert_array_equal(params['encoder']['block_0']['ls_mlp']['scale'],
                                np.full(WIDTH, 1e-5, np.float32))


@pytest.mark.parametrize('method', ['dinov2', 'bicubic', 'bicubic_antialias', 'bilinear'])
def test_stored_grid_is_resized_to_the_image_grid(method):
  model = vit.Model(None, 'mu/7', posemb_grid=4, posemb_resize=method)
  params = _random_params(model, (1, 14, 21, 3))
  assert params['pos_embedding'].shape == (1, 16, WIDTH)  # The stored 4x4 grid, not 2x3.
  _, out = jax.jit(model.apply)({'params': params}, np.ones((1, 14, 21, 3), np.float32))
  expected = posemb_resize.resize(params['pos_embedding'], (4, 4), (2, 3), method)
  np.testing.assert_allclose(out['with_posemb'] - out['stem'], expected, atol=1e-6)
  _, same = jax.jit(model.apply)({'params': params}, np.ones((1, 28, 28, 3), np.float32))
  np.testing.assert_allclose(same['with_posemb'] - same['stem'], params['pos_embedding'],
                             atol=1e-6)  # Equal grids: no resize.


def _encoder_input(model, params, image):
  """The tokens entering the encoder (after the prefix tokens are put in front)."""
  seen = {}

  def capture(next_fun, args, kwargs, context):
    if context.method_name == '__call__' and context.module.path == ('encoder',):
      seen['x'] = np.asarray(args[0])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(capture):
    model.apply({'params': params}, image)
  return seen['x']


@pytest.mark.parametrize('method', ['dinov2', 'bicubic', 'bicubic_antialias'])
def test_class_position_row_is_added_to_the_class_token_and_never_resized(method):
  model = vit.Model(None, 'mu/7', posemb_grid=4, posemb_resize=method, class_posemb=True,
                    num_registers=2)
  params = _random_params(model, (1, 28, 28, 3))
  cls = params['cls'][0, 0] + params['cls_pos_embedding'][0, 0]
  for size in ((28, 28), (14, 21)):  # The stored 4x4 grid, and 2x3 (resized patch rows).
    x = _encoder_input(model, params, np.ones((1, *size, 3), np.float32))
    np.testing.assert_allclose(x[0, 0], cls, atol=1e-6)
    np.testing.assert_array_equal(x[0, 1:3], params['registers'][0])  # No position rows.


def test_dinov2_offset_differs_from_plain_bicubic():
  pos = np.random.default_rng(0).normal(size=(1, 37 * 37, 4)).astype(np.float32)
  plain = posemb_resize.resize(pos, (37, 37), (16, 16), 'bicubic')
  offset = posemb_resize.resize(pos, (37, 37), (16, 16), 'dinov2')
  assert float(jnp.abs(plain - offset).max()) > 1e-2


@pytest.mark.parametrize('kw, match', [
    (dict(pool_type='tok', class_token=False), "class_token=False"),
    (dict(mlp_act='relu'), "'gelu', 'quick_gelu'"),
    (dict(posemb_grid=4, posemb_resize='nearest'), "'bicubic', 'bicubic_antialias'"),
    (dict(num_registers=-1), 'num_registers must be >= 0'),
    (dict(posemb_grid=4, posemb='sincos2d'), "needs posemb='learn'"),
    (dict(pool_type='gap', class_posemb=True), 'class_posemb=True is the position embedding '
     'of the class token, but the model has none'),
])
def test_config_errors(kw, match):
  with pytest.raises(ValueError, match=match):
    vit.Model(None, 'mu/7', **kw).init(jax.random.key(0), jnp.zeros((1, 14, 14, 3)))
