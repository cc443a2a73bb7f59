"""The hand-written VJPs equal the autodiff references they replace.

``mfp_parallel`` (blocked custom VJP) against ``mfp_parallel_reference`` (autodiff of the
matmul), and ``lif_bptt`` against ``lif_serial`` (autodiff of the scan): identical spikes, the
same gradients, under jit, vmap and grad. Block sizes are made tiny so every code path of the
blocked backward runs: one block, the loop with several chains, and a ragged tail.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mfp_jax import fast_neurons
from mfp_jax import neurons
from mfp_jax import surrogate

SURROGATES = [surrogate.get_surrogate(n, a) for n, a in
              [('atan', None), ('sigmoid', 3.0), ('triangle', 0.7)]]
SURROGATE_IDS = ['atan', 'sigmoid3', 'triangle0.7']


def _inputs(rng, t, shape, dtype=jnp.float32):
  x = jnp.asarray(rng.normal(loc=0.6, size=(t,) + shape), dtype)
  m = jnp.asarray(rng.normal(loc=0.3, scale=0.5, size=(t, t)), dtype)
  w = jnp.asarray(rng.normal(size=(t,) + shape), dtype)  # a cotangent for the spikes
  return x, m, w


def _blocked(chunk, chains, surr=surrogate.atan):
  """``mfp_parallel``'s fast path with explicit block sizes, for ``x: [T, ...]``."""

  def f(x, m, vth=1.0):
    t = x.shape[0]
    s = fast_neurons.mfp_blocked(x.reshape(t, -1), m, jnp.asarray(vth, x.dtype), surr, chunk,
                                 chains)
    return s.reshape(x.shape)

  return f


def _grads(f, x, m, w, vth):
  return jax.grad(lambda x, m, v: jnp.vdot(w, f(x, m, v)), argnums=(0, 1, 2))(x, m, vth)


# (T, trailing shape, chunk, chains): N = prod(shape) neurons per step.
BLOCKINGS = [
    (4, (3, 5), 64, 2),    # N <= chunk: one block, no loop
    (5, (40,), 8, 1),      # loop, one chain
    (6, (7, 11), 8, 2),    # loop with two chains (77 = 4*16 + 13) and a ragged tail
    (3, (50,), 4, 3),      # three chains, tail of two blocks (50 = 4*12 + 2)
    (1, (9,), 2, 2),       # T = 1
]


@pytest.mark.parametrize('t,shape,chunk,chains', BLOCKINGS)
def test_blocked_spikes_and_grads_equal_reference(t, shape, chunk, chains, rng):
  x, m, w = _inputs(rng, t, shape)
  vth = jnp.float32(0.9)
  fast = _blocked(chunk, chains)
  ref = lambda x, m, v: neurons.mfp_parallel_reference(x, m, vth=v)
  np.testing.assert_array_equal(jax.jit(fast)(x, m, vth), ref(x, m, vth))
  got = jax.jit(functools.partial(_grads, fast))(x, m, w, vth)
  want = _grads(ref, x, m, w, vth)
  for name, g, h in zip(('x', 'm', 'vth'), got, want):
    np.testing.assert_allclose(g, h, rtol=2e-5, atol=2e-5, err_msg=name)
  assert jnp.all(jnp.triu(got[1], 1) == 0)  # step t never sees a later step


