"""Hand-written VJPs for training: the cache-blocked MFP neuron and the BPTT LIF neuron.

Pure functions on time-major arrays; the public, shape-checked entry points are
:func:`mfp_jax.neurons.mfp_parallel` and :func:`mfp_jax.neurons.lif_bptt`, which call these.

**MFP.** Autodiff of ``S = step(tril(M) X - vth)`` saves ``X`` and ``H`` and runs its backward
as whole-array passes (``H``, ``dH = dS * step'(H - vth)``, ``dX = M^T dH``, ``dM = dH X^T``),
each reading and writing ``[T, N]`` arrays in memory. :func:`mfp_blocked` saves only ``X`` and
``M``, recomputes ``H`` in the backward, and walks the neurons in blocks of ``chunk`` inside a
``lax.fori_loop``: a block's ``H``, ``dH`` and ``dX`` stay in cache, so the backward reads
``X`` and ``dS`` once and writes ``dX`` (zeroed first) -- about the memory traffic of one
elementwise pass, and no ``[T, N]`` scratch. The rest of its cost is arithmetic: three
``[T, T] x [T, block]`` products, ``3 T^2`` multiply-adds per neuron, which on a CPU core
take longer than that pass (see the README's Performance section).

**LIF.** :func:`lif_bptt_fn` is BPTT written by hand: a forward ``lax.scan`` that saves only the
membrane ``H[t]`` (the spike is ``step(H[t] - vth)``) and a reverse ``lax.scan`` for the gradient.
Its gradients equal autodiff through :func:`mfp_jax.neurons.lif_serial`.

Both take the surrogate as the same callable ``x -> step(x)`` the rest of the package uses
(:mod:`mfp_jax.surrogate`); its derivative is taken from its own VJP, so any surrogate with a
custom gradient works unchanged.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp

SpikeFn = Callable[[jax.Array], jax.Array]

# Neurons per block: about 2^18 / T, so that a block of x, H, dH and dX (1 MiB each) stays
# in L2/L3. Measured on a 2-core AMD EPYC (1 MiB L2, 32 MiB L3), one core: the best block
# holds 2^17 to 2^19 elements at T = 4, 10 and 32; below that the loop's per-iteration
# overhead shows, above it the blocks fall out of cache (at T = 32, 2^21 elements: +40%).
_BLOCK_ELEMENTS = 2**18
_MIN_CHUNK = 2048
# Blocks per loop iteration. More than one gives XLA:CPU independent blocks it may run on
# several cores at once; here (one core effectively free) 1, 2 and 4 timed the same.
CHAINS = 1


def default_chunk(t: int) -> int:
  """Neurons per block for ``T = t``: a power of two near ``2^18 / t``, at least 2048."""
  c = _BLOCK_ELEMENTS // max(t, 1)
  return max(_MIN_CHUNK, 1 << (c.bit_length() - 1))


def surrogate_vjp(surrogate: SpikeFn, z: jax.Array,
                  cotangent: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(step(z), cotangent * step'(z))`` by the surrogate's own forward and backward rules."""
  s, pull = jax.vjp(surrogate, z)
  return s, pull(cotangent)[0]


# --- MFP: blocked backward ------------------------------------------------------------------


def _mfp_forward(x2, m, vth, surrogate):
  # The same product as mfp_parallel_reference, so the spikes are bit-identical to it.
  return surrogate(jnp.tril(m).astype(x2.dtype) @ x2 - vth)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def mfp_blocked(x2: jax.Array, m: jax.Array, vth: jax.Array, surrogate: SpikeFn,
                chunk: int, chains: int) -> jax.Array:
  """MFP spikes ``step(tril(m) @ x2 - vth)`` with a cache-blocked backward.

  Args:
    x2: input currents ``[T, N]`` (time-major, neurons flattened).
    m: ``[T, T]``; only the lower triangle is used (and gets a gradient).
    vth: scalar threshold (a 0-d array; it gets a gradient too).
    surrogate: step function with a surrogate gradient.
    chunk: neurons per block of the backward; ``N <= chunk`` runs one block, no loop.
    chains: independent blocks per loop iteration (>= 1).

  Returns:
    spikes ``[T, N]`` of ``x2.dtype``.
  """
  return _mfp_forward(x2, m, vth, surrogate)


def _mfp_blocked_fwd(x2, m, vth, surrogate, chunk, chains):
  # Residuals: x and M only. Keeping H as well (as autodiff does) saved 4-6% of forward +
  # backward at T = 16 and 32 here, for one more [T, N] array alive between the passes.
  return _mfp_forward(x2, m, vth, surrogate), (x2, m, vth)


