"""Folds a trained model into a deployable :class:`Program`: packed signs, folded thresholds.

For a hidden 1-bit conv ``w_hat = s * sign(W)`` (per-channel scale ``s``) followed by
BatchNorm ``y -> (y - mean) * gamma / sqrt(var + eps) + beta`` (eps 1e-5, as
``layers.batch_norm``), the neuron's current is ``X = a C + c`` on the integer count
``C = sign(W) S`` with

  ``a = s * gamma / sqrt(var + eps) / k^2``  (``k^2``: the avg-pool window in front, 1 if none)
  ``c = beta - gamma * mean / sqrt(var + eps)``

and the MFP neuron fires where ``C[t]`` crosses the per-step threshold of
``neurons.fold_thresholds(M, vth, a, c)``. A program stores ``a``, ``c`` and ``M``; the
thresholds are derived from them at run time (see :func:`mfp_jax.inference.run_program`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mfp_jax import layers
from mfp_jax import models
from mfp_jax import quant

BN_EPS = 1e-5  # layers.batch_norm's epsilon
FOLDABLE_NEURONS = ('mfp', 'mfp_column')


@dataclasses.dataclass(frozen=True)
class Program:
  """A folded network: a static op list plus named numpy arrays (what a deployment stores).

  Attributes:
    ops: JSON-able op records in execution order (``stem``, ``conv``, ``pool``, ``block``,
      ``classifier``), naming their arrays by prefix.
    arrays: ``name -> np.ndarray``: packed signs (``uint8``), folded scales ``a`` and shifts
      ``c`` (``float32 [C]``), ``M`` (``float32 [T, T]``), first/last weights (``int8`` levels +
      a ``float32`` scale, or ``float32``), classifier bias.
    meta: ``T``, ``vth``, ``input_shape``, ``num_classes``, ``model``, ``neuron``, ``edge_bits``.
  """
  ops: tuple[dict[str, Any], ...]
  arrays: dict[str, np.ndarray]
  meta: dict[str, Any]


# Jitted: run eagerly, every small op would compile on its own (seconds on a busy CPU).


@jax.jit
def _bn_affine_jit(scale, bias, mean, var):
  mul = scale * jax.lax.rsqrt(var + BN_EPS)
  return mul, bias - mean * mul


@functools.partial(jax.jit, static_argnums=1)
def _quantized(kernel: jax.Array, qspec: layers.QuantSpec) -> jax.Array:
  return qspec(kernel, None)


@functools.partial(jax.jit, static_argnums=1)
def _levels(w: jax.Array, bits: int) -> tuple[jax.Array, jax.Array]:
  # Same arithmetic as quant.quantize_max_scale, so the levels are the trained ones.
  n = quant.uniform_levels(bits)
  alpha = jnp.maximum(jnp.max(jnp.abs(w)), jnp.finfo(w.dtype).tiny)
  return jnp.round(jnp.clip(w, -alpha, alpha) / alpha * n), alpha


def bn_affine(params: Mapping, stats: Mapping) -> tuple[np.ndarray, np.ndarray]:
  """BatchNorm as ``y * mul + shift``, ``mul = gamma * rsqrt(var + eps)`` as flax computes it.

  Returns:
    ``(mul, shift)``, float32 ``[C]`` each.
  """
  mul, shift = _bn_affine_jit(params['scale'], params['bias'], stats['mean'], stats['var'])
  return np.asarray(mul, np.float32), np.asarray(shift, np.float32)


def binary_kernel(kernel: Any, qspec: layers.QuantSpec) -> tuple[np.ndarray, np.ndarray]:
  """Packed signs ``uint8 [ceil(size / 8)]`` and per-channel scales ``float32 [C]`` of a
  1-bit kernel ``[..., C]``, read from the very quantizer the model uses.

  Raises:
    ValueError: ``qspec`` is not 1-bit.
  """
  if qspec.bits != 1:
    raise ValueError(f'serial (folded) inference needs 1-bit hidden weights, the model has '
                     f'{qspec.bits}-bit ones')
  w_hat = np.asarray(_quantized(jnp.asarray(kernel, jnp.float32), qspec))
  return quant.pack_signs(w_hat), np.abs(w_hat).max(axis=tuple(range(w_hat.ndim - 1)))


def edge_kernel(kernel: Any, bits: int, prefix: str) -> dict[str, np.ndarray]:
  """First conv / classifier weights: ``{prefix/q: int8 levels, prefix/alpha: scale}``
  (``int16`` above 8 bits), or ``{prefix/kernel: float32}`` at 32 bits."""
  if bits >= 32:
    return {f'{prefix}/kernel': np.asarray(kernel, np.float32)}
  q, alpha = _levels(jnp.asarray(kernel, jnp.float32), bits)
  return {f'{prefix}/q': np.asarray(q, np.int8 if bits <= 8 else np.int16),
          f'{prefix}/alpha': np.asarray(alpha, np.float32)}


def neuron_matrix(params: Mapping) -> np.ndarray:
  """``M`` (float32 ``[T, T]``) of a spiking layer's params; the column form's ``tau`` gives
  ``M[t, i] = tau_i`` for ``i <= t`` (Eq. 6)."""
  if 'M' in params:
    return np.asarray(params['M'], np.float32)
  tau = np.asarray(params['tau'], np.float32)
  return np.tril(np.broadcast_to(tau[None, :], (tau.size, tau.size)))


def _node(tree: Mapping, path: str) -> Mapping:
  for part in path.split('/'):
    tree = tree[part]
  return tree


class _Folder:
  """Accumulates ops and arrays while walking a model's variables in call order."""

  def __init__(self, model: nn.Module, variables: Mapping[str, Any]):
    self.model = model
    self.params, self.stats = variables['params'], variables.get('batch_stats', {})
    self.ops: list[dict[str, Any]] = []
    self.arrays: dict[str, np.ndarray] = {}
    self.den = 1  # integer activations = true activations * den (sum pools)

  def neuron(self, scope: str) -> str:
    name = f'{scope}/SpikingNeuron_0'
    self.arrays[f'{name}/M'] = neuron_matrix(_node(self.params, name))
    return name

  def binary(self, prefix: str, scope: str, conv: str, norm: str) -> list[int]:
    if self.den > 127:  # the counting conv reads int8 activations
      raise ValueError(f'{prefix}: pooled spike counts up to {self.den} do not fit int8')
    kernel = _node(self.params, f'{scope}/{conv}')['kernel']
    packed, scale = binary_kernel(kernel, self.model.quant)
    mul, shift = bn_affine(_node(self.params, f'{scope}/{norm}'),
                           _node(self.stats, f'{scope}/{norm}'))
    self.arrays[f'{prefix}/signs'] = packed
    self.arrays[f'{prefix}/a'] = (scale * mul / self.den).astype(np.float32)
    self.arrays[f'{prefix}/c'] = shift
    return list(np.shape(kernel))

  def stem(self):
    kernel = _node(self.params, 'Stem_0/QConv_0')['kernel']
    self.arrays.update(edge_kernel(kernel, self.model.edge_quant.bits, 'Stem_0'))
    self.arrays['Stem_0/a'], self.arrays['Stem_0/c'] = bn_affine(
        _node(self.params, 'Stem_0/BatchNorm_0'), _node(self.stats, 'Stem_0/BatchNorm_0'))
    self.ops.append({'op': 'stem', 'name': 'Stem_0', 'neuron': self.neuron('Stem_0'),
                     'shape': list(np.shape(kernel))})

  def conv_op(self, name: str, strides: int = 1) -> dict[str, Any]:
    shape = self.binary(name, name, 'QConv_0', 'BatchNorm_0')
    self.den = 1
    return {'op': 'conv', 'name': name, 'neuron': self.neuron(name), 'stride': strides,
            'shape': shape}

  def pool(self, window: int = 2):
    self.ops.append({'op': 'pool', 'window': window})
    self.den *= window * window

  def block(self, name: str, strides: int):
    op = {'op': 'block', 'name': name, 'stride': strides,
          'inner': self.conv_op(f'{name}/ConvNormSpike_0', strides),
          'shape2': self.binary(f'{name}/conv2', name, 'QConv_0', 'BatchNorm_0'),
          'neuron': self.neuron(name)}
    if 'shortcut_conv' in _node(self.params, name):
      op['shape_sc'] = self.binary(f'{name}/shortcut', name, 'shortcut_conv', 'shortcut_norm')
    self.ops.append(op)

  def classifier(self, global_pool: bool):
    p = _node(self.params, 'Classifier_0/QDense_0')
    self.arrays.update(edge_kernel(p['kernel'], self.model.edge_quant.bits, 'Classifier_0'))
    self.arrays['Classifier_0/bias'] = np.asarray(p['bias'], np.float32)
    self.ops.append({'op': 'classifier', 'name': 'Classifier_0', 'global_pool': global_pool,
                     'den': self.den, 'shape': list(np.shape(p['kernel']))})


