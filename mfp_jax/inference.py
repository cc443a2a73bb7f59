"""Inference of a trained network in three forms, plus the deployable (folded, bit-packed) program.

``make_infer_fn(model, variables, mode=..., input_shape=...)`` returns a function
``batch [B, *input_shape] float32 -> time-mean logits [B, num_classes]`` (jitted inside, run
in chunks of ``chunk_size`` rows so memory stays of the order of one chunk; non-finite inputs
are refused with a ``ValueError`` unless ``check_finite=False``):

* ``'parallel'`` -- the training form (every MFP neuron one matmul over time).
* ``'serial'`` -- the exact streaming form of a deployed network, built by :func:`build_program`:
  every MFP neuron is a ``lax.scan`` over time that sees one step at a time, and on the
  1-bit-weight x binary-spike layers the weight scale and BatchNorm are folded into per-step
  thresholds on integer spike counts. Which layers are integer-exact:

  ======================================  ==============================================
  layer                                    serial arithmetic
  ======================================  ==============================================
  first layer (``Stem``, ``DenseStem``)    real-valued input x 8/32-bit weights: float32
                                           current, neuron = exact float streaming scan
  hidden 1-bit conv/dense (incl. 1x1       counts ``C = sign(W) S`` in int8 x int8 -> int32
  shortcut)                                (exact); threshold comparison in float32
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

Folding is in :mod:`mfp_jax.folding`; saving and loading (bit-packed ``.npz`` weights,
``jax.export`` artifacts) in :mod:`mfp_jax.deploy`.
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

from mfp_jax import folding
from mfp_jax import layers
from mfp_jax import neurons
from mfp_jax import quant

MODES = ('parallel', 'serial', 'eq9')
DEFAULT_CHUNK = 256  # rows per call: ResNet19 activations at 256 x T=4 x 32x32x128 are ~0.5 GB
_DN = ('NHWC', 'HWIO', 'NHWC')

# The folding lives in mfp_jax.folding; these names are part of this module's API too.
Program = folding.Program
build_program = folding.build_program


# --- Input checks --------------------------------------------------------------------------


def check_input(x: Any, input_shape: Sequence[int], *, check_finite: bool = True) -> Any:
  """Checks ``x`` is a float32 array ``[B, *input_shape]`` (and finite); returns it.

  Raises:
    ValueError: wrong dtype (only float32 is accepted: preprocess first), shape, or a NaN /
      inf value (pass ``check_finite=False`` to run on them anyway).
  """
  shape, dtype = tuple(np.shape(x)), getattr(x, 'dtype', None)
  want = f'float32 [B, {", ".join(map(str, input_shape))}]'
  if dtype is None or np.dtype(dtype) != np.float32:
    raise ValueError(f'expected input {want} (preprocessed images), got dtype {dtype}')
  if len(shape) != len(input_shape) + 1 or shape[1:] != tuple(input_shape) or shape[0] < 1:
    raise ValueError(f'expected input {want}, got shape {list(shape)}')
  if check_finite:
    bad = ~np.isfinite(np.asarray(x)).reshape(shape[0], -1).all(axis=1)
    if bad.any():
      rows = np.flatnonzero(bad)
      raise ValueError(f'input has NaN or inf values in {rows.size} of {shape[0]} rows (first: '
                       f'{rows[:5].tolist()}); a network given them predicts garbage. Clean '
                       f'the input, or pass check_finite=False')
  return x


def run_chunked(fn: Callable[[Any], Any], x: Any, chunk_size: int) -> Any:
  """``fn`` over ``x [N, ...]`` in chunks of ``chunk_size`` rows, concatenated on the host.

  The last chunk is padded to ``chunk_size`` (one compiled shape) and its padding dropped.
  Outputs are pytrees whose leaves lead with the batch axis (or ``[T, B, ...]`` spikes, whose
  batch axis 1 is handled too).
  """
  if chunk_size < 1:
    raise ValueError(f'chunk_size must be >= 1, got {chunk_size}')
  n = int(np.shape(x)[0])
  if n <= chunk_size:
    return fn(x)
  outs = []
  for start in range(0, n, chunk_size):
    part = np.asarray(x[start:start + chunk_size])
    rows = len(part)
    if rows < chunk_size:
      part = np.concatenate([part, np.zeros((chunk_size - rows,) + part.shape[1:], part.dtype)])
    out = jax.device_get(fn(part))
    outs.append(jax.tree.map(lambda a: _take_rows(np.asarray(a), rows, chunk_size), out))
  return jax.tree.map(lambda *parts: np.concatenate(parts, axis=_batch_axis(parts[0])), *outs)


def _batch_axis(a: np.ndarray) -> int:
  # Logits are [B, K]; spikes [T, B, ...] (time-major).
  return 0 if a.ndim == 2 else 1


def _take_rows(a: np.ndarray, rows: int, chunk: int) -> np.ndarray:
  del chunk
  return a[:rows] if _batch_axis(a) == 0 else a[:, :rows]


# --- Parallel and Eq. 9: the Flax model itself ---------------------------------------------


@dataclasses.dataclass(frozen=True)
class ModeBound:
  """A model whose ``apply`` runs every linear-threshold neuron in ``mode`` (same params)."""
  model: nn.Module
  mode: str

  def apply(self, *args, **kwargs):
    with layers.neuron_mode(self.mode):
      return self.model.apply(*args, **kwargs)


def with_neuron_mode(model: nn.Module, mode: str) -> ModeBound:
  """The same model (same parameters) with every MFP-type neuron run as ``'parallel'``,
  ``'serial'`` (float streaming) or ``'eq9'``; works for a model of any structure."""
  if mode not in layers.NEURON_MODES:
    raise ValueError(f'unknown neuron mode {mode!r}; allowed: {list(layers.NEURON_MODES)}')
  return ModeBound(model.model if isinstance(model, ModeBound) else model, mode)


def _per_example_mean(x: jax.Array, batch: int) -> jax.Array:
  """``[B, ...]`` or time-folded ``[T*B, ...]`` -> mean per example ``[B]``."""
  return x.reshape(x.shape[0] // batch, batch, -1).astype(jnp.float32).mean(axis=(0, 2))


def forward_flax(model: nn.Module | ModeBound, variables: Mapping[str, Any], x: jax.Array
                 ) -> tuple[jax.Array, dict[str, jax.Array], dict[str, jax.Array]]:
  """Evaluation forward of the Flax model, recording spikes and layer inputs.

  Args:
    model: a model (or :func:`with_neuron_mode` of one).
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
  flat = traverse_util.flatten_dict(col['intermediates'])
  spikes = {'/'.join(k[:-1]): v[0] for k, v in flat.items() if k[-1] == '__call__'}
  return logits.mean(axis=0), spikes, inputs


