"""Losses on per-step logits ``[T, B, K]`` and the WS-DR firing-rate term. Pure functions.

``mask: [B]`` weights each example (0 for the padding rows of the last eval batch).
Classification losses are registered by name (:func:`register_loss`): a loss is
``fn(logits [T, B, K], labels [B], mask [B], **kwargs) -> scalar``, and a config's ``loss``
section holds ``name``, the firing-rate term's ``fr_lambda`` / ``fr_target``, and the loss's
own keyword arguments (e.g. ``lam`` for ``tet``, ``label_smoothing`` for the cross-entropies).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mfp_jax import registry

LOSSES: registry.Registry = registry.Registry('loss')
register_loss = registry.registrar(LOSSES)


def _masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of ``values [B]`` weighted by ``mask [B]``."""
  return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def _label_smoothing_ok(s: object) -> bool:
  """The one rule for ``label_smoothing``, checked at config time and at the call."""
  return isinstance(s, (int, float)) and 0.0 <= s < 1.0


def _smoothed_ce(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
  """Cross-entropy ``[...]`` of ``logits [..., K]`` against ``labels [...]``, the one-hot
  targets smoothed to ``(1 - s) * onehot + s / K`` (plain CE at ``s = 0``)."""
  if not _label_smoothing_ok(label_smoothing):
    raise ValueError(f'label_smoothing = {label_smoothing!r}: must be in [0, 1)')
  if label_smoothing == 0.0:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1], dtype=logits.dtype),
                                label_smoothing)
  return optax.softmax_cross_entropy(logits, targets)


def _label_smoothing_problems(fields: dict) -> list[tuple[str, str]]:
  """``config_problems`` hook of the cross-entropies: ``label_smoothing`` in [0, 1)."""
  ok = _label_smoothing_ok(fields.get('label_smoothing', 0.0))
  return [] if ok else [('label_smoothing', 'a number in [0, 1)')]


@register_loss('per_step_ce')
def per_step_ce(logits: jax.Array, labels: jax.Array, mask: jax.Array, *,
                label_smoothing: float = 0.0) -> jax.Array:
  """Cross-entropy at every time step, averaged over ``T`` (TET without its MSE term).

  Args:
    logits: ``[T, B, K]``; labels: int ``[B]``; mask: ``[B]``.
    label_smoothing: ``s`` in [0, 1): targets ``(1 - s) * onehot + s / K``.

  Returns:
    scalar ``(1/T) sum_t mean_b CE(logits[t, b], labels[b])``.
  """
  ce = _smoothed_ce(logits, jnp.broadcast_to(labels[None, :], logits.shape[:2]),
                    label_smoothing)  # [T, B]
  return _masked_mean(ce.mean(axis=0), mask)


@register_loss('mean_ce')
def mean_ce(logits: jax.Array, labels: jax.Array, mask: jax.Array, *,
            label_smoothing: float = 0.0) -> jax.Array:
  """Cross-entropy of the time-mean logits ``mean_t logits[t]``. Shapes and
  ``label_smoothing`` as :func:`per_step_ce`."""
  return _masked_mean(_smoothed_ce(logits.mean(axis=0), labels, label_smoothing), mask)


per_step_ce.config_problems = mean_ce.config_problems = _label_smoothing_problems


@register_loss('tet')
def tet(logits: jax.Array, labels: jax.Array, mask: jax.Array, *, lam: float = 1e-3,
        phi: float = 1.0) -> jax.Array:
  """TET loss (Deng et al. 2022): ``(1 - lam) * per_step_ce + lam * mean (logits - phi)^2``.

  The MSE term pulls every step's logits toward ``phi`` (TET's regularizer, ``phi = 1``).
  """
  mse = jnp.mean((logits - phi) ** 2, axis=(0, 2))  # [B]
  return (1.0 - lam) * per_step_ce(logits, labels, mask) + lam * _masked_mean(mse, mask)


def firing_rate_penalty(rates: jax.Array, *, target: float = 0.5) -> jax.Array:
  """WS-DR term ``mean_l (fr_l - target)^2`` over the hidden spiking layers.

  Args:
    rates: ``[L]`` firing rates of all spiking layers in network order; the first and the
      last are excluded (with ``L <= 2`` the term is 0).

  Returns:
    scalar (multiply by ``lambda`` in the total loss).
  """
  hidden = rates[1:-1]
  if hidden.shape[0] == 0:
    return jnp.zeros((), rates.dtype)
  return jnp.mean((hidden - target) ** 2)


def predictions(logits: jax.Array) -> jax.Array:
  """Class predictions ``[B]``: argmax of the time-mean logits ``[T, B, K]``."""
  return jnp.argmax(logits.mean(axis=0), axis=-1)
