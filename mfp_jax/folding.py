"""Folds a trained model into a deployable :class:`Program` by walking its blocks.

The walk traces the model once with shapes only (``nn.intercept_methods`` under
``jax.eval_shape``) and records every module call in call order, with its children. The
model's top-level calls must form a chain (each block takes the previous block's output, the
first takes the model input, the last returns the logits), and each is folded by the rule
registered for its type (:func:`register_fold_rule`; looked up along the class's MRO). The
built-in rules cover :class:`~mfp_jax.models.Stem`, :class:`~mfp_jax.models.DenseStem`,
:class:`~mfp_jax.layers.ConvNormSpike`, :class:`~mfp_jax.layers.DenseNormSpike`,
:class:`~mfp_jax.layers.AvgPool`, :class:`~mfp_jax.models.BasicBlock` and
:class:`~mfp_jax.models.Classifier`, so a model a user assembles from them folds, runs exact
serial inference and exports with no edit here. Inside a block, layers are found by type and
order, never by name. A rule emits ops of the program's vocabulary (``stem``, ``binary``,
``pool``, ``block``, ``classifier``; run by :func:`mfp_jax.inference.run_program`).

For a hidden 1-bit layer ``w_hat = s * sign(W)`` (per-channel scale ``s``) followed by
BatchNorm ``y -> (y - mean) * gamma / sqrt(var + eps) + beta``, the neuron's current is
``X = a C + c`` on the integer count ``C = sign(W) S`` with

  ``a = s * gamma / sqrt(var + eps) / k^2``  (``k^2``: the avg-pool window in front, 1 if none)
  ``c = beta - gamma * mean / sqrt(var + eps)``

and the neuron fires where ``C[t]`` crosses the per-step threshold of
``neurons.fold_thresholds(M, 1, a, c)``. A neuron is stored as ``M / vth`` (its kind's
:meth:`~mfp_jax.neuron_kinds.LinearNeuron.mixing`, threshold 1), so any linear-threshold kind
folds, a user's included.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from mfp_jax import layers
from mfp_jax import models
from mfp_jax import neuron_kinds
from mfp_jax import quant

BN_EPS = 1e-5  # layers.batch_norm's epsilon


@dataclasses.dataclass(frozen=True)
class Program:
  """A folded network: a static op list plus named numpy arrays (what a deployment stores).

  Attributes:
    ops: JSON-able op records in execution order (``stem``, ``binary``, ``pool``, ``block``,
      ``classifier``), naming their arrays by the model's module paths.
    arrays: ``name -> np.ndarray``: packed signs (``uint8``), folded scales ``a`` and shifts
      ``c`` (``float32 [C]``), ``M / vth`` (``float32 [T, T]``), first/last weights (``int8``
      levels + a ``float32`` scale, or ``float32``), classifier bias.
    meta: ``T``, ``input_shape``, ``num_classes``, ``model``, ``neurons`` (kinds).
  """
  ops: tuple[dict[str, Any], ...]
  arrays: dict[str, np.ndarray]
  meta: dict[str, Any]


# --- Arrays of one layer (jitted: eagerly, every small op would compile on its own) ---------


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
  """First layer / classifier weights: ``{prefix/q: int8 levels, prefix/alpha: scale}``
  (``int16`` above 8 bits), or ``{prefix/kernel: float32}`` at 32 bits."""
  if bits >= 32:
    return {f'{prefix}/kernel': np.asarray(kernel, np.float32)}
  q, alpha = _levels(jnp.asarray(kernel, jnp.float32), bits)
  return {f'{prefix}/q': np.asarray(q, np.int8 if bits <= 8 else np.int16),
          f'{prefix}/alpha': np.asarray(alpha, np.float32)}


def neuron_matrix(params: Mapping, spec: layers.NeuronSpec | None = None) -> np.ndarray:
  """``M / vth`` (float32 ``[T, T]``) of a spiking layer's params, from its kind's ``mixing``
  (``spec`` None: an ``'mfp'`` neuron if ``params`` has ``M``, else ``'mfp_column'``).

  Raises:
    ValueError: the kind is not a linear-threshold (MFP-type) neuron.
  """
  if spec is None:
    spec = layers.NeuronSpec(kind='mfp' if 'M' in params else 'mfp_column')
  kind = neuron_kinds.NEURONS.get(spec.kind)
  if not isinstance(kind, neuron_kinds.LinearNeuron):
    raise ValueError(f'serial (folded) inference needs an MFP neuron (a LinearNeuron kind, '
                     f'e.g. mfp or mfp_column); this one is {spec.kind!r}')
  m, vth = kind.mixing({k: jnp.asarray(v) for k, v in params.items()}, spec)
  m = np.tril(np.asarray(m, np.float32))
  return m if float(vth) == 1.0 else (m / np.float32(vth)).astype(np.float32)


# --- The walk --------------------------------------------------------------------------------


@dataclasses.dataclass(eq=False)
class Call:
  """One recorded module call: the bound module (its static fields), where its variables
  live, its first input and output (the traced objects, compared by identity) and the calls
  made inside it, in order."""
  module: nn.Module
  path: str
  inp: Any
  out: Any = None
  children: list[Call] = dataclasses.field(default_factory=list)

  def find(self, *types: type) -> list[Call]:
    """The direct children of these types, in call order."""
    return [c for c in self.children if isinstance(c.module, types)]


def trace_calls(model: nn.Module, input_shape: Sequence[int]) -> tuple[Call, Any]:
  """Records ``model``'s module calls on one example of ``input_shape`` (shapes only).

  Returns:
    ``(root call, the traced input)``.
  """
  x = jax.ShapeDtypeStruct((1,) + tuple(input_shape), jnp.float32)
  box: dict[str, Any] = {}

  def record(next_fun, args, kwargs, context):
    if context.method_name != '__call__':
      return next_fun(*args, **kwargs)
    call = Call(context.module, '/'.join(context.module.path), args[0] if args else None)
    stack = box['stack']
    stack[-1].children.append(call)
    stack.append(call)
    try:
      call.out = next_fun(*args, **kwargs)
    finally:
      stack.pop()
    return call.out

  def run(variables, xt):
    box['x'], box['stack'] = xt, [Call(model, '', xt)]
    with nn.intercept_methods(record):
      model.apply(variables, xt, train=False)
    box['root'] = box['stack'][0].children[0]
    return 0

  abstract = jax.eval_shape(lambda: models.init_variables(model, input_shape,
                                                          jax.random.key(0)))
  jax.eval_shape(run, abstract, x)
  return box['root'], box['x']


def walk_calls(call: Call):
  """Every call under (and including) ``call``, depth first in call order."""
  yield call
  for child in call.children:
    yield from walk_calls(child)


def neuron_specs(model: nn.Module, input_shape: Sequence[int]) -> dict[str, layers.NeuronSpec]:
  """``{path: NeuronSpec}`` of every spiking layer of ``model``, in call order."""
  root, _ = trace_calls(model, input_shape)
  return {c.path: c.module.spec for c in walk_calls(root)
          if isinstance(c.module, layers.SpikingNeuron)}


def all_linear(model: nn.Module, input_shape: Sequence[int]) -> bool:
  """Whether every spiking layer is an MFP-type (linear-threshold) neuron, and there is one."""
  specs = neuron_specs(model, input_shape)
  return bool(specs) and all(neuron_kinds.is_linear(s.kind) for s in specs.values())


FoldRule = Callable[[Call, 'Folder'], None]
FOLD_RULES: dict[type, FoldRule] = {}


def register_fold_rule(block_type: type):
  """Decorator: ``rule(call, folder)`` folds blocks of ``block_type`` (and subclasses) by
  appending ops to ``folder.ops`` and arrays to ``folder.arrays``.

  Raises:
    ValueError: a rule for exactly this type exists.
  """
  def deco(rule: FoldRule) -> FoldRule:
    if block_type in FOLD_RULES:
      raise ValueError(f'a fold rule for {block_type.__name__} is already registered')
    FOLD_RULES[block_type] = rule
    return rule

  return deco


def _rule_for(module: nn.Module) -> FoldRule | None:
  for cls in type(module).__mro__:
    if cls in FOLD_RULES:
      return FOLD_RULES[cls]
  return None


class Folder:
  """Accumulates a program's ops and arrays while the rules fold a model's blocks."""

  def __init__(self, variables: Mapping[str, Any]):
    self.params = traverse_util.flatten_dict(variables['params'], sep='/')
    self.stats = traverse_util.flatten_dict(variables.get('batch_stats', {}), sep='/')
    self.ops: list[dict[str, Any]] = []
    self.arrays: dict[str, np.ndarray] = {}
    self.den = 1  # integer activations = true activations * den (sum pools)
    self.kinds: list[str] = []

  @staticmethod
  def _sub(flat: Mapping[str, Any], path: str) -> dict[str, Any]:
    prefix = f'{path}/' if path else ''
    return {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}

  def variables_of(self, call: Call) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(params, batch_stats)`` of one call's module, keyed by their names inside it."""
    return self._sub(self.params, call.path), self._sub(self.stats, call.path)

  def neuron(self, call: Call) -> str:
    """Stores a spiking layer's ``M / vth``; returns its path (the key of its spikes)."""
    spec = call.module.spec
    self.arrays[f'{call.path}/M'] = neuron_matrix(self.variables_of(call)[0], spec)
    self.kinds.append(spec.kind)
    return call.path

  def norm(self, call: Call) -> tuple[np.ndarray, np.ndarray]:
    params, stats = self.variables_of(call)
    return bn_affine(params, stats)

  def binary(self, layer: Call, norm: Call, prefix: str) -> dict[str, Any]:
    """A 1-bit conv/dense + its norm: packed signs and the folded ``a``, ``c`` under
    ``prefix`` (the block's path, or the layer's inside a residual block)."""
    if self.den > 127:  # the counting conv reads int8 activations
      raise ValueError(f'{layer.path}: pooled spike counts up to {self.den} do not fit int8')
    kernel = self.variables_of(layer)[0]['kernel']
    packed, scale = binary_kernel(kernel, layer.module.quant)
    mul, shift = self.norm(norm)
    self.arrays[f'{prefix}/signs'] = packed
    self.arrays[f'{prefix}/a'] = (scale * mul / self.den).astype(np.float32)
    self.arrays[f'{prefix}/c'] = shift
    conv = isinstance(layer.module, layers.QConv)
    return {'layer': prefix, 'shape': list(np.shape(kernel)),
            'kind': 'conv' if conv else 'dense',
            'stride': int(layer.module.strides) if conv else 1}

  def edge(self, layer: Call, prefix: str) -> dict[str, Any]:
    """A first layer / classifier at 8..32 bits: its (quantized) kernel, and bias if any,
    under ``prefix`` (the block's path)."""
    params = self.variables_of(layer)[0]
    bits = int(layer.module.quant.bits)
    self.arrays.update(edge_kernel(params['kernel'], bits, prefix))
    if 'bias' in params:
      self.arrays[f'{prefix}/bias'] = np.asarray(params['bias'], np.float32)
    conv = isinstance(layer.module, layers.QConv)
    return {'layer': prefix, 'bits': bits, 'shape': list(np.shape(params['kernel'])),
            'kind': 'conv' if conv else 'dense',
            'stride': int(layer.module.strides) if conv else 1}


