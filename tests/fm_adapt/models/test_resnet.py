"""Tests of fm_adapt.models.resnet: shapes, torchvision layout, BatchNorm, a PyTorch oracle."""
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fm_adapt.models import resnet


def _abstract(model: resnet.Model, shape: tuple[int, ...]):
  """eval_shape of init_with_output: (variable shapes, logits shape, out shapes)."""
  image = jax.ShapeDtypeStruct(shape, jnp.float32)
  (logits, out), variables = jax.eval_shape(model.init_with_output, jax.random.key(0), image)
  return variables, logits, out


def _random_variables(model: resnet.Model, shape: tuple[int, ...], seed: int = 0):
  """Random params and running statistics (variances positive), without running `init`."""
  rng = np.random.default_rng(seed)
  variables, _, _ = _abstract(model, shape)
  draw = lambda path, x: (np.abs(rng.normal(size=x.shape)) + 0.5 if path[-1].key == 'var'
                          else 0.3 * rng.normal(size=x.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(draw, variables)


def _num_params(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


# torchvision.models.resnet{18,34,50}(num_classes=1000), BN running statistics not counted.
@pytest.mark.parametrize('depth, count', [(18, 11_689_512), (34, 21_797_672),
                                          (50, 25_557_032)])
def test_param_count_matches_torchvision(depth, count):
  model = resnet.Model(num_classes=1000, depth=depth, stem='imagenet')
  variables, logits, out = _abstract(model, (1, 224, 224, 3))
  assert _num_params(variables['params']) == count
  assert logits.shape == (1, 1000)
  assert out['features'].shape == (1, 7, 7, 512 if depth < 50 else 2048)


@pytest.mark.parametrize('depth, stem, size, spatial', [
    (18, 'cifar', 28, 4), (34, 'cifar', 28, 4), (50, 'cifar', 32, 4),
    (18, 'imagenet', 64, 2), (50, 'imagenet', 224, 7)])
def test_shapes(depth, stem, size, spatial):
  model = resnet.Model(num_classes=9, depth=depth, stem=stem, width=8)
  variables, logits, out = _abstract(model, (2, size, size, 1))
  features = 64 if depth < 50 else 256
  assert set(out) == {'features', 'pre_logits', 'logits'}
  assert out['features'].shape == (2, spatial, spatial, features)
  assert out['pre_logits'].shape == (2, features)
  assert logits.shape == out['logits'].shape == (2, 9)
  assert set(variables) == {'params', 'batch_stats'}


def _names(tree) -> set[str]:
  return {'/'.join(k) for k in flax.traverse_util.flatten_dict(tree)}


def test_param_names():
  params = _abstract(resnet.Model(num_classes=3, width=4), (1, 16, 16, 3))[0]['params']
  names = _names(params)
  assert {'stem/conv/kernel', 'stem/bn/scale', 'stem/bn/bias', 'head/kernel',
          'head/bias'} <= names
  assert _names(params['stage_0']['block_0']) == {
      f'{m}/{p}' for m, p in [('conv1', 'kernel'), ('conv2', 'kernel'), ('bn1', 'scale'),
                              ('bn1', 'bias'), ('bn2', 'scale'), ('bn2', 'bias')]}
  assert set(params['stage_1']['block_0']) == {'conv1', 'bn1', 'conv2', 'bn2', 'proj_conv',
                                               'proj_bn'}
  assert set(params) == {'stem', 'stage_0', 'stage_1', 'stage_2', 'stage_3', 'head'}
  assert [set(params[f'stage_{s}']) for s in range(4)] == [{'block_0', 'block_1'}] * 4
  params = _abstract(resnet.Model(num_classes=3, depth=50, width=4), (1, 16, 16, 3))[0]['params']
  assert set(params['stage_0']['block_0']) == {'conv1', 'bn1', 'conv2', 'bn2', 'conv3', 'bn3',
                                               'proj_conv', 'proj_bn'}
  assert params['stage_3']['block_2']['conv2']['kernel'].shape == (3, 3, 32, 32)


def test_no_head():
  model = resnet.Model(num_classes=0, width=4)
  variables, logits, out = _abstract(model, (2, 16, 16, 3))
  assert 'head' not in variables['params'] and logits.shape == (2, 32)


@pytest.mark.parametrize('kwargs, match', [
    (dict(depth=101), r'\[18, 34, 50\]'), (dict(stem='tiny'), "'cifar', 'imagenet'")])
def test_config_errors(kwargs, match):
  with pytest.raises(ValueError, match=match):
    _abstract(resnet.Model(num_classes=3, **kwargs), (1, 16, 16, 3))


def test_init_values():
  model = resnet.Model(num_classes=3, width=4, zero_init_residual=True)
  # An unsafe_rbg key compiles init ~3x faster than threefry; its statistics are fine here.
  rng = jax.random.key(0, impl='unsafe_rbg')
  variables = jax.jit(model.init)(rng, np.ones((1, 8, 8, 3), np.float32))
  block = variables['params']['stage_1']['block_0']
  np.testing.assert_array_equal(block['bn2']['scale'], 0.0)
  np.testing.assert_array_equal(block['bn1']['scale'], 1.0)
  np.testing.assert_array_equal(block['proj_bn']['scale'], 1.0)
  stats = variables['batch_stats']['stem']['bn']
  np.testing.assert_array_equal(stats['mean'], 0.0)
  np.testing.assert_array_equal(stats['var'], 1.0)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables))


def test_bottleneck_zero_init_residual():
  block = resnet.Bottleneck(features=2, stride=2, zero_init_residual=True)
  rng = jax.random.key(0, impl='unsafe_rbg')
  params = jax.jit(block.init)(rng, np.ones((1, 4, 4, 3), np.float32))['params']
  np.testing.assert_array_equal(params['bn3']['scale'], 0.0)
  np.testing.assert_array_equal(params['bn2']['scale'], 1.0)
  assert params['proj_conv']['kernel'].shape == (1, 1, 3, 8)


def test_train_step_grads_and_batch_stats():
  model = resnet.Model(num_classes=3, width=4)
  image = np.random.default_rng(1).normal(size=(4, 12, 12, 3)).astype(np.float32)
  variables = _random_variables(model, image.shape)
  is_stem_conv = lambda mdl, _: mdl.name == 'conv' and mdl.parent.name == 'stem'

  def loss(params):
    (logits, _), updates = model.apply(
        {**variables, 'params': params}, image, train=True, capture_intermediates=is_stem_conv,
        mutable=['batch_stats', 'intermediates'])
    return jnp.mean(logits**2), (logits, updates)

  grads, (logits, updates) = jax.jit(jax.grad(loss, has_aux=True))(variables['params'])
  leaves = jax.tree_util.tree_leaves(grads)
  assert all(np.all(np.isfinite(g)) for g in leaves) and all(np.any(g) for g in leaves)
  old, new = variables['batch_stats'], updates['batch_stats']
  assert jax.tree_util.tree_structure(old) == jax.tree_util.tree_structure(new)
  assert all(not np.allclose(a, b) for a, b in
             zip(jax.tree_util.tree_leaves(old), jax.tree_util.tree_leaves(new)))
  # Momentum 0.9 on the batch mean and the biased batch variance (PyTorch would use the
  # unbiased variance for its running estimate).
  conv_out = np.asarray(updates['intermediates']['stem']['conv']['__call__'][0], np.float64)
  old_bn, new_bn = old['stem']['bn'], new['stem']['bn']
  np.testing.assert_allclose(new_bn['mean'], 0.9 * old_bn['mean']
                             + 0.1 * conv_out.mean((0, 1, 2)), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(new_bn['var'], 0.9 * old_bn['var']
                             + 0.1 * conv_out.var((0, 1, 2)), rtol=1e-4, atol=1e-5)
  evaluate = jax.jit(model.apply)  # Immutable batch_stats: raises if eval tried to update.
  a, b = evaluate(variables, image)[0], evaluate(variables, image)[0]
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, logits)  # Batch statistics differ from running ones.


def test_remat_same_params_loss_grads_and_batch_stats():
  """nn.remat per block changes neither the parameter tree nor any value of a training step
  (BatchNorm statistics and the padding mask included)."""
  model = resnet.Model(num_classes=3, width=4)
  image = np.random.default_rng(1).normal(size=(3, 12, 12, 3)).astype(np.float32)
  mask = np.array([True, True, False])
  variables = _random_variables(model, image.shape)
  shapes = lambda m: jax.tree_util.tree_map(lambda x: x.shape, _abstract(m, image.shape)[0])
  assert shapes(model) == shapes(model.clone(remat=True))

  def step(m):
    def loss(params):
      (logits, _), updates = m.apply({**variables, 'params': params}, image, train=True,
                                     mask=mask, mutable=['batch_stats'])
      return jnp.mean(logits[:2]**2), updates
    return jax.jit(jax.value_and_grad(loss, has_aux=True))(variables['params'])

  (loss, updates), grads = step(model)
  (remat_loss, remat_updates), remat_grads = step(model.clone(remat=True))
  np.testing.assert_allclose(remat_loss, loss, rtol=1e-6)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  jax.tree_util.tree_map(close, remat_grads, grads)
  jax.tree_util.tree_map(close, remat_updates, updates)
  assert all(np.any(g) for g in jax.tree_util.tree_leaves(grads))


def test_bfloat16_compute():
  model = resnet.Model(num_classes=3, width=4, dtype=jnp.bfloat16)
  variables, logits, out = _abstract(model, (2, 12, 12, 3))
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables))
  assert logits.dtype == jnp.float32 and out['features'].dtype == jnp.bfloat16