def _mfp_blocked_bwd(surrogate, chunk, chains, res, g):
  x2, m, vth = res
  t, n = x2.shape
  mt = jnp.tril(m).astype(x2.dtype)
  # Materialize M^T: left as a transpose, XLA folds it into the dot's dimension numbers and
  # XLA:CPU then runs dX on a slower kernel than the plain [T, T] @ [T, chunk] product.
  mt_t = jax.lax.optimization_barrier(mt.T)

  def block(xc, gc):
    _, dh = surrogate_vjp(surrogate, mt @ xc - vth, gc)
    return mt_t @ dh, dh @ xc.T, jnp.sum(dh)

  if n <= chunk:
    dx, dm, sdh = block(x2, g)
  else:
    dx, dm, sdh = _blocked_loop(block, x2, g, chunk, chains)
  return dx, jnp.tril(dm).astype(m.dtype), (-sdh).astype(vth.dtype)


def _blocked_loop(block, x2, g, chunk, chains):
  """Runs ``block`` over column blocks of ``x2`` and ``g``; returns ``(dX, dM, sum dH)``.

  ``dX`` is written block by block into one zero-initialized ``[T, N]`` buffer (in place, by
  ``dynamic_update_slice``). ``g`` is only read, so the ``chains`` blocks of an iteration are
  independent. (Writing ``dX`` over ``g`` instead saves the zeroing only where XLA may reuse
  ``g``; where it may not, as for a jit argument, it copies ``g`` first, which costs more.)
  """
  t, n = x2.shape

  def blocks(offsets, size, carry):
    out, dm, sdh = carry
    for off in offsets:
      xc = jax.lax.dynamic_slice_in_dim(x2, off, size, 1)
      gc = jax.lax.dynamic_slice_in_dim(g, off, size, 1)
      dxc, dmc, sc = block(xc, gc)
      out = jax.lax.dynamic_update_slice_in_dim(out, dxc, off, 1)
      dm, sdh = dm + dmc, sdh + sc
    return out, dm, sdh

  def body(i, carry):
    return blocks([(i * chains + j) * chunk for j in range(chains)], chunk, carry)

  width = chunk * chains
  iters = n // width
  carry = (jnp.zeros_like(g), jnp.zeros((t, t), x2.dtype), jnp.zeros((), x2.dtype))
  carry = jax.lax.fori_loop(0, iters, body, carry)
  tail = n - iters * width  # fewer than `chains` blocks left
  if tail >= chunk:
    carry = blocks(list(range(iters * width, n - chunk + 1, chunk)), chunk, carry)
  if tail % chunk:
    carry = blocks([n - tail % chunk], tail % chunk, carry)
  return carry


mfp_blocked.defvjp(_mfp_blocked_fwd, _mfp_blocked_bwd)


# --- LIF: hand-written BPTT -----------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3, 4))
def lif_bptt_fn(x: jax.Array, tau: float, vth: float, reset: str,
                surrogate: SpikeFn) -> jax.Array:
  """LIF spikes ``[T, ...]`` (hard or soft reset) with a hand-written BPTT backward.

  Same neuron as :func:`mfp_jax.neurons.lif_serial`; arguments are positional so they can be
  ``nondiff_argnums``. ``reset`` is ``'hard'`` or ``'soft'`` (checked by the caller).
  """
  return _lif_forward(x, tau, vth, reset, surrogate)[0]


def _lif_forward(x, tau, vth, reset, surrogate):
  def step(u, xt):  # the same expressions as lif_serial, so the spikes are bit-identical
    h = tau * u + xt
    s = surrogate(h - vth)
    u = h * (1.0 - s) if reset == 'hard' else h - vth * s
    return u, (s, h)

  _, (s, h) = jax.lax.scan(step, jnp.zeros_like(x[0]), x)
  return s, h


def _lif_bptt_fwd(x, tau, vth, reset, surrogate):
  s, h = _lif_forward(x, tau, vth, reset, surrogate)
  return s, h  # the membrane H[t] is all the backward needs: S[t] = step(H[t] - vth)


def _lif_bptt_bwd(tau, vth, reset, surrogate, h, g):
  # du: gradient reaching U[t] from step t + 1. With H[t] = tau U[t-1] + X[t]:
  #   dH[t] = dS[t] s'(H[t] - vth) + du * dU[t]/dH[t],   dX[t] = dH[t],   du <- tau dH[t]
  # hard: U = H (1 - S)   ->  dU/dH = (1 - S) - H s'      (autodiff does not detach the reset)
  # soft: U = H - vth S   ->  dU/dH = 1 - vth s'
  def step(du, inp):
    ht, gt = inp
    if reset == 'hard':
      st, dh = surrogate_vjp(surrogate, ht - vth, gt - ht * du)
      dh = dh + du * (1.0 - st)
    else:
      _, dh = surrogate_vjp(surrogate, ht - vth, gt - vth * du)
      dh = dh + du
    return tau * dh, dh

  _, dx = jax.lax.scan(step, jnp.zeros_like(h[0]), (h, g), reverse=True)
  return (dx,)


lif_bptt_fn.defvjp(_lif_bptt_fwd, _lif_bptt_bwd)
