"""Flax (Linen) building blocks: quantized conv/dense, spiking neurons that own ``M``, time folding.

Modules own parameters only (latent weights, ``M``, norm scales) and call the pure functions
of :mod:`mfp_jax.quant` and :mod:`mfp_jax.neurons`. Activations are time-major
``[T, B, ...]``; layers without time dependence (conv, dense, norm, pool) run on the folded
``[T*B, ...]`` view.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from mfp_jax import neurons
from mfp_jax import quant
from mfp_jax import surrogate as surrogate_lib

NEURONS = ('mfp', 'mfp_column', 'lif', 'relu')
NEURON_MODES = ('parallel', 'serial', 'eq9')
BINARY_SCALES = ('pow2', 'mean')
ESTIMATORS = ('ste', 'annealed')


# --- Time folding and encoding -------------------------------------------------------------


def fold_time(x: jax.Array) -> jax.Array:
  """``[T, B, ...] -> [T*B, ...]``."""
  return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def unfold_time(x: jax.Array, t: int) -> jax.Array:
  """``[T*B, ...] -> [T, B, ...]``."""
  return x.reshape((t, x.shape[0] // t) + x.shape[1:])


def direct_encode(x: jax.Array, t: int) -> jax.Array:
  """Static images ``[B, H, W, C]`` repeated over time: ``[T, B, H, W, C]``."""
  return jnp.broadcast_to(x[None], (t,) + x.shape)


def frames_to_time_major(x: jax.Array) -> jax.Array:
  """Event frames ``[B, T, H, W, C]`` (data layout) -> ``[T, B, H, W, C]`` (network layout)."""
  return jnp.swapaxes(x, 0, 1)


# --- Quantized weights ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class QuantSpec:
  """How a layer's weights are quantized.

  Attributes:
    bits: 1 (sign + per-channel scale), 2..16 (Eq. 4, max-scaled), or 32 (full precision).
    scale: 1-bit scale: ``'pow2'`` (Q-SNN: standardized, power-of-two) or ``'mean'`` (mean|w|).
    estimator: 1-bit backward: ``'ste'`` (clipped) or ``'annealed'`` (tanh, sharpness ``t``).
  """
  bits: int = 1
  scale: str = 'pow2'
  estimator: str = 'ste'

  def __call__(self, w: jax.Array, anneal_t: jax.Array | None) -> jax.Array:
    if self.bits >= 32:
      return w
    if self.bits == 1:
      if self.scale == 'mean':
        return quant.binarize_mean_scale(w)
      t = jnp.float32(1.0) if anneal_t is None else anneal_t
      return quant.binarize_pow2(w, estimator=self.estimator, t=t)
    return quant.quantize_max_scale(w, self.bits)


FULL_PRECISION = QuantSpec(bits=32)


class QConv(nn.Module):
  """Convolution with quantized weights (no bias: a norm follows). NHWC in and out."""
  features: int
  kernel_size: int = 3
  strides: int = 1
  quant: QuantSpec = QuantSpec()

  @nn.compact
  def __call__(self, x: jax.Array, anneal_t: jax.Array | None = None) -> jax.Array:
    k = self.kernel_size
    kernel = self.param('kernel', nn.initializers.kaiming_normal(),
                        (k, k, x.shape[-1], self.features), jnp.float32)
    w = self.quant(kernel, anneal_t).astype(x.dtype)
    return jax.lax.conv_general_dilated(
        x, w, window_strides=(self.strides, self.strides), padding='SAME',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


class QDense(nn.Module):
  """Dense layer with quantized weights and an optional full-precision bias."""
  features: int
  use_bias: bool = True
  quant: QuantSpec = QuantSpec()

  @nn.compact
  def __call__(self, x: jax.Array, anneal_t: jax.Array | None = None) -> jax.Array:
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (x.shape[-1], self.features),
                        jnp.float32)
    y = x @ self.quant(kernel, anneal_t).astype(x.dtype)
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    return y


def batch_norm(train: bool, name: str | None = None) -> nn.BatchNorm:
  """BatchNorm over the folded time x batch axis (tdBN without its threshold scaling)."""
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name)


# --- Spiking neurons -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class NeuronSpec:
  """Which spiking neuron a layer uses and its fixed hyper-parameters.

  Attributes:
    kind: ``'mfp'`` (learnable ``[T, T]`` M), ``'mfp_column'`` (Eq. 6, learnable ``[T]`` tau),
      ``'lif'`` (hard-reset LIF baseline, BPTT), or ``'relu'`` (no spikes: the ANN floor).
    vth: threshold.
    surrogate: surrogate name (see :mod:`mfp_jax.surrogate`); alpha: its sharpness (None:
      default).
    tau: LIF decay, and the decay of ``M``'s initialization.
    membrane_bits: LIF only: quantize the stored membrane to this many bits (None: float).
    mode: how an MFP neuron runs (same parameters in every mode): ``'parallel'`` (training
      form), ``'serial'`` (exact streaming ``lax.scan``, float) or ``'eq9'`` (the paper's
      Eq. 9 thresholds, exact only for a diagonal ``M``). Ignored by ``'lif'`` and ``'relu'``.
      Switch with ``model.clone(neuron=dataclasses.replace(spec, mode='serial'))``.
  """
  kind: str = 'mfp'
  vth: float = 1.0
  surrogate: str = 'atan'
  alpha: float | None = None
  tau: float = 0.5
  membrane_bits: int | None = None
  mode: str = 'parallel'


def decaying_m_init(tau: float):
  """``M[t, i] = tau^(t - i)`` for ``i <= t``: the LIF membrane without reset, as a start."""

  def init(key, shape, dtype=jnp.float32):
    del key
    t = shape[0]
    lag = jnp.arange(t)[:, None] - jnp.arange(t)[None, :]
    return jnp.where(lag >= 0, jnp.asarray(tau, dtype) ** jnp.maximum(lag, 0), 0).astype(dtype)

  return init


def _run_mfp(x: jax.Array, m: jax.Array, spec: NeuronSpec, spike_fn) -> jax.Array:
  """MFP spikes ``[T, ...]`` of ``x`` with ``m: [T, T]`` in the form ``spec.mode`` names."""
  if spec.mode == 'parallel':
    return neurons.mfp_parallel(x, m, vth=spec.vth, surrogate=spike_fn)
  if spec.mode == 'serial':
    return neurons.mfp_serial(x, m, vth=spec.vth)
  if spec.mode == 'eq9':
    return neurons.mfp_serial_eq9(x, m, vth=spec.vth)
  raise ValueError(f'unknown neuron mode {spec.mode!r}; allowed: {list(NEURON_MODES)}')


class SpikingNeuron(nn.Module):
  """Spiking nonlinearity over ``[T, B, ...]``; owns its time-mixing parameters.

  Sows its firing rate (mean spike) into the ``'intermediates'`` collection as
  ``'firing_rate'``, so losses and logs can read it without global state.
  """
  spec: NeuronSpec = NeuronSpec()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    t = x.shape[0]
    spec = self.spec
    spike_fn = surrogate_lib.get_surrogate(spec.surrogate, spec.alpha)
    if spec.kind == 'mfp':
      m = self.param('M', decaying_m_init(spec.tau), (t, t), jnp.float32)
      s = _run_mfp(x, m.astype(x.dtype), spec, spike_fn)
    elif spec.kind == 'mfp_column':
      tau = self.param('tau', nn.initializers.ones, (t,), jnp.float32)
      if spec.mode == 'parallel':
        s = neurons.mfp_column_parallel(x, tau.astype(x.dtype), vth=spec.vth,
                                        surrogate=spike_fn)
      elif spec.mode == 'serial':
        s = neurons.mfp_column_serial(x, tau.astype(x.dtype), vth=spec.vth)
      else:
        s = _run_mfp(x, neurons.column_matrix(tau.astype(x.dtype)), spec, spike_fn)
    elif spec.kind == 'lif':
      if spec.membrane_bits is None:
        # Hand-written BPTT: the same spikes and gradients as lif_serial, faster and leaner.
        s = neurons.lif_bptt(x, tau=spec.tau, vth=spec.vth, surrogate=spike_fn)
      else:
        bits = spec.membrane_bits
        mq = lambda u: quant.quantize_membrane(u, bits, vmax=spec.vth)
        s = neurons.lif_serial(x, tau=spec.tau, vth=spec.vth, surrogate=spike_fn,
                               membrane_quant=mq)
    elif spec.kind == 'relu':
      # Not a spiking neuron: the ANN with the same layers, a speed floor for benchmarks.
      s = jax.nn.relu(x)
    else:
      raise ValueError(f'unknown neuron {spec.kind!r}; allowed: {list(NEURONS)}')
    self.sow('intermediates', 'firing_rate', jnp.mean(s))
    return s


class ConvNormSpike(nn.Module):
  """``QConv -> BatchNorm`` on ``[T*B, H, W, C]``, then the neuron on ``[T, B, H, W, C]``."""
  features: int
  strides: int = 1
  quant: QuantSpec = QuantSpec()
  neuron: NeuronSpec = NeuronSpec()

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, anneal_t: jax.Array | None = None):
    t = x.shape[0]
    y = QConv(self.features, 3, self.strides, self.quant)(fold_time(x), anneal_t)
    y = batch_norm(train)(y)
    return SpikingNeuron(self.neuron)(unfold_time(y, t))


def avg_pool(x: jax.Array, window: int = 2) -> jax.Array:
  """Average pooling of a folded ``[N, H, W, C]`` batch."""
  return nn.avg_pool(x, (window, window), strides=(window, window))


def firing_rates(intermediates: Mapping[str, Any]) -> list[tuple[str, jax.Array]]:
  """``(module path, firing rate)`` of every :class:`SpikingNeuron`, in call order.

  Walks the ``'intermediates'`` collection returned by ``apply`` in its insertion order (call
  it inside the traced function: a dict that crossed a ``jit`` boundary has sorted keys).
  """
  out = []

  def walk(tree, prefix):
    for k, v in tree.items():
      if k == 'firing_rate':
        out.append((prefix, v[0]))  # sow stores a tuple of the values sown
      elif isinstance(v, Mapping):
        walk(v, f'{prefix}/{k}' if prefix else k)

  walk(intermediates, '')
  return out
