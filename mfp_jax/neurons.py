"""Spiking neuron dynamics as pure functions. No Flax, no state outside the arguments.

Everything is time-major: ``x`` has shape ``[T, ...]`` (any trailing shape, e.g.
``[T, B, H, W, C]``), ``m`` is the ``[T, T]`` time-mixing matrix of MFP-QSNN (only its lower
triangle is used). Spikes come back as floats of ``x.dtype`` with the shape of ``x``.

The MFP neuron (paper Eq. 6-8) has no membrane and no reset::

    H = tril(M) X      (over the time axis)      S = step(H - Vth)

* :func:`mfp_parallel` -- the training form: all ``T`` steps in one matmul, with a
  hand-written, cache-blocked backward (:mod:`mfp_jax.fast_neurons`).
* :func:`mfp_parallel_reference` -- the same neuron by plain autodiff through the matmul.
* :func:`mfp_serial` -- the exact streaming form: a ``lax.scan`` that sees one step at a time
  and carries the partial sums for the current and future steps (``O(T)`` state per neuron).
* :func:`mfp_serial_eq9` -- the paper's Eq. 9 per-step thresholds. Exact only for a diagonal
  ``M``; kept so its drift can be measured.
* :func:`mfp_column_parallel` / :func:`mfp_column_serial` -- Eq. 6 proper, ``M[t, i] = tau_i``,
  whose serial form needs one accumulator (``O(1)`` state).
* :func:`fold_thresholds` / :func:`folded_serial` -- deployable inference on integer spike
  counts with the weight scale and normalization folded into per-step thresholds.
* :func:`lif_serial` -- the LIF baseline (hard or soft reset), BPTT by autodiff of a scan.
* :func:`lif_bptt` -- the same LIF with BPTT written by hand (the best-effort baseline).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from mfp_jax import fast_neurons
from mfp_jax import surrogate as surrogate_lib

SpikeFn = Callable[[jax.Array], jax.Array]
_DEFAULT_SURROGATE: SpikeFn = surrogate_lib.atan


def check_time_major(x: jax.Array, m: jax.Array | None = None, *, name: str = 'x') -> int:
  """Validates ``x: [T, ...]`` and ``m: [T, T]``; returns ``T``.

  Raises:
    ValueError: naming the expected and actual shapes.
  """
  if jnp.ndim(x) < 1:
    raise ValueError(f'{name} must be time-major [T, ...] with at least one axis, got shape '
                     f'{jnp.shape(x)}')
  t = jnp.shape(x)[0]
  if t < 1:
    raise ValueError(f'{name} must have T >= 1 time steps, got shape {jnp.shape(x)}')
  if m is not None and jnp.shape(m) != (t, t):
    raise ValueError(f'm must be [T, T] = {(t, t)} for {name} of shape {jnp.shape(x)} '
                     f'(T = {name}.shape[0]), got m of shape {jnp.shape(m)}')
  return t


def _check_vector(v: jax.Array, t: int, name: str) -> None:
  if jnp.shape(v) != (t,):
    raise ValueError(f'{name} must be [T] = {(t,)}, got shape {jnp.shape(v)}')


def _expand(v: jax.Array, ndim: int) -> jax.Array:
  """Appends singleton axes so a ``[T]`` (or ``[T, T]``) vector broadcasts over ``ndim`` axes."""
  return v.reshape(v.shape + (1,) * (ndim - v.ndim))


# --- MFP: parallel training form -----------------------------------------------------------


def mfp_membrane(x: jax.Array, m: jax.Array) -> jax.Array:
  """Memory-free membrane ``H = einsum('ts,s...->t...', tril(m), x)`` (paper Eq. 7).

  Written as one matmul on ``x.reshape(T, -1)``: the same product as the 5-D einsum, which
  XLA:CPU lowers with transposes and runs about 2x slower.

  Args:
    x: input currents ``[T, ...]``.
    m: ``[T, T]``; the upper triangle is ignored (step ``t`` never sees a later step).

  Returns:
    ``H`` with the shape and dtype of ``x``.
  """
  t = check_time_major(x, m)
  mt = jnp.tril(m).astype(x.dtype)
  return (mt @ x.reshape(t, -1)).reshape(x.shape)


def mfp_parallel(x: jax.Array,
                 m: jax.Array,
                 *,
                 vth: float | jax.Array = 1.0,
                 surrogate: SpikeFn = _DEFAULT_SURROGATE) -> jax.Array:
  """MFP spikes for all steps at once: ``S = step(tril(m) @ x - vth)`` (paper Eq. 7-8).

  The forward is the product of :func:`mfp_parallel_reference` (identical spikes). The
  backward is hand-written (:func:`mfp_jax.fast_neurons.mfp_blocked`): it saves only ``x`` and
  ``m``, recomputes ``H`` and runs over cache-sized blocks of neurons, so it needs less memory
  and fewer passes over it than autodiff; gradients agree with the reference to float
  rounding. A ``vth`` that is not a scalar takes the reference path. Reverse mode only
  (``jax.grad``, ``jax.vjp``); for forward-mode AD use :func:`mfp_parallel_reference`.

  Args:
    x: input currents ``[T, ...]``.
    m: ``[T, T]`` time-mixing matrix, lower triangle used.
    vth: firing threshold (scalar or broadcastable to ``x``).
    surrogate: step function with a surrogate gradient (see :mod:`mfp_jax.surrogate`).

  Returns:
    spikes in ``{0, 1}``, shape and dtype of ``x``; gradients flow to ``x``, ``m`` and a
    traced ``vth`` through the surrogate.
  """
  t = check_time_major(x, m)
  if jnp.ndim(vth) != 0:
    return mfp_parallel_reference(x, m, vth=vth, surrogate=surrogate)
  s = fast_neurons.mfp_blocked(x.reshape(t, -1), m, jnp.asarray(vth, x.dtype), surrogate,
                               fast_neurons.default_chunk(t), fast_neurons.CHAINS)
  return s.reshape(x.shape)


def mfp_parallel_reference(x: jax.Array,
                           m: jax.Array,
                           *,
                           vth: float | jax.Array = 1.0,
                           surrogate: SpikeFn = _DEFAULT_SURROGATE) -> jax.Array:
  """:func:`mfp_parallel` by plain autodiff: ``surrogate(mfp_membrane(x, m) - vth)``.

  The specification the fast path is tested against, and the form for forward-mode AD.
  Autodiff saves ``x`` and ``H`` and runs its backward as whole-array passes.

  Args:
    x: input currents ``[T, ...]``; m: ``[T, T]`` (lower triangle used); vth: threshold
      (scalar or broadcastable to ``x``); surrogate: step function.

  Returns:
    spikes, shape and dtype of ``x``.
  """
  return surrogate(mfp_membrane(x, m) - vth)


# --- MFP: exact serial (streaming) form ----------------------------------------------------


def mfp_serial(x: jax.Array, m: jax.Array, *, vth: float | jax.Array = 1.0) -> jax.Array:
  """Exact streaming form of :func:`mfp_parallel`: one ``lax.scan`` step per time step.

  The carry ``P[t']`` holds ``sum_{i<=t} M[t', i] X[i]`` for every ``t'`` (``O(T)`` state
  per neuron). At step ``t`` only ``X[t]`` is read: ``P += M[:, t] X[t]``, then the neuron
  fires where ``P[t] >= vth``. This equals the parallel form up to floating-point summation
  order (bit-for-bit whenever the products and sums are exact).

  Args:
    x: input currents ``[T, ...]``.
    m: ``[T, T]``, lower triangle used.
    vth: firing threshold.

  Returns:
    spikes in ``{0, 1}``, shape and dtype of ``x``.
  """
  t = check_time_major(x, m)
  cols = jnp.tril(m).astype(x.dtype).T  # cols[s] = M[:, s]: how step s feeds every step.

  def step(p, inp):
    idx, col, xt = inp
    p = p + _expand(col, p.ndim) * xt[None]
    h = jax.lax.dynamic_index_in_dim(p, idx, keepdims=False)
    return p, (h >= vth).astype(x.dtype)

  _, spikes = jax.lax.scan(step, jnp.zeros_like(x), (jnp.arange(t), cols, x))
  return spikes


def eq9_thresholds(m: jax.Array, *, vth: float | jax.Array = 1.0) -> jax.Array:
  """The paper's Eq. 9 per-step thresholds ``vth * inv(M)[t, t]`` in current units, ``[T]``.

  For a lower-triangular ``M``, ``inv(M)[t, t] = 1 / M[t, t]``: Eq. 9 keeps only the diagonal
  and drops every off-diagonal (history) term, so it is exact only for a diagonal ``M``.
  """
  check_time_major(m, m, name='m')
  return vth / jnp.diagonal(m)


def mfp_serial_eq9(x: jax.Array, m: jax.Array, *, vth: float | jax.Array = 1.0) -> jax.Array:
  """Spikes by the paper's Eq. 9: ``S[t] = (M[t, t] X[t] >= vth)``, each step on its own.

  Written as the product ``M[t, t] X[t]`` rather than ``X[t] >= vth * inv(M)[t, t]`` so that
  a negative or zero diagonal entry keeps the comparison's direction right. Equals
  :func:`mfp_parallel` when ``m`` is diagonal; otherwise it drifts (measure it).

  Args:
    x: ``[T, ...]``; m: ``[T, T]``; vth: threshold.

  Returns:
    spikes, shape and dtype of ``x``.
  """
  check_time_major(x, m)
  d = jnp.diagonal(m).astype(x.dtype)
  return (_expand(d, x.ndim) * x >= vth).astype(x.dtype)


# --- Eq. 6 proper: the column form M[t, i] = tau_i -----------------------------------------


def column_matrix(tau: jax.Array) -> jax.Array:
  """``[T] -> [T, T]`` lower-triangular ``M[t, i] = tau_i`` for ``i <= t`` (paper Eq. 6)."""
  t = jnp.shape(tau)[0]
  return jnp.tril(jnp.broadcast_to(tau[None, :], (t, t)))


def mfp_column_parallel(x: jax.Array,
                        tau: jax.Array,
                        *,
                        vth: float | jax.Array = 1.0,
                        surrogate: SpikeFn = _DEFAULT_SURROGATE) -> jax.Array:
  """Eq. 6 in parallel: ``H[t] = sum_{i<=t} tau_i X[i]``, i.e. ``M = column_matrix(tau)``.

  Runs :func:`mfp_parallel` on ``column_matrix(tau)`` (the same blocked backward; ``tau``
  gets its gradient through ``column_matrix``). A cumulative sum would do ``O(T N)`` work
  instead of ``O(T^2 N)``, but XLA:CPU runs ``jnp.cumsum`` over the time axis slowly: forward
  + backward took 1.5x as long as this product at T = 10 and 14x at T = 32
  (``python -m benchmarks.neuron``, before this change).

  Args:
    x: ``[T, ...]``; tau: ``[T]`` per-step weights; vth: threshold; surrogate: step function.

  Returns:
    spikes, shape and dtype of ``x``; equal to ``mfp_parallel(x, column_matrix(tau))``.
  """
  t = check_time_major(x)
  _check_vector(tau, t, 'tau')
  return mfp_parallel(x, column_matrix(tau.astype(x.dtype)), vth=vth, surrogate=surrogate)


def mfp_column_serial(x: jax.Array, tau: jax.Array, *, vth: float | jax.Array = 1.0) -> jax.Array:
  """Eq. 6 streaming: one accumulator ``A += tau_t X[t]`` per neuron (``O(1)`` state).

  Args:
    x: ``[T, ...]``; tau: ``[T]``; vth: threshold.

  Returns:
    spikes, shape and dtype of ``x``.
  """
  t = check_time_major(x)
  _check_vector(tau, t, 'tau')

  def step(acc, inp):
    tau_t, xt = inp
    acc = acc + tau_t * xt
    return acc, (acc >= vth).astype(x.dtype)

  _, spikes = jax.lax.scan(step, jnp.zeros_like(x[0]), (tau.astype(x.dtype), x))
  return spikes


# --- Deployable inference: integer counts against folded per-step thresholds --------------


class FoldedThresholds(NamedTuple):
  """Per-channel constants of a folded MFP layer (``C`` channels, last axis of the counts).

  The layer's current is ``X[t] = a * C[t] + c`` with ``C[t]`` the integer count
  ``sign(W) S[t]`` (``a`` folds the weight scale and the normalization's scale, ``c`` its
  shift). The neuron fires where ``a M[t,t] C[t] >= vth - c (M 1)[t] - a sum_{i<t} M[t,i] C[i]``.
  """
  gain: jax.Array   # [T, C] a * M[t, t]: which way the comparison points, and the divisor
  bias: jax.Array   # [T, C] vth - c * (M 1)[t]: the static part of the threshold
  a: jax.Array      # [C]    scale of the history term
  m_off: jax.Array  # [T, T] strictly lower part of M: how past counts move the threshold
  m_diag: jax.Array | None = None  # [T] M[t, t]: how a second branch's current moves it


def fold_thresholds(m: jax.Array, vth: float | jax.Array, a: jax.Array,
                    c: jax.Array) -> FoldedThresholds:
  """Folds ``M``, ``vth`` and the per-channel affine ``X = a C + c`` into thresholds.

  Args:
    m: ``[T, T]`` (lower triangle used).
    vth: scalar threshold.
    a: ``[C]`` per-channel scale (may be negative or zero).
    c: ``[C]`` per-channel shift.

  Returns:
    :class:`FoldedThresholds` for :func:`folded_serial`.
  """
  check_time_major(m, m, name='m')
  a = jnp.asarray(a)
  c = jnp.asarray(c)
  if a.ndim != 1 or c.shape != a.shape:
    raise ValueError(f'a and c must both be [C], got shapes {a.shape} and {c.shape}')
  ml = jnp.tril(m).astype(a.dtype)
  gain = jnp.diagonal(ml)[:, None] * a[None, :]
  bias = vth - ml.sum(axis=1)[:, None] * c[None, :]
  return FoldedThresholds(gain=gain, bias=bias, a=a, m_off=jnp.tril(ml, -1),
                          m_diag=jnp.diagonal(ml))


def _rhs(folded: FoldedThresholds, t: jax.Array, history: jax.Array,
         extra: jax.Array | None) -> jax.Array:
  """``bias[t] - a * history [- extra]``: what ``gain[t] * C[t]`` is compared against."""
  rhs = folded.bias[t] - folded.a * history
  return rhs if extra is None else rhs - extra


def step_thresholds(folded: FoldedThresholds, t: jax.Array, history: jax.Array, *,
                    extra: jax.Array | None = None) -> jax.Array:
  """Threshold on the count ``C[t]`` at step ``t``: ``(bias[t] - a * history - extra) / gain[t]``.

  ``history = sum_{i<t} M[t, i] C[i]`` (``[..., C]``); ``extra = sum_{i<=t} M[t, i] E[i]``, the
  part of the membrane a second branch contributes (None: no second branch). Where
  ``gain[t] < 0`` the neuron fires at or *below* the threshold; where ``gain[t] == 0`` the
  result is ``inf`` and :func:`folded_serial` uses the constant ``0 >= bias - a * history -
  extra`` instead.
  """
  rhs = _rhs(folded, t, history, extra)
  g = folded.gain[t]
  return jnp.where(g != 0, rhs / jnp.where(g != 0, g, 1), jnp.inf)


def folded_serial(counts: jax.Array, folded: FoldedThresholds, *,
                  extra: jax.Array | None = None, dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """Serial inference on integer spike counts with folded per-step thresholds.

  A ``lax.scan`` over ``t``; the carry holds ``sum_{i<t'} M[t', i] C[i]`` for the current and
  future steps (for the column form this is one number per neuron). Each step compares the
  integer count ``C[t]`` with its threshold from :func:`step_thresholds`.

  With ``extra`` (a residual sum ``X = a C + c + E``, e.g. identity-shortcut spikes or a 1x1
  shortcut's ``a2 C2 + c2``), the count ``C`` stays isolated and ``E``'s per-step contribution
  moves into the threshold; the scan then carries ``E``'s history too. Both read only step
  ``t`` of their inputs.

  Args:
    counts: integer counts ``[T, ..., C]`` (``sign(W) S`` of a binary layer).
    folded: from :func:`fold_thresholds` with ``C`` channels.
    extra: ``[T, ..., C]`` the second branch's current, or None.
    dtype: float dtype of the threshold arithmetic (``float64`` needs ``jax_enable_x64``).

  Returns:
    spikes ``[T, ..., C]`` as ``dtype``; equal to
    ``mfp_parallel(a * counts + c [+ extra], m, vth=vth)`` up to float rounding at exact ties.
  """
  t = check_time_major(counts, folded.m_off, name='counts')
  if folded.gain.shape != (t, counts.shape[-1]):
    raise ValueError(f'folded thresholds are for [T, C] = {folded.gain.shape}, counts have '
                     f'T = {t} and C = {counts.shape[-1]} (shape {counts.shape})')
  if extra is not None and extra.shape != counts.shape:
    raise ValueError(f'counts and extra must both be [T, ..., C], got {counts.shape} and '
                     f'{extra.shape}')
  folded = jax.tree.map(lambda v: v.astype(dtype), folded)
  cols = folded.m_off.T

  def step(carry, inp):
    hist, ehist = carry
    idx, col, diag, ct, et = inp
    cf = ct.astype(dtype)
    e_t = None if extra is None else ehist[idx] + diag * et.astype(dtype)
    h_t = jax.lax.dynamic_index_in_dim(hist, idx, keepdims=False)
    theta = step_thresholds(folded, idx, h_t, extra=e_t)
    g = folded.gain[idx]
    spike = jnp.where(g > 0, cf >= theta,
                      jnp.where(g < 0, cf <= theta, 0 >= _rhs(folded, idx, h_t, e_t)))
    # Future steps t' > t see this step through M[t', t] (the strictly lower column).
    hist = hist + _expand(col, hist.ndim) * cf[None]
    if extra is not None:
      ehist = ehist + _expand(col, hist.ndim) * et.astype(dtype)[None]
    return (hist, ehist), spike.astype(dtype)

  zeros = jnp.zeros(counts.shape, dtype)
  diag = folded.m_diag if folded.m_diag is not None else jnp.zeros((t,), dtype)
  xs = (jnp.arange(t), cols, diag, counts, counts if extra is None else extra)
  _, spikes = jax.lax.scan(step, (zeros, zeros if extra is not None else jnp.zeros((), dtype)),
                           xs)
  return spikes


# --- LIF baseline --------------------------------------------------------------------------

RESETS = ('hard', 'soft')


def lif_serial(x: jax.Array,
               *,
               tau: float = 0.5,
               vth: float = 1.0,
               reset: str = 'hard',
               surrogate: SpikeFn = _DEFAULT_SURROGATE,
               membrane_quant: Callable[[jax.Array], jax.Array] | None = None) -> jax.Array:
  """LIF neuron (paper Eq. 1-3) as a ``lax.scan``, trained by BPTT through autodiff.

  ``H[t] = tau U[t-1] + X[t]``, ``S[t] = step(H[t] - vth)``, then ``U[t] = H[t] (1 - S[t])``
  (hard reset) or ``U[t] = H[t] - vth S[t]`` (soft reset).

  Args:
    x: input currents ``[T, ...]``.
    tau: decay; vth: threshold; reset: ``'hard'`` or ``'soft'``.
    surrogate: step function with a surrogate gradient.
    membrane_quant: optional quantizer applied to the stored membrane ``U[t]`` (e.g.
      ``functools.partial(quant.quantize_membrane, bits=2)``) -- the Q-SNN setting.

  Returns:
    spikes, shape and dtype of ``x``.
  """
  check_time_major(x)
  if reset not in RESETS:
    raise ValueError(f'unknown reset {reset!r}; allowed: {list(RESETS)}')

  def step(u, xt):
    h = tau * u + xt
    s = surrogate(h - vth)
    u = h * (1.0 - s) if reset == 'hard' else h - vth * s
    if membrane_quant is not None:
      u = membrane_quant(u)
    return u, s

  _, spikes = jax.lax.scan(step, jnp.zeros_like(x[0]), x)
  return spikes


def lif_bptt(x: jax.Array,
             *,
             tau: float = 0.5,
             vth: float = 1.0,
             reset: str = 'hard',
             surrogate: SpikeFn = _DEFAULT_SURROGATE) -> jax.Array:
  """:func:`lif_serial` with BPTT written by hand: the best-effort LIF baseline.

  A ``jax.custom_vjp``: the forward scan saves only the membrane ``H[t]``; the backward is a
  reverse ``lax.scan`` (:func:`mfp_jax.fast_neurons.lif_bptt_fn`). Spikes are identical to
  :func:`lif_serial`'s and so are the gradients (autodiff keeps the gradient through the
  reset, and so does this). No membrane quantizer: use :func:`lif_serial` for that.

  Args:
    x: input currents ``[T, ...]``.
    tau: decay; vth: threshold -- Python numbers (not differentiated).
    reset: ``'hard'`` or ``'soft'``.
    surrogate: step function with a surrogate gradient.

  Returns:
    spikes, shape and dtype of ``x``.
  """
  check_time_major(x)
  if reset not in RESETS:
    raise ValueError(f'unknown reset {reset!r}; allowed: {list(RESETS)}')
  return fast_neurons.lif_bptt_fn(x, float(tau), float(vth), reset, surrogate)
