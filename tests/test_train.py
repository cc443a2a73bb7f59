import functools
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import run_script, tiny_digits_config
from mfp_jax import checkpoints
from mfp_jax import config_lib
from mfp_jax import data as data_lib
from mfp_jax import train_lib


def _setup(config):
  s = train_lib.setup(config, train_lib.create_mesh())
  return s.dataset, s.model, s.tx, s.init(jax.random.key(0))


def test_train_step_lowers_loss(tiny_config):
  tiny_config.optim.warmup_epochs = 0.0
  ds, model, tx, state = _setup(tiny_config)
  batch = next(data_lib.iterate_batches(ds, 'train', batch_size=64))
  step = jax.jit(functools.partial(train_lib.train_step, model=model, tx=tx,
                                   loss_cfg=tiny_config.loss, skip_nonfinite=False))
  losses = []
  for _ in range(8):
    state, m = step(state, batch, jnp.float32(1.0))
    losses.append(float(m['loss']))
  assert losses[-1] < losses[0] - 0.15, losses
  assert all(b < a for a, b in zip(losses, losses[1:])), losses
  assert int(state.step) == 8


def test_weight_decay_skips_m_scales_and_norm(tiny_config):
  _, _, _, state = _setup(tiny_config)
  mask = train_lib.weight_decay_mask(state.params)
  flat = {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(mask)[0]}
  assert all(v for k, v in flat.items() if k.endswith("['kernel']"))
  assert not any(v for k, v in flat.items() if not k.endswith("['kernel']"))
  assert any("['M']" in k for k in flat) and any("['scale']" in k for k in flat)


def test_learning_rate_schedule():
  o = config_lib.base_config().optim
  o.learning_rate, o.warmup_epochs = 0.1, 1.0
  lr = train_lib.create_learning_rate_fn(o, steps_per_epoch=10, total_steps=100)
  assert float(lr(0)) == 0.0 and abs(float(lr(10)) - 0.1) < 1e-7
  assert float(lr(55)) < 0.1 and abs(float(lr(100))) < 1e-7


def test_short_digits_run_is_clearly_above_chance(tmp_path):
  result = train_lib.train_and_evaluate(tiny_digits_config(), str(tmp_path))
  assert result.metrics['accuracy'] > 0.6  # chance is 0.1
  assert result.metrics['count'] == 450     # every test example counted once
  lines = [json.loads(l) for l in open(tmp_path / 'metrics.jsonl')]
  assert {l['split'] for l in lines} == {'train', 'test'}
  assert all('rates' in l for l in lines) and len(lines[0]['rates']) == 3
  assert os.listdir(tmp_path / 'tensorboard')
  assert checkpoints.RunCheckpoints(str(tmp_path)).latest_step() == result.metrics['step']
  assert checkpoints.RunCheckpoints(str(tmp_path)).read_meta(best=True) is not None


@pytest.mark.parametrize('kind', ['lif', 'mfp_column'])
def test_other_neurons_train(kind, tmp_path):
  result = train_lib.train_and_evaluate(tiny_digits_config(**{'model.neuron.kind': kind}),
                                        str(tmp_path))
  assert result.metrics['accuracy'] > 0.4


def test_interrupt_and_resume_matches_uninterrupted(tmp_path):
  # 1347 train examples / 64 = 21 steps per epoch; stop mid-epoch 2, at step 30.
  full = train_lib.train_and_evaluate(tiny_digits_config(), str(tmp_path / 'full'))
  part = train_lib.train_and_evaluate(tiny_digits_config(stop_at_step=30),
                                      str(tmp_path / 'resumed'))
  assert part.metrics['step'] == 30
  resumed = train_lib.train_and_evaluate(tiny_digits_config(), str(tmp_path / 'resumed'))
  assert resumed.metrics['step'] == full.metrics['step'] == 42
  chex.assert_trees_all_close(jax.device_get(resumed.state.params),
                              jax.device_get(full.state.params), rtol=1e-6, atol=1e-7)
  assert resumed.metrics['accuracy'] == full.metrics['accuracy']


