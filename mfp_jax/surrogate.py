"""Heaviside step functions with surrogate gradients.

Each surrogate is a pure function ``f(x) -> step(x)`` whose forward pass is the exact
Heaviside step (``1.0`` where ``x >= 0``) and whose backward pass is the derivative of a
smooth primitive. The primitive is kept beside it (``*_primitive``) so tests can check the
custom gradient against ``jax.grad`` of the primitive.

Pick one by name from a config with :func:`get_surrogate`.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp

from mfp_jax import registry

SpikeFn = Callable[[jax.Array], jax.Array]


def _heaviside(x: jax.Array) -> jax.Array:
  return (x >= 0).astype(x.dtype)


def _with_surrogate(grad_fn: Callable[[jax.Array, float], jax.Array]):
  """Builds a step function of ``(x, alpha)`` whose derivative is ``grad_fn(x, alpha)``."""

  @functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
  def step(x, alpha):
    return _heaviside(x)

  def fwd(x, alpha):
    return _heaviside(x), x

  def bwd(alpha, x, g):
    return (g * grad_fn(x, alpha).astype(g.dtype),)

  step.defvjp(fwd, bwd)
  return step


# --- ATan (Fang et al. 2021; SpikingJelly's default) -------------------------------------


def atan_primitive(x: jax.Array, alpha: float = 2.0) -> jax.Array:
  """Smooth primitive ``1/2 + arctan(pi/2 * alpha * x) / pi``. Any shape."""
  return 0.5 + jnp.arctan(0.5 * math.pi * alpha * x) / math.pi


def atan_grad(x: jax.Array, alpha: float = 2.0) -> jax.Array:
  """``(alpha/2) / (1 + (pi/2 * alpha * x)^2)``, elementwise."""
  return (0.5 * alpha) / (1.0 + (0.5 * math.pi * alpha * x) ** 2)


_atan = _with_surrogate(atan_grad)


def atan(x: jax.Array, alpha: float = 2.0) -> jax.Array:
  """Heaviside step with the ATan surrogate gradient.

  Args:
    x: any shape, usually ``H - Vth``.
    alpha: sharpness; the gradient at 0 is ``alpha / 2``.

  Returns:
    ``(x >= 0)`` as ``x.dtype``, same shape as ``x``.
  """
  return _atan(x, float(alpha))


# --- Sigmoid ------------------------------------------------------------------------------


def sigmoid_primitive(x: jax.Array, alpha: float = 4.0) -> jax.Array:
  """Smooth primitive ``sigmoid(alpha * x)``. Any shape."""
  return jax.nn.sigmoid(alpha * x)


def sigmoid_grad(x: jax.Array, alpha: float = 4.0) -> jax.Array:
  """``alpha * s * (1 - s)`` with ``s = sigmoid(alpha * x)``, elementwise."""
  s = jax.nn.sigmoid(alpha * x)
  return alpha * s * (1.0 - s)


_sigmoid = _with_surrogate(sigmoid_grad)


def sigmoid(x: jax.Array, alpha: float = 4.0) -> jax.Array:
  """Heaviside step with the sigmoid surrogate gradient. Same shape as ``x``."""
  return _sigmoid(x, float(alpha))


# --- Triangle (the Q-SNN / TET line's LIF surrogate, width ``alpha``) ---------------------


def triangle_primitive(x: jax.Array, alpha: float = 1.0) -> jax.Array:
  """Piecewise-quadratic primitive whose derivative is the triangle of half-width ``alpha``."""
  y = jnp.clip(x / alpha, -1.0, 1.0)
  # Integral of (1 - |y|) / alpha dx, shifted so it runs from 0 to 1.
  return 0.5 + y - 0.5 * y * jnp.abs(y)


def triangle_grad(x: jax.Array, alpha: float = 1.0) -> jax.Array:
  """``max(0, alpha - |x|) / alpha^2``, elementwise (area 1)."""
  return jnp.maximum(0.0, alpha - jnp.abs(x)) / (alpha * alpha)


_triangle = _with_surrogate(triangle_grad)


def triangle(x: jax.Array, alpha: float = 1.0) -> jax.Array:
  """Heaviside step with the triangle surrogate gradient. Same shape as ``x``."""
  return _triangle(x, float(alpha))


# name -> (step function of (x, alpha), default alpha).
SURROGATES: registry.Registry[tuple[Callable[..., jax.Array], float]] = registry.Registry(
    'surrogate')
register_surrogate = registry.registrar(SURROGATES)
register_surrogate('atan', (atan, 2.0))
register_surrogate('sigmoid', (sigmoid, 4.0))
register_surrogate('triangle', (triangle, 1.0))


def get_surrogate(name: str, alpha: float | None = None) -> SpikeFn:
  """Returns the step function ``x -> spikes`` named ``name`` with its ``alpha`` bound.

  Args:
    name: registered in ``SURROGATES`` (built in: ``'atan'``, ``'sigmoid'``, ``'triangle'``;
      add one with ``register_surrogate(name, (fn, default_alpha))``).
    alpha: sharpness; ``None`` uses the surrogate's default.

  Raises:
    ValueError: unknown name or non-positive ``alpha``.
  """
  fn, default = SURROGATES.get(name)
  alpha = default if alpha is None else float(alpha)
  if not alpha > 0:
    raise ValueError(f'surrogate alpha must be > 0, got {alpha}')
  return functools.partial(fn, alpha=alpha)
