"""Kinds of spiking neuron: what ``NeuronSpec.kind`` names, and the way to add one.

A kind says which parameters a :class:`~mfp_jax.layers.SpikingNeuron` creates and how it
turns input currents ``x: [T, B, ...]`` into spikes. The built-ins are registered below with
the same :func:`register_neuron` a user calls:

* ``'mfp'`` -- the MFP neuron with a learnable ``[T, T]`` matrix ``M`` (paper Eq. 7-8);
* ``'mfp_column'`` -- Eq. 6, ``M[t, i] = tau_i`` with a learnable ``[T]`` vector ``tau``;
* ``'lif'`` -- the hard-reset LIF baseline (hand-written BPTT; optional quantized membrane);
* ``'relu'`` -- no spikes at all: the ANN with the same layers, a floor for benchmarks.

**Linear-threshold kinds** (subclasses of :class:`LinearNeuron`) fire where
``(M_eff X)[t] >= vth`` for a lower-triangular ``M_eff`` built from their parameters by
:meth:`LinearNeuron.mixing`. Everything else follows from that one method: the parallel
training form, the exact serial scan, the paper's Eq. 9, and the folded integer thresholds
of a deployed network (:mod:`mfp_jax.folding`). A new MFP variant only writes ``init`` and
``mixing``; for example a learnable threshold per step (``examples/custom_model.py``)::

  class AdaptiveThreshold(LinearNeuron):
    def init(self, module, t, spec):
      return {'M': module.param('M', decaying_m_init(spec.tau), (t, t)),
              'log_vth': module.param('log_vth', nn.initializers.zeros, (t,))}

    def mixing(self, params, spec):
      # (M X)[t] >= vth_t  <=>  (M X)[t] / vth_t >= 1: the thresholds fold into M's rows.
      return params['M'] / (spec.vth * jnp.exp(params['log_vth']))[:, None], 1.0

  register_neuron('adaptive', AdaptiveThreshold())
"""

from __future__ import annotations

from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from mfp_jax import neurons
from mfp_jax import quant
from mfp_jax import registry

MODES = ('parallel', 'serial', 'eq9')


def decaying_m_init(tau: float):
  """``M[t, i] = tau^(t - i)`` for ``i <= t``: the LIF membrane without reset, as a start."""

  def init(key, shape, dtype=jnp.float32):
    del key
    t = shape[0]
    lag = jnp.arange(t)[:, None] - jnp.arange(t)[None, :]
    return jnp.where(lag >= 0, jnp.asarray(tau, dtype) ** jnp.maximum(lag, 0), 0).astype(dtype)

  return init


class NeuronKind:
  """One kind of spiking neuron. Subclass, then ``register_neuron(name, instance)``.

  ``spec`` below is the layer's :class:`~mfp_jax.layers.NeuronSpec` (``vth``, ``tau``,
  ``membrane_bits`` ...); ``spike_fn`` is its surrogate step function.
  """
  spiking = True  # False: not a spiking nonlinearity (its outputs are not 1-bit)

  def init(self, module: nn.Module, t: int, spec: Any) -> Mapping[str, jax.Array]:
    """Creates this neuron's parameters with ``module.param`` for ``T = t``; returns them."""
    del module, t, spec
    return {}

  def __call__(self, params: Mapping[str, jax.Array], x: jax.Array, spec: Any, spike_fn,
               mode: str) -> jax.Array:
    """Spikes ``[T, ...]`` of currents ``x: [T, ...]`` in ``mode`` (see :data:`MODES`)."""
    raise NotImplementedError

  def check(self, spec: Any) -> list[str]:
    """Problems of ``spec`` for this kind (one message each); empty if it is fine."""
    return [] if spec.membrane_bits is None else [
        f'membrane_bits = {spec.membrane_bits} is for a neuron with a membrane (kind lif); '
        f'{spec.kind!r} keeps none: leave it None']

  def state_bytes(self, t: int) -> int:
    """Bytes of inference state per neuron (float32) when run one step at a time."""
    del t
    return 0


