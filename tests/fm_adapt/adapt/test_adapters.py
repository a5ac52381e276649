"""Tests of bottleneck adapters (fm_adapt.adapt.adapters) on the ViT and EfficientNet-Lite."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fm_adapt.adapt import adapters
from fm_adapt import param_paths
from fm_adapt.models import efficientnet, vit
from fm_adapt.train import model_fns

IMAGE = np.random.default_rng(1).normal(size=(2, 8, 8, 3)).astype(np.float32)


def _key(seed: int = 0) -> jax.Array:
  # unsafe_rbg compiles its sampler several times faster than threefry on CPU.
  return jax.random.key(seed, impl='unsafe_rbg')


def _random_variables(model, shape, cfg, model_name, seed=0, zero_up=True) -> dict:
  """Random variables with adapters from numpy; up-projections zero (as at init) unless not."""
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(model.init, _key(), jax.ShapeDtypeStruct(shape, jnp.float32))
  extra = jax.eval_shape(lambda p: adapters.init(p, cfg, model_name, _key()), abstract['params'])
  abstract = dict(abstract, params=param_paths.merge(abstract['params'], extra))

  def leaf(path, x):
    names = [str(getattr(p, 'key', p)) for p in path]
    if zero_up and 'up' in names:
      return np.zeros(x.shape, np.float32)
    value = (0.3 * rng.normal(size=x.shape)).astype(np.float32)
    return np.abs(value) + 0.5 if names[-1] == 'var' else value
  return jax.tree_util.tree_map_with_path(leaf, abstract)


def _strip_adapters(tree):
  return param_paths.unflatten({k: v for k, v in param_paths.flatten(tree).items() if 'adapter' not in k})


def _vit() -> vit.Model:
  return vit.Model(num_classes=3, variant='mu/4')


def _logits(model, cfg, model_name, variables, image, jit=True):
  fn = adapters.wrap_apply_fn(model_fns.make_apply_fn(model), cfg, model_name)
  run = lambda v: fn(v['params'], {k: x for k, x in v.items() if k != 'params'}, image,
                     train=False, rng=None)[0]
  return (jax.jit(run) if jit else run)(variables)


def test_bottleneck_starts_at_exactly_zero():
  x = np.random.default_rng(0).normal(size=(2, 5, 8)).astype(np.float32)
  params = adapters.init_bottleneck(_key(), 8, 4)
  assert params['down']['kernel'].shape == (8, 4) and np.any(params['down']['kernel'])
  assert params['up']['kernel'].shape == (4, 8)
  assert not np.any(params['up']['kernel']) and not np.any(params['up']['bias'])
  np.testing.assert_array_equal(adapters.bottleneck(params, x, 'gelu'), 0.0)


@pytest.mark.parametrize('where, names', [
    (('attn', 'mlp'), {'adapter_attn', 'adapter_mlp'}), (('mlp',), {'adapter_mlp'}),
    ('attn', {'adapter_attn'})])
def test_vit_param_names(where, names):
  base = jax.eval_shape(_vit().init, _key(), IMAGE)['params']
  extra = jax.eval_shape(
      lambda p: adapters.init(p, dict(mode='parallel', dim=4, where=where), 'vit', _key()), base)
  params = param_paths.merge(base, extra)
  flat = param_paths.flatten(params)
  adapted = {p for p in flat if 'adapter' in p}
  assert adapted == set(param_paths.flatten(extra)) == {
      f'encoder/block_{i}/{n}/{layer}/{leaf}' for i in range(2) for n in names
      for layer in ('down', 'up') for leaf in ('kernel', 'bias')}
  assert flat['encoder/block_1/' + sorted(names)[0] + '/down/kernel'].shape == (32, 4)
  assert flat['encoder/block_1/' + sorted(names)[0] + '/up/kernel'].shape == (4, 32)
  selected = {p for p, m in param_paths.flatten(param_paths.make_mask(params, '.*adapter.*')).items() if m}
  assert selected == adapted
  assert set(param_paths.flatten(_strip_adapters(params))) == set(param_paths.flatten(base))


@pytest.mark.parametrize('mode', adapters.MODES)
def test_vit_zero_adapters_equal_base_exactly(mode):
  cfg = dict(mode=mode, dim=4, scale=2.0)
  params = _random_variables(_vit(), IMAGE.shape, cfg, 'vit')['params']
  # Op by op (no jit): under jit the extra adapter ops can change XLA's fusion of the *base* ops,
  # which moves some logits by 1 ulp; the transform itself adds exact zeros.
  logits = _logits(_vit(), cfg, 'vit', {'params': params}, IMAGE, jit=False)
  base = _vit().apply({'params': _strip_adapters(params)}, IMAGE)[0]
  np.testing.assert_array_equal(logits, base)


def _block_oracle(params, x, scale, parallel):
  """One block with adapters written out by hand from the block's submodules."""
  block = vit.Encoder1DBlock(mlp_dim=64, num_heads=2)
  base = {'params': _strip_adapters(params)}
  ad = lambda name, h: adapters.bottleneck(params[name], h, 'gelu')
  y = block.apply(base, x, method=lambda m, x: m.attn(m.ln_attn(x)))
  x = x + y + scale * ad('adapter_attn', x if parallel else y)
  y = block.apply(base, x, method=lambda m, x: m.mlp(m.ln_mlp(x)))
  return x + y + scale * ad('adapter_mlp', x if parallel else y)


