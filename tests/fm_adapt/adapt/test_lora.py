"""Tests of fm_adapt.adapt.lora: init, exact zero-init, merge, CNN kernels, counts, flops."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fm_adapt.adapt import lora
from fm_adapt import param_paths
from fm_adapt.models import efficientnet, vit
from fm_adapt.train import model_fns, optim, state as state_lib, step as step_lib

QV = '.*attn/(query|value)/kernel'
IMAGE = np.random.default_rng(1).normal(size=(2, 8, 8, 3)).astype(np.float32)


def _key(seed: int = 0) -> jax.Array:
  # unsafe_rbg compiles its sampler several times faster than threefry on CPU; any key works.
  return jax.random.key(seed, impl='unsafe_rbg')


def _random_variables(model: nn.Module, shape: tuple[int, ...], seed: int = 0) -> dict:
  """Random nonzero variables of the right shapes from numpy (no init compile)."""
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(model.init, _key(), jax.ShapeDtypeStruct(shape, jnp.float32))

  def leaf(path, x):
    value = (0.3 * rng.normal(size=x.shape)).astype(np.float32)
    return np.abs(value) + 0.5 if path[-1].key == 'var' else value
  return jax.tree_util.tree_map_with_path(leaf, abstract)


def _mu_vit():
  model = vit.Model(num_classes=3, variant='mu/4')
  return model, _random_variables(model, IMAGE.shape)['params']


def _logits_fn(model, scale):
  """jitted (params with an optional 'lora' subtree, model_state) -> logits."""
  apply = lora.wrap_apply_fn(model_fns.make_apply_fn(model), scale=scale)
  return jax.jit(lambda p, s, x: apply(p, s, x, train=False, rng=None)[0])


def _randomize_b(tree, seed=2):
  rng = np.random.default_rng(seed)
  return param_paths.unflatten({
      k: (0.2 * rng.normal(size=v.shape)).astype(np.float32) if k.endswith('lora_b') else v
      for k, v in param_paths.flatten(tree).items()})


def test_init_shapes_one_key_per_leaf_and_zero_b():
  _, params = _mu_vit()
  tree = lora.init(params, param_paths.make_mask(params, QV), 4, _key())
  flat = param_paths.flatten(tree)
  assert set(flat) == {f'encoder/block_{i}/attn/{p}/{f}' for i in range(2)
                       for p in ('query', 'value') for f in ('lora_a', 'lora_b')}
  a_leaves = [np.asarray(v) for k, v in sorted(flat.items()) if k.endswith('lora_a')]
  assert all(a.shape == (32, 4) for a in a_leaves)
  assert all(np.abs(a).max() <= 1 / np.sqrt(32) for a in a_leaves)  # PEFT's kaiming-uniform.
  # One split key per leaf: no two A matrices share a key (or any value pattern).
  assert len({a.tobytes() for a in a_leaves}) == len(a_leaves)
  for k, v in flat.items():
    if k.endswith('lora_b'):
      assert v.shape == (4, 32) and not np.any(v)
  again = lora.init(params, param_paths.make_mask(params, QV), 4, _key())
  jax.tree.map(np.testing.assert_array_equal, tree, again)
  assert lora.num_params(tree) == 2 * 2 * (32 * 4 + 4 * 32)


@pytest.mark.parametrize('pattern, match', [
    ('encoder/block_0/attn/query/bias', r"kernels.*'encoder/block_0/attn/query/bias'"),
    ('embedding/kernel', r"'embedding/kernel' has shape \(4, 4, 3, 32\)"),
])
def test_init_rejects_other_leaves(pattern, match):
  _, params = _mu_vit()
  with pytest.raises(ValueError, match=match):
    lora.init(params, param_paths.make_mask(params, pattern), 4, _key())


def test_init_and_scaling_errors():
  _, params = _mu_vit()
  with pytest.raises(ValueError, match='positive int'):
    lora.init(params, param_paths.make_mask(params, QV), 0, _key())
  with pytest.raises(ValueError, match='selects no parameter'):
    lora.init(params, jax.tree.map(lambda _: False, params), 4, _key())
  assert lora.scaling(8, 16) == 2.0 and lora.scaling(4) == 1.0
  assert lora.scaling(16, 8, rslora=True) == 2.0


def test_zero_init_equals_base_exactly_and_merge_matches():
  model, params = _mu_vit()
  logits = _logits_fn(model, scale=2.0)
  tree = lora.init(params, param_paths.make_mask(params, QV), 4, _key())
  base = logits(params, {}, IMAGE)
  # Exactly equal, also op by op (under jit, extra ops could re-fuse base ops to within 1 ulp).
  np.testing.assert_array_equal(logits(dict(params, lora=tree), {}, IMAGE), base)
  eager = lora.wrap_apply_fn(model_fns.make_apply_fn(model), scale=2.0)
  np.testing.assert_array_equal(eager(dict(params, lora=tree), {}, IMAGE, train=False, rng=None)[0],
                                model.apply({'params': params}, IMAGE)[0])
  trained = _randomize_b(tree)
  unmerged = logits(dict(params, lora=trained), {}, IMAGE)
  assert np.abs(unmerged - base).max() > 1e-2
  merged = logits(lora.merge(params, trained, scale=2.0), {}, IMAGE)
  np.testing.assert_allclose(merged, unmerged, atol=1e-5, rtol=1e-5)  # float32 reassociation.
  assert 'lora' not in lora.merge(dict(params, lora=trained), trained, scale=2.0)


def test_remat_model_same_lora_output():
  model, params = _mu_vit()
  tree = _randomize_b(lora.init(params, param_paths.make_mask(params, QV), 2, _key()))
  full = dict(params, lora=tree)
  np.testing.assert_allclose(_logits_fn(model.clone(remat=True), 1.0)(full, {}, IMAGE),
                             _logits_fn(model, 1.0)(full, {}, IMAGE), atol=1e-6)


def test_dora_init_merge_and_grads():
  model, params = _mu_vit()
  logits = _logits_fn(model, scale=1.0)
  tree = lora.init(params, param_paths.make_mask(params, QV), 4, _key(), dora=True)
  query = params['encoder']['block_0']['attn']['query']['kernel']
  np.testing.assert_allclose(tree['encoder']['block_0']['attn']['query']['m'],
                             np.linalg.norm(query, axis=0), rtol=1e-6)
  base = logits(params, {}, IMAGE)
  # DoRA forms W' = m (W + sAB) / ||W + sAB|| = W up to rounding at init.
  np.testing.assert_allclose(logits(dict(params, lora=tree), {}, IMAGE), base, atol=1e-5)
  trained = _randomize_b(tree)
  unmerged = logits(dict(params, lora=trained), {}, IMAGE)
  merged = logits(lora.merge(params, trained, scale=1.0), {}, IMAGE)
  np.testing.assert_allclose(merged, unmerged, atol=1e-5, rtol=1e-5)
  apply = lora.wrap_apply_fn(model_fns.make_apply_fn(model), scale=1.0)
  grads = jax.jit(jax.grad(lambda t: apply(dict(params, lora=t), {}, IMAGE, train=False,
                                           rng=None)[0].sum()))(trained)
  assert all(np.any(g) for g in jax.tree.leaves(grads))


class _DenseNet(nn.Module):
  """One Dense layer: y = x @ W + b."""

  @nn.compact
  def __call__(self, x, *, train=False):
    return nn.Dense(5, name='proj')(x), {}


def test_dora_gradients_treat_the_column_norm_as_a_constant():
  """dL/dA, dL/dB, dL/dm by hand with ||W + sAB|| detached (DoRA paper Sec. 4.3, PEFT)."""
  rng = np.random.default_rng(7)
  x, g = rng.normal(size=(3, 4)), rng.normal(size=(3, 5))
  params = {'proj': {'kernel': rng.normal(size=(4, 5)), 'bias': rng.normal(size=5)}}
  tree = {'proj': {'lora_a': rng.normal(size=(4, 2)), 'lora_b': rng.normal(size=(2, 5)),
                   'm': rng.uniform(0.5, 2.0, size=5)}}
  params, tree = jax.tree.map(lambda a: np.asarray(a, np.float32), (params, tree))
  s = 0.5
  apply = lora.wrap_apply_fn(model_fns.make_apply_fn(_DenseNet()), scale=s)
  loss = lambda t: jnp.sum(apply(dict(params, lora=t), {}, x.astype(np.float32), train=False,
                                 rng=None)[0] * g)
  grads = jax.grad(loss)(tree)['proj']
  a, b, m = (np.float64(tree['proj'][k]) for k in ('lora_a', 'lora_b', 'm'))
  v = params['proj']['kernel'] + s * a @ b            # W + sAB
  norm = np.linalg.norm(v, axis=0)                    # a constant in the backward pass
  d_weight = x.T @ g                                  # dL/dW', W' = m * V / norm
  d_v = d_weight * (m / norm)
  np.testing.assert_allclose(grads['lora_a'], s * d_v @ b.T, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(grads['lora_b'], s * a.T @ d_v, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(grads['m'], (d_weight * v / norm).sum(0), rtol=1e-4, atol=1e-5)
  # With the norm differentiated, dL/dV would have the extra term below; it is not zero here.
  extra = -(m / norm) * v * (d_weight * v).sum(0) / norm**2
  assert np.abs(s * extra @ b.T).max() > 1e-2


class _PaddedNet(nn.Module):
  """A 1x1 conv with explicit padding: its output is larger than its input."""

  @nn.compact
  def __call__(self, x, *, train=False):
    return nn.Conv(6, (1, 1), padding=1, name='proj')(x).mean((1, 2)), {}


@pytest.mark.parametrize('dora', [False, True])
def test_lora_and_dora_refuse_a_padded_1x1_conv(dora):
  model = _PaddedNet()
  image = np.random.default_rng(3).normal(size=(2, 5, 5, 4)).astype(np.float32)
  params = _random_variables(model, image.shape)['params']
  tree = lora.init(params, param_paths.make_mask(params, 'proj/kernel'), 2, _key(), dora=dora)
  what = 'DoRA output' if dora else 'LoRA branch'
  with pytest.raises(ValueError, match=rf"{what} of 'proj' has shape \(2, 5, 5, 6\) but the "
                                       r'layer output has \(2, 7, 7, 6\)'):
    _logits_fn(model, 1.0)(dict(params, lora=tree), {}, image)


@pytest.mark.parametrize('dora', [False, True])
def test_lora_and_dora_check_the_kernel_and_factor_shapes(dora):
  model = efficientnet.Model(num_classes=4, dropout=0.0)
  image = np.zeros((1, 32, 32, 3), np.float32)
  variables = _random_variables(model, image.shape)
  params, state = variables['params'], {'batch_stats': variables['batch_stats']}
  factors = lambda d_in, d_out: dict(lora_a=np.zeros((d_in, 2), np.float32),
                                     lora_b=np.zeros((2, d_out), np.float32),
                                     **({'m': np.ones(d_out, np.float32)} if dora else {}))
  depthwise = {'block_1': {'dw_conv': factors(96, 96)}}  # A 3x3 kernel: LoRA cannot adapt it.
  with pytest.raises(ValueError, match=r"'block_1/dw_conv/kernel' has shape \(3, 3, 1, 96\)"):
    _logits_fn(model, 1.0)(dict(params, lora=depthwise), state, image)
  wrong = {'head': factors(1280, 3)}  # The head has 4 classes.
  with pytest.raises(ValueError, match=r"'head' has lora_a \(1280, 2\), lora_b \(2, 3\).*"
                                       r'\[1280, 4\]'):
    _logits_fn(model, 1.0)(dict(params, lora=wrong), state, image)


class _StridedNet(nn.Module):
  """A 1x1 stride-2 conv (like ResNet's projection shortcut) and a Dense head."""

  @nn.compact
  def __call__(self, x, *, train=False):
    x = nn.Conv(6, (1, 1), strides=(2, 2), name='proj')(x)
    return nn.Dense(3, name='head')(x.mean((1, 2))), {}


def test_strided_1x1_conv_merge_matches():
  model = _StridedNet()
  image = np.random.default_rng(3).normal(size=(2, 7, 9, 4)).astype(np.float32)
  params = _random_variables(model, image.shape)['params']
  tree = _randomize_b(lora.init(params, param_paths.make_mask(params, '.*kernel'), 2,
                                _key()))
  assert tree['proj']['lora_a'].shape == (4, 2) and tree['proj']['lora_b'].shape == (2, 6)
  logits = _logits_fn(model, scale=0.5)
  np.testing.assert_allclose(logits(lora.merge(params, tree, scale=0.5), {}, image),
                             logits(dict(params, lora=tree), {}, image), atol=1e-5)


def test_efficientnet_1x1_convs_and_head():
  model = efficientnet.Model(num_classes=4, dropout=0.0)
  image = np.random.default_rng(4).normal(size=(2, 32, 32, 3)).astype(np.float32)
  variables = _random_variables(model, image.shape)
  params, state = variables['params'], {'batch_stats': variables['batch_stats']}
  # A few layers of each kind: every new kernel shape costs a sampler compile in init.
  targets = ['block_(3|15)/(expand|project)_conv/kernel', 'head_conv/kernel', 'head/kernel']
  tree = lora.init(params, param_paths.make_mask(params, targets), 4, _key())
  assert tree['block_3']['expand_conv']['lora_a'].shape == (24, 4)
  assert tree['block_3']['expand_conv']['lora_b'].shape == (4, 144)
  assert tree['head']['lora_b'].shape == (4, 4)
  logits = _logits_fn(model, scale=2.0)
  base = logits(params, state, image)
  np.testing.assert_array_equal(logits(dict(params, lora=tree), state, image), base)
  trained = _randomize_b(tree)
  unmerged = logits(dict(params, lora=trained), state, image)
  assert np.abs(unmerged - base).max() > 1e-3
  merged = logits(lora.merge(params, trained, scale=2.0), state, image)
  # Logits reach |20| after 16 random blocks: 1e-4 absolute is ~5 float32 ulps of that scale.
  np.testing.assert_allclose(merged, unmerged, rtol=1e-5, atol=1e-4)
  with pytest.raises(ValueError, match=r"'block_1/dw_conv/kernel' has shape \(3, 3, 1, 96\)"):
    lora.init(params, param_paths.make_mask(params, 'block_1/dw_conv/kernel'), 4, _key())


def test_unused_lora_entry_is_an_error():
  model, params = _mu_vit()
  tree = lora.init(params, param_paths.make_mask(params, QV), 4, _key())
  tree['encoder']['block_9'] = tree['encoder']['block_0']
  with pytest.raises(ValueError, match="'encoder/block_9/attn/query'.*matched no"):
    _logits_fn(model, scale=1.0)(dict(params, lora=tree), {}, IMAGE)


def test_vit_b16_qv_rank4_count():
  model = vit.Model(num_classes=1000, variant='B/16')
  params = jax.eval_shape(model.init, _key(),
                          jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))['params']
  tree = jax.eval_shape(lambda p: lora.init(p, param_paths.make_mask(p, QV), 4, _key()),
                        params)
  assert lora.num_params(tree) == 147_456 == 12 * 2 * (768 * 4 + 4 * 768)


