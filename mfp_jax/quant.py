"""Quantizers with straight-through gradients, and 1-bit packing of sign weights.

Conventions: weights are Flax kernels, output channel on the last axis (``[in, out]`` for
dense, ``[kh, kw, in, out]`` for conv); per-output-channel scales are reduced over every
other axis. Full-precision latent weights live in the optimizer; only signs and scales deploy.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax


def _channel_axes(w: jax.Array) -> tuple[int, ...]:
  return tuple(range(w.ndim - 1))


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def sign_ste(w: jax.Array, clip: float = 1.0) -> jax.Array:
  """``sign(w)`` in ``{-1, +1}`` (``sign(0) = +1``) with the clipped straight-through estimator.

  Backward: ``dL/dw = dL/dsign * (|w| <= clip)`` -- identity inside the clip range, zero
  outside (Courbariaux et al. 2016). Any shape.
  """
  return jnp.where(w >= 0, 1.0, -1.0).astype(w.dtype)


def _sign_ste_fwd(w, clip):
  return sign_ste(w, clip), w


def _sign_ste_bwd(clip, w, g):
  return (g * (jnp.abs(w) <= clip).astype(g.dtype),)


sign_ste.defvjp(_sign_ste_fwd, _sign_ste_bwd)


def binarize_mean_scale(w: jax.Array, *, clip: float = 1.0) -> jax.Array:
  """1-bit weights ``alpha * sign(w)`` with ``alpha = mean|w|`` per output channel (XNOR-Net).

  Args:
    w: latent kernel, output channel last (``[..., out]``).
    clip: STE clip range of :func:`sign_ste`.

  Returns:
    ``w_hat``, shape of ``w``; values ``+-alpha[out]``. Gradients reach ``w`` through the STE
    and through ``alpha``.
  """
  alpha = jnp.mean(jnp.abs(w), axis=_channel_axes(w), keepdims=True)
  return alpha * sign_ste(w, clip)


@jax.custom_vjp
def sign_annealed(w: jax.Array, t: jax.Array) -> jax.Array:
  """``sign(w)`` in ``{-1, +1}`` with the annealed tanh estimator of Q-SNN.

  Backward: ``dL/dw = dL/dsign * k t (1 - tanh(t w)^2)`` with ``k = max(1, 1/t)``; as ``t``
  grows the estimator sharpens toward the true derivative of ``sign``. ``t`` (a scalar
  array, so changing it never recompiles) gets no gradient.
  """
  del t
  return jnp.where(w >= 0, 1.0, -1.0).astype(w.dtype)


def annealed_grad(w: jax.Array, t: jax.Array) -> jax.Array:
  """The estimator's derivative ``max(1, 1/t) * t * (1 - tanh(t w)^2)``, elementwise."""
  k = jnp.maximum(1.0, 1.0 / t)
  # 1 - tanh^2 = sech^2, computed as 1 / cosh^2: no cancellation in float32 where tanh ~ 1.
  return k * t / jnp.cosh(t * w) ** 2


def _sign_annealed_fwd(w, t):
  return sign_annealed(w, t), (w, t)


def _sign_annealed_bwd(res, g):
  w, t = res
  return g * annealed_grad(w, t).astype(g.dtype), jnp.zeros_like(t)


sign_annealed.defvjp(_sign_annealed_fwd, _sign_annealed_bwd)


def anneal_schedule(step: jax.Array | int, total_steps: int, *, t_min: float = 0.1,
                    t_max: float = 10.0) -> jax.Array:
  """Log-uniform sharpness ``t_min * (t_max / t_min)^(step / total_steps)``, clipped to the ends.

  Optax's ``exponential_decay`` with a growth rate: a pure function of the step, computed
  outside (or inside) the jitted step and passed in as a float32 scalar.
  """
  schedule = optax.exponential_decay(jnp.float32(t_min), max(int(total_steps), 1),
                                     jnp.float32(t_max / t_min), end_value=jnp.float32(t_max))
  return jnp.asarray(schedule(jnp.asarray(step, jnp.float32)), jnp.float32)


def binarize_pow2(w: jax.Array, *, estimator: str = 'ste', t: jax.Array | float = 1.0,
                  clip: float = 1.0, eps: float = 1e-5) -> jax.Array:
  """Q-SNN weight binarizer: standardize per output channel, sign, power-of-two scale.

  ``w_std = (w - mean) / std`` over every axis but the last; ``w_hat = 2^round(log2(mean
  |w_std|)) * sign(w_std)`` -- the scale is a shift in hardware. The scale is a statistic
  (no gradient); the sign's backward is the clipped STE (``estimator='ste'``) or the annealed
  estimator (``'annealed'``, sharpness ``t``).

  Args:
    w: latent kernel ``[..., out]``.
    estimator: ``'ste'`` or ``'annealed'``.
    t: sharpness of the annealed estimator (scalar).
    clip: STE clip range (in standardized units).

  Returns:
    ``w_hat`` with the shape of ``w``, values ``+-2^k`` per output channel.
  """
  axes = _channel_axes(w)
  mu = jnp.mean(w, axis=axes, keepdims=True)
  sd = jnp.std(w, axis=axes, keepdims=True)
  w_std = (w - mu) / (sd + eps)
  scale = jax.lax.stop_gradient(
      2.0 ** jnp.round(jnp.log2(jnp.mean(jnp.abs(w_std), axis=axes, keepdims=True) + eps)))
  if estimator == 'ste':
    return scale * sign_ste(w_std, clip)
  if estimator == 'annealed':
    return scale * sign_annealed(w_std, jnp.asarray(t, w.dtype))
  raise ValueError(f"unknown estimator {estimator!r}; allowed: ['annealed', 'ste']")


