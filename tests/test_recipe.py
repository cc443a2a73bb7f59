"""The Q-SNN training recipe: power-of-two binarizer, annealed estimator, 8-bit edges, losses."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_digits_config
from mfp_jax import data as data_lib
from mfp_jax import layers
from mfp_jax import losses
from mfp_jax import models
from mfp_jax import quant
from mfp_jax import train_lib


@pytest.mark.parametrize('estimator', ['ste', 'annealed'])
def test_pow2_scales_are_exact_powers_of_two(estimator, rng):
  w = jnp.asarray(rng.normal(loc=0.3, scale=rng.uniform(0.01, 5, size=7), size=(3, 3, 4, 7)),
                  jnp.float32)
  wb = np.asarray(quant.binarize_pow2(w, estimator=estimator, t=jnp.float32(2.0)))
  for o in range(7):
    vals = np.unique(np.abs(wb[..., o]))
    assert len(vals) == 1
    k = np.log2(vals[0])
    assert k == np.round(k)
    w_std = (np.asarray(w[..., o]) - w[..., o].mean()) / w[..., o].std()
    assert vals[0] == 2.0 ** np.round(np.log2(np.mean(np.abs(w_std))))
    np.testing.assert_array_equal(np.sign(wb[..., o]), np.where(w_std >= 0, 1, -1))


@pytest.mark.parametrize('t', [0.1, 0.5, 1.0, 3.0, 10.0])
def test_annealed_gradient_closed_form(t):
  w = jnp.linspace(-2.0, 2.0, 41)
  g = jax.grad(lambda v: quant.sign_annealed(v, jnp.float32(t)).sum())(w)
  k = max(1.0, 1.0 / t)
  want = k * t * (1 - np.tanh(t * np.asarray(w, np.float64)) ** 2)  # float64 reference
  np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(quant.sign_annealed(w, jnp.float32(t)),
                                np.where(np.asarray(w) >= 0, 1, -1))


def test_anneal_schedule_endpoints_and_monotonic():
  ts = [float(quant.anneal_schedule(s, 100)) for s in range(0, 101)]
  assert math.isclose(ts[0], 0.1, rel_tol=1e-6) and math.isclose(ts[-1], 10.0, rel_tol=1e-5)
  assert all(b > a for a, b in zip(ts, ts[1:]))
  # log-uniform: the midpoint is the geometric mean
  assert math.isclose(ts[50], 1.0, rel_tol=1e-5)
  assert float(quant.anneal_schedule(500, 100)) == pytest.approx(10.0)


def test_eight_bit_edges_are_eq4_levels(rng):
  w = jnp.asarray(rng.normal(size=(3, 3, 1, 8)), jnp.float32)
  q = np.asarray(layers.QuantSpec(bits=8)(w, None))
  alpha = np.abs(np.asarray(w)).max()
  np.testing.assert_allclose(q / alpha * 127, np.round(q / alpha * 127), atol=1e-4)
  assert np.abs(q).max() == pytest.approx(alpha)


def test_per_step_loss_and_firing_rate_term_by_hand():
  # T=2, B=2, K=3.
  logits = jnp.array([[[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]],
                      [[0.0, 0.0, 0.0], [1.0, 1.0, 3.0]]])
  labels = jnp.array([0, 2])
  mask = jnp.ones(2)

  def ce(z, y):
    z = np.asarray(z)
    return -(z[y] - np.log(np.exp(z).sum()))

  want = np.mean([np.mean([ce(logits[t, b], labels[b]) for t in range(2)]) for b in range(2)])
  assert float(losses.per_step_ce(logits, labels, mask)) == pytest.approx(want, rel=1e-6)
  mean_logits = np.asarray(logits).mean(axis=0)
  want_mean = np.mean([ce(mean_logits[b], labels[b]) for b in range(2)])
  assert float(losses.mean_ce(logits, labels, mask)) == pytest.approx(want_mean, rel=1e-6)
  # masked: only example 1 counts
  want_1 = np.mean([ce(logits[t, 1], 2) for t in range(2)])
  assert float(losses.per_step_ce(logits, labels, jnp.array([0.0, 1.0]))) == pytest.approx(
      want_1, rel=1e-6)
  # TET adds lam * mean (logits - 1)^2
  mse = np.mean((np.asarray(logits) - 1.0) ** 2)
  assert float(losses.tet(logits, labels, mask, lam=0.1)) == pytest.approx(
      0.9 * want + 0.1 * mse, rel=1e-6)
  # WS-DR: first and last layers excluded
  rates = jnp.array([0.9, 0.2, 0.6, 0.05])
  assert float(losses.firing_rate_penalty(rates)) == pytest.approx(
      ((0.2 - 0.5) ** 2 + (0.6 - 0.5) ** 2) / 2)
  assert float(losses.firing_rate_penalty(jnp.array([0.3, 0.9]))) == 0.0


def test_label_smoothing_by_hand():
  # T=2, B=2, K=3; targets (1 - s) * onehot + s / K.
  logits = jnp.array([[[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]],
                      [[0.0, 0.0, 0.0], [1.0, 1.0, 3.0]]])
  labels = jnp.array([0, 2])
  mask = jnp.array([1.0, 1.0])
  s = 0.3

  def smoothed_ce(z, y):
    logp = np.asarray(z) - np.log(np.exp(np.asarray(z)).sum())
    target = np.full(3, s / 3)
    target[y] += 1 - s
    return -(target * logp).sum()

  want = np.mean([np.mean([smoothed_ce(logits[t, b], labels[b]) for t in range(2)])
                  for b in range(2)])
  assert float(losses.per_step_ce(logits, labels, mask, label_smoothing=s)) == pytest.approx(
      want, rel=1e-6)
  mean_logits = np.asarray(logits).mean(axis=0)
  want_mean = np.mean([smoothed_ce(mean_logits[b], labels[b]) for b in range(2)])
  assert float(losses.mean_ce(logits, labels, mask, label_smoothing=s)) == pytest.approx(
      want_mean, rel=1e-6)
  # s = 0 is the plain CE, and the smoothed loss's gradient is the softmax minus the target
  assert float(losses.mean_ce(logits, labels, mask, label_smoothing=0.0)) == float(
      losses.mean_ce(logits, labels, mask))
  g = jax.grad(lambda z: losses.mean_ce(z[None], labels, mask, label_smoothing=s))(
      jnp.asarray(mean_logits))
  target = np.full((2, 3), s / 3)
  target[[0, 1], [0, 2]] += 1 - s
  np.testing.assert_allclose(np.asarray(g), (np.asarray(jax.nn.softmax(mean_logits)) - target)
                             / 2, rtol=1e-5, atol=1e-7)
  with pytest.raises(ValueError, match=r'label_smoothing = 1.0: must be in \[0, 1\)'):
    losses.mean_ce(logits, labels, mask, label_smoothing=1.0)


def test_changing_t_does_not_recompile(tiny_config):
  tiny_config.model.quant.estimator = 'annealed'
  ds = data_lib.create_dataset(tiny_config.data, T=4)
  model = models.create_model(tiny_config.model, num_classes=10)
  tx = train_lib.create_optimizer(tiny_config.optim, lambda s: 1e-3)
  state = train_lib.create_train_state(model, tx, ds.input_shape, jax.random.key(0))
  step = jax.jit(functools.partial(train_lib.train_step, model=model, tx=tx,
                                   loss_cfg=tiny_config.loss, skip_nonfinite=False))
  batch = next(data_lib.iterate_batches(ds, 'train', batch_size=32))
  grads_seen = []
  for s in range(4):
    t = quant.anneal_schedule(s, 3)
    state, m = step(state, batch, t)
    grads_seen.append(float(m['loss']))
  assert step._cache_size() == 1  # one compilation for four different t
  assert len(set(grads_seen)) > 1


def test_annealed_gradient_reaches_latent_weights(tiny_config):
  tiny_config.model.quant.estimator = 'annealed'
  ds = data_lib.create_dataset(tiny_config.data, T=4)
  model = models.create_model(tiny_config.model, num_classes=10)
  v = models.init_variables(model, ds.input_shape, jax.random.key(0))
  x = jnp.asarray(next(data_lib.iterate_batches(ds, 'test', batch_size=8))['image'])

  def loss(params, t):
    out, _ = model.apply({'params': params, 'batch_stats': v['batch_stats']}, x, train=True,
                         anneal_t=t, mutable=['batch_stats', 'intermediates'])
    return out.sum()

  g_soft = jax.grad(loss)(v['params'], jnp.float32(0.1))
  g_sharp = jax.grad(loss)(v['params'], jnp.float32(10.0))
  k_soft = g_soft['ConvNormSpike_0']['QConv_0']['kernel']
  k_sharp = g_sharp['ConvNormSpike_0']['QConv_0']['kernel']
  assert jnp.any(k_soft != 0) and not jnp.allclose(k_soft, k_sharp)


def test_recipe_run_trains_above_chance(tmp_path):
  c = tiny_digits_config(**{'model.quant.estimator': 'annealed', 'model.edge_quant.bits': 8,
                            'loss.fr_lambda': 5e-3})
  result = train_lib.train_and_evaluate(c, str(tmp_path))
  assert result.metrics['accuracy'] > 0.5
