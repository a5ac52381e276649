"""BatchNorm over the real rows of a padded batch.

A training batch may end in padding rows (`mask` False): the last, short batch of an epoch
padded to the compiled shape. Models with batch statistics take `mask` [B] in `__call__` and
pass it here, so that the padding enters neither the normalisation nor the running statistics
and the padded batch trains exactly as the short batch it stands for.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


def normalize(bn: nn.BatchNorm, x: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Applies `bn` to x [B, ...]; in training, rows where `mask` [B] is False are left out."""
  if mask is None or bn.use_running_average:
    return bn(x)
  return bn(x, mask=jnp.broadcast_to(mask.reshape(-1, *([1] * (x.ndim - 1))), x.shape))