def uniform_levels(bits: int) -> int:
  """Number of positive levels ``n = 2^(b-1) - 1`` of the ``b``-bit quantizer of Eq. 4."""
  if bits < 2:
    raise ValueError(f'Eq. 4 uniform levels need bits >= 2 (use sign for 1 bit), got {bits}')
  return 2 ** (bits - 1) - 1


def quantize_uniform(w: jax.Array, bits: int, alpha: jax.Array | float) -> jax.Array:
  """Paper Eq. 4: ``Q_b(w) = alpha * {0, +-1/n, ..., +-1}`` with ``n = 2^(b-1) - 1``.

  Forward: ``alpha * round(clip(w / alpha, -1, 1) * n) / n``; ``bits = 1`` is
  ``alpha * sign(w)``. Backward: straight-through inside ``[-alpha, alpha]``, zero outside;
  ``alpha`` gets no gradient (it is a statistic, not a parameter).

  Args:
    w: any shape; bits: ``>= 1``; alpha: positive scale broadcastable to ``w``.

  Returns:
    quantized ``w``, same shape and dtype.
  """
  alpha = jax.lax.stop_gradient(jnp.asarray(alpha, w.dtype))
  if bits == 1:
    return alpha * sign_ste(w / alpha)
  n = uniform_levels(bits)
  wc = jnp.clip(w, -alpha, alpha)
  q = alpha * jnp.round(wc / alpha * n) / n
  return wc + jax.lax.stop_gradient(q - wc)


def quantize_max_scale(w: jax.Array, bits: int = 8) -> jax.Array:
  """Eq. 4 with ``alpha = max|w|`` over the whole tensor (the 8-bit first/last layer)."""
  alpha = jnp.maximum(jnp.max(jnp.abs(w)), jnp.finfo(w.dtype).tiny)
  return quantize_uniform(w, bits, alpha)


def quantize_membrane(u: jax.Array, bits: int, *, vmax: float = 1.0) -> jax.Array:
  """``b``-bit membrane quantizer (the Q-SNN setting that MFP removes), straight-through.

  ``bits >= 2``: Eq. 4 levels on ``[-vmax, vmax]``. ``bits = 1``: the levels ``{0, vmax}``
  (a one-bit register that can hold "nothing" or "near threshold"; negative values clip to 0).
  """
  if bits == 1:
    uc = jnp.clip(u, 0.0, vmax)
    return uc + jax.lax.stop_gradient(vmax * jnp.round(uc / vmax) - uc)
  return quantize_uniform(u, bits, vmax)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def multibit_spike(h: jax.Array, vth: float = 1.0, bits: int = 1) -> jax.Array:
  """Multi-bit spikes ``floor(clip(h / vth, 0, 2^bits - 1))`` (Bit Budget paper).

  ``bits = 1`` is the ordinary step ``h >= vth``. Backward: straight-through ``1 / vth``
  inside ``[0, 2^bits * vth)``, zero outside. Any shape.
  """
  return jnp.floor(jnp.clip(h / vth, 0, 2**bits - 1))


def _multibit_fwd(h, vth, bits):
  return multibit_spike(h, vth, bits), h


def _multibit_bwd(vth, bits, h, g):
  inside = (h >= 0) & (h < (2**bits) * vth)
  return (g * inside.astype(g.dtype) / vth,)


multibit_spike.defvjp(_multibit_fwd, _multibit_bwd)


def pack_signs(w: np.ndarray | jax.Array) -> np.ndarray:
  """Packs ``sign(w)`` (``w >= 0`` -> bit 1) into ``uint8``, 1 bit per weight, row-major.

  Returns:
    ``uint8[ceil(w.size / 8)]``; the shape is not stored -- keep it beside the bytes.
  """
  return np.packbits(np.asarray(w).reshape(-1) >= 0)


def unpack_signs(packed: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
  """Inverse of :func:`pack_signs`: ``int8`` array of ``+-1`` with the given shape.

  Raises:
    ValueError: ``packed`` has the wrong number of bytes for ``shape``.
  """
  size = int(np.prod(shape, dtype=np.int64))
  packed = np.asarray(packed, np.uint8).reshape(-1)
  if packed.size != (size + 7) // 8:
    raise ValueError(f'{packed.size} packed bytes cannot hold shape {tuple(shape)}: '
                     f'expected {(size + 7) // 8}')
  bits = np.unpackbits(packed, count=size)
  return (bits.astype(np.int8) * 2 - 1).reshape(shape)
