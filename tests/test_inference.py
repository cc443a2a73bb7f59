"""Parallel vs exact serial (folded, integer) vs Eq. 9 inference; export and packed weights."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eval_helpers import random_variables, trained_digits
from mfp_jax import data as data_lib
from mfp_jax import deploy
from mfp_jax import inference
from mfp_jax import layers
from mfp_jax import models
from mfp_jax import neurons

DIGITS = (8, 8, 1)


@pytest.fixture(scope='module')
def digits():
  """The trained tiny digits model, its variables and the whole test split."""
  config, _, variables = trained_digits()
  model = models.create_model(config.model, num_classes=10)
  ds = data_lib.load_digits()
  x, y = ds.test.get_batch(np.arange(len(ds.test)))
  return model, variables, ds.preprocess(x), y


def _agree(spikes_a, spikes_b):
  assert spikes_a.keys() == spikes_b.keys()
  return {k: float(jnp.mean(spikes_a[k] == spikes_b[k])) for k in spikes_a}


def _both_forms(model, variables, x, input_shape):
  """``(logits, spikes)`` of the parallel and of the exact serial form on ``x``."""
  return [inference.make_infer_fn(model, variables, mode=mode, input_shape=input_shape,
                                  with_spikes=True)(x) for mode in ('parallel', 'serial')]


def test_serial_equals_parallel_on_trained_digits(digits):
  model, variables, x, y = digits
  (lp, sp), (ls, ss) = _both_forms(model, variables, x, DIGITS)
  np.testing.assert_array_equal(lp.argmax(-1), ls.argmax(-1))
  assert all(v == 1.0 for v in _agree(sp, ss).values()), _agree(sp, ss)
  np.testing.assert_allclose(lp, ls, rtol=1e-5, atol=1e-5)
  assert float(jnp.mean(lp.argmax(-1) == y)) > 0.3  # trained: far above chance (0.1)


@pytest.mark.parametrize('kind,edge_bits', [('mfp', 32), ('mfp_column', 8)])
def test_serial_equals_parallel_on_residual_net(kind, edge_bits):
  # Block 0 has an identity shortcut, block 1 a strided 1x1 conv shortcut: both ways a second
  # branch moves into the threshold. Perturbed norms and M (negative diagonals included).
  model = models.ResNet19(num_classes=10, T=3, stage_sizes=(1, 1), widths=(8, 16),
                          neuron=layers.NeuronSpec(kind=kind),
                          edge_quant=layers.QuantSpec(bits=edge_bits))
  variables = random_variables(model, (8, 8, 3))
  x = jax.random.uniform(jax.random.key(2), (32, 8, 8, 3))
  (lp, sp), (ls, ss) = _both_forms(model, variables, x, (8, 8, 3))
  agree = _agree(sp, ss)
  assert set(agree) >= {'BasicBlock_0/SpikingNeuron_0', 'BasicBlock_1/SpikingNeuron_0'}
  assert all(v == 1.0 for v in agree.values()), agree
  assert 0.05 < float(np.mean([jnp.mean(s) for s in ss.values()])) < 0.95  # not degenerate
  np.testing.assert_array_equal(lp.argmax(-1), ls.argmax(-1))


def test_serial_equals_parallel_with_same_padded_pools():
  # 14x14 -> stem stride 2 -> 7x7 -> 'SAME' pool -> 4x4 -> 2x2: the zero-padded edge windows
  # hold fewer spikes but the same window^2 divisor, in the parallel and the integer form.
  model = models.DigitsNet(num_classes=10, T=3, channels=(4, 8, 8), stem_strides=2,
                           pool_padding='SAME')
  variables = random_variables(model, (14, 14, 1))
  x = jax.random.uniform(jax.random.key(4), (16, 14, 14, 1))
  (lp, sp), (ls, ss) = _both_forms(model, variables, x, (14, 14, 1))
  agree = _agree(sp, ss)
  assert len(agree) == 3 and all(v == 1.0 for v in agree.values()), agree
  assert 0.05 < float(np.mean([jnp.mean(s) for s in ss.values()])) < 0.95  # not degenerate
  np.testing.assert_allclose(lp, ls, rtol=1e-5, atol=1e-5)


def test_folded_residual_scan_matches_parallel_and_plain_fold():
  T, C = 4, 6
  k = jax.random.split(jax.random.key(3), 5)
  counts = jax.random.randint(k[0], (T, 5, C), -9, 10)
  extra = jax.random.normal(k[1], (T, 5, C))
  m = jnp.tril(jax.random.normal(k[2], (T, T)))
  a = jax.random.normal(k[3], (C,)).at[0].set(0.0)  # a zero gain: spike is the constant H >= vth
  c = jax.random.normal(k[4], (C,))
  got = inference.folded_serial_residual(counts, extra, m, 0.7, a, c)
  x = a * counts + c + extra
  want = (neurons.mfp_membrane(x, m) >= 0.7).astype(jnp.float32)
  assert float(jnp.mean(got == want)) == 1.0
  plain = neurons.folded_serial(counts, neurons.fold_thresholds(m, 0.7, a, c))
  zero = inference.folded_serial_residual(counts, jnp.zeros_like(extra), m, 0.7, a, c)
  np.testing.assert_array_equal(zero, plain)
  with pytest.raises(ValueError, match='counts and extra'):
    inference.folded_serial_residual(counts, extra[:2], m, 0.7, a, c)


def test_neuron_modes_keep_params_and_eq9_is_exact_for_diagonal_m(digits):
  model, variables, x, _ = digits
  # The float streaming form through the Flax model is the parallel form, step by step.
  lp = inference.make_infer_fn(model, variables, input_shape=DIGITS)(x)
  lf = jax.jit(lambda v, x: inference.with_neuron_mode(model, 'serial').apply(v, x))(
      variables, x).mean(0)
  np.testing.assert_array_equal(lp.argmax(-1), lf.argmax(-1))
  diag = jax.tree_util.tree_map_with_path(
      lambda p, a: jnp.diag(jnp.diagonal(a)) if p[-1].key == 'M' else a, variables)
  lp = inference.make_infer_fn(model, diag, input_shape=DIGITS)(x)
  le = inference.make_infer_fn(model, diag, mode='eq9', input_shape=DIGITS)(x)
  np.testing.assert_array_equal(lp.argmax(-1), le.argmax(-1))
  relu = model.clone(neuron=dataclasses.replace(model.neuron, kind='relu', mode='eq9'))
  assert relu.apply(variables, x[:2]).shape == (4, 2, 10)  # other kinds ignore the mode


def test_export_and_packed_weights_round_trip(digits, tmp_path):
  model, variables, x, _ = digits
  serial = inference.make_infer_fn(model, variables, mode='serial', input_shape=DIGITS)
  program = inference.build_program(model, variables, DIGITS)
  want = serial(x)
  packed, exported = str(tmp_path / 'w.npz'), str(tmp_path / 'f.mfpx')
  nbytes = deploy.save_packed(program, packed)
  assert nbytes == sum(a.nbytes for a in program.arrays.values())
  with np.load(packed, allow_pickle=False) as z:
    signs = [k for k in z.files if k.endswith('/signs')]
    assert signs and all(z[k].dtype == np.uint8 for k in signs)
  np.testing.assert_array_equal(deploy.packed_infer_fn(packed)(x), want)
  deploy.export_serial(deploy.load_packed(packed), exported)
  loaded = deploy.load_exported(exported)
  np.testing.assert_array_equal(loaded(x), want)
  np.testing.assert_array_equal(loaded(x[:3]), want[:3])  # symbolic batch dimension


def test_wrong_input_shape_or_dtype_raises(digits, tmp_path):
  model, variables, x, _ = digits
  program = inference.build_program(model, variables, DIGITS)
  path = str(tmp_path / 'f.mfpx')
  deploy.export_serial(program, path)
  fns = [inference.make_infer_fn(model, variables, mode=m, input_shape=DIGITS)
         for m in inference.MODES] + [deploy.load_exported(path)]
  for fn in fns:
    with pytest.raises(ValueError, match=r'expected input float32 \[B, 8, 8, 1\].*shape'):
      fn(x[:, :4])
    with pytest.raises(ValueError, match='float32.*got dtype uint8'):
      fn((x * 16).astype(np.uint8))
  with pytest.raises(ValueError, match='unknown mode'):
    inference.make_infer_fn(model, variables, mode='fast', input_shape=DIGITS)


def test_damaged_files_raise_a_clear_error(digits, tmp_path):
  model, variables, x, _ = digits
  program = inference.build_program(model, variables, DIGITS)
  packed, exported = tmp_path / 'w.npz', tmp_path / 'f.mfpx'
  deploy.save_packed(program, str(packed))
  deploy.export_serial(program, str(exported))
  for good in (packed, exported):
    blob = good.read_bytes()
    truncated, flipped = tmp_path / f'trunc_{good.name}', tmp_path / f'flip_{good.name}'
    truncated.write_bytes(blob[:len(blob) * 2 // 3])
    mid = len(blob) // 2
    flipped.write_bytes(blob[:mid] + bytes([blob[mid] ^ 0xFF]) + blob[mid + 1:])
    load = deploy.load_packed if good == packed else deploy.load_exported
    for bad in (truncated, flipped):
      with pytest.raises(deploy.ArtifactError, match=bad.name):
        load(str(bad))
  # Rewritten consistently (valid zip, valid CRCs) but with altered weights: the digest catches it.
  with np.load(packed, allow_pickle=False) as z:
    data = {k: z[k] for k in z.files}
  data['Classifier_0/bias'] = data['Classifier_0/bias'] + 1
  np.savez(tmp_path / 'edited.npz', **data)
  with pytest.raises(deploy.ArtifactError, match='SHA-256'):
    deploy.load_packed(str(tmp_path / 'edited.npz'))
  with pytest.raises(deploy.ArtifactError, match='missing.npz'):
    deploy.load_packed(str(tmp_path / 'missing.npz'))


def test_unfoldable_models_are_refused():
  lif = models.DigitsNet(channels=(4, 8), T=2, neuron=layers.NeuronSpec(kind='lif'))
  v = random_variables(lif, DIGITS)
  with pytest.raises(ValueError, match='MFP neuron'):
    inference.build_program(lif, v, DIGITS)
  wide = models.DigitsNet(channels=(4, 8), T=2, quant=layers.QuantSpec(bits=4))
  v = random_variables(wide, DIGITS)
  with pytest.raises(ValueError, match='1-bit hidden weights'):
    inference.build_program(wide, v, DIGITS)
