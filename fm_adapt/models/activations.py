"""Activation functions shared by the models and the adaptation modules."""
import math

import jax
from jax import lax


def gelu(x: jax.Array) -> jax.Array:
  """Exact (erf) GELU, `0.5 * x * (1 + erf(x / sqrt(2)))`, as PyTorch `nn.GELU()` / timm.

  The same function as `jax.nn.gelu(x, approximate=False)`, written with `lax.erf`: jax's
  version goes through `erfc`, which XLA:CPU duplicates into up to three fusions (value,
  derivative, a transposed copy). This form made a ViT MLP block's forward + backward 45%
  faster on the development CPU (benchmarks/README.md).
  """
  return 0.5 * x * (1.0 + lax.erf(x * (1.0 / math.sqrt(2.0))).astype(x.dtype))
