"""Prompt tokens for ViT-layout models: VPT-shallow, VPT-deep and embedded prompt tuning (EPT).

Like LoRA (`fm_adapt.adapt.lora`), prompts are a pure pytree transform attached from outside:
`init` makes the prompt tree from the base parameters, it lives in the top-level subtree
`prompt/` (so the schedule rule `'prompt/.*'` selects it), and `wrap_apply_fn` takes it out of
the parameters and applies it by intercepting module calls (`flax.linen.intercept_methods`).
The model holds no prompt code:

  params = dict(base_params, prompt=prompts.init(base_params, cfg, rng))
  apply_fn = prompts.wrap_apply_fn(state.make_apply_fn(model), cfg)

  'vpt_shallow'  prompt/shallow [1, n, D]. VPT-shallow (Jia et al., ECCV 2022): n learned tokens
                 are inserted right after the prefix tokens (the class token and any register
                 tokens; after the position embedding and the embedding dropout), pass through
                 every block, and are dropped from the encoder output before pooling and the
                 head; `out['encoded']` keeps the [cls?, registers?, patches] layout of the base
                 model.
  'vpt_deep'     prompt/deep [L, n, D]. VPT-deep: row 0 is inserted like the shallow prompts; at
                 the input of every later block i the previous block's outputs at the prompt
                 positions are discarded and replaced by row i.
                 VPT initializes both with uniform(-v, v), v = sqrt(6 / (C*p*p + D)) (xavier
                 uniform with the patch embedding's fan-in C*p*p), as done here; an optional
                 'dropout' rate is applied to the prompt tokens in training (VPT's prompt dropout).
  'ept'          prompt/ept [L, T, n]. Embedded prompt tuning (Zu et al., "Embedded Prompt
                 Tuning: Towards Enhanced Calibration of Pretrained Models for Medical Images",
                 Medical Image Analysis 97, 2024), implemented as in the authors' code
                 (github.com/zuwenqiang/EPT, `medfmc/models/ept.py`): instead of new tokens, each of
                 the T tokens (class token and patches) of block l gets n prompt values that are
                 embedded as n expanded channels of its row of the attention map. The pre-softmax
                 attention logits [T, T] (already scaled by 1/sqrt(d_head)) are concatenated with
                 the prompt [T, n] (shared by all heads) to [T, T + n], the softmax runs over the
                 T + n channels, and the n prompt channels are dropped before multiplying with
                 the values. The effect is a learned per-token ("patch-wise") scaling of each
                 attention output by Z_i / (Z_i + sum_k exp(P[l, i, k])), Z_i = sum_j exp(s_ij),
                 which the paper reads as distribution calibration. Prompts are used in every
                 block (the authors' default, "EPT-deep") and initialized normal(0.02), the
                 authors' default. T is the number of tokens the model runs on: class token,
                 register tokens and the patches of the image (`init(..., image_shape=)`: the
                 image's grid at the patch size of `embedding/kernel`). Without image_shape the
                 patches are read from `pos_embedding`, which is right only when it is stored at
                 the image's grid (not for a model with posemb_grid run at another resolution,
                 e.g. DINOv2 stored at 37x37); a model with posemb='sincos2d' has none.

The layout prompts attach to is that of `fm_adapt.models.vit`; any model with it gets prompts
without edits. Parameters read by `init`:
  embedding/kernel [p, p, C, D]     the patch embedding: the width D and VPT's fan-in C*p*p
  cls                               present iff there is a class token (prompts go after it)
  registers [1, R, D]               register tokens, after the class token (prompts go after)
  pos_embedding [1, N, D]           the N patch tokens without image_shape (EPT: T = N + prefix)
  encoder/block_{i}/...             the L blocks
Module calls intercepted (positional token arguments):
  encoder                    __call__(tokens [B, T, D], deterministic)  blocks and final norm
  encoder/block_{i}          __call__(tokens [B, T, D], ...)            block i
  encoder/block_{i}/attn/core  __call__(q, k, v) -> [B, T, H, d]       the attention of block i
"""
from __future__ import annotations

import contextlib
import inspect
import math
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fm_adapt import param_paths

PROMPT_KEY = 'prompt'
KINDS = ('vpt_shallow', 'vpt_deep', 'ept')
KEYS = ('kind', 'num_tokens', 'dropout')
ENCODER = 'encoder'
BLOCK = re.compile(r'encoder/block_(\d+)')
ATTENTION = re.compile(r'encoder/block_(\d+)/attn/core')
EMBEDDING = 'embedding/kernel'
CLASS_TOKEN = 'cls'
REGISTERS = 'registers'
POSITION = 'pos_embedding'
# The leaf of the prompt tree of each kind.
LEAVES = {'vpt_shallow': 'shallow', 'vpt_deep': 'deep', 'ept': 'ept'}