@pytest.mark.parametrize('surr', SURROGATES, ids=SURROGATE_IDS)
def test_blocked_uses_the_surrogates_own_gradient(surr, rng):
  x, m, w = _inputs(rng, 5, (6, 7))
  fast = _blocked(8, 2, surr)
  ref = lambda x, m, v: neurons.mfp_parallel_reference(x, m, vth=v, surrogate=surr)
  for g, h in zip(_grads(fast, x, m, w, 1.0), _grads(ref, x, m, w, 1.0)):
    np.testing.assert_allclose(g, h, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize('t', [1, 4, 10])
def test_default_path_bit_for_bit_on_exact_inputs(t, rng):
  # Dyadic M and integer x: every product and partial sum is exact in float64, so the blocked
  # backward (which sums dX and dM in another order) must agree exactly too.
  with jax.enable_x64(True):
    x = jnp.asarray(rng.integers(-3, 4, size=(t, 2, 3, 3)), jnp.float64)
    m = jnp.asarray(rng.integers(-16, 17, size=(t, t)) / 8.0)
    w = jnp.asarray(rng.integers(-2, 3, size=x.shape), jnp.float64)
    surr = surrogate.get_surrogate('triangle', 4.0)  # piecewise linear: exact on dyadics
    fast = lambda x, m: neurons.mfp_parallel(x, m, surrogate=surr)
    ref = lambda x, m: neurons.mfp_parallel_reference(x, m, surrogate=surr)
    np.testing.assert_array_equal(fast(x, m), ref(x, m))
    gf = jax.grad(lambda x, m: jnp.vdot(w, fast(x, m)), (0, 1))(x, m)
    gr = jax.grad(lambda x, m: jnp.vdot(w, ref(x, m)), (0, 1))(x, m)
    for g, h in zip(gf, gr):
      np.testing.assert_array_equal(g, h)


def test_default_path_float32_spikes_identical(rng):
  # Large enough for the blocked loop at its default block size.
  x, m, w = _inputs(rng, 4, (2, 16, 16, 32))
  np.testing.assert_array_equal(neurons.mfp_parallel(x, m),
                                neurons.mfp_parallel_reference(x, m))
  gf = jax.jit(jax.grad(lambda x, m: jnp.vdot(w, neurons.mfp_parallel(x, m)), (0, 1)))(x, m)
  gr = jax.grad(lambda x, m: jnp.vdot(w, neurons.mfp_parallel_reference(x, m)), (0, 1))(x, m)
  np.testing.assert_allclose(gf[0], gr[0], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(gf[1], gr[1], rtol=1e-5, atol=1e-3)  # sums over 65536 neurons


def test_vmap_jit_grad_compose(rng):
  # vmap over a custom VJP whose backward is a fori_loop with dynamic slices.
  x, m, w = _inputs(rng, 4, (3, 37))
  fast = _blocked(8, 2)
  ref = lambda x, m, v: neurons.mfp_parallel_reference(x, m, vth=v)

  def per_example(f):
    return jax.grad(lambda x, m: jnp.vdot(w[:, 0], f(x, m, 1.0)), (0, 1))

  got = jax.jit(jax.vmap(per_example(fast), in_axes=(1, None)))(x, m)
  want = jax.vmap(per_example(ref), in_axes=(1, None))(x, m)
  for g, h in zip(got, want):
    np.testing.assert_allclose(g, h, rtol=2e-5, atol=2e-5)
  # vmap over a batch of M as well (per-example time mixing).
  ms = jnp.stack([m, 0.5 * m])
  sv = jax.vmap(lambda m: fast(x, m, 1.0))(ms)
  np.testing.assert_array_equal(sv[1], ref(x, 0.5 * m, 1.0))


def test_vth_array_and_traced_scalar(rng):
  x, m, w = _inputs(rng, 4, (6,))
  per_neuron = jnp.linspace(0.5, 1.5, 6)
  np.testing.assert_array_equal(neurons.mfp_parallel(x, m, vth=per_neuron),
                                neurons.mfp_parallel_reference(x, m, vth=per_neuron))
  dv = jax.grad(lambda v: jnp.vdot(w, neurons.mfp_parallel(x, m, vth=v)))(jnp.float32(0.8))
  dv_ref = jax.grad(lambda v: jnp.vdot(w, neurons.mfp_parallel_reference(x, m, vth=v)))(
      jnp.float32(0.8))
  np.testing.assert_allclose(dv, dv_ref, rtol=1e-5)


@pytest.mark.parametrize('call', [
    lambda f: f(jnp.float32(1.0), jnp.ones((1, 1))),
    lambda f: f(jnp.ones((4, 3)), jnp.ones((3, 3))),
    lambda f: f(jnp.ones((0, 3)), jnp.ones((0, 0))),
], ids=['scalar x', 'm not TxT', 'empty T'])
def test_same_value_errors_as_reference(call):
  with pytest.raises(ValueError) as fast_err:
    call(neurons.mfp_parallel)
  with pytest.raises(ValueError) as ref_err:
    call(neurons.mfp_parallel_reference)
  assert str(fast_err.value) == str(ref_err.value)


def test_default_chunk():
  assert fast_neurons.default_chunk(10) == 16384
  assert fast_neurons.default_chunk(4) == 65536
  assert fast_neurons.default_chunk(1024) == 2048
  assert all(fast_neurons.default_chunk(t) & (fast_neurons.default_chunk(t) - 1) == 0
             for t in range(1, 70))


# --- LIF -------------------------------------------------------------------------------------


@pytest.mark.parametrize('reset', ['hard', 'soft'])
@pytest.mark.parametrize('surr', SURROGATES, ids=SURROGATE_IDS)
def test_lif_bptt_equals_autodiff(reset, surr, rng):
  x = jnp.asarray(rng.normal(loc=0.6, size=(8, 4, 25)), jnp.float32)
  w = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  kw = dict(tau=0.6, vth=0.9, reset=reset, surrogate=surr)
  fast = jax.jit(lambda x: neurons.lif_bptt(x, **kw))
  s = fast(x)
  np.testing.assert_array_equal(s, neurons.lif_serial(x, **kw))
  assert 0 < float(s.mean()) < 1
  got = jax.jit(jax.grad(lambda x: jnp.vdot(w, neurons.lif_bptt(x, **kw))))(x)
  want = jax.grad(lambda x: jnp.vdot(w, neurons.lif_serial(x, **kw)))(x)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_lif_bptt_vmap_and_hand_worked():
  x = jnp.array([0.6, 0.8, 0.5, 1.2])  # see test_neurons.test_lif_hand_worked
  np.testing.assert_array_equal(neurons.lif_bptt(x), [0.0, 1.0, 0.0, 1.0])
  xb = jnp.stack([x, 2 * x], axis=1)  # [T, 2]
  vm = jax.vmap(jax.grad(lambda v: neurons.lif_bptt(v).sum()), in_axes=1, out_axes=1)(xb)
  want = jax.vmap(jax.grad(lambda v: neurons.lif_serial(v).sum()), in_axes=1, out_axes=1)(xb)
  np.testing.assert_allclose(vm, want, rtol=1e-6)


def test_lif_bptt_bad_inputs():
  with pytest.raises(ValueError, match="allowed: \\['hard'"):
    neurons.lif_bptt(jnp.ones((2, 3)), reset='none')
  with pytest.raises(ValueError, match='T >= 1'):
    neurons.lif_bptt(jnp.ones((0, 3)))


def test_spiking_neuron_lif_uses_hand_written_bptt(rng):
  from mfp_jax import layers
  x = jnp.asarray(rng.normal(loc=0.6, size=(4, 2, 3, 3, 5)), jnp.float32)
  w = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
  spec = layers.NeuronSpec(kind='lif', tau=0.5, vth=1.0, surrogate='triangle', alpha=1.0)
  mod = layers.SpikingNeuron(spec)
  loss = lambda x: jnp.vdot(w, mod.apply({}, x))
  surr = surrogate.get_surrogate('triangle', 1.0)
  want = jax.grad(lambda x: jnp.vdot(w, neurons.lif_serial(x, surrogate=surr)))(x)
  np.testing.assert_allclose(jax.grad(loss)(x), want, rtol=1e-6, atol=1e-7)
  jaxpr = str(jax.make_jaxpr(jax.grad(loss))(x))
  assert 'custom_vjp' in jaxpr  # the hand-written backward, not autodiff of the scan