def _update_flops(model, params, schedule, apply_fn) -> float:
  """Flops of the compiled `step.make_update_fn` update for a schedule (abstract inputs)."""
  config = ml_collections.ConfigDict(dict(lr=0.1, optax_name='adam', optax={}, wd=0.0,
                                          grad_clip_norm=None, schedule=schedule))
  trainable, frozen, model_state = state_lib.split_variables(
      {'params': params}, optim.trainable_mask(params, schedule))
  tx, schedules = optim.make_optimizer(config, trainable, total_steps=10)
  loss_fn = lambda logits, labels, mask: optax.softmax_cross_entropy_with_integer_labels(
      logits, labels).mean()
  update = step_lib.make_update_fn(apply_fn, loss_fn, tx, schedules[0])
  state = dict(params=trainable, frozen=frozen, model_state=model_state,
               opt=jax.eval_shape(tx.init, trainable), step=jax.ShapeDtypeStruct((), jnp.int32))
  batch = dict(image=jax.ShapeDtypeStruct((8, 16, 16, 3), jnp.float32),
               label=jax.ShapeDtypeStruct((8,), jnp.int32), mask=jax.ShapeDtypeStruct((8,), bool))
  compiled = jax.jit(update).lower(state, jax.random.key(0), batch).compile()
  return compiled.cost_analysis()['flops']


def test_lora_step_costs_fewer_flops_than_full_finetuning():
  model = vit.Model(num_classes=5, variant='mu/4')
  params = jax.eval_shape(model.init, _key(),
                          jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32))['params']
  apply = model_fns.make_apply_fn(model)
  full = _update_flops(model, params, [('.*', {})], apply)
  with_lora = jax.eval_shape(
      lambda p: dict(p, lora=lora.init(p, param_paths.make_mask(p, QV), 4, _key())), params)
  low = _update_flops(model, with_lora, [('lora/.*|head/.*', {}), ('.*', None)],
                      lora.wrap_apply_fn(apply, scale=1.0))
  # Measured on this CPU (mu/4, 16 px, batch 8): full 18.5 MFLOP, LoRA 12.9 MFLOP, ratio 0.70.
  # The forward and the input-gradient backward remain; the weight-gradient third is gone,
  # because the frozen kernels are never differentiated and W + sAB is never formed.
  # (ViT-Ti/16 at 32 px gives 0.63.)
  assert low < 0.8 * full, (low, full)