def _layers(call: Call, pattern: Sequence[type], what: str) -> list[Call]:
  """The children of ``call`` that are layers, checked against ``pattern`` (types in order)."""
  found = call.find(layers.QConv, layers.QDense, nn.BatchNorm, layers.SpikingNeuron,
                    layers.ConvNormSpike)
  if len(found) != len(pattern) or not all(isinstance(c.module, t)
                                           for c, t in zip(found, pattern)):
    raise ValueError(f'cannot fold {call.path or "the model"} ({type(call.module).__name__}): '
                     f'expected {what} inside, found '
                     f'{[type(c.module).__name__ for c in found]}')
  return found


_WEIGHT = (layers.QConv, layers.QDense)


@register_fold_rule(models.Stem)
@register_fold_rule(models.DenseStem)
def _fold_stem(call: Call, f: Folder) -> None:
  layer, norm, neuron = _layers(call, (_WEIGHT, nn.BatchNorm, layers.SpikingNeuron),
                                'a conv or dense layer, a BatchNorm and a SpikingNeuron')
  op = {'op': 'stem', **f.edge(layer, call.path), 'neuron': f.neuron(neuron),
        'T': int(call.module.T)}
  f.arrays[f'{call.path}/a'], f.arrays[f'{call.path}/c'] = f.norm(norm)
  f.ops.append(op)


