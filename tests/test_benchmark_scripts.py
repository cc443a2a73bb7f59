"""The recipe and data benchmarks run at tiny sizes (timings are never asserted)."""

import json

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
  rows = input_pipeline.main(['--datasets', 'digits', '--batch_size', '8', '--epochs', '1',
                              '--train_steps', '1', '--out', str(tmp_path / 'd.json')])
  assert rows[0]['pipeline_batches_per_s'] > 0 and rows[0]['train_steps_per_s'] > 0
  rows = input_pipeline.main(['--datasets', 'cifar10', 'tinyimagenet', 'cifar10dvs',
                              '--batch_size', '4', '--examples', '20', '--epochs', '1',
                              '--train_steps', '0', '--out', str(tmp_path / 'p.json')])
  assert [r['dataset'] for r in rows] == ['cifar10', 'tinyimagenet', 'cifar10dvs']
  assert all(r['pipeline_batches_per_s'] > 0 and r['batches'] >= 1 for r in rows)
