"""mfp_jax.conv.conv2d against plain autodiff of lax.conv_general_dilated.

Expected values come from ``jax.vjp`` of the lax conv itself. The forward and ``dx`` must be
bit-identical (both are XLA's own ops); ``dW`` by per-tap matmuls sums the same products in
another order, so it is checked to float32 rounding: ``|dW - ref| <= 1e-5 |ref| + 1e-5
max|ref|`` (observed: <= 4e-7 of max|ref| at these sizes).
"""

import functools
import json

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import pytest

from mfp_jax import conv

DIMS = ('NHWC', 'HWIO', 'NHWC')
# (N, H, W, C, O, k, stride): strides 1/2, kernels 1/3 (and 2, 5), odd/even sizes, batch 1/>1.
CASES = [
    (2, 7, 6, 5, 3, 3, 1),
    (1, 8, 8, 4, 6, 3, 1),
    (2, 8, 8, 4, 6, 3, 2),
    (1, 7, 9, 3, 4, 3, 2),
    (3, 6, 5, 4, 5, 1, 1),
    (3, 6, 5, 4, 5, 1, 2),
    (2, 5, 4, 3, 2, 2, 2),
    (1, 9, 6, 2, 3, 5, 3),
]


def lax_conv(x, w, stride, preferred_element_type=None):
  return lax.conv_general_dilated(x, w, (stride, stride), 'SAME', dimension_numbers=DIMS,
                                  preferred_element_type=preferred_element_type)