@register_fold_rule(layers.ConvNormSpike)
@register_fold_rule(layers.DenseNormSpike)
def _fold_binary(call: Call, f: Folder) -> None:
  layer, norm, neuron = _layers(call, (_WEIGHT, nn.BatchNorm, layers.SpikingNeuron),
                                'a 1-bit conv or dense layer, a BatchNorm and a SpikingNeuron')
  f.ops.append({'op': 'binary', **f.binary(layer, norm, call.path), 'neuron': f.neuron(neuron)})
  f.den = 1


@register_fold_rule(layers.AvgPool)
def _fold_pool(call: Call, f: Folder) -> None:
  w = int(call.module.window)
  f.ops.append({'op': 'pool', 'window': w, 'padding': call.module.padding})
  f.den *= w * w


@register_fold_rule(models.BasicBlock)
def _fold_block(call: Call, f: Folder) -> None:
  found = call.find(*_WEIGHT, nn.BatchNorm, layers.SpikingNeuron, layers.ConvNormSpike)
  shortcut = len(found) == 6
  pattern = (layers.ConvNormSpike, layers.QConv, nn.BatchNorm) + (
      (layers.QConv, nn.BatchNorm) if shortcut else ()) + (layers.SpikingNeuron,)
  found = _layers(call, pattern, 'ConvNormSpike, QConv, BatchNorm, [QConv, BatchNorm], '
                  'SpikingNeuron')
  den = f.den
  sc = f.binary(found[3], found[4], found[3].path) if shortcut else None
  inner = _layers(found[0], (layers.QConv, nn.BatchNorm, layers.SpikingNeuron),
                  'QConv, BatchNorm, SpikingNeuron')
  op = {'op': 'block', 'inner': {**f.binary(inner[0], inner[1], found[0].path),
                                 'neuron': f.neuron(inner[2])},
        'den': den, 'shortcut': sc}
  f.den = 1  # conv2 reads the inner neuron's spikes
  op['conv2'] = f.binary(found[1], found[2], found[1].path)
  op['neuron'] = f.neuron(found[-1])
  f.ops.append(op)


