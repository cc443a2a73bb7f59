"""Flax (Linen) building blocks: quantized conv/dense, spiking neurons that own ``M``, time folding.

Modules own parameters only (latent weights, ``M``, norm scales) and call the pure functions
of :mod:`mfp_jax.quant` and :mod:`mfp_jax.neurons`. Activations are time-major
``[T, B, ...]``; layers without time dependence (conv, dense, norm, pool) run on the folded
``[T*B, ...]`` view.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Mapping

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp

from mfp_jax import conv
from mfp_jax import neuron_kinds
from mfp_jax import quant
from mfp_jax import surrogate as surrogate_lib

NEURON_MODES = neuron_kinds.MODES
BINARY_SCALES = ('pow2', 'mean')
ESTIMATORS = ('ste', 'annealed')
COMPUTE_DTYPES = ('float32', 'bfloat16')


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
    compute_dtype: dtype of the layer's inputs and weights in its matmul/conv (``'float32'``
      or ``'bfloat16'``), accumulated in float32; parameters stay float32. Binary spikes (and
      their 2x2 averages) times ``+-2^k`` weights are exact in bfloat16, so a 1-bit layer gives
      bit-identical outputs either way; on GPUs and TPUs bfloat16 is where the speed is.
  """
  bits: int = 1
  scale: str = 'pow2'
  estimator: str = 'ste'
  compute_dtype: str = 'float32'

  def __call__(self, w: jax.Array, anneal_t: jax.Array | None) -> jax.Array:
    if self.bits >= 32:
      return w
    if self.bits == 1:
      if self.scale == 'mean':
        return quant.binarize_mean_scale(w)
      t = jnp.float32(1.0) if anneal_t is None else anneal_t
      return quant.binarize_pow2(w, estimator=self.estimator, t=t)
    return quant.quantize_max_scale(w, self.bits)

  def problems(self) -> list[tuple[str, str]]:
    """``(field, what is allowed)`` for every bad field; empty when the spec is usable."""
    out = []
    if not (isinstance(self.bits, int) and (self.bits == 1 or 2 <= self.bits <= 16
                                            or self.bits == 32)):
      out.append(('bits', '1, 2..16 or 32'))
    if self.scale not in BINARY_SCALES:
      out.append(('scale', f'one of {list(BINARY_SCALES)}'))
    if self.estimator not in ESTIMATORS:
      out.append(('estimator', f'one of {list(ESTIMATORS)}'))
    if self.compute_dtype not in COMPUTE_DTYPES:
      out.append(('compute_dtype', f'one of {list(COMPUTE_DTYPES)}'))
    return out

  def operands(self, x: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array, Any]:
    """``(x, w, preferred_element_type)`` of the layer's product in ``compute_dtype``."""
    dtype = jnp.dtype(self.compute_dtype)
    acc = jnp.float32 if dtype != jnp.float32 else None
    return x.astype(dtype), w.astype(dtype), acc


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
    x, w, acc = self.quant.operands(x, self.quant(kernel, anneal_t))
    return conv.conv2d(x, w, stride=self.strides, preferred_element_type=acc)