def _torch_resnet(variables, image, depth: int, stem: str):
  """Independent PyTorch eval-mode forward of the torchvision layout, from our variables."""
  torch = pytest.importorskip('torch')
  fn = torch.nn.functional
  t = lambda a: torch.from_numpy(np.array(a, np.float64))
  p = flax.traverse_util.flatten_dict(variables['params'], sep='/')
  s = flax.traverse_util.flatten_dict(variables['batch_stats'], sep='/')

  def conv(x, name, stride=1):
    w = t(p[f'{name}/kernel']).permute(3, 2, 0, 1)  # HWIO -> OIHW.
    return fn.conv2d(x, w, stride=stride, padding=w.shape[-1] // 2)

  def bn(x, name):
    return fn.batch_norm(x, t(s[f'{name}/mean']), t(s[f'{name}/var']), t(p[f'{name}/scale']),
                         t(p[f'{name}/bias']), training=False, eps=1e-5)

  x = t(image).permute(0, 3, 1, 2)
  x = fn.relu(bn(conv(x, 'stem/conv', 2 if stem == 'imagenet' else 1), 'stem/bn'))
  if stem == 'imagenet':
    x = fn.max_pool2d(x, 3, 2, 1)
  _, sizes = resnet.DEPTHS[depth]
  convs = 2 if depth < 50 else 3
  for si, num_blocks in enumerate(sizes):
    for bi in range(num_blocks):
      pre, stride = f'stage_{si}/block_{bi}', 2 if si > 0 and bi == 0 else 1
      y = x
      for c in range(1, convs + 1):
        strided = c == (1 if convs == 2 else 2)  # torchvision v1.5: stride on the 3x3.
        y = bn(conv(y, f'{pre}/conv{c}', stride if strided else 1), f'{pre}/bn{c}')
        y = fn.relu(y) if c < convs else y
      if f'{pre}/proj_conv/kernel' in p:
        x = bn(conv(x, f'{pre}/proj_conv', stride), f'{pre}/proj_bn')
      x = fn.relu(x + y)
  x = x.mean((2, 3))
  return (x @ t(p['head/kernel']) + t(p['head/bias'])).numpy()


@pytest.mark.parametrize('depth, stem, size', [(18, 'cifar', 12), (50, 'imagenet', 30)])
def test_matches_torch_oracle(depth, stem, size):
  model = resnet.Model(num_classes=5, depth=depth, stem=stem, width=4)
  image = np.random.default_rng(2).normal(size=(2, size, size, 3)).astype(np.float32)
  variables = _random_variables(model, image.shape)
  logits, _ = jax.jit(model.apply)(variables, image)
  expected = _torch_resnet(variables, image, depth, stem)
  np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)


