"""LoRA and DoRA as pure pytree transforms that work for any of our Flax models.

A LoRA tree mirrors the module paths of the adapted kernels (Hu et al., 2022):

  {'encoder': {'block_0': {'attn': {'query': {'lora_a': [in, r], 'lora_b': [r, out]}}}}}

for the kernel `encoder/block_0/attn/query/kernel` (an `nn.Dense` kernel [in, out], or an `nn.Conv`
1x1 kernel [1, 1, in, out]). DoRA (Liu et al., 2024) adds a magnitude vector `m` [out] next to the
factors. The tree holds arrays only; the scaling `s = alpha / r` (or `alpha / sqrt(r)` with
rsLoRA, Kalajdzievski 2023) is static configuration, see `scaling`. It lives in the parameter tree
as the top-level subtree `lora/`, so the schedule rule `'lora/.*'` selects it:

  params = dict(base_params, lora=lora.init(base_params, mask, rank, rng))
  apply_fn = lora.wrap_apply_fn(state.make_apply_fn(model), scale=lora.scaling(rank, alpha))

The forward of a LoRA-adapted layer is `y = orig(x) + s * ((x @ A) @ B)`: the base layer runs
unchanged on its frozen kernel and the low-rank branch is added to its output. No merged weight
`W + s A B` is formed, so when W is frozen (not differentiated, see `fm_adapt.train.step`) XLA forms
neither dL/dW nor any other [in, out]-sized product. The layers are intercepted with
`flax.linen.intercept_methods`, so the models need no LoRA code. `A` starts kaiming-uniform as in
PEFT (uniform(+-1/sqrt(in))) and `B` at zero, so the adapted model equals the base model exactly.

DoRA is defined on the weight, `W' = m * (W + s A B) / ||W + s A B||_col` (column norms over the
input axis), so a DoRA layer *does* form the merged [in, out] weight in its forward and backward
pass (as in the paper and PEFT). The column norm is treated as a constant in the backward pass
(`stop_gradient`), as Sec. 4.3 of the DoRA paper and PEFT's `DoraLinearLayer` do: gradients reach
A, B and m only through the numerator, which saves memory and is what the paper trains. At init
`m = ||W||_col`, so W' equals W up to rounding. `merge` folds either into W for export.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fm_adapt import param_paths

LORA_KEY = 'lora'
FACTOR_KEYS = ('lora_a', 'lora_b')
DORA_KEY = 'm'

Tree = Mapping[str, Any]


def scaling(rank: int, alpha: float | None = None, *, rslora: bool = False) -> float:
  """The LoRA scale s: alpha / rank, or alpha / sqrt(rank) with rsLoRA; alpha defaults to rank."""
  _check_rank(rank)
  alpha = float(rank if alpha is None else alpha)
  return alpha / (math.sqrt(rank) if rslora else rank)


def _check_rank(rank: Any) -> None:
  if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
    raise ValueError(f'LoRA rank must be a positive int, got {rank!r}.')


def _matrix_shape(path: str, shape: tuple[int, ...]) -> tuple[int, int]:
  """(in, out) of a Dense kernel [in, out] or a 1x1 conv kernel [1, ..., 1, in, out]."""
  if not path.endswith('/kernel'):
    raise ValueError(f'LoRA targets must be kernels (paths ending in /kernel); {path!r} with '
                     f'shape {shape} was selected.')
  if len(shape) == 2 or (len(shape) > 2 and all(d == 1 for d in shape[:-2])):
    return shape[-2], shape[-1]
  raise ValueError(f'LoRA supports Dense kernels [in, out] and 1x1 conv kernels [1, 1, in, out]; '
                   f'{path!r} has shape {shape}. Narrow the target regex.')


def init(params: Tree, mask: Tree, rank: int, rng: jax.Array, *, dora: bool = False
         ) -> dict[str, Any]:
  """Creates the LoRA (or DoRA) tree for the masked kernels of `params`.

  Args:
    params: the base parameter tree (arrays or ShapeDtypeStructs under `jax.eval_shape`).
    mask: same-shaped bool tree (`param_paths.make_mask(params, '.*attn/(query|value)/kernel')`).
    rank: the LoRA rank r.
    rng: PRNG key; split into one key per adapted kernel, in sorted path order.
    dora: also store the DoRA magnitude `m` [out], initialized to the column norms of W.

  Returns:
    The nested dict {module path...: {'lora_a': [in, r], 'lora_b': [r, out](, 'm': [out])}}.

  Raises:
    ValueError: for a bad rank, no selected kernel, or a selected leaf that is not a Dense or
      1x1 conv kernel (the message names it).
  """
  _check_rank(rank)
  flat, flat_mask = param_paths.flatten(params), param_paths.flatten(mask)
  paths = sorted(path for path, selected in flat_mask.items() if selected)
  if not paths:
    raise ValueError('The LoRA mask selects no parameter.')
  shapes = {path: _matrix_shape(path, tuple(flat[path].shape)) for path in paths}
  keys = jax.random.split(rng, len(paths))
  out = {}
  for key, path in zip(keys, paths):
    (d_in, d_out), module = shapes[path], path[:-len('/kernel')]
    bound = 1.0 / math.sqrt(d_in)
    out[f'{module}/lora_a'] = jax.random.uniform(key, (d_in, rank), jnp.float32, -bound, bound)
    out[f'{module}/lora_b'] = jnp.zeros((rank, d_out), jnp.float32)
    if dora:
      kernel = jnp.asarray(flat[path], jnp.float32).reshape(d_in, d_out)
      out[f'{module}/{DORA_KEY}'] = jnp.linalg.norm(kernel, axis=0)
  return param_paths.unflatten(out)


def num_params(lora_tree: Tree) -> int:
  """Number of parameters in a LoRA tree (the trainable count it adds)."""
  return sum(int(math.prod(leaf.shape)) for leaf in param_paths.flatten(lora_tree).values())


def by_module(lora_tree: Tree) -> dict[tuple[str, ...], dict[str, Any]]:
  """Groups a LoRA tree by module path: {('encoder', ..., 'query'): {'lora_a': A, ...}}.

  Raises:
    ValueError: if a module's leaves are not exactly lora_a, lora_b (and optionally m).
  """
  groups: dict[tuple[str, ...], dict[str, Any]] = {}
  for path, leaf in param_paths.flatten(lora_tree).items():
    *module, name = path.split('/')
    groups.setdefault(tuple(module), {})[name] = leaf
  for module, leaves in groups.items():
    if set(leaves) - {DORA_KEY} != set(FACTOR_KEYS):
      raise ValueError(f"LoRA entry {'/'.join(module)!r} has leaves {sorted(leaves)}; expected "
                       f'{list(FACTOR_KEYS)} (and optionally {DORA_KEY!r}).')
  return groups


def _delta(matrix: jax.Array, factors: Mapping[str, jax.Array], scale: float) -> jax.Array:
  """The weight a layer uses in place of its kernel matrix [in, out]: W + s A B, or DoRA's W'."""
  merged = matrix + scale * (factors['lora_a'] @ factors['lora_b'])
  if DORA_KEY not in factors:
    return merged
  norm = jax.lax.stop_gradient(jnp.linalg.norm(merged, axis=0))  # A constant, as in the paper.
  return merged * (factors[DORA_KEY] / norm)


def merge(params: Tree, lora_tree: Tree, *, scale: float) -> dict[str, Any]:
  """Folds LoRA / DoRA factors into their kernels (for export); drops a `lora` subtree.

  Args:
    params: the base parameters (a top-level 'lora' entry, if present, is removed).
    lora_tree: the LoRA tree from `init` (trained).
    scale: the LoRA scale s (`scaling`).

  Returns:
    A parameter tree of the base model's structure with W <- W + s A B (DoRA: W').
  """
  flat = param_paths.flatten({k: v for k, v in params.items() if k != LORA_KEY})
  for module, factors in by_module(lora_tree).items():
    path = '/'.join(module) + '/kernel'
    if path not in flat:
      raise ValueError(f'LoRA entry for {path!r} has no kernel in params.')
    kernel = flat[path]
    d_in, d_out = _matrix_shape(path, tuple(kernel.shape))
    merged = _delta(jnp.asarray(kernel, jnp.float32).reshape(d_in, d_out), factors, scale)
    flat[path] = merged.reshape(kernel.shape).astype(kernel.dtype)
  return param_paths.unflatten(flat)


def _conv_input(module: nn.Conv, x: jax.Array) -> jax.Array:
  """The input samples a 1x1 conv reads: x subsampled by the stride on the spatial axes."""
  nsp = len(module.kernel_size)
  if any(k != 1 for k in module.kernel_size) or module.feature_group_count != 1:
    raise ValueError(f"LoRA on conv {'/'.join(module.path)!r} needs a 1x1 kernel without "
                     f'groups; got kernel_size={module.kernel_size}, '
                     f'feature_group_count={module.feature_group_count}.')
  as_tuple = lambda v: (v or 1,) * nsp if v is None or isinstance(v, int) else tuple(v)
  if any(d != 1 for d in as_tuple(module.input_dilation)):
    raise ValueError(f"LoRA on conv {'/'.join(module.path)!r} does not support input_dilation.")
  strides = as_tuple(module.strides)
  return x[(..., *(slice(None, None, s) for s in strides), slice(None))]


def _layer_input(module: nn.Module, x: jax.Array) -> jax.Array:
  return _conv_input(module, x) if isinstance(module, nn.Conv) else x


def _check_shape(module: nn.Module, delta: jax.Array, y: jax.Array, what: str = 'LoRA branch'
                 ) -> None:
  if delta.shape != y.shape:
    raise ValueError(f"{what} of {'/'.join(module.path)!r} has shape {delta.shape} but the "
                     f'layer output has {y.shape} (padding of a 1x1 conv?).')


def _check_factors(module: nn.Module, factors: Mapping[str, jax.Array]) -> tuple[int, int]:
  """(in, out) of the layer's kernel; fails unless it is a LoRA kernel that fits the factors."""
  path = '/'.join(module.path)
  d_in, d_out = _matrix_shape(f'{path}/kernel', module.get_variable('params', 'kernel').shape)
  a, b = factors['lora_a'].shape, factors['lora_b'].shape
  m = factors[DORA_KEY].shape if DORA_KEY in factors else (d_out,)
  if a[0] != d_in or b[1] != d_out or a[1] != b[0] or m != (d_out,):
    raise ValueError(f'LoRA entry {path!r} has lora_a {a}, lora_b {b}'
                     f"{f', m {m}' if DORA_KEY in factors else ''}; its kernel is [{d_in}, "
                     f'{d_out}]. Was the LoRA tree made for another model?')
  return d_in, d_out