def _plain_layout(model: nn.Module) -> tuple[list[Any], bool]:
  """Layers after the stem (ints: conv widths, ``'A'``: 2x2 pool) and the classifier's pool."""
  if isinstance(model, models.DigitsNet):
    return [x for c in model.channels[1:] for x in (c, 'A')], False
  return list(model.layout[1:]), model.global_pool


def build_program(model: nn.Module, variables: Mapping[str, Any],
                  input_shape: Sequence[int]) -> Program:
  """Folds a trained ``DigitsNet``, ``VGG`` or ``ResNet19`` into a deployable :class:`Program`.

  Args:
    model: the model (``neuron.kind`` ``'mfp'`` or ``'mfp_column'``, 1-bit hidden weights).
    variables: ``{'params', 'batch_stats'}`` (host or device arrays).
    input_shape: one example, ``(H, W, C)`` or ``(T, H, W, C)``.

  Raises:
    ValueError: an unsupported model, neuron kind or weight width.
  """
  if model.neuron.kind not in FOLDABLE_NEURONS:
    raise ValueError(f'serial (folded) inference needs an MFP neuron {list(FOLDABLE_NEURONS)}, '
                     f'the model has {model.neuron.kind!r}')
  f = _Folder(model, variables)
  if isinstance(model, models.ResNet19):
    f.stem()
    k = 0
    for i, n in enumerate(model.stage_sizes):
      for j in range(n):
        f.block(f'BasicBlock_{k}', 2 if (i > 0 and j == 0) else 1)
        k += 1
    f.classifier(global_pool=True)
  elif isinstance(model, (models.DigitsNet, models.VGG)):
    f.stem()
    layout, global_pool = _plain_layout(model)
    k = 0
    for item in layout:
      if item == 'A':
        f.pool()
      else:
        f.ops.append(f.conv_op(f'ConvNormSpike_{k}'))
        k += 1
    f.classifier(global_pool=global_pool)
  else:
    raise ValueError(f'serial inference supports DigitsNet, VGG and ResNet19, got '
                     f'{type(model).__name__}')
  meta = {'T': int(model.T), 'vth': float(model.neuron.vth), 'input_shape': list(input_shape),
          'num_classes': int(model.num_classes), 'model': type(model).__name__,
          'neuron': model.neuron.kind, 'edge_bits': int(model.edge_quant.bits)}
  return Program(tuple(f.ops), f.arrays, meta)
