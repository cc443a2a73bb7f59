"""``QuantSpec.compute_dtype='bfloat16'``: what is bit-exact and what is not.

A 1-bit layer in bfloat16 casts its inputs and its ``+-2^k`` weights to bfloat16 and
accumulates in float32 (``QuantSpec.operands``). What the tests below establish:

* **Forward: exact.** Spikes ``{0, 1}`` and their 2x2 averages ``{0, 1/4, ..., 1}`` fit in
  bfloat16's 8 significant bits, and so do ``+-2^k``. Every product in one output's sum is a
  multiple of ``2^(k-2)`` (one scale per output channel) and at most ``2^k``, so every
  partial sum of fewer than ``2^22`` terms is exact in float32, in any order. Pre-activations,
  spikes and logits are bit-identical to float32. The first layer and the readout keep
  float32 operands (``edge_quant`` is not ``quant``). Not exact: real-valued inputs (the ANN
  kind ``'relu'``), and weights that are not powers of two (``scale='mean'``, multi-bit).
* **Backward: one bfloat16 rounding per 1-bit layer.** The cotangent of a bfloat16 operand
  is bfloat16: a layer's input and weight gradients are computed in float32 from exact
  operands (``conv.conv2d``'s per-tap weight gradient and XLA's both accumulate in float32)
  and then rounded once to bfloat16 (``dx == bf16(dx_float32)``, ``dW == bf16(dW_float32)``,
  bit for bit). The rounded input gradient flows into the layers before it, so only the
  parameters after the last 1-bit layer (its norm and neuron, the readout) get float32's
  gradients exactly. (The operands are exact; only the cast's cotangent rounds. A cast
  inside the conv's custom VJP that hands float32 cotangents back would make the backward
  exact too, with the backward's products then taking float32 cotangents.)
* **Training: close, not equal.** On the tiny digits run the logged train losses and the
  printed accuracy (4 decimals) after 6 steps equal float32's; the final test loss differs in
  the fifth digit (observed relative 2e-5), and after 20 steps the accuracies differ
  (0.4133 vs 0.4044 here).
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import read_metrics, tiny_digits_config
from mfp_jax import config_lib, conv, layers, models, quant, train_lib

F32 = layers.QuantSpec()
BF16 = layers.QuantSpec(compute_dtype='bfloat16')


def _bf16_round(a):
  return a.astype(jnp.bfloat16).astype(jnp.float32)


def _spikes(key, shape, averaged):
  """Binary spikes, or their 2x2 averages (multiples of 1/4), as a pooled layer feeds on."""
  if not averaged:
    return (jax.random.uniform(key, shape) < 0.3).astype(jnp.float32)
  n, h, w, c = shape
  s = (jax.random.uniform(key, (n, 2 * h, 2 * w, c)) < 0.3).astype(jnp.float32)
  return layers.avg_pool(s)


# (layer, input shape): 3x3 at a fan-in of 3*3*512 = 4608, stride 2, ResNet's 1x1 shortcut,
# and a dense layer on a flattened 3x3x512 map (VGGSNN's last features).
LAYERS = {
    'conv3x3_c512': (lambda q: layers.QConv(16, 3, 1, q), (2, 6, 6, 512)),
    'conv3x3_s2': (lambda q: layers.QConv(32, 3, 2, q), (2, 8, 8, 64)),
    'conv1x1_s2': (lambda q: layers.QConv(32, 1, 2, q), (2, 8, 8, 64)),
    'dense_4608': (lambda q: layers.QDense(16, use_bias=False, quant=q), (4, 4608)),
}


@functools.cache
def _layer_vjp(name, q):
  """Jitted ``(y, dx, d kernel)`` of layer ``name`` in spec ``q`` (one compile per pair)."""
  make = LAYERS[name][0]

  def vjp(params, x, key):
    y, pull = jax.vjp(lambda p, x: make(q).apply(p, x), params, x)
    dparams, dx = pull(jax.random.normal(key, y.shape))
    return y, dx, dparams['params']['kernel']

  return jax.jit(vjp)


@pytest.mark.parametrize('averaged', [False, True], ids=['spikes', 'avg2x2'])
@pytest.mark.parametrize('name', sorted(LAYERS))
def test_one_bit_layer_forward_exact_backward_rounded_once(name, averaged, key):
  make, shape = LAYERS[name]
  kx, kp, kg = jax.random.split(key, 3)
  x4 = shape if len(shape) == 4 else (shape[0], 1, 1, shape[1])
  x = _spikes(kx, x4, averaged).reshape(shape)
  params = jax.jit(make(F32).init)(kp, x)
  (y32, dx32, dk32), (y16, dx16, dk16) = (_layer_vjp(name, q)(params, x, kg) for q in (F32, BF16))
  assert y16.dtype == jnp.float32
  np.testing.assert_array_equal(y16, y32)  # the forward: bit-identical
  np.testing.assert_array_equal(dx16, _bf16_round(dx32))  # dx: float32's, rounded once
  assert not np.array_equal(dx16, dx32)
  # The kernel's gradient is its quantized weight's (rounded once the same way) through the
  # standardizing STE, which mixes a channel's entries: close, not a rounding identity.
  np.testing.assert_allclose(dk16, dk32, rtol=0, atol=2**-7 * float(jnp.abs(dk32).max()))


@pytest.mark.parametrize('dw', ['taps', 'xla'])
def test_conv_weight_gradient_accumulates_in_float32(dw, key):
  """Both weight-gradient paths of ``conv.conv2d`` (per-tap matmuls, XLA's conv) sum in
  float32 and round once at the end: ``dW == bf16(dW_float32)`` bit for bit, as ``dx``."""
  kx, kw, kg = jax.random.split(key, 3)
  x = _spikes(kx, (2, 8, 8, 64), averaged=False)
  w = quant.binarize_pow2(jax.random.normal(kw, (3, 3, 64, 32)))
  g = jax.random.normal(kg, (2, 8, 8, 32))
  grads = {}
  for q in (F32, BF16):
    def f(x, w, q=q):
      xq, wq, acc = q.operands(x, w)
      return conv.conv2d(xq, wq, dw=dw, preferred_element_type=acc)
    grads[q.compute_dtype] = jax.jit(lambda x, w, g, f=f: jax.vjp(f, x, w)[1](g))(x, w, g)
  (dx32, dw32), (dx16, dw16) = grads['float32'], grads['bfloat16']
  np.testing.assert_array_equal(dx16, _bf16_round(dx32))
  np.testing.assert_array_equal(dw16, _bf16_round(dw32))


def test_real_valued_inputs_are_not_exact(key):
  """The ANN kind feeds ReLU outputs (not spikes): rounding them to bfloat16 changes sums."""
  x = jax.nn.relu(jax.random.normal(key, (2, 6, 6, 64)))
  params = layers.QConv(16, 3, 1, F32).init(key, x)
  y32, y16 = (jax.jit(layers.QConv(16, 3, 1, q).apply)(params, x) for q in (F32, BF16))
  assert not np.array_equal(y16, y32)
  np.testing.assert_allclose(y16, y32, rtol=0, atol=2**-7 * float(jnp.abs(y32).max()))


def _digits_model(dtype, kind='mfp'):
  cfg = tiny_digits_config(**{'model.quant.compute_dtype': dtype, 'model.neuron.kind': kind})
  return models.create_model(cfg.model, num_classes=10)


@functools.cache
def _digits_variables(kind):
  """Initial variables of the tiny digits net (the same for both compute dtypes)."""
  model = _digits_model('float32', kind)
  return jax.jit(lambda k: models.init_variables(model, (8, 8, 1), k))(jax.random.key(0))


def _forward_record(model, variables, x, train):
  """``(modules, outputs, logits)``: every QConv/QDense/SpikingNeuron and its output, in
  call order (one jitted forward)."""
  modules = []

  def forward(variables, x):
    outs = []

    def record(next_fun, args, kwargs, context):
      y = next_fun(*args, **kwargs)
      if context.method_name == '__call__' and isinstance(
          context.module, (layers.QConv, layers.QDense, layers.SpikingNeuron)):
        modules.append(context.module)
        outs.append(y)
      return y

    with nn.intercept_methods(record):
      logits, _ = model.apply(variables, x, train=train, anneal_t=jnp.float32(1.0),
                              mutable=['batch_stats', 'intermediates'])
    return outs, logits

  outs, logits = jax.jit(forward)(variables, x)
  return modules, outs, logits


@pytest.mark.parametrize('train', [True, False], ids=['train', 'eval'])
@pytest.mark.parametrize('kind', ['mfp', 'lif'])
def test_model_forward_is_bit_identical(kind, train):
  m32, m16 = _digits_model('float32', kind), _digits_model('bfloat16', kind)
  variables = _digits_variables(kind)
  x = jax.random.uniform(jax.random.key(1), (16, 8, 8, 1))
  mods32, outs32, logits32 = _forward_record(m32, variables, x, train)
  mods16, outs16, logits16 = _forward_record(m16, variables, x, train)
  # Stem conv and readout (edge_quant) stay float32; the two hidden convs are bfloat16.
  assert [m.quant.compute_dtype for m in mods16 if hasattr(m, 'quant')] == [
      'float32', 'bfloat16', 'bfloat16', 'float32']
  assert [type(m) for m in mods16] == [type(m) for m in mods32]
  assert sum(isinstance(m, layers.SpikingNeuron) for m in mods16) == 3
  for mod, y16, y32 in zip(mods16, outs16, outs32):  # pre-activations and spikes, in order
    assert y16.dtype == y32.dtype == jnp.float32
    np.testing.assert_array_equal(y16, y32, err_msg=type(mod).__name__)
  np.testing.assert_array_equal(logits16, logits32)


def _product_operand_dtypes(jaxpr, out):
  """``(primitive, operand dtypes)`` of every conv and dot in ``jaxpr``, nested ones too."""
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ('conv_general_dilated', 'dot_general'):
      out.append((eqn.primitive.name, tuple(str(v.aval.dtype) for v in eqn.invars)))
    for p in eqn.params.values():
      for sub in (p if isinstance(p, (tuple, list)) else (p,)):
        sub = getattr(sub, 'jaxpr', sub)
        if hasattr(sub, 'eqns'):
          _product_operand_dtypes(sub, out)
  return out


def test_first_layer_and_readout_compute_in_float32():
  """In the traced program: bfloat16 operands in the hidden convs only."""
  m16 = _digits_model('bfloat16')
  variables = _digits_variables('mfp')
  x = jnp.zeros((2, 8, 8, 1))
  jaxpr = jax.make_jaxpr(lambda v: m16.apply(v, x, train=False))(variables).jaxpr
  prods = _product_operand_dtypes(jaxpr, [])
  convs = [d for p, d in prods if p == 'conv_general_dilated']
  dots = [d for p, d in prods if p == 'dot_general']  # MFP's M products, then the readout
  assert convs == [('float32', 'float32'), ('bfloat16', 'bfloat16'), ('bfloat16', 'bfloat16')]
  assert dots and all(d == ('float32', 'float32') for d in dots)


def test_gradients_after_the_last_one_bit_layer_are_exact():
  """Only what the last 1-bit conv's output feeds gets float32's gradient bit for bit."""
  m32, m16 = _digits_model('float32'), _digits_model('bfloat16')
  variables = _digits_variables('mfp')
  x = jax.random.uniform(jax.random.key(1), (16, 8, 8, 1))
  labels = jnp.arange(16) % 10

  def loss(params, model):
    logits, _ = model.apply({**variables, 'params': params}, x, train=True,
                            anneal_t=jnp.float32(1.0), mutable=['batch_stats', 'intermediates'])
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[None, :, None],
                                         axis=-1))

  grad = jax.jit(jax.grad(loss), static_argnums=1)
  g32 = jax.tree_util.tree_flatten_with_path(grad(variables['params'], m32))[0]
  g16 = jax.tree_util.tree_flatten_with_path(grad(variables['params'], m16))[0]
  exact = sorted(jax.tree_util.keystr(k) for (k, a), (_, b) in zip(g32, g16)
                 if np.array_equal(a, b))
  assert exact == ["['Classifier_0']['QDense_0']['bias']", "['Classifier_0']['QDense_0']['kernel']",
                   "['ConvNormSpike_1']['BatchNorm_0']['bias']",
                   "['ConvNormSpike_1']['BatchNorm_0']['scale']",
                   "['ConvNormSpike_1']['SpikingNeuron_0']['M']"]
  for (k, a), (_, b) in zip(g32, g16):  # the rest: within a few bfloat16 roundings
    np.testing.assert_allclose(b, a, rtol=0, atol=2**-6 * float(np.abs(a).max()),
                               err_msg=jax.tree_util.keystr(k))


def test_short_training_run_matches_float32(tmp_path):
  runs = {}
  for dtype in ('float32', 'bfloat16'):
    cfg = tiny_digits_config(**{'model.quant.compute_dtype': dtype, 'stop_at_step': 6,
                                'log_every_steps': 2})
    res = train_lib.train_and_evaluate(cfg, str(tmp_path / dtype)).metrics
    runs[dtype] = res, [m for m in read_metrics(tmp_path / dtype) if m['split'] == 'train']
  (r32, log32), (r16, log16) = runs['float32'], runs['bfloat16']
  assert f'{r16["accuracy"]:.4f}' == f'{r32["accuracy"]:.4f}'  # what train.py prints
  assert [m['step'] for m in log16] == [2, 4, 6]
  assert [m['loss'] for m in log16] == [m['loss'] for m in log32]  # the logged train losses
  # The test loss after 6 updates from rounded gradients: close (observed relative 2e-5).
  assert r16['loss'] == pytest.approx(r32['loss'], rel=1e-3)


def test_unknown_compute_dtype_is_a_config_error():
  assert dataclasses.replace(F32, compute_dtype='float16').problems() == [
      ('compute_dtype', "one of ['float32', 'bfloat16']")]
  cfg = tiny_digits_config(**{'model.quant.compute_dtype': 'float16'})
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(cfg)
  assert str(e.value) == ("invalid config:\n  config.model.quant.compute_dtype = 'float16': "
                          "must be one of ['float32', 'bfloat16']")