def _lora_forward(module: nn.Module, next_fun: Callable[..., Any], args: tuple, kwargs: dict,
                  factors: Mapping[str, jax.Array], scale: float) -> jax.Array:
  """orig(x) + s * ((x @ A) @ B), computed on the layer's own (strided) input."""
  _check_factors(module, factors)
  y = next_fun(*args, **kwargs)
  x = _layer_input(module, args[0] if args else kwargs['inputs'])
  x, a, b = nn.dtypes.promote_dtype(x, factors['lora_a'], factors['lora_b'], dtype=module.dtype)
  # As 2-D [rows, features] dots: the factors' gradients then contract over one axis, which
  # XLA:CPU runs in place instead of first copying x into a transposed layout.
  rows = x.reshape(-1, x.shape[-1])
  delta = ((jnp.dot(rows, a, precision=module.precision) * scale) @ b).reshape(
      *x.shape[:-1], b.shape[-1])
  _check_shape(module, delta, y)
  return y + delta.astype(y.dtype)


def _dora_forward(module: nn.Module, next_fun: Callable[..., Any], args: tuple, kwargs: dict,
                  factors: Mapping[str, jax.Array], scale: float) -> jax.Array:
  """x @ W' + bias with DoRA's merged weight W' (formed explicitly, by definition)."""
  d_in, d_out = _check_factors(module, factors)
  x = _layer_input(module, args[0] if args else kwargs['inputs'])
  kernel = module.get_variable('params', 'kernel')
  weight = _delta(kernel.reshape(d_in, d_out), factors, scale)
  bias = module.get_variable('params', 'bias') if module.use_bias else None
  x, weight, bias = nn.dtypes.promote_dtype(x, weight, bias, dtype=module.dtype)
  y = jnp.dot(x, weight, precision=module.precision)
  y = y if bias is None else y + bias
  # The layer's own output only for its shape (as LoRA checks); jit drops its computation.
  _check_shape(module, y, next_fun(*args, **kwargs), 'DoRA output')
  return y