def _inputs(case, seed=0):
  n, h, w, c, o, k, s = case
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(n, h, w, c)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(k, k, c, o)), jnp.float32)
  g = jnp.asarray(rng.normal(size=(n, -(-h // s), -(-w // s), o)), jnp.float32)
  return x, kernel, g, s


def _vjp_all(f, x, w, g):
  """``(y, dx, dW)`` of ``f`` at ``(x, w)`` for cotangent ``g``, one jitted call."""
  def both(x, w, g):
    y, pull = jax.vjp(f, x, w)
    return (y,) + pull(g)
  return jax.jit(both)(x, w, g)


def _assert_dw_close(dw, ref):
  ref = np.asarray(ref)
  np.testing.assert_allclose(dw, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_same_padding_is_xlas():
  for size in range(1, 12):
    for k in (1, 2, 3, 5):
      for stride in (1, 2, 3):
        assert conv.same_padding(size, k, stride) == tuple(
            lax.padtype_to_pads((size,), (k,), (stride,), 'SAME')[0]), (size, k, stride)


@pytest.mark.parametrize('case', CASES)
def test_explicit_padding_reproduces_same_in_xla(case):
  x, w, _, s = _inputs(case)
  pads = [conv.same_padding(x.shape[1], w.shape[0], s),
          conv.same_padding(x.shape[2], w.shape[1], s)]
  explicit = lax.conv_general_dilated(x, w, (s, s), pads, dimension_numbers=DIMS)
  np.testing.assert_array_equal(explicit, lax_conv(x, w, s))


@functools.lru_cache(maxsize=None)
def _reference(case):
  x, w, g, s = _inputs(case)
  return _vjp_all(lambda x, w: lax_conv(x, w, s), x, w, g)


@pytest.mark.parametrize('case', CASES)
def test_taps_forward_and_grads_match_autodiff(case):
  x, w, g, s = _inputs(case)
  y_ref, dx_ref, dw_ref = _reference(case)
  y, dx, dw = _vjp_all(lambda x, w: conv.conv2d(x, w, stride=s, dw='taps'), x, w, g)
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_array_equal(dx, dx_ref)
  _assert_dw_close(dw, dw_ref)


def test_xla_mode_is_plain_autodiff():
  x, w, g, s = _inputs(CASES[2])
  for got, want in zip(_vjp_all(lambda x, w: conv.conv2d(x, w, stride=s, dw='xla'), x, w, g),
                       _reference(CASES[2])):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize('channels,k', [(conv.AUTO_TAPS_MIN_CHANNELS, 3), (2, 3),
                                        (conv.AUTO_TAPS_MIN_CHANNELS, 1)])
def test_auto_picks_taps_on_cpu_as_measured(channels, k):
  x, w, g, s = _inputs((2, 8, 8, channels, 6, k, 2))
  taps_expected = (jax.default_backend() == 'cpu' and channels >= conv.AUTO_TAPS_MIN_CHANNELS
                   and (k == 1 or conv.cpu_convs_use_ynn()))
  dws = {}
  for mode in conv.DW_MODES:
    f = jax.jit(lambda x, w, g, mode=mode: jax.vjp(
        lambda w: conv.conv2d(x, w, stride=s, dw=mode), w)[1](g)[0])
    dws[mode] = f(x, w, g)
    hlo = f.lower(x, w, g).compile().as_text()
    # The forward is dead code in a dW-only function; what is left is the dW algorithm.
    uses_taps = mode == 'taps' or (mode == 'auto' and taps_expected)
    assert ('convolution(' in hlo) != uses_taps, mode
  np.testing.assert_array_equal(dws['auto'], dws['taps' if taps_expected else 'xla'])


@pytest.mark.parametrize('flags,ynn', [
    ('', True),
    ('--xla_cpu_use_xnnpack=true', True),
    ('--xla_cpu_experimental_ynn_fusion_type=-individual_convolution', False),
    ('--xla_cpu_experimental_ynn_fusion_type=+individual_dot', True),
    ('--xla_cpu_experimental_ynn_fusion_type=', False),
    ('--xla_cpu_experimental_ynn_fusion_type=dot', False),
    ('--xla_cpu_experimental_ynn_fusion_type=individual_convolution,dot', True),
])
def test_cpu_convs_use_ynn_reads_xla_flags(monkeypatch, flags, ynn):
  monkeypatch.setenv('XLA_FLAGS', flags)
  assert conv.cpu_convs_use_ynn() is ynn


def test_eager_jit_grad_vmap_compose():
  x, w, _, _ = _inputs((2, 5, 5, 8, 4, 3, 2))
  xs = jnp.stack([x, 2 * x])  # [2, N, H, W, C]: vmap over a leading axis

  def loss(mode):
    return lambda x, w: jnp.sum(jnp.sin(conv.conv2d(x, w, stride=2, dw=mode)))

  per_example = lambda mode: jax.vmap(jax.grad(loss(mode), argnums=(0, 1)), in_axes=(0, None))
  ref_dx, ref_dw = jax.jit(per_example('xla'))(xs, w)
  for mode in ('taps', 'auto'):
    dx, dw = jax.jit(per_example(mode))(xs, w)
    np.testing.assert_array_equal(dx, ref_dx)
    for b in range(2):
      _assert_dw_close(dw[b], ref_dw[b])
  eager = jax.grad(loss('taps'), argnums=1)(x, w)  # no jit: op-by-op dispatch
  _assert_dw_close(eager, jax.jit(jax.grad(loss('xla'), argnums=1))(x, w))


@pytest.mark.parametrize('stride', [1, 2])
def test_bfloat16_with_float32_accumulation_is_exact(stride):
  # Binary spikes, +-2^k weights and cotangents on a 1/4 grid: every product and partial
  # sum is exact in float32, so bfloat16 inputs with float32 accumulation must give the
  # float32 numbers bit for bit (dW's sums are small multiples of 1/32, exact in bfloat16).
  rng = np.random.default_rng(1)
  x = (rng.random((4, 9, 8, 6)) < 0.3).astype(np.float32)
  w = (np.sign(rng.normal(size=(3, 3, 6, 5))) * 2.0**rng.integers(-3, 2, (3, 3, 6, 5)))
  w = w.astype(np.float32)
  ho, wo = -(-9 // stride), -(-8 // stride)
  g = jnp.asarray(rng.integers(-4, 5, (4, ho, wo, 5)) / 4, jnp.float32)
  y32, _, dw32 = _vjp_all(lambda x, w: conv.conv2d(x, w, stride=stride, dw='taps'), x, w, g)
  xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
  f32 = jnp.float32
  y, dx, dw = _vjp_all(lambda x, w: conv.conv2d(x, w, stride=stride, dw='taps',
                                                 preferred_element_type=f32), xb, wb, g)
  assert y.dtype == f32 and dx.dtype == dw.dtype == jnp.bfloat16
  np.testing.assert_array_equal(y, y32)
  np.testing.assert_array_equal(dw.astype(f32), dw32)
  _, dx_ref, dw_ref = _vjp_all(lambda x, w: lax_conv(x, w, stride, f32), xb, wb, g)
  np.testing.assert_array_equal(dx, dx_ref)  # dx is rounded to bfloat16 just as autodiff's
  np.testing.assert_array_equal(dw, dw_ref)


@pytest.mark.parametrize('xs,ws', [((2, 6, 6, 4), (3, 3, 5, 8)), ((6, 6, 4), (3, 3, 4, 8)),
                                   ((2, 6, 6, 4), (3, 4, 8))])
def test_bad_shapes_raise(xs, ws):
  with pytest.raises(ValueError, match=rf'x \({", ".join(map(str, xs))},?\) and w'):
    conv.conv2d(jnp.zeros(xs), jnp.zeros(ws))


def test_bad_options_raise():
  x, w = jnp.zeros((1, 4, 4, 2)), jnp.zeros((3, 3, 2, 2))
  with pytest.raises(ValueError, match='allowed'):
    conv.conv2d(x, w, dw='fast')
  with pytest.raises(ValueError, match='stride'):
    conv.conv2d(x, w, stride=0)


def test_benchmark_runs_at_tiny_size(tmp_path, capsys):
  from benchmarks import conv as bench
  out = tmp_path / 'conv.json'
  # The default allocator: the tuned one changes glibc settings for the whole test process.
  bench.main(['--shapes', 'tiny', '--no-torch', '--reps', '1', '--warmup', '0', '--pause', '0',
              '--allocator', 'default', '--out', str(out)])
  printed = capsys.readouterr().out
  assert 'taps dW' in printed and str(out) in printed
  rec = json.loads(out.read_text())['results']['tiny']
  assert rec['taps dW']['max_rel_err'] < 1e-5 and rec['jax dW']['median_ms'] > 0
