"""Tests of bottleneck adapters (fm_adapt.adapt.adapters) in the ViT and EfficientNet-Lite."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fm_adapt.adapt import adapters, masks
from fm_adapt.models import efficientnet, vit

IMAGE = np.random.default_rng(1).normal(size=(2, 8, 8, 3)).astype(np.float32)


def _key(seed: int = 0) -> jax.Array:
  # unsafe_rbg compiles its sampler several times faster than threefry on CPU.
  return jax.random.key(seed, impl='unsafe_rbg')


def _random_variables(model, shape, seed=0, zero_up=True) -> dict:
  """Random variables from numpy; adapter up-projections zero (as at init) unless zero_up=False."""
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(model.init, _key(), jax.ShapeDtypeStruct(shape, jnp.float32))

  def leaf(path, x):
    names = [str(getattr(p, 'key', p)) for p in path]
    if zero_up and 'up' in names:
      return np.zeros(x.shape, np.float32)
    value = (0.3 * rng.normal(size=x.shape)).astype(np.float32)
    return np.abs(value) + 0.5 if names[-1] == 'var' else value
  return jax.tree_util.tree_map_with_path(leaf, abstract)


def _strip_adapters(tree):
  return masks.unflatten({k: v for k, v in masks.flatten(tree).items() if 'adapter' not in k})


def _vit(adapter=None) -> vit.Model:
  return vit.Model(num_classes=3, variant='mu/4', adapter=adapter)


def test_bottleneck_starts_at_exactly_zero():
  x = np.random.default_rng(0).normal(size=(2, 5, 8)).astype(np.float32)
  variables = adapters.Bottleneck(4).init(_key(), x)
  params = variables['params']
  assert params['down']['kernel'].shape == (8, 4) and np.any(params['down']['kernel'])
  assert params['up']['kernel'].shape == (4, 8)
  assert not np.any(params['up']['kernel']) and not np.any(params['up']['bias'])
  np.testing.assert_array_equal(adapters.Bottleneck(4).apply(variables, x), 0.0)


@pytest.mark.parametrize('where, names', [
    (('attn', 'mlp'), {'adapter_attn', 'adapter_mlp'}), (('mlp',), {'adapter_mlp'}),
    ('attn', {'adapter_attn'})])
def test_vit_param_names(where, names):
  model = _vit(dict(kind='parallel', dim=4, where=where))
  params = jax.eval_shape(model.init, _key(), IMAGE)['params']
  flat = masks.flatten(params)
  adapted = {p for p in flat if 'adapter' in p}
  assert adapted == {f'encoder/block_{i}/{n}/{layer}/{leaf}' for i in range(2) for n in names
                     for layer in ('down', 'up') for leaf in ('kernel', 'bias')}
  assert flat['encoder/block_1/' + sorted(names)[0] + '/down/kernel'].shape == (32, 4)
  assert flat['encoder/block_1/' + sorted(names)[0] + '/up/kernel'].shape == (4, 32)
  selected = {p for p, m in masks.flatten(masks.make_mask(params, '.*adapter.*')).items() if m}
  assert selected == adapted
  assert set(masks.flatten(_strip_adapters(params))) == set(
      masks.flatten(jax.eval_shape(_vit().init, _key(), IMAGE)['params']))


@pytest.mark.parametrize('kind', adapters.VIT_KINDS)
def test_vit_zero_adapters_equal_base_exactly(kind):
  model = _vit(dict(kind=kind, dim=4, scale=2.0))
  params = _random_variables(model, IMAGE.shape)['params']
  # Op by op (no jit): under jit the extra adapter ops can change XLA's fusion of the *base* ops,
  # which moves some logits by 1 ulp; the transform itself adds exact zeros.
  logits = model.apply({'params': params}, IMAGE)[0]
  base = _vit().apply({'params': _strip_adapters(params)}, IMAGE)[0]
  np.testing.assert_array_equal(logits, base)


@jax.jit
def _block_oracle(params, x, scale, parallel):
  """One block with adapters written out from the block's branch methods."""
  block = vit.Encoder1DBlock(mlp_dim=64, num_heads=2)
  base = {'params': _strip_adapters(params)}
  ad = lambda name, h: adapters.Bottleneck(4).apply({'params': params[name]}, h)
  y = block.apply(base, x, True, method='attn_branch')
  x = x + y + scale * ad('adapter_attn', jnp.where(parallel, x, y))
  y = block.apply(base, x, True, method='mlp_branch')
  return x + y + scale * ad('adapter_mlp', jnp.where(parallel, x, y))