# --- Running a program ---------------------------------------------------------------------


def _signs(arrays: Mapping[str, jax.Array], prefix: str, shape: Sequence[int]) -> jax.Array:
  size = int(np.prod(shape))
  bits = jnp.unpackbits(arrays[f'{prefix}/signs'], count=size)
  return (bits.astype(jnp.int8) * 2 - 1).reshape(shape)


def _edge_weights(arrays: Mapping[str, jax.Array], op: Mapping[str, Any]) -> jax.Array:
  prefix = op['layer']
  if op['bits'] >= 32:
    return arrays[f'{prefix}/kernel']
  # alpha * q / n in the quantizer's order of operations.
  return arrays[f'{prefix}/alpha'] * arrays[f'{prefix}/q'].astype(jnp.float32) / \
      quant.uniform_levels(op['bits'])


def _count(s: jax.Array, signs: jax.Array, layer: Mapping[str, Any]) -> jax.Array:
  """Integer counts ``sign(W) S``: int ``[T, B, ..., Cin]`` -> int32 ``[T, B, ..., C]``."""
  t, b = s.shape[:2]
  s8 = s.reshape((t * b,) + s.shape[2:]).astype(jnp.int8)
  if layer['kind'] == 'dense':
    y = jax.lax.dot_general(s8, signs, (((1,), (0,)), ((), ())),
                            preferred_element_type=jnp.int32)
  else:
    stride = layer['stride']
    y = jax.lax.conv_general_dilated(s8, signs, (stride, stride), 'SAME',
                                     dimension_numbers=_DN, preferred_element_type=jnp.int32)
  return y.reshape((t, b) + y.shape[1:])


