"""A drop-in `nn.Conv` whose training step is fast on XLA:CPU.

XLA:CPU computes the weight gradient of a convolution (its "backprop-filter" convolution) about
10x slower than the forward pass or the input gradient: for x [128, 28, 28, 64] and a 3x3 kernel
64 -> 64 it takes 2.0 s against 0.12 s forward, so it dominates a CPU training step of a CNN.
Depthwise convolutions are worse: forward, dL/dx (above all with stride 2) and dL/dW all run at
a fraction of a GFLOP/s. `im2col_grad_conv` has the signature of `lax.conv_general_dilated` and
computes

  feature_group_count 1 (a `jax.custom_vjp`):
    forward   lax.conv_general_dilated, unchanged;
    dL/dx     its transpose, from `jax.vjp` with respect to x only (fast on XLA:CPU);
    dL/dW     im2col and ONE 2-D matmul, patches[P, taps*C]^T @ dy[P, O] (P = N * H_out * W_out;
              a 1x1 kernel's patches are x itself), scanned over batch chunks of a few MiB of
              patches, which is 3-4x faster than forming all of them at once;
  depthwise (feature_group_count = C, kernel [..., 1, C * m]):
    the sum over kernel taps of a shifted, strided slice of x times that tap's weights,
    differentiated by JAX (dL/dW per tap is a sum of x_tap * dy over N and space). Elementwise
    work that XLA fuses, 10-50x faster than XLA:CPU's depthwise convolution in all three parts.

It covers channels-last (NHWC / HWIO) convolutions of any spatial rank, with strides, padding
('SAME', 'SAME_LOWER', 'VALID' or explicit pairs) and kernel dilation. Anything else (input
dilation, other group counts, batch_group_count, preferred_element_type, other layouts) falls
back to plain `lax.conv_general_dilated`. Sums over taps and the weight gradient accumulate in
at least float32. The dense path has no forward-mode derivative (custom VJP): use
conv_impl='xla' for `jax.jvp`, `jax.jacfwd` or Hessians.

`Conv` is `nn.Conv` with one more field, `conv_impl`:

  'auto'         'im2col_grad' when `jax.default_backend() == 'cpu'` (checked when traced),
                 'xla' elsewhere (GPU and TPU have good convolution gradient kernels);
  'xla'          lax.conv_general_dilated, exactly nn.Conv;
  'im2col_grad'  `im2col_grad_conv` above.

It subclasses `nn.Conv` and only sets nn.Conv's `conv_general_dilated` field, so parameters
(`kernel` [*kernel_size, in / groups, out], `bias` [out]), `isinstance(m, nn.Conv)` and
`nn.intercept_methods` (LoRA) behave exactly as for nn.Conv.
"""
from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Array = jax.Array
Pads = tuple[tuple[int, int], ...]

CONV_IMPLS = ('auto', 'xla', 'im2col_grad')


def resolve_impl(conv_impl: str) -> str:
  """'xla' or 'im2col_grad': what `conv_impl` means on the current default backend.

  Raises:
    ValueError: for a name not in CONV_IMPLS.
  """
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f'Unknown conv_impl {conv_impl!r}; valid: {list(CONV_IMPLS)}.')
  if conv_impl == 'auto':
    return 'im2col_grad' if jax.default_backend() == 'cpu' else 'xla'
  return conv_impl


# ---------------------------------------------------------------------------------------------
# Shared pieces (channels-last layout, explicit padding).

# Batch chunk of the weight gradient: patches of at most this many bytes are formed at a time.
# Forming all patches at once (9x the input for a 3x3 kernel) is 3-4x slower on XLA:CPU than a
# `lax.scan` over chunks of a few MiB (fresh pages and cache misses); measured on 2 cores.
PATCH_CHUNK_BYTES = 4 * 2**20


def _channels_last_specs(nsp: int) -> tuple[tuple[int, ...], ...]:
  """(lhs, rhs, out) dimension specs of NHWC / HWIO / NHWC for `nsp` spatial dimensions."""
  lhs = (0, nsp + 1) + tuple(range(1, nsp + 1))
  rhs = (nsp + 1, nsp) + tuple(range(nsp))
  return lhs, rhs, lhs


