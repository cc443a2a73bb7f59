"""The recipe and data benchmarks run at tiny sizes (timings are never asserted)."""

import json
import math

import pytest

from benchmarks import ablation_digits, input_pipeline


def test_ablation_runs_tiny(tmp_path):
  rows = ablation_digits.main(['--seeds', '0', '--variants', 'lif_m2', '--epochs', '1',
                               '--out', str(tmp_path / 'a.json')])
  assert [r['variant'] for r in rows] == ['lif_m2']
  assert set(ablation_digits.VARIANTS) >= {'default', 'annealed', 'wsdr', 'fp_weights',
                                           'edges_8bit', 'lif', 'lif_m8', 'lif_m2', 'lif_m1'}
  assert all(0.0 <= r['mean_accuracy'] <= 1.0 for r in rows)
  data = json.load(open(tmp_path / 'a.json'))
  assert data['rows'][0]['runs'][0]['seed'] == 0 and 'jax' in data['environment']


def test_input_pipeline_runs_tiny(tmp_path):
  pytest.importorskip('dv_processing')
  # Digits with every kind of loading setting and the overlapped step loop, at the fewest
  # batches and repetitions that still run each path.
  rows = input_pipeline.main(['--datasets', 'digits', '--batch_size', '128', '--epochs', '1',
                              '--threads', '2', '--workers', '1', '--prefetch', '2',
                              '--train_steps', '1', '--overlap_reps', '1',
                              '--read_latency_ms', '1', '--overlap_channels', '4', '4', '4',
                              '--out', str(tmp_path / 'd.json')])
  assert rows[0]['pipeline_batches_per_s'] > 0 and rows[0]['train_steps_per_s'] > 0
  assert set(rows[0]['settings']) == {'in-thread', '2 threads', '1 worker'}
  overlap = json.load(open(tmp_path / 'd.json'))['overlap'][0]
  assert set(overlap['loop_ms']) == {'in-thread', '2 threads', '1 worker'}
  assert all(v > 0 for v in overlap['loop_ms'].values())
  # The other loaders' real on-disk formats, loading only.
  rows = input_pipeline.main(['--datasets', 'cifar10', 'tinyimagenet', 'cifar10dvs',
                              '--batch_size', '4', '--examples', '40', '--epochs', '1',
                              '--threads', '1', '--workers', '0', '--overlap',
                              '--train_steps', '0', '--out', str(tmp_path / 'p.json')])
  assert [r['dataset'] for r in rows] == ['cifar10', 'tinyimagenet', 'cifar10dvs']
  assert all(r['pipeline_batches_per_s'] > 0 and r['batches'] >= 1 for r in rows)
  # With one thread, 4 of cifar10's 10 batches are buffered after the first: the 5 timed are
  # too few for a rate.
  assert rows[0]['settings']['1 thread']['timed_batches'] == 5
  assert math.isnan(rows[0]['settings']['1 thread']['batches_per_s'])
