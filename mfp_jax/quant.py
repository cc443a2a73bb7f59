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