@pytest.mark.parametrize('kind', adapters.VIT_KINDS)
def test_vit_block_matches_oracle(kind):
  model = vit.Encoder1DBlock(mlp_dim=64, num_heads=2,
                             adapter=adapters.check_vit_config(dict(kind=kind, dim=4,
                                                                    scale=0.5)))
  x = np.random.default_rng(2).normal(size=(2, 5, 32)).astype(np.float32)
  params = _random_variables(model, x.shape, zero_up=False)['params']
  got = jax.jit(model.apply)({'params': params}, x)
  np.testing.assert_allclose(got, _block_oracle(params, x, 0.5, kind == 'parallel'), atol=1e-5)
  assert np.abs(got - jax.jit(vit.Encoder1DBlock(64, 2).apply)(
      {'params': _strip_adapters(params)}, x)).max() > 1e-3


@pytest.mark.parametrize('adapter, match', [
    (dict(kind='serial', dim=4), r"'sequential', 'parallel'"),
    (dict(kind='parallel'), 'dim must be a positive int'),
    (dict(kind='parallel', dim=4, where=('ffn',)), r"\['attn', 'mlp'\]"),
    (dict(kind='parallel', dim=4, size=3), r"\['size'\].*valid keys"),
    (dict(kind='parallel', dim=4, act='tanh'), 'gelu'),
])
def test_vit_adapter_errors(adapter, match):
  with pytest.raises(ValueError, match=match):
    jax.eval_shape(_vit(adapter).init, _key(), IMAGE)


def test_efficientnet_param_names_and_widths():
  model = efficientnet.Model(num_classes=4, adapter=dict(dim=8, blocks=(0, -1)))
  params = jax.eval_shape(model.init, _key(),
                          jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))['params']
  adapted = sorted(p for p in masks.flatten(params) if 'adapter' in p)
  assert adapted == [f'block_{i}/adapter/{layer}/{leaf}' for i in (0, 15)
                     for layer in ('down', 'up') for leaf in ('bias', 'kernel')]
  assert params['block_0']['adapter']['down']['kernel'].shape == (16, 8)
  assert params['block_15']['adapter']['up']['kernel'].shape == (8, 320)
  reduced = efficientnet.Model(num_classes=4, adapter=dict(reduction=4))
  params = jax.eval_shape(reduced.init, _key(),
                          jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))['params']
  assert all('adapter' in params[f'block_{i}'] for i in range(16))
  assert params['block_3']['adapter']['down']['kernel'].shape == (40, 10)


def test_efficientnet_zero_adapters_equal_base_exactly(monkeypatch):
  # A 3-block variant runs the same MBConv code as lite0 and compiles in a fraction of the time.
  spec = efficientnet.BlockSpec
  monkeypatch.setitem(efficientnet.VARIANTS, 'tiny', (
      8, (spec(8, 8, 3, 1, 1), spec(8, 16, 3, 2, 6), spec(16, 16, 3, 1, 6)), 32))
  image = np.random.default_rng(4).normal(size=(2, 16, 16, 3)).astype(np.float32)
  model = efficientnet.Model(num_classes=4, variant='tiny', adapter=dict(dim=4, blocks=(0, 2)))
  variables = _random_variables(model, image.shape)
  assert {p for p in masks.flatten(variables['params']) if 'adapter' in p} == {
      f'block_{i}/adapter/{layer}/{leaf}' for i in (0, 2) for layer in ('down', 'up')
      for leaf in ('kernel', 'bias')}
  logits = jax.jit(model.apply)(variables, image)[0]
  base_variables = dict(variables, params=_strip_adapters(variables['params']))
  base = jax.jit(efficientnet.Model(num_classes=4, variant='tiny').apply)(base_variables,
                                                                          image)[0]
  np.testing.assert_array_equal(logits, base)
  variables = _random_variables(model, image.shape, zero_up=False)
  assert np.abs(jax.jit(model.apply)(variables, image)[0] - base).max() > 1e-3


@pytest.mark.parametrize('adapter, match', [
    (dict(dim=8, reduction=4), "exactly one of 'dim' or 'reduction'"),
    (dict(), "exactly one of 'dim' or 'reduction'"),
    (dict(dim=8, blocks=(16,)), r'\[16\] out of range for 16 blocks'),
    (dict(dim=8, kind='parallel'), r"\['kind'\].*valid keys"),
])
def test_efficientnet_adapter_errors(adapter, match):
  with pytest.raises(ValueError, match=match):
    efficientnet.Model(num_classes=4, adapter=adapter)