@pytest.mark.parametrize('mode', adapters.MODES)
def test_vit_matches_oracle(mode):
  cfg = dict(mode=mode, dim=4, scale=0.5)
  variables = _random_variables(_vit(), IMAGE.shape, cfg, 'vit', zero_up=False)
  params = variables['params']
  got = _logits(_vit(), cfg, 'vit', variables, IMAGE)
  _, out = _vit().apply({'params': _strip_adapters(params)}, IMAGE)
  x = out['with_posemb']
  x = np.concatenate([np.broadcast_to(params['cls'], (2, 1, 32)), x], axis=1)
  for i in range(2):
    x = _block_oracle(params['encoder'][f'block_{i}'], x, 0.5, mode == 'parallel')
  x = vit.nn.LayerNorm(epsilon=1e-6).apply({'params': params['encoder']['norm']}, x)
  expected = x[:, 0] @ params['head']['kernel'] + params['head']['bias']
  np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
  assert np.abs(got - _vit().apply({'params': _strip_adapters(params)}, IMAGE)[0]).max() > 1e-3


def test_vit_adapter_reads_the_branch_output_after_its_dropout():
  """Sequential adapters act on the dropped-out branch output (Houlsby; AdaptFormer)."""
  cfg = dict(mode='sequential', dim=4)
  model = vit.Model(num_classes=3, variant='mu/4', dropout=0.5)
  params = _random_variables(model, IMAGE.shape, cfg, 'vit', zero_up=False)['params']
  found = {('attn', 'encoder/block_0'): params['encoder']['block_0']['adapter_attn']}
  outputs = {}

  def spy(name):
    def intercept(next_fun, args, kwargs, context):
      y = next_fun(*args, **kwargs)
      if context.module.path == ('encoder', 'block_0', 'drop_attn'):
        outputs[name] = y
      return y
    return intercept

  with vit.nn.intercept_methods(spy('adapted')), adapters.intercept(found, cfg, 'vit'), \
      vit.nn.intercept_methods(spy('dropped')):
    model.apply({'params': _strip_adapters(params)}, IMAGE, train=True,
                rngs={'dropout': jax.random.key(0)})
  dropped = outputs['dropped']
  assert 0.3 < float(jnp.mean(dropped == 0)) < 0.7  # Dropout acted on the branch output.
  np.testing.assert_allclose(outputs['adapted'],
                             dropped + adapters.bottleneck(found[('attn', 'encoder/block_0')],
                                                           dropped, 'gelu'), atol=1e-6)


