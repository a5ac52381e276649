"""Prompt tokens for the ViT: VPT-shallow, VPT-deep and embedded prompt tuning (EPT).

Configured through `vit.Model(prompt=dict(kind=..., num_tokens=n))`; `prompt=None` or
`num_tokens=0` builds exactly the base model (no parameters, same arithmetic). All parameters
live in the top-level subtree `prompt/`, so the schedule rule `'prompt/.*'` selects them:

  'vpt_shallow'  prompt/shallow [1, n, D]. VPT-shallow (Jia et al., ECCV 2022): n learned tokens
                 are inserted right after the class token (after the position embedding and the
                 embedding dropout), pass through every block, and are dropped from the encoder
                 output before pooling and the head; `out['encoded']` keeps the [cls?, patches]
                 layout of the base model.
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
                 authors' default. T is fixed by the image size, like the position embedding.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

KINDS = ('vpt_shallow', 'vpt_deep', 'ept')
KEYS = ('kind', 'num_tokens', 'dropout')


def check_config(cfg: Mapping[str, Any] | None) -> dict[str, Any] | None:
  """Validates a ViT prompt config; returns None when it adds nothing (None or 0 tokens).

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


class PromptParams(nn.Module):
  """Holds the prompt parameters; use it with name='prompt' so they live in `prompt/...`.

  Attributes:
    kind: one of KINDS.
    num_tokens: number of prompt tokens (VPT) or prompt channels per token (EPT).
    depth: number of encoder blocks L.
    width: token width D.
    num_seq: number of tokens T of the sequence (class token + patches), for EPT.
    fan_in: fan-in of the patch embedding (C * p * p), for VPT's init.
  """
  kind: str
  num_tokens: int
  depth: int
  width: int
  num_seq: int
  fan_in: int

  @nn.compact
  def __call__(self) -> jax.Array:
    """Returns prompt/shallow [1, n, D], prompt/deep [L, n, D] or prompt/ept [L, T, n]."""
    n = self.num_tokens
    if self.kind == 'vpt_shallow':
      return self.param('shallow', vpt_init(self.fan_in), (1, n, self.width), jnp.float32)
    if self.kind == 'vpt_deep':
      return self.param('deep', vpt_init(self.fan_in), (self.depth, n, self.width), jnp.float32)
    return self.param('ept', nn.initializers.normal(stddev=0.02),
                      (self.depth, self.num_seq, n), jnp.float32)


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