def _accumulation(dtype: Any) -> Any:
  """The dtype sums are accumulated in: dtype, but at least float32."""
  return jnp.promote_types(dtype, jnp.float32)


def _out_shape(in_shape: Sequence[int], kernel_shape: Sequence[int], strides: Sequence[int],
               pads: Pads, dilation: Sequence[int]) -> tuple[int, ...]:
  """Spatial output shape of a convolution."""
  return tuple((i + lo + hi - (k - 1) * d - 1) // s + 1 for i, k, s, (lo, hi), d
               in zip(in_shape, kernel_shape, strides, pads, dilation))


def _taps(x: Array, kernel_shape: Sequence[int], strides: Sequence[int], pads: Pads,
          dilation: Sequence[int]) -> list[Array]:
  """The input each kernel tap reads: one [N, *out_shape, C] strided slice per tap.

  Taps are in row-major order of the kernel's spatial positions, like kernel.reshape(-1, I, O).
  """
  out_shape = _out_shape(x.shape[1:-1], kernel_shape, strides, pads, dilation)
  xp = lax.pad(x, jnp.zeros((), x.dtype),
               [(0, 0, 0), *((lo, hi, 0) for lo, hi in pads), (0, 0, 0)])
  slices = []
  for tap in itertools.product(*(range(k) for k in kernel_shape)):
    start = [t * d for t, d in zip(tap, dilation)]
    limit = [b + (o - 1) * st + 1 for b, o, st in zip(start, out_shape, strides)]
    slices.append(lax.slice(xp, (0, *start, 0), (xp.shape[0], *limit, xp.shape[-1]),
                            (1, *strides, 1)))
  return slices


# ---------------------------------------------------------------------------------------------
# Dense convolution (feature_group_count 1): lax forward and dX, im2col dW (custom VJP).


def _lax_conv(x: Array, w: Array, strides: tuple[int, ...], pads: Pads,
              dilation: tuple[int, ...], precision: Any) -> Array:
  """lax.conv_general_dilated in channels-last layout with explicit padding."""
  dn = lax.ConvDimensionNumbers(*_channels_last_specs(x.ndim - 2))
  return lax.conv_general_dilated(x, w, strides, pads, rhs_dilation=dilation,
                                  dimension_numbers=dn, precision=precision)


def _patch_matmul(x: Array, dy: Array, kernel_shape: Sequence[int], strides: Sequence[int],
                  pads: Pads, dilation: Sequence[int], precision: Any) -> Array:
  """dW [taps * C, O] = patches^T @ dy as ONE 2-D matmul (patches = im2col of x)."""
  taps = _taps(x, kernel_shape, strides, pads, dilation)
  patches = taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
  patches = patches.reshape(-1, patches.shape[-1])
  return lax.dot_general(patches, dy.reshape(-1, dy.shape[-1]), (((0,), (0,)), ((), ())),
                         precision=precision, preferred_element_type=_accumulation(dy.dtype))


