"""Inference of a trained network in three forms, plus the deployable (folded, bit-packed) program.

``make_infer_fn(model, variables, mode=..., input_shape=...)`` returns a function
``batch [B, *input_shape] float32 -> time-mean logits [B, num_classes]`` (jitted inside):

* ``'parallel'`` -- the training form (every MFP neuron one matmul over time).
* ``'serial'`` -- the exact streaming form of a deployed network, built by :func:`build_program`:
  every MFP neuron is a ``lax.scan`` over time that sees one step at a time, and on the
  1-bit-weight x binary-spike layers the weight scale and BatchNorm are folded into per-step
  thresholds on integer spike counts. Which layers are integer-exact:

  ======================================  ==============================================
  layer                                    serial arithmetic
  ======================================  ==============================================
  first conv (``Stem``)                    real-valued pixels x 8/32-bit weights: float32
                                           current, neuron = exact float streaming scan
  hidden 1-bit convs (incl. 1x1 shortcut)  counts ``C = sign(W) S`` in int8 x int8 -> int32
                                           (exact); threshold comparison in float32
  neuron after a residual sum              the 3x3 conv's count is isolated; the shortcut's
                                           per-step current (identity spikes, or ``a2 C2 +
                                           c2``) moves into the threshold, in float32
  avg pool between convs                   integer sum pool; the ``1/k^2`` goes into ``a``
  classifier                               float32 dense readout of pooled spike counts
  ======================================  ==============================================

  Spikes equal the parallel form's except where a membrane lies within float32 rounding of
  the threshold (a near-tie; ``eval.py`` prints spike agreement per layer to measure it).
* ``'eq9'`` -- the paper's Eq. 9 per-step thresholds (``S[t] = M[t,t] X[t] >= vth``), exact only
  for a diagonal ``M``; kept to measure how far it drifts.

Folding (``a = s gamma / sqrt(var + eps)``, ``c = beta - gamma mean / sqrt(var + eps)``) is
in :mod:`mfp_jax.folding`; saving and loading (bit-packed ``.npz`` weights, ``jax.export``
artifacts) in :mod:`mfp_jax.deploy`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mfp_jax import folding
from mfp_jax import layers
from mfp_jax import neurons
from mfp_jax import quant

MODES = ('parallel', 'serial', 'eq9')
_DN = ('NHWC', 'HWIO', 'NHWC')

# The folding lives in mfp_jax.folding; these names are part of this module's API too.
Program = folding.Program
build_program = folding.build_program
FOLDABLE_NEURONS = folding.FOLDABLE_NEURONS


# --- Input checks --------------------------------------------------------------------------


def check_input(x: Any, input_shape: Sequence[int]) -> jax.Array:
  """Returns ``x`` as a float32 array ``[B, *input_shape]``.

  Raises:
    ValueError: wrong dtype (only float32 is accepted: preprocess first) or shape.
  """
  shape, dtype = tuple(np.shape(x)), getattr(x, 'dtype', None)
  want = f'float32 [B, {", ".join(map(str, input_shape))}]'
  if dtype is None or np.dtype(dtype) != np.float32:
    raise ValueError(f'expected input {want} (preprocessed images), got dtype {dtype}')
  if len(shape) != len(input_shape) + 1 or shape[1:] != tuple(input_shape) or shape[0] < 1:
    raise ValueError(f'expected input {want}, got shape {list(shape)}')
  return jnp.asarray(x)


# --- Parallel and Eq. 9: the Flax model itself ---------------------------------------------


def with_neuron_mode(model: nn.Module, mode: str) -> nn.Module:
  """The same model (same parameters) with every neuron run as ``'parallel'``, ``'serial'``
  (float streaming) or ``'eq9'``."""
  if mode not in layers.NEURON_MODES:
    raise ValueError(f'unknown neuron mode {mode!r}; allowed: {list(layers.NEURON_MODES)}')
  return model.clone(neuron=dataclasses.replace(model.neuron, mode=mode))


def _per_example_mean(x: jax.Array, batch: int) -> jax.Array:
  """``[B, ...]`` or time-folded ``[T*B, ...]`` -> mean per example ``[B]``."""
  return x.reshape(x.shape[0] // batch, batch, -1).astype(jnp.float32).mean(axis=(0, 2))


def forward_flax(model: nn.Module, variables: Mapping[str, Any], x: jax.Array
                 ) -> tuple[jax.Array, dict[str, jax.Array], dict[str, jax.Array]]:
  """Evaluation forward of the Flax model, recording spikes and layer inputs.

  Args:
    model: any model of :mod:`mfp_jax.models` (its ``neuron.mode`` picks the form).
    variables: ``{'params', 'batch_stats'}``.
    x: ``[B, *input_shape]`` float32.

  Returns:
    time-mean logits ``[B, K]``; spikes ``{neuron path: [T, B, ...]}``; mean input per example
    ``{weight-layer path: [B]}`` of every ``QConv``/``QDense`` (their firing rates).
  """
  batch = x.shape[0]
  inputs: dict[str, jax.Array] = {}

  def record(next_fun, args, kwargs, context):
    if (isinstance(context.module, (layers.QConv, layers.QDense))
        and context.method_name == '__call__'):
      inputs['/'.join(context.module.path)] = _per_example_mean(args[0], batch)
    return next_fun(*args, **kwargs)

  capture = lambda mdl, name: isinstance(mdl, layers.SpikingNeuron) and name == '__call__'
  with nn.intercept_methods(record):
    logits, col = model.apply(variables, x, train=False, capture_intermediates=capture,
                              mutable=['intermediates'])
  spikes = {}

  def walk(tree, prefix):
    for k, v in tree.items():
      if k == '__call__':
        spikes[prefix] = v[0]
      elif isinstance(v, Mapping):
        walk(v, f'{prefix}/{k}' if prefix else k)

  walk(col['intermediates'], '')
  return logits.mean(axis=0), spikes, inputs


# --- Running a program ---------------------------------------------------------------------


def _signs(arrays: Mapping[str, jax.Array], prefix: str, shape: Sequence[int]) -> jax.Array:
  size = int(np.prod(shape))
  bits = jnp.unpackbits(arrays[f'{prefix}/signs'], count=size)
  return (bits.astype(jnp.int8) * 2 - 1).reshape(shape)


def _edge_weights(arrays: Mapping[str, jax.Array], prefix: str, bits: int) -> jax.Array:
  if bits >= 32:
    return arrays[f'{prefix}/kernel']
  # alpha * q / n in the quantizer's order of operations.
  return arrays[f'{prefix}/alpha'] * arrays[f'{prefix}/q'].astype(jnp.float32) / \
      quant.uniform_levels(bits)


def _count(s: jax.Array, signs: jax.Array, stride: int) -> jax.Array:
  """Integer counts ``sign(W) S``: int ``[T, B, H, W, Cin]`` -> int32 ``[T, B, H', W', C]``."""
  t, b = s.shape[:2]
  y = jax.lax.conv_general_dilated(
      s.reshape((t * b,) + s.shape[2:]).astype(jnp.int8), signs, (stride, stride), 'SAME',
      dimension_numbers=_DN, preferred_element_type=jnp.int32)
  return y.reshape((t, b) + y.shape[1:])


def folded_serial_residual(counts: jax.Array, extra: jax.Array, m: jax.Array,
                           vth: float | jax.Array, a: jax.Array, c: jax.Array, *,
                           dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """Exact serial MFP neuron on ``X = a C + c + E``: one integer count plus a second current.

  The count ``C`` is isolated; the other branch's per-step current ``E`` (identity shortcut
  spikes, or a 1x1 shortcut's ``a2 C2 + c2``) moves into the threshold::

    fire at t  <=>  a M[t,t] C[t] >= vth - c (M 1)[t] - a sum_{i<t} M[t,i] C[i]
                                    - sum_{i<=t} M[t,i] E[i]

  (flipped where ``a M[t,t] < 0``; where it is 0, the constant ``0 >= right-hand side``). A
  ``lax.scan`` over ``t`` carries both histories for the current and future steps (``O(T)`` per
  neuron), reading only step ``t`` of ``C`` and ``E``. With ``E = 0`` it equals
  ``neurons.folded_serial``.

  Args:
    counts: integer ``[T, ..., C]``.
    extra: ``[T, ..., C]`` the second branch's current.
    m: ``[T, T]`` (lower triangle used); vth: threshold; a, c: ``[C]``.
    dtype: float dtype of the threshold arithmetic.

  Returns:
    spikes ``[T, ..., C]`` as ``dtype``; equal to ``mfp_parallel(a * counts + c + extra, m)``
    up to float rounding at exact ties.
  """
  if extra.shape != counts.shape or counts.ndim < 2:
    raise ValueError(f'counts and extra must both be [T, ..., C], got {counts.shape} and '
                     f'{extra.shape}')
  t = counts.shape[0]
  if m.shape != (t, t) or a.shape != (counts.shape[-1],) or c.shape != a.shape:
    raise ValueError(f'm must be [T, T] = {(t, t)} and a, c [C] = {(counts.shape[-1],)}; got '
                     f'{m.shape}, {a.shape}, {c.shape}')
  ml = jnp.tril(m).astype(dtype)
  a, c = a.astype(dtype), c.astype(dtype)
  gain = jnp.diagonal(ml)[:, None] * a          # [T, C]
  bias = vth - ml.sum(axis=1)[:, None] * c      # [T, C]
  expand = lambda v: v.reshape(v.shape + (1,) * (counts.ndim - 1))

  def step(carry, inp):
    hist, ehist = carry
    idx, col, diag, ct, et = inp
    cf, et = ct.astype(dtype), et.astype(dtype)
    rhs = bias[idx] - a * hist[idx] - (ehist[idx] + diag * et)
    g = gain[idx]
    theta = rhs / jnp.where(g != 0, g, 1)
    spike = jnp.where(g > 0, cf >= theta, jnp.where(g < 0, cf <= theta, 0 >= rhs))
    # Future steps t' > t see this step through M[t', t] (the strictly lower column).
    hist = hist + expand(col) * cf[None]
    ehist = ehist + expand(col) * et[None]
    return (hist, ehist), spike.astype(dtype)

  zeros = jnp.zeros(counts.shape, dtype)
  cols = jnp.tril(ml, -1).T
  _, spikes = jax.lax.scan(step, (zeros, zeros),
                           (jnp.arange(t), cols, jnp.diagonal(ml), counts, extra))
  return spikes


def _folded(arrays, prefix: str, neuron: str, counts: jax.Array, vth: float) -> jax.Array:
  folded = neurons.fold_thresholds(arrays[f'{neuron}/M'], vth, arrays[f'{prefix}/a'],
                                   arrays[f'{prefix}/c'])
  return neurons.folded_serial(counts, folded)


def _sum_pool(s: jax.Array, window: int) -> jax.Array:
  w = (1, 1, window, window, 1)
  return jax.lax.reduce_window(s.astype(jnp.int32), 0, jax.lax.add, w, w, 'VALID')


def run_program(ops: Sequence[Mapping[str, Any]], meta: Mapping[str, Any],
                arrays: Mapping[str, jax.Array], x: jax.Array, *, with_spikes: bool = False):
  """Serial inference of a folded program (pure; jit it with ``ops``/``meta`` bound).

  Args:
    ops, meta: from :class:`Program` (static).
    arrays: the program's arrays as jax arrays (pass them as arguments, not constants).
    x: ``[B, *input_shape]`` float32.
    with_spikes: also return every neuron's spikes.

  Returns:
    time-mean logits ``[B, K]`` (and ``{neuron path: spikes [T, B, ...]}`` if asked).
  """
  T, vth, edge = meta['T'], meta['vth'], meta['edge_bits']
  spikes: dict[str, jax.Array] = {}
  h = None
  for op in ops:
    kind = op['op']
    if kind == 'stem':
      w = _edge_weights(arrays, 'Stem_0', edge)
      if x.ndim == 4:  # static image: the T steps see the same current
        y = jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=_DN)
        cur = jnp.broadcast_to((y * arrays['Stem_0/a'] + arrays['Stem_0/c'])[None],
                               (T,) + y.shape)
      else:  # event frames [B, T, ...]
        xt = jnp.swapaxes(x, 0, 1)
        y = jax.lax.conv_general_dilated(xt.reshape((-1,) + xt.shape[2:]), w, (1, 1), 'SAME',
                                         dimension_numbers=_DN)
        cur = (y * arrays['Stem_0/a'] + arrays['Stem_0/c']).reshape(xt.shape[:2] + y.shape[1:])
      h = neurons.mfp_serial(cur, arrays[f'{op["neuron"]}/M'], vth=vth)
      spikes[op['neuron']] = h
    elif kind == 'conv':
      counts = _count(h, _signs(arrays, op['name'], op['shape']), op['stride'])
      h = _folded(arrays, op['name'], op['neuron'], counts, vth)
      spikes[op['neuron']] = h
    elif kind == 'pool':
      h = _sum_pool(h, op['window'])
    elif kind == 'block':
      inner, name = op['inner'], op['name']
      s1 = _folded(arrays, inner['name'], inner['neuron'],
                   _count(h, _signs(arrays, inner['name'], inner['shape']), op['stride']), vth)
      spikes[inner['neuron']] = s1
      c2 = _count(s1, _signs(arrays, f'{name}/conv2', op['shape2']), 1)
      if 'shape_sc' in op:
        csc = _count(h, _signs(arrays, f'{name}/shortcut', op['shape_sc']), op['stride'])
        extra = (csc.astype(jnp.float32) * arrays[f'{name}/shortcut/a']
                 + arrays[f'{name}/shortcut/c'])
      else:
        extra = h.astype(jnp.float32)
      h = folded_serial_residual(c2, extra, arrays[f'{op["neuron"]}/M'], vth,
                                 arrays[f'{name}/conv2/a'], arrays[f'{name}/conv2/c'])
      spikes[op['neuron']] = h
    elif kind == 'classifier':
      t, b = h.shape[:2]
      hf = h.astype(jnp.float32)
      if op['global_pool']:
        feats = hf.reshape((t * b, -1, hf.shape[-1])).sum(axis=1) / (op['den'] * np.prod(
            hf.shape[2:-1]))
      else:
        feats = hf.reshape((t * b, -1)) / op['den']
      w = _edge_weights(arrays, 'Classifier_0', edge)
      logits = (feats @ w + arrays['Classifier_0/bias']).reshape((t, b, -1)).mean(axis=0)
    else:
      raise ValueError(f'unknown op {kind!r} in program')
  return (logits, spikes) if with_spikes else logits


def program_fn(program: Program, *, with_spikes: bool = False) -> Callable:
  """A jitted ``(arrays, x) -> logits`` for ``program`` (arrays are arguments, not constants)."""
  return jax.jit(functools.partial(run_program, program.ops, program.meta,
                                   with_spikes=with_spikes))


def make_infer_fn(model: nn.Module, variables: Mapping[str, Any], *, mode: str = 'parallel',
                  input_shape: Sequence[int], with_spikes: bool = False) -> Callable:
  """A compiled inference function ``batch -> logits`` in one of :data:`MODES`.

  Args:
    model: a model of :mod:`mfp_jax.models` (parameters are never changed).
    variables: ``{'params', 'batch_stats'}``.
    mode: ``'parallel'``, ``'serial'`` (folded integer form, see the module doc) or ``'eq9'``.
    input_shape: one example, e.g. ``(8, 8, 1)``.
    with_spikes: return ``(logits, {neuron path: spikes [T, B, ...]})`` instead.

  Returns:
    ``infer(x: float32 [B, *input_shape]) -> float32 [B, num_classes]`` time-mean logits; it
    raises ``ValueError`` for a wrong shape or dtype.

  Example::

    infer = make_infer_fn(model, variables, mode='serial', input_shape=(8, 8, 1))
    predictions = infer(images).argmax(-1)
  """
  input_shape = tuple(int(d) for d in input_shape)
  if mode == 'serial':
    program = build_program(model, variables, input_shape)
    fn, args = program_fn(program, with_spikes=with_spikes), program_arrays(program)
  elif mode in ('parallel', 'eq9'):
    if mode == 'eq9' and model.neuron.kind not in FOLDABLE_NEURONS:
      raise ValueError(f'Eq. 9 applies to MFP neurons, the model has {model.neuron.kind!r}')
    clone = with_neuron_mode(model, mode)
    args = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}

    def flax_fn(v, x):
      logits, spikes, _ = forward_flax(clone, v, x)
      return (logits, spikes) if with_spikes else logits

    fn = jax.jit(flax_fn)
  else:
    raise ValueError(f'unknown mode {mode!r}; allowed: {list(MODES)}')

  def infer(x):
    return fn(args, check_input(x, input_shape))

  return infer


def program_arrays(program: Program) -> dict[str, jax.Array]:
  """The program's arrays on the default device."""
  return {k: jnp.asarray(v) for k, v in program.arrays.items()}