def check_config(cfg: Mapping[str, Any] | None) -> dict[str, Any] | None:
  """Validates a prompt config; returns None when it adds nothing (None or 0 tokens).

  Args:
    cfg: None, or a dict with 'kind' (one of KINDS), 'num_tokens' (int >= 0) and an optional
      'dropout' rate on VPT prompt tokens (default 0).

  Raises:
    ValueError: for unknown keys or kinds (listing the valid ones) or a bad num_tokens.
  """
  if cfg is None:
    return None
  cfg = dict(cfg)
  unknown = sorted(set(cfg) - set(KEYS))
  if unknown:
    raise ValueError(f'Unknown prompt key(s) {unknown}; valid keys: {list(KEYS)}.')
  if cfg.get('kind') not in KINDS:
    raise ValueError(f"Unknown prompt kind {cfg.get('kind')!r}; valid: {list(KINDS)}.")
  num = cfg.get('num_tokens')
  if not isinstance(num, int) or isinstance(num, bool) or num < 0:
    raise ValueError(f'prompt num_tokens must be an int >= 0, got {num!r}.')
  if cfg['kind'] == 'ept' and cfg.get('dropout'):
    raise ValueError('prompt dropout applies to VPT prompt tokens, not to EPT.')
  if num == 0:
    return None
  return dict(kind=cfg['kind'], num_tokens=num, dropout=float(cfg.get('dropout', 0.0)))


def vpt_init(fan_in: int) -> nn.initializers.Initializer:
  """VPT's prompt init: uniform(-v, v), v = sqrt(6 / (fan_in + D)), D the last axis."""

  def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    bound = math.sqrt(6.0 / (fan_in + shape[-1]))
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def count_prefix(params: Mapping[str, Any]) -> int:
  """The tokens before the patches (and before the prompts): the class token and registers."""
  registers = params.get(REGISTERS)
  return int(CLASS_TOKEN in params) + (0 if registers is None else int(registers.shape[1]))