def test_pytorch_default_init_matches_torch_layer_defaults():
  """weight_init='pytorch' draws convs and the head as torch.nn's defaults do (the MedMNIST v2
  28-px ResNet sets no initialiser): U(+-1/sqrt(fan_in)), head bias too."""
  torch = pytest.importorskip('torch')
  model = resnet.Model(num_classes=3, weight_init='pytorch')
  rng = jax.random.key(0, impl='unsafe_rbg')
  params = jax.jit(model.init)(rng, np.ones((1, 28, 28, 1), np.float32))['params']
  torch.manual_seed(0)
  pairs = [(params['stem']['conv']['kernel'], torch.nn.Conv2d(1, 64, 3, bias=False).weight),
           (params['stage_2']['block_0']['conv1']['kernel'],
            torch.nn.Conv2d(128, 256, 3, bias=False).weight),
           (params['head']['kernel'], torch.nn.Linear(512, 3).weight),
           (params['head']['bias'], torch.nn.Linear(512, 3).bias)]
  for ours, theirs in pairs:
    theirs = theirs.detach().numpy()
    bound = np.abs(theirs).max()
    assert np.abs(ours).max() <= bound * 1.01 + 1e-6
    assert np.abs(ours).max() >= 0.5 * bound
    if ours.size > 100:  # Same spread (uniform: std = bound / sqrt(3)).
      np.testing.assert_allclose(np.std(ours), np.std(theirs), rtol=0.1)


def test_torchvision_init_is_wider_than_pytorch_default():
  """torchvision's kaiming-normal fan-out convs are ~1.7-2.4x the PyTorch default's scale."""
  rng = jax.random.key(0, impl='unsafe_rbg')
  stds = {}
  for weight_init in ('torchvision', 'pytorch'):
    model = resnet.Model(num_classes=3, weight_init=weight_init)
    params = jax.jit(model.init)(rng, np.ones((1, 28, 28, 1), np.float32))['params']
    stds[weight_init] = float(np.std(params['stage_1']['block_0']['conv2']['kernel']))
  ratio = stds['torchvision'] / stds['pytorch']
  assert ratio > 1.5 and ratio < 2.6, ratio


def test_unknown_weight_init_names_the_valid_ones():
  with pytest.raises(ValueError, match=r"weight_init 'he'.*\['pytorch', 'torchvision'\]"):
    _abstract(resnet.Model(num_classes=3, weight_init='he'), (1, 16, 16, 3))