class LinearNeuron(NeuronKind):
  """A neuron that fires where ``(mixing(params) X)[t] >= vth``: an MFP-type neuron.

  Subclasses define :meth:`init` and :meth:`mixing`; the three run modes and the folding of
  a deployed network come from ``mixing``.
  """

  def mixing(self, params: Mapping[str, jax.Array], spec: Any) -> tuple[jax.Array, Any]:
    """``(M [T, T], vth)``: the effective time-mixing matrix (lower triangle used) and the
    threshold (a scalar) of ``S = step(M X - vth)``."""
    raise NotImplementedError

  def __call__(self, params, x, spec, spike_fn, mode):
    m, vth = self.mixing(params, spec)
    m = m.astype(x.dtype)
    if mode == 'parallel':
      return neurons.mfp_parallel(x, m, vth=vth, surrogate=spike_fn)
    if mode == 'serial':
      return self.serial(params, x, spec)
    if mode == 'eq9':
      return neurons.mfp_serial_eq9(x, m, vth=vth)
    raise ValueError(f'unknown neuron mode {mode!r}; allowed: {list(MODES)}')

  def serial(self, params, x: jax.Array, spec) -> jax.Array:
    """The exact streaming form; the default is :func:`mfp_jax.neurons.mfp_serial`."""
    m, vth = self.mixing(params, spec)
    return neurons.mfp_serial(x, m.astype(x.dtype), vth=vth)

  def state_bytes(self, t: int) -> int:
    return 4 * t  # the partial sums for the current and every later step


class MFP(LinearNeuron):
  """``M`` a learnable ``[T, T]`` matrix, initialized to the reset-free LIF decay ``tau^lag``."""

  def init(self, module, t, spec):
    return {'M': module.param('M', decaying_m_init(spec.tau), (t, t), jnp.float32)}

  def mixing(self, params, spec):
    return params['M'], spec.vth


class MFPColumn(LinearNeuron):
  """Eq. 6: ``M[t, i] = tau_i``, a learnable ``[T]`` vector; its serial form has O(1) state."""

  def init(self, module, t, spec):
    return {'tau': module.param('tau', nn.initializers.ones, (t,), jnp.float32)}

  def mixing(self, params, spec):
    return neurons.column_matrix(params['tau']), spec.vth

  def __call__(self, params, x, spec, spike_fn, mode):
    if mode == 'parallel':
      return neurons.mfp_column_parallel(x, params['tau'].astype(x.dtype), vth=spec.vth,
                                         surrogate=spike_fn)
    return super().__call__(params, x, spec, spike_fn, mode)

  def serial(self, params, x, spec):
    return neurons.mfp_column_serial(x, params['tau'].astype(x.dtype), vth=spec.vth)

  def state_bytes(self, t: int) -> int:
    return 4  # one accumulator


class LIF(NeuronKind):
  """Hard-reset LIF (``tau`` decay): hand-written BPTT, or autodiff of the scan when the
  stored membrane is quantized to ``membrane_bits``. Runs the same in every mode."""

  def __call__(self, params, x, spec, spike_fn, mode):
    del params, mode
    if spec.membrane_bits is None:
      return neurons.lif_bptt(x, tau=spec.tau, vth=spec.vth, surrogate=spike_fn)
    bits = spec.membrane_bits
    mq = lambda u: quant.quantize_membrane(u, bits, vmax=spec.vth)
    return neurons.lif_serial(x, tau=spec.tau, vth=spec.vth, surrogate=spike_fn,
                              membrane_quant=mq)

  def check(self, spec):
    return []

  def state_bytes(self, t: int) -> int:
    return 4  # the membrane


class ReLU(NeuronKind):
  """Not a spiking neuron: ``relu(x)``, the ANN with the same layers (a speed floor)."""
  spiking = False

  def __call__(self, params, x, spec, spike_fn, mode):
    del params, spec, spike_fn, mode
    return jax.nn.relu(x)


NEURONS: registry.Registry[NeuronKind] = registry.Registry('neuron')
register_neuron = registry.registrar(NEURONS)
register_neuron('mfp', MFP())
register_neuron('mfp_column', MFPColumn())
register_neuron('lif', LIF())
register_neuron('relu', ReLU())


def is_linear(kind: str) -> bool:
  """Whether the registered kind is a :class:`LinearNeuron` (foldable, has serial/Eq. 9)."""
  return isinstance(NEURONS.get(kind), LinearNeuron)
