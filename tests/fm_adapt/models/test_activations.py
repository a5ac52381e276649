import jax
import jax.numpy as jnp
import numpy as np
from scipy import special

from fm_adapt.models import activations


def test_gelu_is_exact_erf_gelu_with_matching_gradient():
  x = np.linspace(-8.0, 8.0, 4001).astype(np.float32)
  expected = 0.5 * x.astype(np.float64) * (1.0 + special.erf(x / np.sqrt(2.0)))
  np.testing.assert_allclose(activations.gelu(jnp.asarray(x)), expected, atol=2e-6)
  grad = jax.vmap(jax.grad(activations.gelu))(jnp.asarray(x))
  reference = jax.vmap(jax.grad(lambda t: jax.nn.gelu(t, approximate=False)))(jnp.asarray(x))
  np.testing.assert_allclose(grad, reference, atol=1e-6)


def test_gelu_keeps_dtype():
  assert activations.gelu(jnp.ones((3,), jnp.bfloat16)).dtype == jnp.bfloat16