def geometry(params: Mapping[str, Any], image_shape: tuple[int, ...] | None = None
             ) -> dict[str, Any]:
  """What prompts need to know of a ViT-layout parameter tree.

  Args:
    params: the base ViT-layout parameters (arrays or ShapeDtypeStructs).
    image_shape: (H, W, C) of the images the model runs on, or None.

  Returns:
    dict(width=D, fan_in=C*p*p, depth=L, num_prefix=class token + register tokens,
    num_patches=N: the image's grid at the patch size with image_shape, else from
    pos_embedding, or None without either).

  Raises:
    ValueError: if the tree lacks the ViT layout (no patch embedding or no encoder blocks), or
      the image is not divisible by the patch size.
  """
  flat = param_paths.flatten(params)
  if EMBEDDING not in flat or len(flat[EMBEDDING].shape) != 4:
    raise ValueError(f'Prompts need a ViT-layout model with a patch embedding {EMBEDDING!r} '
                     f'[p, p, C, D]; closest paths: {param_paths.closest_paths(EMBEDDING, flat)}.')
  blocks = {int(m.group(1)) for p in flat if (m := BLOCK.match(p))}
  if not blocks or blocks != set(range(len(blocks))):
    raise ValueError(f'Prompts need encoder blocks encoder/block_0..block_{{L-1}}; found '
                     f'{sorted(blocks)}.')
  p1, p2, channels, width = flat[EMBEDDING].shape
  posemb = flat.get(POSITION)
  num_patches = None if posemb is None else posemb.shape[1]
  if image_shape is not None:
    h, w = image_shape[0], image_shape[1]
    if h % p1 or w % p2:
      raise ValueError(f'Image size {h}x{w} is not divisible by the patch size {p1}x{p2}.')
    num_patches = (h // p1) * (w // p2)
  return dict(width=width, fan_in=p1 * p2 * channels, depth=len(blocks),
              num_prefix=count_prefix(params), num_patches=num_patches)


def init(params: Mapping[str, Any], cfg: Mapping[str, Any], rng: jax.Array, *,
         image_shape: tuple[int, ...] | None = None) -> dict[str, Any]:
  """Creates the prompt tree (the `prompt/` subtree) for base parameters `params`.

  Args:
    params: the base ViT-layout parameters (arrays or ShapeDtypeStructs).
    cfg: a prompt config (`check_config`).
    rng: PRNG key.
    image_shape: (H, W, C) of the images the model runs on: EPT's token count T comes from its
      grid (else from `pos_embedding`, see the module docstring). VPT does not need it.

  Returns:
    {'shallow': [1, n, D]}, {'deep': [L, n, D]} or {'ept': [L, T, n]}; {} for no prompts.

  Raises:
    ValueError: for a bad config, a tree without the ViT layout, or EPT without image_shape
      and without a learned position embedding (the token count T is unknown).
  """
  cfg = check_config(cfg)
  if cfg is None:
    return {}
  if PROMPT_KEY in params:
    raise ValueError(f"params already hold a {PROMPT_KEY!r} subtree.")
  g, kind, n = geometry(params, image_shape), cfg['kind'], cfg['num_tokens']
  if kind == 'vpt_shallow':
    return {'shallow': vpt_init(g['fan_in'])(rng, (1, n, g['width']))}
  if kind == 'vpt_deep':
    return {'deep': vpt_init(g['fan_in'])(rng, (g['depth'], n, g['width']))}
  if g['num_patches'] is None:
    raise ValueError(f"EPT prompts are [L, T, n], one row per token, and T comes from the "
                     f"image_shape, else from {POSITION!r} [1, N, D]; this model has none "
                     "(posemb='sincos2d'?). Pass image_shape, or use a learned position "
                     "embedding (posemb='learn').")
  num_seq = g['num_patches'] + g['num_prefix']
  return {'ept': nn.initializers.normal(stddev=0.02)(rng, (g['depth'], num_seq, n), jnp.float32)}


def insert(x: jax.Array, tokens: jax.Array, num_prefix: int) -> jax.Array:
  """Inserts tokens [B, n, D] into x [B, T, D] after its first `num_prefix` tokens."""
  return jnp.concatenate([x[:, :num_prefix], tokens.astype(x.dtype), x[:, num_prefix:]], axis=1)


def replace(x: jax.Array, tokens: jax.Array, num_prefix: int) -> jax.Array:
  """Replaces x[:, num_prefix:num_prefix + n] of x [B, T, D] by tokens [B, n, D]."""
  return jax.lax.dynamic_update_slice_in_dim(x, tokens.astype(x.dtype), num_prefix, axis=1)


def remove(x: jax.Array, num_prefix: int, num_tokens: int) -> jax.Array:
  """Drops the num_tokens tokens after the first num_prefix of x [B, T, D]."""
  return jnp.concatenate([x[:, :num_prefix], x[:, num_prefix + num_tokens:]], axis=1)


def ept_attention(q: jax.Array, k: jax.Array, v: jax.Array, prompt: jax.Array) -> jax.Array:
  """Attention with EPT prompt channels embedded in the attention map.

  Args:
    q, k, v: [B, T, H, d] queries, keys and values.
    prompt: [T, n] prompt logits of this block, shared by all heads.

  Returns:
    [B, T, H, d]: softmax([q k^T / sqrt(d), prompt]) restricted to its first T channels, times v.
  """
  b, t, h, d = q.shape
  logits = jnp.einsum('bqhd,bkhd->bhqk', q, k) / jnp.sqrt(d).astype(q.dtype)
  prompt = jnp.broadcast_to(prompt.astype(logits.dtype), (b, h, t, prompt.shape[-1]))
  weights = jax.nn.softmax(jnp.concatenate([logits, prompt], axis=-1), axis=-1)[..., :t]
  return jnp.einsum('bhqk,bkhd->bqhd', weights, v)


def _tokens_arg(args: tuple, path: str) -> tuple[jax.Array, tuple]:
  if not args:
    raise ValueError(f'Prompts need the tokens of {path!r} as its first positional argument.')
  return args[0], args[1:]


def _prompt_tokens(table: jax.Array, x: jax.Array, rate: float, context: Any, args: tuple,
                   kwargs: dict) -> jax.Array:
  """The table [L, n, D] broadcast to [B, L, n, D], with VPT's prompt dropout in training."""
  tokens = jnp.broadcast_to(table.astype(x.dtype)[None], (x.shape[0], *table.shape))
  bound = inspect.signature(context.orig_method).bind(*args, **kwargs)  # Bound to the module.
  bound.apply_defaults()
  if rate == 0.0 or bound.arguments.get('deterministic', True):
    return tokens
  keep = jax.random.bernoulli(context.module.make_rng('dropout'), 1.0 - rate, tokens.shape)
  return jnp.where(keep, tokens / (1.0 - rate), jnp.zeros_like(tokens))


def _interceptor(tree: Mapping[str, jax.Array], cfg: Mapping[str, Any], num_prefix: int,
                 used: set[str]):
  """A `nn.intercept_methods` interceptor applying the prompts of `tree`."""
  kind, table = cfg['kind'], tree[LEAVES[cfg['kind']]]
  running = {}  # The VPT tokens [B, L, n, D] of the encoder call in progress.

  def encoder(next_fun, args, kwargs, context, path):
    x, rest = _tokens_arg(args, path)
    tokens = _prompt_tokens(table, x, cfg['dropout'], context, args, kwargs)
    running['tokens'] = tokens
    y = next_fun(insert(x, tokens[:, 0], num_prefix), *rest, **kwargs)
    used.add(path)
    return remove(y, num_prefix, cfg['num_tokens'])

  def intercept(next_fun, args, kwargs, context):
    path = '/'.join(context.module.path)
    if context.method_name != '__call__':
      return next_fun(*args, **kwargs)
    if kind == 'ept':
      if (match := ATTENTION.fullmatch(path)) is None:
        return next_fun(*args, **kwargs)
      row = int(match.group(1))
      if row >= table.shape[0] or table.shape[1] != args[0].shape[1]:
        raise ValueError(f'EPT prompt {table.shape} [L, T, n] does not fit {path!r}, block '
                         f'{row} over {args[0].shape[1]} tokens (made for another image size? '
                         'prompts.init(..., image_shape=) sizes T to the images run).')
      used.add(path)
      return ept_attention(*args, table[row])
    if path == ENCODER:
      return encoder(next_fun, args, kwargs, context, path)
    match = BLOCK.fullmatch(path)
    if kind == 'vpt_deep' and match and int(match.group(1)) > 0:
      x, rest = _tokens_arg(args, path)
      used.add(path)
      return next_fun(replace(x, running['tokens'][:, int(match.group(1))], num_prefix), *rest,
                      **kwargs)
    return next_fun(*args, **kwargs)

  return intercept


def _expected_calls(cfg: Mapping[str, Any], depth: int) -> set[str]:
  if cfg['kind'] == 'ept':
    return {f'encoder/block_{i}/attn/core' for i in range(depth)}
  deep = {f'encoder/block_{i}' for i in range(1, depth)} if cfg['kind'] == 'vpt_deep' else set()
  return {ENCODER} | deep


@contextlib.contextmanager
def intercept(tree: Mapping[str, jax.Array], cfg: Mapping[str, Any], *, num_prefix: int
              ) -> Iterator[None]:
  """Context in which `model.apply` runs with the prompts of `tree` (from `init`).

  Raises:
    ValueError: for a tree that does not hold the prompt of `cfg`, or, on exit, if a module call
      the prompts need (see the module docstring) did not happen.
  """
  cfg = check_config(cfg)
  leaf = LEAVES[cfg['kind']] if cfg else None
  if cfg is None or set(tree) != {leaf}:
    raise ValueError(f'The prompt tree has {sorted(tree)}; the prompt config {cfg} needs '
                     f'[{leaf!r}].')
  used: set[str] = set()
  with nn.intercept_methods(_interceptor(tree, cfg, num_prefix, used)):
    yield
  missing = sorted(_expected_calls(cfg, tree[leaf].shape[0]) - used)
  if missing:
    raise ValueError(f'Prompts found no call of {missing} in the model; prompts need the ViT '
                     'layout of fm_adapt.adapt.prompts.')


def wrap_apply_fn(apply_fn: Callable[..., Any], cfg: Mapping[str, Any]) -> Callable[..., Any]:
  """Wraps a `state.make_apply_fn` function so that it applies `params['prompt']`.

  Args:
    apply_fn: `apply_fn(params, model_state, images, *, train, rng, **kwargs)`.
    cfg: the prompt config the tree was made with (`init`).

  Returns:
    The same signature; the top-level 'prompt' subtree of `params` is removed before the model
    sees the parameters and applied through `intercept` (`apply_fn` itself for no prompts).
  """

  if check_config(cfg) is None:
    return apply_fn

  def wrapped(params, model_state, images, *, train: bool, rng: jax.Array | None, **kwargs):
    params = dict(params)
    if PROMPT_KEY not in params:
      raise ValueError(f"The prompt config {cfg} needs a top-level {PROMPT_KEY!r} subtree in "
                       f'params (prompts.init); the params hold {sorted(params)}.')
    tree = params.pop(PROMPT_KEY)
    with intercept(tree, cfg, num_prefix=count_prefix(params)):
      return apply_fn(params, model_state, images, train=train, rng=rng, **kwargs)

  return wrapped
