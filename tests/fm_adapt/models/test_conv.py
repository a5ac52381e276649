"""Tests of fm_adapt.models.conv: the fast-gradient convolution equals lax's, Conv equals nn.Conv."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from fm_adapt.adapt import lora
from fm_adapt.models import conv
from fm_adapt.models import efficientnet
from fm_adapt.models import resnet

NHWC = ('NHWC', 'HWIO', 'NHWC')
EXPLICIT = ((2, 0), (1, 3))


def _rand(seed: int, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
  """Standard normal values from numpy (compiling jax.random per shape is slow on CPU)."""
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), dtype)


def _value_and_grads(fn, x, w, **kwargs):
  """(y, dL/dx, dL/dw) of L = sum(y * r) for a fixed random cotangent r, jitted.

  Arrays are passed as arguments: XLA would constant-fold convolutions of constants, slowly.
  """
  def value_and_grads(x, w, r):
    y, vjp = jax.vjp(lambda x, w: fn(x, w, dimension_numbers=NHWC, **kwargs), x, w)
    return (y, *vjp(r))
  y_shape = jax.eval_shape(lambda x, w: fn(x, w, dimension_numbers=NHWC, **kwargs), x, w)
  return jax.jit(value_and_grads)(x, w, _rand(9, y_shape.shape, y_shape.dtype))


def _assert_close(actual, expected, rtol=1e-5):
  """Elementwise within rtol of the expected values' scale (sums of many products)."""
  expected = np.asarray(expected, np.float64)
  atol = rtol * max(np.abs(expected).max(), 1e-30)
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol, atol=atol)


def _check_against_lax(x_shape, w_shape, strides, padding, groups=1, dilation=(1, 1)):
  x, w = _rand(0, x_shape), _rand(1, w_shape)
  kwargs = dict(window_strides=strides, padding=padding, rhs_dilation=dilation,
                feature_group_count=groups)
  expected = _value_and_grads(lax.conv_general_dilated, x, w, **kwargs)
  actual = _value_and_grads(conv.im2col_grad_conv, x, w, **kwargs)
  for name, a, e in zip(('y', 'dx', 'dw'), actual, expected):
    assert a.shape == e.shape and a.dtype == e.dtype, name
    _assert_close(a, e)


# (kernel, stride, padding): every padding with both strides, every kernel size; not the full
# product, as each case compiles (about 0.5 s, 3 s for 7x7 on 2 cores).
CASES = [(1, 1, 'SAME'), (1, 2, 'VALID'), (3, 1, 'VALID'), (3, 2, 'SAME'), (3, 1, EXPLICIT),
         (5, 2, EXPLICIT), (5, 1, 'SAME'), (7, 2, 'SAME')]


@pytest.mark.parametrize('kernel, stride, padding', CASES)
def test_dense_matches_lax(kernel, stride, padding):
  _check_against_lax((2, 15, 13, 3), (kernel, kernel, 3, 5), (stride, stride), padding)


@pytest.mark.parametrize('kernel, stride, padding', CASES)
def test_depthwise_matches_lax(kernel, stride, padding):
  _check_against_lax((2, 15, 13, 6), (kernel, kernel, 1, 6), (stride, stride), padding, groups=6)


@pytest.mark.parametrize('case', [
    dict(x_shape=(2, 15, 13, 4), w_shape=(3, 3, 1, 8), strides=(2, 1), padding='SAME', groups=4),
    dict(x_shape=(2, 15, 13, 3), w_shape=(3, 2, 3, 5), strides=(1, 2), padding='SAME_LOWER'),
    dict(x_shape=(2, 15, 13, 3), w_shape=(3, 3, 3, 5), strides=(2, 2), padding='SAME',
         dilation=(2, 1)),
    dict(x_shape=(2, 15, 13, 4), w_shape=(5, 5, 1, 4), strides=(1, 1), padding='VALID',
         groups=4, dilation=(1, 2)),
    dict(x_shape=(2, 15, 13, 3), w_shape=(3, 3, 3, 5), strides=(1, 1), padding=((-1, 2), (0, 1))),
    dict(x_shape=(2, 15, 13, 1), w_shape=(3, 3, 1, 5), strides=(1, 1), padding='SAME'),
])
def test_other_configurations_match_lax(case):
  """Channel multiplier, rectangular kernels and strides, SAME_LOWER, dilation, cropping, C=1."""
  _check_against_lax(**case)