@register_fold_rule(models.Classifier)
def _fold_classifier(call: Call, f: Folder) -> None:
  (layer,) = _layers(call, (layers.QDense,), 'one QDense')
  f.ops.append({'op': 'classifier', **f.edge(layer, call.path),
                'global_pool': bool(call.module.global_pool),
                'den': f.den})


def _chain(root: Call, x: Any) -> list[Call]:
  """The model's top-level calls, checked to form a chain from ``x`` to the logits."""
  blocks, prev = root.children, x
  if not blocks:
    raise ValueError(f'cannot fold {type(root.module).__name__}: it calls no modules')
  for b in blocks:
    if b.inp is not prev:
      raise ValueError(f'cannot fold {type(root.module).__name__}: the input of {b.path} '
                       f'({type(b.module).__name__}) is not the output of the block before '
                       f'it; serial inference folds a chain of blocks (see mfp_jax.folding)')
    prev = b.out
  if root.out is not prev:
    raise ValueError(f'cannot fold {type(root.module).__name__}: its output is not the output '
                     f'of its last block ({blocks[-1].path})')
  return blocks


def build_program(model: nn.Module, variables: Mapping[str, Any],
                  input_shape: Sequence[int]) -> Program:
  """Folds a trained model into a deployable :class:`Program`.

  Args:
    model: a chain of foldable blocks (module doc) with MFP-type neurons and 1-bit hidden
      weights: every built-in model, or a user's built from the same blocks.
    variables: ``{'params', 'batch_stats'}`` (host or device arrays).
    input_shape: one example, ``(H, W, C)``, ``(T, H, W, C)`` or ``(T, F)``.

  Raises:
    ValueError: a block without a fold rule, a structure that is not a chain, a neuron that
      is not MFP-type, or hidden weights that are not 1-bit.
  """
  root, x = trace_calls(model, input_shape)
  f = Folder(variables)
  for b in _chain(root, x):
    rule = _rule_for(b.module)
    if rule is None:
      raise ValueError(f'cannot fold {b.path} ({type(b.module).__name__}): no fold rule for '
                       f'it; register one with mfp_jax.folding.register_fold_rule')
    rule(b, f)
  if f.ops[0]['op'] != 'stem' or f.ops[-1]['op'] != 'classifier':
    raise ValueError(f'cannot fold {type(model).__name__}: a program starts with a stem and '
                     f'ends with a classifier, got {[o["op"] for o in f.ops]}')
  meta = {'T': f.ops[0]['T'], 'input_shape': [int(d) for d in input_shape],
          'num_classes': int(f.ops[-1]['shape'][-1]), 'model': type(model).__name__,
          'neurons': sorted(set(f.kinds))}
  return Program(tuple(f.ops), f.arrays, meta)
