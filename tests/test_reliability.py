"""Runs survive kills and bad numbers, bad input gets clear errors, nothing is lost.

Where a run must be killed or signalled it is ``train.py`` in a subprocess; those runs share a
persistent XLA compilation cache so each start costs seconds, not a compile. Every run is the
tiny digits config (2 epochs x 21 steps) with a checkpoint every 5 steps.
"""

import dataclasses
import glob
import json
import os
import re
import shutil
import signal

import numpy as np
import pytest

from helpers import TINY_TRAIN, Processes, read_metrics, run_script, saved_arrays
from helpers import tiny_digits_config
from mfp_jax import checkpoints
from mfp_jax import cli
from mfp_jax import data as data_lib
from mfp_jax import train_lib

# The command-line twin of tiny_config().
TINY = TINY_TRAIN + ['--config.log_every_steps=5', '--config.checkpoint_every_steps=5']
FINAL = re.compile(r'final test accuracy: ([\d.]+) on (\d+) examples \(best ([\d.]+), step (\d+)')
metrics = read_metrics


def tiny_config(**kw):
  return tiny_digits_config(**{'checkpoint_every_steps': 5, **kw})


def committed_steps(workdir):
  d = os.path.join(workdir, 'checkpoints')
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


class Runs(Processes):
  """train.py runs of one test on the tiny config, sharing an XLA compilation cache."""

  def start(self, name, workdir, *extra, env=None):
    return super().start(name, [*TINY, '--workdir', str(workdir), *extra], env=env)


@pytest.fixture
def runs(tmp_path, cache_env):
  r = Runs(tmp_path, cache_env)
  yield r
  r.kill_all()


@pytest.fixture(scope='module')
def reference(tmp_path_factory, cache_env):
  """An uninterrupted train.py run: (workdir, metrics lines, final-line numbers)."""
  tmp = tmp_path_factory.mktemp('reference')
  r = Runs(tmp, cache_env)
  rc, out = r.finish(r.start('run', tmp / 'w'))
  assert rc == 0, out[-3000:]
  return tmp / 'w', metrics(tmp / 'w'), FINAL.search(out).groups()


# --- Determinism -----------------------------------------------------------------------------


def test_same_config_and_seed_give_identical_metrics(reference, runs, tmp_path):
  rc, out = runs.finish(runs.start('again', tmp_path / 'w'))
  assert rc == 0, out[-3000:]
  assert metrics(tmp_path / 'w') == reference[1]  # every logged number, train and test
  assert FINAL.search(out).groups() == reference[2]


# --- Kill and resume -------------------------------------------------------------------------