def _chunk_size(x: Array, dy: Array, kernel_shape: Sequence[int]) -> int:
  """Images per chunk so that a chunk's patches take about PATCH_CHUNK_BYTES."""
  row_bytes = math.prod(kernel_shape) * x.shape[-1] * x.dtype.itemsize
  return max(1, PATCH_CHUNK_BYTES // (math.prod(dy.shape[1:-1]) * row_bytes))


def _dense_kernel_grad(x: Array, w: Array, dy: Array, strides: tuple[int, ...], pads: Pads,
                       dilation: tuple[int, ...], precision: Any) -> Array:
  """dL/dW, shaped and typed like w: im2col matmuls, scanned over batch chunks."""
  kernel_shape = w.shape[:-2]
  matmul = functools.partial(_patch_matmul, kernel_shape=kernel_shape, strides=strides,
                             pads=pads, dilation=dilation, precision=precision)
  n, chunk = x.shape[0], _chunk_size(x, dy, kernel_shape)
  if math.prod(kernel_shape) == 1 or chunk >= n:
    dw = matmul(x, dy)  # A 1x1 kernel's patches are (a strided view of) x itself.
  else:
    steps, main = n // chunk, n // chunk * chunk
    split = lambda a: a[:main].reshape(steps, chunk, *a.shape[1:])
    body = lambda acc, xy: (acc + matmul(*xy), None)
    init = jnp.zeros((math.prod(w.shape[:-1]), w.shape[-1]), _accumulation(dy.dtype))
    dw, _ = lax.scan(body, init, (split(x), split(dy)))
    if main < n:
      dw = dw + matmul(x[main:], dy[main:])
  return dw.reshape(w.shape).astype(w.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _dense_conv(x: Array, w: Array, strides: tuple[int, ...], pads: Pads,
                dilation: tuple[int, ...], precision: Any) -> Array:
  """Channels-last convolution with the im2col weight gradient (see the module docstring)."""
  return _lax_conv(x, w, strides, pads, dilation, precision)


def _dense_conv_fwd(x, w, strides, pads, dilation, precision):
  return _lax_conv(x, w, strides, pads, dilation, precision), (x, w)


def _dense_conv_bwd(strides, pads, dilation, precision, residuals, dy):
  x, w = residuals
  _, input_vjp = jax.vjp(lambda x_: _lax_conv(x_, w, strides, pads, dilation, precision), x)
  (dx,) = input_vjp(dy)
  return dx, _dense_kernel_grad(x, w, dy, strides, pads, dilation, precision)


_dense_conv.defvjp(_dense_conv_fwd, _dense_conv_bwd)


# ---------------------------------------------------------------------------------------------
# Depthwise convolution (feature_group_count = input channels): a sum over taps.


def _depthwise_conv(x: Array, w: Array, strides: tuple[int, ...], pads: Pads,
                    dilation: tuple[int, ...]) -> Array:
  """y = sum over taps t of x_t * w_t (elementwise per channel), in at least float32.

  XLA:CPU runs depthwise convolutions, and above all their gradients, at a fraction of a
  GFLOP/s; this form is elementwise work that XLA fuses, and JAX's autodiff of it gives
  dL/dx (padded, strided adds of dy * w_t) and dL/dW (per tap, a sum of x_t * dy over N and
  space) that are as fast. With a channel multiplier m (w [..., 1, C * m]) output channel
  c * m + j reads input channel c, as in lax.
  """
  multiplier = w.shape[-1] // x.shape[-1]
  if multiplier > 1:
    x = jnp.repeat(x, multiplier, axis=-1)
  acc = _accumulation(x.dtype)
  kernel = w.reshape(-1, w.shape[-1]).astype(acc)
  taps = _taps(x, w.shape[:-2], strides, pads, dilation)
  y = taps[0].astype(acc) * kernel[0]
  for tap, k in zip(taps[1:], kernel[1:]):
    y = y + tap.astype(acc) * k
  return y.astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# lax.conv_general_dilated-compatible entry points.


def _as_tuple(value: int | Sequence[int] | None, nsp: int) -> tuple[int, ...]:
  if value is None:
    return (1,) * nsp
  return (value,) * nsp if isinstance(value, int) else tuple(value)


def _is_channels_last(lhs: Array, rhs: Array, dimension_numbers: Any) -> bool:
  """Whether the dimension numbers describe NHWC / HWIO / NHWC (for any spatial rank)."""
  if dimension_numbers is None:
    return False  # lax's default is NCHW / OIHW.
  dn = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  return (tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec)) == _channels_last_specs(
      lhs.ndim - 2)


def _fast_path_applies(lhs: Array, rhs: Array, lhs_dilation: Any, dimension_numbers: Any,
                       feature_group_count: int, batch_group_count: int,
                       preferred_element_type: Any) -> bool:
  """Whether `im2col_grad_conv` handles this call itself (else it calls lax)."""
  if lhs.ndim < 3 or not _is_channels_last(lhs, rhs, dimension_numbers):
    return False
  depthwise = feature_group_count == lhs.shape[-1] and rhs.shape[-2] == 1
  return (all(d == 1 for d in _as_tuple(lhs_dilation, lhs.ndim - 2))
          and (feature_group_count == 1 or depthwise) and batch_group_count == 1
          and preferred_element_type is None and lhs.dtype == rhs.dtype)


def _explicit_pads(lhs: Array, rhs: Array, strides: tuple[int, ...], padding: Any,
                   dilation: tuple[int, ...]) -> Pads:
  """Padding as ((low, high), ...) per spatial dimension, resolving 'SAME' / 'VALID'."""
  if isinstance(padding, str):
    window = [(k - 1) * d + 1 for k, d in zip(rhs.shape[:-2], dilation)]
    padding = lax.padtype_to_pads(lhs.shape[1:-1], window, strides, padding)
  return tuple((int(lo), int(hi)) for lo, hi in padding)


def im2col_grad_conv(lhs: Array, rhs: Array, window_strides: Sequence[int], padding: Any,
                     lhs_dilation: Sequence[int] | None = None,
                     rhs_dilation: Sequence[int] | None = None,
                     dimension_numbers: Any = None, feature_group_count: int = 1,
                     batch_group_count: int = 1, precision: Any = None,
                     preferred_element_type: Any = None) -> Array:
  """`lax.conv_general_dilated` with a fast (im2col + matmul) weight gradient.

  Same arguments and result as `lax.conv_general_dilated`. Calls it unchanged for cases the
  fast path does not cover (see the module docstring).
  """
  if not _fast_path_applies(lhs, rhs, lhs_dilation, dimension_numbers, feature_group_count,
                            batch_group_count, preferred_element_type):
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type)
  nsp = lhs.ndim - 2
  strides, dilation = _as_tuple(window_strides, nsp), _as_tuple(rhs_dilation, nsp)
  pads = _explicit_pads(lhs, rhs, strides, padding, dilation)
  if feature_group_count == 1:
    return _dense_conv(lhs, rhs, strides, pads, dilation, precision)
  return _depthwise_conv(lhs, rhs, strides, pads, dilation)


