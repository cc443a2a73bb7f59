import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mfp_jax import quant


def test_sign_ste_forward_and_clipped_gradient():
  w = jnp.array([-2.0, -1.0, -0.3, 0.0, 0.5, 1.0, 1.5])
  np.testing.assert_array_equal(quant.sign_ste(w), [-1, -1, -1, 1, 1, 1, 1])
  g = jax.grad(lambda v: (quant.sign_ste(v) * jnp.arange(7.0)).sum())(w)
  # identity inside |w| <= 1, zero outside
  np.testing.assert_array_equal(g, [0, 1, 2, 3, 4, 5, 0])


def test_binarize_mean_scale_per_output_channel(rng):
  w = jnp.asarray(rng.normal(size=(3, 3, 4, 6)), jnp.float32)
  wb = quant.binarize_mean_scale(w)
  alpha = np.abs(np.asarray(w)).mean(axis=(0, 1, 2))
  np.testing.assert_allclose(np.abs(np.asarray(wb)), np.broadcast_to(alpha, w.shape), rtol=1e-6)
  np.testing.assert_array_equal(np.sign(wb), np.where(np.asarray(w) >= 0, 1, -1))
  g = jax.grad(lambda v: quant.binarize_mean_scale(v).sum())(w)
  assert jnp.all(jnp.isfinite(g)) and jnp.any(g != 0)


@pytest.mark.parametrize('bits', [2, 3, 4, 8])
def test_uniform_levels_are_exactly_eq4(bits, rng):
  # Eq. 4: Q_b(w) = alpha * {0, +-1/(2^(b-1)-1), ..., +-1}
  alpha = 0.7
  n = 2 ** (bits - 1) - 1
  w = jnp.asarray(rng.uniform(-1.5, 1.5, size=20000), jnp.float32)
  q = np.asarray(quant.quantize_uniform(w, bits, alpha))
  levels = np.unique(q)
  want = alpha * np.arange(-n, n + 1) / n
  np.testing.assert_allclose(levels, want.astype(np.float32), rtol=1e-6)
  assert len(levels) == 2 * n + 1
  # each value goes to its nearest level (after clipping)
  np.testing.assert_allclose(q, alpha * np.round(np.clip(w / alpha, -1, 1) * n) / n, rtol=1e-6)


def test_uniform_ste_gradient():
  w = jnp.array([-1.0, -0.5, 0.1, 0.69, 0.71, 2.0])
  g = jax.grad(lambda v: quant.quantize_uniform(v, 4, 0.7).sum())(w)
  np.testing.assert_array_equal(g, [0, 1, 1, 1, 0, 0])


def test_one_bit_uniform_is_sign():
  w = jnp.array([-0.2, 0.0, 3.0])
  np.testing.assert_allclose(quant.quantize_uniform(w, 1, 0.5), [-0.5, 0.5, 0.5])
  with pytest.raises(ValueError, match='bits >= 2'):
    quant.uniform_levels(1)


def test_max_scale_eight_bit(rng):
  w = jnp.asarray(rng.normal(size=(5, 7)), jnp.float32)
  q = quant.quantize_max_scale(w, 8)
  alpha = float(jnp.max(jnp.abs(w)))
  np.testing.assert_allclose(np.asarray(q) * 127 / alpha, np.round(np.asarray(q) * 127 / alpha),
                             atol=1e-4)
  assert np.max(np.abs(np.asarray(q - w))) <= alpha / 127 / 2 + 1e-6


@pytest.mark.parametrize('bits', [1, 2, 8])
def test_membrane_quantizer_levels(bits, rng):
  u = jnp.asarray(rng.uniform(-2, 2, size=5000), jnp.float32)
  q = np.unique(np.asarray(quant.quantize_membrane(u, bits, vmax=1.0)))
  if bits == 1:
    np.testing.assert_array_equal(q, [0.0, 1.0])
  else:
    assert len(q) == 2 ** bits - 1 and q.min() == -1.0 and q.max() == 1.0


def test_multibit_spikes_and_gradient():
  h = jnp.array([-0.5, 0.5, 1.0, 2.4, 3.0, 9.0])
  np.testing.assert_array_equal(quant.multibit_spike(h, 1.0, 2), [0, 0, 1, 2, 3, 3])
  np.testing.assert_array_equal(quant.multibit_spike(h, 1.0, 1), [0, 0, 1, 1, 1, 1])
  g = jax.grad(lambda v: quant.multibit_spike(v, 0.5, 2).sum())(h)
  # 1/vth inside [0, 2^bits * vth) = [0, 2)
  np.testing.assert_array_equal(g, [0, 2, 2, 0, 0, 0])


@pytest.mark.parametrize('shape', [(1,), (7,), (8,), (3, 3, 5, 17), (64, 10)])
def test_pack_unpack_round_trip(shape, rng):
  w = rng.normal(size=shape).astype(np.float32)
  packed = quant.pack_signs(w)
  assert packed.dtype == np.uint8 and packed.size == (w.size + 7) // 8
  np.testing.assert_array_equal(quant.unpack_signs(packed, shape), np.where(w >= 0, 1, -1))


def test_unpack_rejects_wrong_size():
  with pytest.raises(ValueError, match='expected 2'):
    quant.unpack_signs(np.zeros(3, np.uint8), (3, 3))


@pytest.mark.parametrize('fn', [
    lambda w: quant.sign_ste(w),
    lambda w: quant.binarize_mean_scale(w),
    lambda w: quant.quantize_uniform(w, 4, 1.0),
    lambda w: quant.quantize_max_scale(w, 8),
    lambda w: quant.quantize_membrane(w, 2),
    lambda w: quant.multibit_spike(w, 1.0, 2),
])
def test_jit_grad_vmap(fn, rng):
  w = jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
  np.testing.assert_array_equal(jax.jit(fn)(w), fn(w))
  g = jax.jit(jax.grad(lambda v: fn(v).sum()))(w)
  assert g.shape == w.shape and jnp.all(jnp.isfinite(g))
  per_row = jax.vmap(lambda r: fn(r[None])[0])(w)
  loop = jnp.stack([fn(w[i:i + 1])[0] for i in range(w.shape[0])])
  np.testing.assert_allclose(per_row, loop, rtol=1e-6)