def test_two_devices_match_one(tmp_path):
  outs = {}
  for n in (1, 2):
    out = tmp_path / f'{n}.npz'
    r = run_script(['tests/dp_worker.py', str(out), str(tmp_path / f'w{n}'), 'stop_at_step=6'],
                   devices=n)
    assert r.returncode == 0, r.stderr[-3000:]
    outs[n] = np.load(out)
  assert int(outs[1]['devices']) == 1 and int(outs[2]['devices']) == 2
  np.testing.assert_allclose(outs[2]['loss'], outs[1]['loss'], rtol=1e-4)
  keys = [k for k in outs[1].files if k not in ('loss', 'devices')]
  assert len(keys) == 14  # 3 x (kernel, norm scale, norm bias, M) + dense kernel, bias
  for k in keys:
    np.testing.assert_allclose(outs[2][k], outs[1][k], rtol=2e-4, atol=2e-5, err_msg=k)


# --- Bad input stops at start-up with a one-line error ------------------------------------

BAD = [
    ('model.name', 'resnet50',
     "one of \\['digits_cnn', 'resnet19', 'vggsnn', 'vgg16', 'seq_mlp'\\]"),
    ('model.neuron.kind', 'izh', "one of \\['mfp', 'mfp_column', 'lif', 'relu'\\]"),
    ('data.name', 'mnist', "one of \\['digits', 'cifar10'"),
    ('model.T', 0, 'an integer in \\[1, 1024\\]'),
    ('optim.name', 'lamb', "one of \\['sgd', 'adamw'\\]"),
    ('loss.name', 'mse', 'one of'),
    ('model.edge_quant.bits', 1, '2..16 or 32'),
    ('optim.learning_rate', -1.0, '> 0'),
]


@pytest.mark.parametrize('field,value,match', BAD, ids=[b[0] for b in BAD])
def test_bad_config_fields(field, value, match, tmp_path):
  with pytest.raises(config_lib.ConfigError, match=f'config.{field}.*{match}'):
    train_lib.train_and_evaluate(tiny_digits_config(**{field: value}), str(tmp_path))
  assert not os.listdir(tmp_path)  # refused before anything was written


def test_all_problems_listed_at_once():
  c = tiny_digits_config(**{'model.T': 0, 'data.batch_size': 0})
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c)
  assert 'model.T' in str(e.value) and 'data.batch_size' in str(e.value)


def test_batch_must_divide_devices():
  c = tiny_digits_config(**{'data.batch_size': 63})
  with pytest.raises(config_lib.ConfigError, match='divisible by the 2 devices'):
    config_lib.check_devices(c, 2, 1)
  config_lib.check_devices(tiny_digits_config(), 2, 1)


def test_unknown_field_rejected():
  c = tiny_digits_config()
  c.unlock()
  c.model.widht = 3
  with pytest.raises(config_lib.ConfigError, match='unknown field config.model.widht'):
    config_lib.validate(c)


def test_workdir_of_another_model_is_refused(tmp_path):
  train_lib.train_and_evaluate(tiny_digits_config(stop_at_step=2), str(tmp_path))
  with pytest.raises(checkpoints.CheckpointError, match='different model'):
    train_lib.train_and_evaluate(tiny_digits_config(**{'model.channels': (4, 8, 8)}),
                                 str(tmp_path))


def test_cli_errors_are_one_line(tmp_path):
  r = run_script(['train.py', '--config', 'configs/digits.py', '--config.model.T=0',
                  '--workdir', str(tmp_path)], timeout=120)
  assert r.returncode == 2
  assert 'Traceback' not in r.stderr
  assert r.stderr.strip().splitlines()[-2:][0].startswith('error: invalid config')
  r = run_script(['train.py', '--config', 'configs/digits.py', '--config.data.batch_size=63',
                  '--workdir', str(tmp_path)], devices=2, timeout=120)
  assert r.returncode == 2 and 'Traceback' not in r.stderr
  assert 'divisible by the 2 devices' in r.stderr