def test_weight_gradient_in_batch_chunks(monkeypatch):
  """A scan over chunks of 2 images plus a remainder of 1 gives the same gradient."""
  monkeypatch.setattr(conv, 'PATCH_CHUNK_BYTES', 2 * 15 * 13 * 9 * 3 * 4)
  x = _rand(0, (5, 15, 13, 3))
  assert conv._chunk_size(x, jnp.zeros((5, 15, 13, 5)), (3, 3)) == 2
  _check_against_lax((5, 15, 13, 3), (3, 3, 3, 5), (1, 1), 'SAME')


@pytest.mark.parametrize('kwargs', [dict(feature_group_count=2), dict(lhs_dilation=(2, 2)),
                                    dict(dimension_numbers=None)])
def test_unsupported_cases_fall_back_to_lax(kwargs):
  x, w = _rand(0, (2, 9, 7, 4)), _rand(1, (3, 3, 4 // kwargs.get('feature_group_count', 1), 6))
  if kwargs.get('dimension_numbers', NHWC) is None:  # lax's default NCHW / OIHW layout.
    x, w = _rand(0, (2, 4, 9, 7)), _rand(1, (6, 4, 3, 3))
  kwargs = dict(dict(dimension_numbers=NHWC), **kwargs)
  args = (x, w, (1, 1), ((1, 1), (1, 1)))
  expected = lax.conv_general_dilated(*args, **kwargs)
  np.testing.assert_array_equal(conv.im2col_grad_conv(*args, **kwargs), expected)


def test_bfloat16_close_to_float32():
  x, w = _rand(0, (2, 15, 13, 8), jnp.bfloat16), _rand(1, (3, 3, 8, 8), jnp.bfloat16)
  kwargs = dict(window_strides=(1, 1), padding='SAME')
  actual = _value_and_grads(conv.im2col_grad_conv, x, w, **kwargs)
  expected = _value_and_grads(lax.conv_general_dilated, x.astype(jnp.float32),
                              w.astype(jnp.float32), **kwargs)
  for a, e in zip(actual, expected):
    assert a.dtype == jnp.bfloat16
    _assert_close(a, e, rtol=3e-2)


def test_resolve_impl(monkeypatch):
  assert conv.resolve_impl('xla') == 'xla'
  assert conv.resolve_impl('auto') == 'im2col_grad'  # The tests run on CPU.
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  assert conv.resolve_impl('auto') == 'xla'
  with pytest.raises(ValueError, match=r"Unknown conv_impl 'fast'; valid: \['auto', 'xla'"):
    conv.resolve_impl('fast')


@pytest.mark.parametrize('kwargs', [
    dict(features=5, kernel_size=(3, 3)),
    dict(features=5, kernel_size=(1, 1), strides=2, padding='VALID', use_bias=False),
    dict(features=8, kernel_size=(5, 5), feature_group_count=4, padding=((2, 2), (1, 1))),
    dict(features=4, kernel_size=3, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
         kernel_init=nn.initializers.ones, bias_init=nn.initializers.normal()),
])
def test_module_matches_nn_conv(kwargs):
  """Same variables (names, shapes, dtypes; values from one key) and outputs as nn.Conv."""
  x = _rand(0, (2, 15, 13, 4))
  module = conv.Conv(**kwargs, conv_impl='im2col_grad', name='c')
  ref_module = nn.Conv(**kwargs, name='c')
  assert isinstance(module, nn.Conv)
  abstract = jax.eval_shape(module.init, jax.random.key(1), x)
  assert abstract == jax.eval_shape(ref_module.init, jax.random.key(1), x)
  variables = jax.tree.map(lambda a: _rand(2, a.shape, a.dtype), abstract)
  y, ref = module.apply(variables, x), ref_module.apply(variables, x)
  assert y.dtype == ref.dtype
  _assert_close(y, ref, rtol=1e-2 if y.dtype == jnp.bfloat16 else 1e-5)



def test_module_conv_impl_selects_function():
  assert conv.Conv(4, (3, 3), conv_impl='xla').conv_general_dilated is lax.conv_general_dilated
  module = conv.Conv(4, (3, 3), conv_impl='im2col_grad')
  assert module.conv_general_dilated is conv.im2col_grad_conv
  assert module.clone(conv_impl='xla').conv_general_dilated is lax.conv_general_dilated
  assert conv.Conv(4, (3, 3)).conv_general_dilated is conv.auto_conv
  custom = lambda *args, **kwargs: lax.conv_general_dilated(*args, **kwargs)
  assert conv.Conv(4, (3, 3), conv_general_dilated=custom).conv_general_dilated is custom
  with pytest.raises(ValueError, match='Unknown conv_impl'):
    conv.Conv(4, (3, 3), conv_impl='cudnn')


def test_lora_intercepts_conv():
  """LoRA's interceptor sees conv.Conv as an nn.Conv (a 1x1 strided conv, like ResNet's)."""
  model = conv.Conv(6, (1, 1), strides=(2, 2), conv_impl='im2col_grad', name='proj')
  x = _rand(0, (2, 8, 8, 4))
  params = _random_variables(model, x)['params']
  lora_tree = {'lora_a': _rand(2, (4, 2)), 'lora_b': _rand(3, (2, 6))}
  with lora.intercept(lora_tree, scale=0.5):
    y = model.apply({'params': params}, x)
  delta = 0.5 * x[:, ::2, ::2] @ lora_tree['lora_a'] @ lora_tree['lora_b']
  _assert_close(y, model.apply({'params': params}, x) + delta)


def _conv_impls_used(model, image) -> dict[str, str]:
  """{module path: conv_impl} of every nn.Conv call in `model` (abstract, nothing compiled)."""
  used = {}
  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, nn.Conv) and context.method_name == '__call__':
      used['/'.join(context.module.path)] = getattr(context.module, 'conv_impl', 'nn.Conv')
    return next_fun(*args, **kwargs)
  with nn.intercept_methods(record):
    jax.eval_shape(model.init, jax.random.key(0), image)
  return used


@pytest.mark.parametrize('model, num_convs', [
    (resnet.Model(num_classes=3, width=4, conv_impl='xla'), 20),
    (resnet.Model(num_classes=3, depth=50, width=4, conv_impl='xla'), 53),
    (efficientnet.Model(num_classes=3, conv_impl='xla'), 49),
])
def test_models_pass_conv_impl_to_every_conv(model, num_convs):
  used = _conv_impls_used(model, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  assert len(used) == num_convs and set(used.values()) == {'xla'}
  default = _conv_impls_used(model.clone(conv_impl='auto'),
                             jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32))
  assert set(default.values()) == {'auto'}


def _random_variables(module: nn.Module, *args, **kwargs) -> dict:
  """Random variables of `module` from numpy (nothing compiled); BatchNorm variances positive."""
  rng = np.random.default_rng(0)
  def leaf(path, x):
    value = rng.normal(0., 0.2, x.shape).astype(np.float32)
    return np.abs(value) + 0.5 if path[-1].key == 'var' else value
  abstract = jax.eval_shape(functools.partial(module.init, **kwargs), jax.random.key(0), *args)
  return jax.tree_util.tree_map_with_path(leaf, abstract)


def _block_value_and_grads(block, x):
  """Output and gradients (params, x) of a train-mode block (BatchNorm on batch statistics)."""
  variables = _random_variables(block, x, train=False)

  def loss(params, batch_stats, x):
    y, _ = block.apply({'params': params, 'batch_stats': batch_stats}, x, train=True,
                       mutable=['batch_stats'])
    return jnp.sum(y * jnp.cos(jnp.arange(y.size).reshape(y.shape))), y

  grad_fn = jax.jit(jax.grad(loss, (0, 2), has_aux=True))
  return grad_fn(variables['params'], variables['batch_stats'], x)


@pytest.mark.parametrize('name', ['resnet_basic', 'resnet_bottleneck', 'efficientnet_mbconv'])
def test_model_blocks_match_xla(name):
  """Blocks of the models (strided 3x3 / 5x5 depthwise / 1x1 convs): im2col_grad equals xla.

  Whole models compile for 20-60 s here; `benchmarks/conv_cpu.py` compares them at full size.
  """
  make = {
      'resnet_basic': lambda impl: resnet.BasicBlock(8, stride=2, conv_impl=impl),
      'resnet_bottleneck': lambda impl: resnet.Bottleneck(4, stride=2, conv_impl=impl),
      'efficientnet_mbconv': lambda impl: efficientnet.MBConv(
          efficientnet.BlockSpec(4, 8, 5, 2, 6), conv_impl=impl),
  }[name]
  x = _rand(0, (4, 9, 11, 4))
  (grads, x_grad), y = _block_value_and_grads(make('im2col_grad'), x)
  (ref_grads, ref_x_grad), ref_y = _block_value_and_grads(make('xla'), x)
  _assert_close(y, ref_y, rtol=1e-4)
  _assert_close(x_grad, ref_x_grad, rtol=1e-4)
  jax.tree.map(lambda a, e: _assert_close(a, e, rtol=1e-4), grads, ref_grads)
