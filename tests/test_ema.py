"""The moving average of the weights (config.optim.ema_decay): by hand, in the step, in a run."""

import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import tiny_digits_config
from mfp_jax import config_lib
from mfp_jax import data as data_lib
from mfp_jax import train_lib


def test_update_ema_by_hand():
  ema, new = {'w': jnp.float32(4.0)}, {'w': jnp.float32(8.0)}
  # step 2: d = min(0.75, 3 / 12) = 0.25 -> 4 * 0.25 + 8 * 0.75 = 7
  assert float(train_lib.update_ema(ema, new, jnp.int32(2), 0.75)['w']) == 7.0
  # step 100: d = min(0.75, 101 / 110) = 0.75 -> 4 * 0.75 + 8 * 0.25 = 5
  assert float(train_lib.update_ema(ema, new, jnp.int32(100), 0.75)['w']) == 5.0


def _steps(config, n):
  """``n`` train steps on the first batch: the states after each."""
  s = train_lib.setup(config, train_lib.create_mesh())
  state = s.init(jax.random.key(0))
  batch = next(data_lib.iterate_batches(s.dataset, 'train', batch_size=64))
  step = jax.jit(functools.partial(train_lib.train_step, model=s.model, tx=s.tx,
                                   loss_cfg=config.loss, skip_nonfinite=False,
                                   ema_decay=config.optim.ema_decay))
  states = [state]
  for _ in range(n):
    states.append(step(states[-1], batch, jnp.float32(1.0))[0])
  return s, states, batch


def test_ema_follows_the_trained_weights_and_leaves_training_unchanged():
  _, plain, _ = _steps(tiny_digits_config(), 3)
  s, kept, batch = _steps(tiny_digits_config(**{'optim.ema_decay': 0.5}), 3)
  assert plain[0].ema is None and s.abstract.ema is not None
  # Training itself is the same with or without the average.
  chex.assert_trees_all_equal(jax.device_get(kept[-1].params), jax.device_get(plain[-1].params))
  # ema_t = d_t ema_{t-1} + (1 - d_t) v_t, d_t = min(0.5, (1 + t) / (10 + t)) = 0.1, 2/11, 3/12.
  want = train_lib.eval_variables(plain[0], ema=False)
  for t, st in enumerate(plain[1:]):
    d = min(0.5, (1 + t) / (10 + t))
    want = jax.tree.map(lambda e, v, d=d: d * e + (1 - d) * v, want,
                        train_lib.eval_variables(st, ema=False))
  chex.assert_trees_all_close(jax.device_get(kept[-1].ema), jax.device_get(want), rtol=1e-6,
                              atol=1e-7)
  # Evaluation uses the average; ema=False the trained weights.
  ev = lambda st, **kw: jax.device_get(train_lib.eval_step(st, batch, model=s.model, **kw))
  as_plain = plain[-1].replace(params=kept[-1].ema['params'],
                               batch_stats=kept[-1].ema['batch_stats'])
  chex.assert_trees_all_close(ev(kept[-1]), ev(as_plain), rtol=1e-6)
  chex.assert_trees_all_close(ev(kept[-1], ema=False), ev(plain[-1]), rtol=1e-6)
  assert not np.allclose(ev(kept[-1])['loss'], ev(plain[-1])['loss'])


def test_ema_decay_must_be_below_one(tmp_path):
  with pytest.raises(config_lib.ConfigError, match=r'config.optim.ema_decay = 1.0: .*\[0, 1\)'):
    train_lib.train_and_evaluate(tiny_digits_config(**{'optim.ema_decay': 1.0}), str(tmp_path))


def test_run_with_ema_logs_both_accuracies_and_resumes_it(tmp_path):
  cfg = lambda **kw: tiny_digits_config(**{'optim.ema_decay': 0.9, 'num_epochs': 1, **kw})
  part = train_lib.train_and_evaluate(cfg(stop_at_step=12), str(tmp_path / 'resumed'))
  assert part.metrics['step'] == 12 and 'raw_accuracy' in part.metrics
  resumed = train_lib.train_and_evaluate(cfg(), str(tmp_path / 'resumed'))
  full = train_lib.train_and_evaluate(cfg(), str(tmp_path / 'full'))
  assert resumed.metrics['step'] == full.metrics['step'] == 21
  chex.assert_trees_all_close(jax.device_get(resumed.state.ema), jax.device_get(full.state.ema),
                              rtol=1e-6, atol=1e-7)
  tests = [l for l in map(json.loads, open(tmp_path / 'full' / 'metrics.jsonl'))
           if l['split'] == 'test']
  assert len(tests) == 1 and 0 <= tests[0]['raw_accuracy'] <= 1
  assert tests[0]['accuracy'] == full.metrics['accuracy']
  # What eval.py and export restore is the average too.
  state, _ = train_lib.load_checkpoint(cfg(), str(tmp_path / 'full'))
  chex.assert_trees_all_equal(jax.device_get(train_lib.eval_variables(state)),
                              jax.device_get(full.state.ema))