@pytest.mark.parametrize('cfg, model_name, match', [
    (dict(mode='serial', dim=4), 'vit', r"'sequential', 'parallel'"),
    (dict(mode='parallel'), 'vit', "exactly one of 'dim' or 'reduction'"),
    (dict(dim=8, reduction=4), 'efficientnet', "exactly one of 'dim' or 'reduction'"),
    (dict(mode='parallel', dim=4, where=('ffn',)), 'vit', r"\['attn', 'mlp'\]"),
    (dict(mode='parallel', dim=4, size=3), 'vit', r"\['size'\].*valid keys"),
    (dict(mode='parallel', dim=4, act='tanh'), 'vit', 'gelu'),
    (dict(dim=0), 'vit', 'dim must be a positive int'),
    (dict(mode='parallel', dim=8), 'efficientnet', r"\['block'\] .* mode='sequential'"),
    (dict(dim=8), 'resnet', r"no placement for model 'resnet'.*\['efficientnet', 'vit'\]"),
])
def test_adapter_config_errors(cfg, model_name, match):
  with pytest.raises(ValueError, match=match):
    adapters.check_config(cfg, model_name)


def test_efficientnet_param_names_and_widths():
  image = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  base = jax.eval_shape(efficientnet.Model(num_classes=4).init, _key(), image)['params']
  init = lambda cfg: jax.eval_shape(lambda p: adapters.init(p, cfg, 'efficientnet', _key()),
                                    base)
  params = init(dict(dim=8, blocks=(0, -1)))
  assert sorted(param_paths.flatten(params)) == [f'block_{i}/adapter/{layer}/{leaf}' for i in (0, 15)
                                           for layer in ('down', 'up')
                                           for leaf in ('bias', 'kernel')]
  assert params['block_0']['adapter']['down']['kernel'].shape == (16, 8)
  assert params['block_15']['adapter']['up']['kernel'].shape == (8, 320)
  params = init(dict(reduction=4))
  assert all('adapter' in params[f'block_{i}'] for i in range(16))
  assert params['block_3']['adapter']['down']['kernel'].shape == (40, 10)
  with pytest.raises(ValueError, match=r'\[16\] out of range for 16 blocks'):
    init(dict(dim=8, blocks=(16,)))
  with pytest.raises(ValueError, match=r"params already hold adapters \['block_0/adapter'\]"):
    adapters.init(param_paths.merge(base, params), dict(dim=8, blocks=(0,)), 'efficientnet', _key())


def test_efficientnet_zero_adapters_equal_base_exactly(monkeypatch):
  # A 3-block variant runs the same MBConv code as lite0 and compiles in a fraction of the time.
  spec = efficientnet.BlockSpec
  monkeypatch.setitem(efficientnet.VARIANTS, 'tiny', (
      8, (spec(8, 8, 3, 1, 1), spec(8, 16, 3, 2, 6), spec(16, 16, 3, 1, 6)), 32))
  image = np.random.default_rng(4).normal(size=(2, 16, 16, 3)).astype(np.float32)
  model, cfg = efficientnet.Model(num_classes=4, variant='tiny'), dict(dim=4, blocks=(0, 2))
  variables = _random_variables(model, image.shape, cfg, 'efficientnet')
  assert {p for p in param_paths.flatten(variables['params']) if 'adapter' in p} == {
      f'block_{i}/adapter/{layer}/{leaf}' for i in (0, 2) for layer in ('down', 'up')
      for leaf in ('kernel', 'bias')}
  logits = _logits(model, cfg, 'efficientnet', variables, image)
  base_variables = dict(variables, params=_strip_adapters(variables['params']))
  base = jax.jit(model.apply)(base_variables, image)[0]
  np.testing.assert_array_equal(logits, base)
  variables = _random_variables(model, image.shape, cfg, 'efficientnet', zero_up=False)
  assert np.abs(_logits(model, cfg, 'efficientnet', variables, image) - base).max() > 1e-3


def test_missing_adapter_params_or_site_calls_fail_clearly():
  cfg = dict(mode='sequential', dim=4)
  fn = adapters.wrap_apply_fn(model_fns.make_apply_fn(_vit()), cfg, 'vit')
  base = _random_variables(_vit(), IMAGE.shape, cfg, 'vit')['params']
  with pytest.raises(ValueError, match='found no adapter parameters'):
    fn(_strip_adapters(base), {}, IMAGE, train=False, rng=None)
  extra = {'encoder': {'block_7': {'adapter_attn': base['encoder']['block_0']['adapter_attn']}}}
  with pytest.raises(ValueError, match=r"\['encoder/block_7/adapter_attn'\] found no call"):
    fn(param_paths.merge(base, extra), {}, IMAGE, train=False, rng=None)
