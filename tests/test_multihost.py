"""Multi-host data parallel: two CPU processes joined by jax.distributed (gloo) on 127.0.0.1.

Each process is ``train.py --coordinator_address=127.0.0.1:PORT --num_processes=2
--process_id=I`` with one CPU device; together they must train exactly like one process with
two devices (same seed, same global batch of 64).
"""

import os
import socket
import time

import numpy as np
import pytest

from helpers import TINY_TRAIN, Processes, read_metrics, saved_arrays
from mfp_jax import cli
from mfp_jax import data as data_lib

TINY = TINY_TRAIN + ['--config.log_every_steps=3', '--config.checkpoint_every_steps=5']


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class Procs(Processes):
  """train.py runs of the tiny config, at XLA's lowest optimization level: it halves the
  compile time that dominates these short runs (every run compared here uses it)."""

  def start(self, name, workdir, *extra, devices=1):
    flags = f'--xla_force_host_platform_device_count={devices} --xla_backend_optimization_level=0'
    return super().start(name, [*TINY, '--workdir', str(workdir), *extra],
                         env={'XLA_FLAGS': flags})

  def pair(self, name, workdir, *extra, heartbeat=10):
    port = free_port()
    return [self.start(f'{name}{i}', workdir, *extra, f'--coordinator_address=127.0.0.1:{port}',
                       '--num_processes=2', f'--process_id={i}',
                       f'--heartbeat_timeout_s={heartbeat}', '--distributed_init_timeout_s=60')
            for i in range(2)]



@pytest.fixture
def procs(tmp_path):
  p = Procs(tmp_path)
  yield p
  p.kill_all()


def metrics(workdir):
  return read_metrics(workdir, keep_time=True)


saved_state = saved_arrays


def test_two_processes_train_like_one_process_with_two_devices_and_resume(procs, tmp_path):
  one, two = tmp_path / 'one', tmp_path / 'two'
  single = procs.start('single', one, '--config.stop_at_step=22', devices=2)
  # The pair stops at step 3 and a second pair resumes it, reading the checkpoint both
  # processes wrote into one directory, through the end of epoch 1 (step 21: evaluation and
  # two saves of one step, latest and best) to step 22.
  first = [procs.finish_ok(p) for p in procs.pair('first', two, '--config.stop_at_step=3')]
  second = [procs.finish_ok(p) for p in procs.pair('second', two, '--config.stop_at_step=22')]
  single_out = procs.finish_ok(single)

  assert '2 devices (cpu), 2 processes, global batch 64' in first[0]
  assert f'resuming from {two / "checkpoints" / "3"} (step 3)' in second[0]
  # Only process 0 reports: no start line, progress or final line from process 1.
  for out in (first[1], second[1]):
    assert 'digits_cnn on' not in out and 'final test accuracy' not in out, out
  final = lambda out: [l for l in out.splitlines() if l.startswith('final test accuracy')][0]
  # The global accuracy, over every test example once (each process evaluated its half).
  assert 'on 450 examples' in final(second[0]) and 'on 450 examples' in final(single_out)
  assert 'best ' in final(second[0])  # the epoch-1 evaluation
  acc = lambda out: float(final(out).split()[3])
  assert abs(acc(second[0]) - acc(single_out)) <= 1 / 450

  m_two, m_one = metrics(two), metrics(one)
  steps = [(m['step'], m['split']) for m in m_one]
  assert [(m['step'], m['split']) for m in m_two] == steps and (21, 'test') in steps
  np.testing.assert_allclose([m['loss'] for m in m_two], [m['loss'] for m in m_one], rtol=1e-4)
  assert (two / 'best' / '21').is_dir()

  s_two, s_one = saved_state(two / 'checkpoints' / '22'), saved_state(one / 'checkpoints' / '22')
  assert s_two.keys() == s_one.keys() and any("['params']" in k for k in s_two)
  for k in s_one:
    np.testing.assert_allclose(s_two[k], s_one[k], rtol=2e-4, atol=2e-5, err_msg=k)


def test_a_dead_process_stops_the_other_within_the_heartbeat_timeout(procs, tmp_path):
  w = tmp_path / 'w'
  p0, p1 = procs.pair('p', w, heartbeat=5)
  t0 = time.time()
  while not (os.path.exists(w / 'metrics.jsonl') and os.path.getsize(w / 'metrics.jsonl')):
    assert p0.poll() is None and p1.poll() is None, p0.log.read_text()[-3000:]
    assert time.time() - t0 < 120, 'training did not start'
    time.sleep(0.05)
  p1.kill()  # SIGKILL mid-run: no goodbye to the coordinator
  t_kill = time.time()
  p0.wait(timeout=60)  # hanging would fail here
  waited = time.time() - t_kill
  out = p0.log.read_text()
  assert p0.returncode == cli.EXIT_DISTRIBUTED, out[-3000:]
  assert waited < 30, waited
  assert 'error: process 0 of 2 failed: ' in out.strip().splitlines()[-1]


@pytest.mark.parametrize('n,processes,batch', [(65, 2, 4), (65, 3, 8), (450, 2, 128), (7, 4, 1)])
def test_shards_step_together_and_test_examples_count_once(n, processes, batch):
  # Every process must yield the same number of batches (each is a collective step), even
  # when the shards differ in size; the test split counts every example exactly once.
  src = data_lib.ArraySource(np.zeros((n, 2, 2, 1), np.uint8), np.arange(n))
  ds = data_lib.Dataset('toy', n, src, src, (2, 2, 1), lambda x: x.astype(np.float32))
  for split in ('train', 'test'):
    per = [list(data_lib.iterate_batches(ds, split, batch_size=batch, seed=3, process_index=p,
                                         process_count=processes)) for p in range(processes)]
    assert len({len(b) for b in per}) == 1, [len(b) for b in per]
    seen = np.concatenate([b['label'][b['mask'] > 0] for bs in per for b in bs])
    if split == 'test':
      assert sorted(seen) == list(range(n))
    else:
      assert len(set(seen)) == len(seen) == (n // processes // batch) * batch * processes