def _layer_counts(arrays, h, layer):
  return _count(h, _signs(arrays, layer['layer'], layer['shape']), layer)


def _folded(arrays, layer: Mapping[str, Any], neuron: str, counts: jax.Array,
            extra: jax.Array | None = None) -> jax.Array:
  folded = neurons.fold_thresholds(arrays[f'{neuron}/M'], 1.0, arrays[f'{layer["layer"]}/a'],
                                   arrays[f'{layer["layer"]}/c'])
  return neurons.folded_serial(counts, folded, extra=extra)


def folded_serial_residual(counts: jax.Array, extra: jax.Array, m: jax.Array,
                           vth: float | jax.Array, a: jax.Array, c: jax.Array, *,
                           dtype: jnp.dtype = jnp.float32) -> jax.Array:
  """Exact serial MFP neuron on ``X = a C + c + E``: the plain fold with a second current.

  ``neurons.folded_serial(counts, neurons.fold_thresholds(m, vth, a, c), extra=extra)``: the
  other branch's per-step current ``E`` moves into the threshold (see there).
  """
  return neurons.folded_serial(counts, neurons.fold_thresholds(m, vth, a, c), extra=extra,
                               dtype=dtype)


def _run_stem(op, arrays, x):
  w = _edge_weights(arrays, op)
  a, c = arrays[f'{op["layer"]}/a'], arrays[f'{op["layer"]}/c']
  T = op['T']
  if op['kind'] == 'dense':  # sequences [B, T, F]
    xt = jnp.swapaxes(x, 0, 1)
    cur = (xt @ w) * a + c
  elif x.ndim == 4:  # static image: the T steps see the same current
    s = op['stride']
    y = jax.lax.conv_general_dilated(x, w, (s, s), 'SAME', dimension_numbers=_DN)
    cur = jnp.broadcast_to((y * a + c)[None], (T,) + y.shape)
  else:  # event frames [B, T, ...]
    s = op['stride']
    xt = jnp.swapaxes(x, 0, 1)
    y = jax.lax.conv_general_dilated(xt.reshape((-1,) + xt.shape[2:]), w, (s, s), 'SAME',
                                     dimension_numbers=_DN)
    cur = (y * a + c).reshape(xt.shape[:2] + y.shape[1:])
  return neurons.mfp_serial(cur, arrays[f'{op["neuron"]}/M'], vth=1.0)


def _run_block(op, arrays, h, spikes):
  inner = op['inner']
  s1 = _folded(arrays, inner, inner['neuron'], _layer_counts(arrays, h, inner))
  spikes[inner['neuron']] = s1
  c2 = _layer_counts(arrays, s1, op['conv2'])
  sc = op['shortcut']
  if sc is not None:
    extra = (_layer_counts(arrays, h, sc).astype(jnp.float32) * arrays[f'{sc["layer"]}/a']
             + arrays[f'{sc["layer"]}/c'])
  else:
    extra = h.astype(jnp.float32) / op['den']
  return _folded(arrays, op['conv2'], op['neuron'], c2, extra)


def _run_classifier(op, arrays, h):
  t, b = h.shape[:2]
  hf = h.astype(jnp.float32)
  if op['global_pool']:
    feats = hf.reshape((t * b, -1, hf.shape[-1])).sum(axis=1) / (
        op['den'] * np.prod(hf.shape[2:-1]))
  else:
    feats = hf.reshape((t * b, -1)) / op['den']
  logits = feats @ _edge_weights(arrays, op) + arrays[f'{op["layer"]}/bias']
  return logits.reshape((t, b, -1)).mean(axis=0)