def auto_conv(*args: Any, **kwargs: Any) -> Array:
  """`im2col_grad_conv` on the CPU backend, `lax.conv_general_dilated` elsewhere."""
  fn = im2col_grad_conv if resolve_impl('auto') == 'im2col_grad' else lax.conv_general_dilated
  return fn(*args, **kwargs)


_CONV_FNS = {'auto': auto_conv, 'xla': lax.conv_general_dilated, 'im2col_grad': im2col_grad_conv}


def conv_fn(conv_impl: str = 'auto'):
  """The `lax.conv_general_dilated`-compatible function of an implementation name.

  Raises:
    ValueError: for a name not in CONV_IMPLS.
  """
  if conv_impl not in _CONV_FNS:
    raise ValueError(f'Unknown conv_impl {conv_impl!r}; valid: {list(CONV_IMPLS)}.')
  return _CONV_FNS[conv_impl]


# ---------------------------------------------------------------------------------------------
# The module.


class Conv(nn.Conv):
  """`flax.linen.Conv` with a selectable convolution implementation.

  All nn.Conv fields and the parameter layout are unchanged (kernel [*kernel_size,
  in / feature_group_count, features], bias [features]).

  Attributes:
    conv_impl: 'auto' (default; the fast weight gradient on CPU, plain XLA elsewhere), 'xla' or
      'im2col_grad'; see the module docstring. Ignored when nn.Conv's own
      `conv_general_dilated` or `conv_general_dilated_cls` is given.
  """
  conv_impl: str = 'auto'

  def __post_init__(self) -> None:
    fn = conv_fn(self.conv_impl)  # Validates conv_impl at construction.
    # A function of ours may come from `clone` of a Conv with another conv_impl: replace it.
    ours = any(self.conv_general_dilated is f for f in _CONV_FNS.values())
    if (self.conv_general_dilated is None or ours) and self.conv_general_dilated_cls is None:
      object.__setattr__(self, 'conv_general_dilated', fn)
    super().__post_init__()