def test_sigkill_in_training_and_in_a_save_resumes_from_last_complete_checkpoint(
    reference, runs, tmp_path):
  w = tmp_path / 'w'
  ck = w / 'checkpoints'
  # 1. SIGKILL in the middle of training, once the step-10 checkpoint is committed.
  p = runs.start('a', w)
  runs.wait_until(lambda: (ck / '10').is_dir(), p)
  p.kill()
  p.wait()
  logged = max(m['step'] for m in metrics(w))
  resume_a = committed_steps(w)[-1]
  assert resume_a >= logged - 5  # at most one checkpoint interval of progress lost

  # 2. Resume, and SIGKILL inside the save of step `pause`: the test hook holds it after its
  # files are written and before the rename that commits it.
  pause = resume_a + 10
  p = runs.start('b', w, env={checkpoints.PAUSE_ENV: str(pause)})
  runs.wait_until(lambda: f'{checkpoints.PAUSE_ENV}: holding' in runs.output(p), p)
  p.kill()
  p.wait()
  assert f'resuming from {ck / str(resume_a)} (step {resume_a})' in runs.output(p)
  partial = glob.glob(str(ck / f'{pause}.orbax-checkpoint-tmp*'))
  assert partial and not (ck / str(pause)).exists()
  for f in glob.glob(partial[0] + '/state/**/d/*', recursive=True):  # and tear its writes
    os.truncate(f, os.path.getsize(f) // 2)
  resume_b = committed_steps(w)[-1]
  assert resume_b == pause - 5

  # 3. Resume to the end: the partial save is ignored and removed; all numbers as if never
  # interrupted (the log lines after the resume point are redone, not duplicated).
  rc, out = runs.finish(runs.start('c', w))
  assert rc == 0, out[-3000:]
  assert f'resuming from {ck / str(resume_b)} (step {resume_b})' in out
  assert not [n for n in os.listdir(ck) if 'tmp' in n]
  assert FINAL.search(out).groups() == reference[2]
  assert metrics(w) == reference[1]


# --- Preemption ------------------------------------------------------------------------------


def test_sigterm_and_sigint_save_a_checkpoint_and_exit_3(reference, runs, tmp_path):
  w = tmp_path / 'w'
  last = 0
  for sig in (signal.SIGTERM, signal.SIGINT):
    p = runs.start(sig.name, w)
    # Signal once this run has logged progress past the previous stop (inside the loop).
    runs.wait_until(lambda: os.path.exists(w / 'metrics.jsonl') and any(
        m['step'] > last for m in metrics(w)), p)
    p.send_signal(sig)
    rc, out = runs.finish(p, timeout=60)
    assert rc == cli.EXIT_PREEMPTED, out[-3000:]
    m = re.search(rf'^stopped: {sig.name}: saved a checkpoint at step (\d+) in (\S+); rerun the '
                  r'same command to resume$', out, re.M)
    assert m, out[-3000:]
    assert 'Traceback' not in out
    step = int(m[1])
    assert step > last and m[2] == str(w / 'checkpoints' / str(step))
    assert committed_steps(w)[-1] == step
    last = step
  rc, out = runs.finish(runs.start('resume', w))
  assert rc == 0, out[-3000:]
  assert f'(step {last})' in out and FINAL.search(out).groups() == reference[2]
  tests = lambda lines: [m for m in lines if m['split'] == 'test']
  assert tests(metrics(w)) == tests(reference[1])


# --- Non-finite numbers ----------------------------------------------------------------------


def _poison_one_example(monkeypatch, config, batch):
  """Makes one training image NaN: the one in ``batch`` of epoch 0. Returns the (1-based)
  steps whose batch holds it, per epoch."""
  ds = data_lib.create_dataset(config.data, T=config.model.T)
  images = ds.train.images.astype(np.float32)
  bs, n = config.data.batch_size, len(images)
  bad = np.random.default_rng([config.seed, 0]).permutation(n)[batch * bs]
  images[bad] = np.nan
  poisoned = dataclasses.replace(ds, train=data_lib.ArraySource(images, ds.train.labels))
  monkeypatch.setattr(data_lib, 'create_dataset', lambda cfg, T: poisoned)
  steps = []
  for epoch in range(config.num_epochs):
    b = int(np.argmax(np.random.default_rng([config.seed, epoch]).permutation(n) == bad)) // bs
    if b < n // bs:
      steps.append(epoch * (n // bs) + b + 1)
  return steps


def test_nonfinite_steps_are_skipped_with_nan_policy_skip(monkeypatch, capsys, tmp_path):
  config = tiny_config(nan_policy='skip')
  steps = _poison_one_example(monkeypatch, config, batch=3)
  assert steps[0] == 4
  result = train_lib.train_and_evaluate(config, str(tmp_path))
  assert result.metrics['step'] == 42 and result.metrics['accuracy'] > 0.5
  assert sum(m.get('skipped', 0) for m in metrics(tmp_path)) == len(steps)
  out = capsys.readouterr().out
  assert 'warning: skipped 1 step(s) with a non-finite loss, gradient or weights: [4]' in out
  for d in glob.glob(str(tmp_path / '*' / '[0-9]*')):  # every saved state, latest and best
    assert all(np.isfinite(a).all() for a in saved_arrays(d).values()), d


def test_nonfinite_loss_stops_naming_step_and_last_good_checkpoint(runs, tmp_path):
  # A huge SGD learning rate overflows the weights within a few steps.
  p = runs.start('nan', tmp_path, '--config.optim.name=sgd', '--config.optim.learning_rate=1e30',
                 '--config.checkpoint_every_steps=1')
  rc, out = runs.finish(p)
  assert rc == cli.EXIT_NONFINITE and 'Traceback' not in out, out[-3000:]
  last = out.strip().splitlines()[-1]
  m = re.fullmatch(r'error: non-finite loss, gradient or weights at step (\d+); training '
                   r'stopped without saving them\. Last good checkpoint: step (\d+) in (\S+) '
                   r'\(a rerun resumes there\)\. To get past it: .*nan_policy=skip', last)
  assert m, last
  bad, good = int(m[1]), int(m[2])
  assert good == bad - 1 == committed_steps(tmp_path)[-1]
  assert m[3] == str(tmp_path / 'checkpoints' / str(good))
  for step in committed_steps(tmp_path):  # only finite states reached the disk
    state = saved_arrays(str(tmp_path / 'checkpoints' / str(step)))
    assert all(np.isfinite(a).all() for a in state.values())


# --- Bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize('flag,expected', [
    ('--config.model.widht=3', "config.model has no field 'widht'; its fields are: T, "),
    ('--config.modle.T=3', "config has no field 'modle' (did you mean 'model'?)"),
    ('--config.model.T=abc', "flag --config.model.T=abc: invalid literal for int()"),
    ('--config.nan_policy=ignore', ""),
])
def test_cli_bad_config_is_a_short_error(flag, expected, tmp_path):
  r = run_script(TINY + [flag, '--workdir', str(tmp_path)], timeout=120)
  assert r.returncode == cli.EXIT_USAGE and 'Traceback' not in r.stderr, r.stderr[-3000:]
  lines = r.stderr.strip().splitlines()
  if expected:
    assert len(lines) == 1 and lines[0].startswith('error: ') and expected in lines[0], lines
  else:  # validate() lists every bad field, each with what is allowed
    assert lines[-2:] == ['error: invalid config:',
                          "  config.nan_policy = 'ignore': must be one of ['stop', 'skip']"]
  assert not os.listdir(tmp_path)


# --- Damaged checkpoints ---------------------------------------------------------------------


def _largest_file(d):
  return max((f for f in glob.glob(f'{d}/**', recursive=True) if os.path.isfile(f)),
             key=os.path.getsize)


def _flip_bytes(f):
  b = bytearray(open(f, 'rb').read())
  for i in range(len(b) // 2, len(b) // 2 + 16):
    b[i] ^= 0xFF
  open(f, 'wb').write(bytes(b))


def _edit_checksum(f):
  meta = json.load(open(f))
  meta['checksum'] = '0' * 64
  json.dump(meta, open(f, 'w'))


DAMAGE = {
    'truncated_arrays': lambda s: os.truncate(f := _largest_file(s / 'state'),
                                              os.path.getsize(f) // 2),
    'flipped_array_bytes': lambda s: _flip_bytes(_largest_file(s / 'state')),
    'garbage_meta': lambda s: (s / 'meta' / 'metadata').write_text('{"epoch": 2, '),
    'meta_not_an_object': lambda s: (s / 'meta' / 'metadata').write_text('[1, 2]'),
    'edited_checksum': lambda s: _edit_checksum(s / 'meta' / 'metadata'),
    'missing_tree_metadata': lambda s: os.remove(s / 'state' / '_METADATA'),
    'truncated_tree_metadata': lambda s: os.truncate(s / 'state' / '_METADATA', 100),
}


@pytest.mark.parametrize('damage', list(DAMAGE))
def test_damaged_checkpoint_is_a_clear_error(damage, reference, tmp_path):
  w = tmp_path / 'w'
  shutil.copytree(reference[0], w)
  step_dir = w / 'checkpoints' / '42'
  DAMAGE[damage](step_dir)
  with pytest.raises(checkpoints.CheckpointError, match=re.escape(str(step_dir))):
    train_lib.load_checkpoint(tiny_config(), str(w))


def test_checkpoints_load_without_unpickling(reference, monkeypatch):
  import pickle

  def refuse(*a, **k):
    raise AssertionError('a checkpoint was unpickled')

  for name in ('load', 'loads', 'Unpickler'):
    monkeypatch.setattr(pickle, name, refuse)
  monkeypatch.setattr(np, 'load', refuse)
  for best in (False, True):
    state, meta = train_lib.load_checkpoint(tiny_config(), str(reference[0]), best=best)
    assert int(state.step) == 42 and meta['test']['count'] == 450
    assert f'{meta["test"]["accuracy"]:.4f}' == reference[2][0]