class QDense(nn.Module):
  """Dense layer with quantized weights and an optional full-precision bias."""
  features: int
  use_bias: bool = True
  quant: QuantSpec = QuantSpec()

  @nn.compact
  def __call__(self, x: jax.Array, anneal_t: jax.Array | None = None) -> jax.Array:
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (x.shape[-1], self.features),
                        jnp.float32)
    x, w, acc = self.quant.operands(x, self.quant(kernel, anneal_t))
    y = jnp.matmul(x, w, preferred_element_type=acc)
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
    kind: a registered :mod:`mfp_jax.neuron_kinds` name: ``'mfp'`` (learnable ``[T, T]`` M),
      ``'mfp_column'`` (Eq. 6, learnable ``[T]`` tau), ``'lif'`` (hard-reset LIF baseline,
      BPTT), ``'relu'`` (no spikes: the ANN floor), or one added with ``register_neuron``.
    vth: threshold.
    surrogate: surrogate name (see :mod:`mfp_jax.surrogate`); alpha: its sharpness (None:
      the surrogate's default).
    tau: LIF decay, and the decay of ``M``'s initialization.
    membrane_bits: LIF only: quantize the stored membrane to this many bits (None: float).
    mode: how a linear-threshold (MFP-type) neuron runs, with the same parameters in every
      mode: ``'parallel'`` (training form), ``'serial'`` (exact streaming ``lax.scan``,
      float) or ``'eq9'`` (the paper's Eq. 9 thresholds, exact only for a diagonal ``M``).
      Ignored by other kinds. :func:`neuron_mode` overrides it for a whole model.
  """
  kind: str = 'mfp'
  vth: float = 1.0
  surrogate: str = 'atan'
  alpha: float | None = None
  tau: float = 0.5
  membrane_bits: int | None = None
  mode: str = 'parallel'

  def problems(self) -> list[tuple[str, str]]:
    """``(field, what is allowed)`` for every bad field; empty when the spec is usable."""
    out = []
    if self.kind not in neuron_kinds.NEURONS:
      out.append(('kind', f'one of {neuron_kinds.NEURONS.names()}'))
    if not _number(self.vth) or not self.vth > 0:
      out.append(('vth', 'a number > 0'))
    if self.surrogate not in surrogate_lib.SURROGATES:
      out.append(('surrogate', f'one of {surrogate_lib.SURROGATES.names()}'))
    if self.alpha is not None and (not _number(self.alpha) or not self.alpha > 0):
      out.append(('alpha', 'None (the surrogate\'s default) or a number > 0'))
    if not _number(self.tau) or not 0 < self.tau <= 1:
      out.append(('tau', 'a number in (0, 1]'))
    if self.membrane_bits is not None and not (
        isinstance(self.membrane_bits, int) and 1 <= self.membrane_bits <= 16):
      out.append(('membrane_bits', 'None (a float membrane) or an integer in [1, 16]'))
    if self.mode not in neuron_kinds.MODES:
      out.append(('mode', f'one of {list(neuron_kinds.MODES)}'))
    if not out:
      out += [('membrane_bits', msg) for msg in neuron_kinds.NEURONS.get(self.kind).check(self)]
    return out


def _number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


decaying_m_init = neuron_kinds.decaying_m_init

_MODE: contextvars.ContextVar[str | None] = contextvars.ContextVar('neuron_mode', default=None)


@contextlib.contextmanager
def neuron_mode(mode: str):
  """Runs every linear-threshold neuron of the models applied inside in ``mode``.

  A trace-time setting (like ``jax.default_matmul_precision``): wrap the ``apply`` call,
  inside the jitted function when there is one. Parameters are unchanged; a model of any
  structure (not only one with a ``neuron`` field) switches as a whole::

    with layers.neuron_mode('serial'):
      logits = model.apply(variables, x)
  """
  if mode not in neuron_kinds.MODES:
    raise ValueError(f'unknown neuron mode {mode!r}; allowed: {list(neuron_kinds.MODES)}')
  token = _MODE.set(mode)
  try:
    yield
  finally:
    _MODE.reset(token)


class SpikingNeuron(nn.Module):
  """Spiking nonlinearity over ``[T, B, ...]``; owns its time-mixing parameters.

  ``spec.kind`` picks a registered :class:`~mfp_jax.neuron_kinds.NeuronKind`, which creates
  the parameters and computes the spikes. Sows its firing rate (mean spike) into the
  ``'intermediates'`` collection as ``'firing_rate'``, so losses and logs can read it
  without global state.
  """
  spec: NeuronSpec = NeuronSpec()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    spec = self.spec
    kind = neuron_kinds.NEURONS.get(spec.kind)
    spike_fn = surrogate_lib.get_surrogate(spec.surrogate, spec.alpha)
    params = kind.init(self, x.shape[0], spec)
    s = kind(params, x, spec, spike_fn, _MODE.get() or spec.mode)
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


class DenseNormSpike(nn.Module):
  """``QDense -> BatchNorm`` on ``[T*B, F]``, then the neuron: ``[T, B, F] -> [T, B, features]``."""
  features: int
  quant: QuantSpec = QuantSpec()
  neuron: NeuronSpec = NeuronSpec()

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, anneal_t: jax.Array | None = None):
    t = x.shape[0]
    y = QDense(self.features, use_bias=False, quant=self.quant)(fold_time(x), anneal_t)
    y = batch_norm(train)(y)
    return SpikingNeuron(self.neuron)(unfold_time(y, t))


POOL_PADDINGS = ('VALID', 'SAME')


def avg_pool(x: jax.Array, window: int = 2, padding: str = 'VALID') -> jax.Array:
  """``window x window`` average pooling, stride ``window``, of a folded ``[N, H, W, C]`` batch.

  ``'VALID'`` drops the last ``H % window`` rows (and columns); ``'SAME'`` keeps them, padding
  with zeros as XLA's ``SAME`` does (for window 2: one row/column at the far edge of an odd
  map) and still dividing by ``window^2``, so ``window^2 * output`` stays an integer count of
  spikes, which exact serial inference relies on. Output
  ``[N, H // window, ...]`` or ``[N, ceil(H / window), ...]``.
  """
  if padding not in POOL_PADDINGS:
    raise ValueError(f'pool padding must be one of {list(POOL_PADDINGS)}, got {padding!r}')
  return nn.avg_pool(x, (window, window), strides=(window, window), padding=padding,
                     count_include_pad=True)


class AvgPool(nn.Module):
  """``window x window`` average pooling of time-major ``[T, B, H, W, C]`` (no parameters).

  A module rather than a function so that code walking a model (folding, accounting) sees it.
  """
  window: int = 2
  padding: str = 'VALID'  # or 'SAME': see avg_pool

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return unfold_time(avg_pool(fold_time(x), self.window, self.padding), x.shape[0])


def firing_rates(intermediates: Mapping[str, Any]) -> list[tuple[str, jax.Array]]:
  """``(module path, firing rate)`` of every :class:`SpikingNeuron`, in call order.

  Reads the ``'intermediates'`` collection returned by ``apply`` in its insertion order (call
  it inside the traced function: a dict that crossed a ``jit`` boundary has sorted keys).
  """
  flat = traverse_util.flatten_dict(intermediates)
  # sow stores a tuple of the values sown.
  return [('/'.join(k[:-1]), v[0]) for k, v in flat.items() if k[-1] == 'firing_rate']