def _interceptor(groups: Mapping[tuple[str, ...], Mapping[str, jax.Array]], scale: float,
                 used: set[tuple[str, ...]]):
  """A `nn.intercept_methods` interceptor adding LoRA to Dense / Conv layers found in groups."""

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != '__call__' or not isinstance(module, (nn.Dense, nn.Conv)):
      return next_fun(*args, **kwargs)
    factors = groups.get(tuple(module.path))
    if factors is None:
      return next_fun(*args, **kwargs)
    used.add(tuple(module.path))
    if DORA_KEY in factors:
      return _dora_forward(module, next_fun, args, kwargs, factors, scale)
    return _lora_forward(module, next_fun, args, kwargs, factors, scale)

  return intercept


@contextlib.contextmanager
def intercept(lora_tree: Tree, *, scale: float) -> Iterator[None]:
  """Context in which `model.apply` runs every targeted Dense / Conv layer with LoRA.

  Raises:
    ValueError: on exit, if some LoRA entry matched no nn.Dense / nn.Conv call.
  """
  groups, used = by_module(lora_tree), set()
  with nn.intercept_methods(_interceptor(groups, scale, used)):
    yield
  unused = sorted('/'.join(m) for m in set(groups) - used)
  if unused:
    raise ValueError(f'LoRA entries {unused} matched no nn.Dense / nn.Conv call of the model.')


def wrap_apply_fn(apply_fn: Callable[..., Any], *, scale: float) -> Callable[..., Any]:
  """Wraps a `state.make_apply_fn` function so that it applies `params['lora']`.

  Args:
    apply_fn: `apply_fn(params, model_state, images, *, train, rng, **kwargs)` (e.g. `mask`).
    scale: the LoRA scale s (`scaling`).

  Returns:
    The same signature; `params` may hold a top-level 'lora' subtree, which is removed before the
    model sees the parameters and applied through `intercept`.
  """

  def wrapped(params, model_state, images, *, train: bool, rng: jax.Array | None, **kwargs):
    params = dict(params)
    lora_tree = params.pop(LORA_KEY, None)
    if not lora_tree:
      return apply_fn(params, model_state, images, train=train, rng=rng, **kwargs)
    with intercept(lora_tree, scale=scale):
      return apply_fn(params, model_state, images, train=train, rng=rng, **kwargs)

  return wrapped
