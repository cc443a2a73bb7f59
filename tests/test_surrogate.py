import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mfp_jax import surrogate

GRID = jnp.linspace(-3.0, 3.0, 121)


@pytest.mark.parametrize('name', sorted(surrogate.SURROGATES))
@pytest.mark.parametrize('alpha', [None, 0.5, 3.0])
def test_forward_is_exact_step(name, alpha):
  fn = surrogate.get_surrogate(name, alpha)
  np.testing.assert_array_equal(fn(GRID), (GRID >= 0).astype(jnp.float32))


@pytest.mark.parametrize('name', sorted(surrogate.SURROGATES))
@pytest.mark.parametrize('alpha', [None, 0.5, 3.0])
def test_custom_grad_equals_grad_of_primitive(name, alpha):
  fn = surrogate.get_surrogate(name, alpha)
  a = surrogate.SURROGATES.get(name)[1] if alpha is None else alpha
  primitive = getattr(surrogate, f'{name}_primitive')
  got = jax.vmap(jax.grad(fn))(GRID)
  want = jax.vmap(jax.grad(lambda x: primitive(x, a)))(GRID)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_atan_closed_form():
  # The formula: (alpha/2) / (1 + (pi/2 * alpha * x)^2), alpha = 2 by default.
  fn = surrogate.get_surrogate('atan')
  for x in [-1.3, -0.2, 0.0, 0.4, 2.0]:
    want = 1.0 / (1 + (math.pi * x) ** 2)
    np.testing.assert_allclose(jax.grad(fn)(jnp.float32(x)), want, rtol=1e-6)


def test_triangle_closed_form():
  fn = surrogate.get_surrogate('triangle', 0.5)
  xs = jnp.array([-0.6, -0.25, 0.0, 0.1, 0.5, 0.7])
  want = np.maximum(0.0, 0.5 - np.abs(np.asarray(xs))) / 0.25
  np.testing.assert_allclose(jax.vmap(jax.grad(fn))(xs), want, rtol=1e-6)


def test_sigmoid_closed_form():
  fn = surrogate.get_surrogate('sigmoid', 4.0)
  xs = np.array([-1.0, 0.0, 0.3])
  s = 1 / (1 + np.exp(-4 * xs))
  np.testing.assert_allclose(jax.vmap(jax.grad(fn))(jnp.asarray(xs)), 4 * s * (1 - s), rtol=1e-5)


@pytest.mark.parametrize('name', sorted(surrogate.SURROGATES))
def test_jit_vmap_grad_compose(name):
  fn = surrogate.get_surrogate(name)
  x = jnp.linspace(-0.9, 0.9, 12).reshape(3, 4)  # inside every default support
  g_jit = jax.jit(jax.grad(lambda v: fn(v).sum()))(x)
  g_vmap = jax.vmap(jax.grad(lambda v: fn(v).sum()))(x)
  np.testing.assert_allclose(g_jit, g_vmap, rtol=1e-6)
  assert jnp.all(g_jit > 0)


def test_unknown_name_and_bad_alpha():
  with pytest.raises(ValueError, match="allowed: \\['atan', 'sigmoid', 'triangle'\\]"):
    surrogate.get_surrogate('relu')
  with pytest.raises(ValueError, match='alpha must be > 0'):
    surrogate.get_surrogate('atan', 0.0)