def _sum_pool(s: jax.Array, window: int, padding: str) -> jax.Array:
  w = (1, 1, window, window, 1)
  return jax.lax.reduce_window(s.astype(jnp.int32), 0, jax.lax.add, w, w, padding)


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
  del meta
  spikes: dict[str, jax.Array] = {}
  h, logits = None, None
  for op in ops:
    kind = op['op']
    if kind == 'stem':
      h = spikes[op['neuron']] = _run_stem(op, arrays, x)
    elif kind == 'binary':
      h = spikes[op['neuron']] = _folded(arrays, op, op['neuron'], _layer_counts(arrays, h, op))
    elif kind == 'pool':
      # Programs folded before pools had a padding were all 'VALID'.
      h = _sum_pool(h, op['window'], op.get('padding', 'VALID'))
    elif kind == 'block':
      h = spikes[op['neuron']] = _run_block(op, arrays, h, spikes)
    elif kind == 'classifier':
      logits = _run_classifier(op, arrays, h)
    else:
      raise ValueError(f'unknown op {kind!r} in program')
  return (logits, spikes) if with_spikes else logits


def program_fn(program: Program, *, with_spikes: bool = False) -> Callable:
  """A jitted ``(arrays, x) -> logits`` for ``program`` (arrays are arguments, not constants)."""
  return jax.jit(functools.partial(run_program, program.ops, program.meta,
                                   with_spikes=with_spikes))


def program_arrays(program: Program) -> dict[str, jax.Array]:
  """The program's arrays on the default device."""
  return {k: jnp.asarray(v) for k, v in program.arrays.items()}


def make_infer_fn(model: nn.Module, variables: Mapping[str, Any], *, mode: str = 'parallel',
                  input_shape: Sequence[int], with_spikes: bool = False,
                  chunk_size: int = DEFAULT_CHUNK, check_finite: bool = True) -> Callable:
  """A compiled inference function ``batch -> logits`` in one of :data:`MODES`.

  Args:
    model: a trained model (parameters are never changed).
    variables: ``{'params', 'batch_stats'}``.
    mode: ``'parallel'``, ``'serial'`` (folded integer form, see the module doc) or ``'eq9'``.
    input_shape: one example, e.g. ``(8, 8, 1)``.
    with_spikes: return ``(logits, {neuron path: spikes [T, B, ...]})`` instead (all of the
      batch's spikes are kept: memory grows with the batch).
    chunk_size: rows per compiled call; larger batches run chunk by chunk.
    check_finite: refuse inputs with NaN or inf (a ``ValueError``).

  Returns:
    ``infer(x: float32 [B, *input_shape]) -> float32 [B, num_classes]`` time-mean logits; it
    raises ``ValueError`` for a wrong shape or dtype, or a non-finite value.

  Example::

    infer = make_infer_fn(model, variables, mode='serial', input_shape=(8, 8, 1))
    predictions = infer(images).argmax(-1)
  """
  input_shape = tuple(int(d) for d in input_shape)
  if mode == 'serial':
    program = build_program(model, variables, input_shape)
    fn, args = program_fn(program, with_spikes=with_spikes), program_arrays(program)
  elif mode in ('parallel', 'eq9'):
    if mode == 'eq9' and not folding.all_linear(model, input_shape):
      raise ValueError('Eq. 9 applies to MFP neurons (LinearNeuron kinds); this model has '
                       f'{sorted({s.kind for s in folding.neuron_specs(model, input_shape).values()})}')
    clone = with_neuron_mode(model, mode)
    args = {'params': variables['params'], 'batch_stats': variables.get('batch_stats', {})}

    def flax_fn(v, x):
      logits, spikes, _ = forward_flax(clone, v, x)
      return (logits, spikes) if with_spikes else logits

    fn = jax.jit(flax_fn)
  else:
    raise ValueError(f'unknown mode {mode!r}; allowed: {list(MODES)}')

  def infer(x):
    check_input(x, input_shape, check_finite=check_finite)
    return run_chunked(lambda part: fn(args, part), x, chunk_size)

  return infer
