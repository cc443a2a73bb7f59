"""eval.py: three-way evaluation of a checkpoint, the cost report, plots, user errors."""

import json
import os

import pytest

from eval_helpers import trained_digits
from helpers import ROOT, run_script
from mfp_jax import eval_lib
from mfp_jax import plots

PNG = b'\x89PNG\r\n\x1a\n'


@pytest.fixture(scope='module')
def evaluated():
  config, workdir, _ = trained_digits()
  res = eval_lib.evaluate_run(config, workdir, write_plots=True)
  return config, workdir, res


def test_three_way_evaluation_of_a_checkpoint(evaluated):
  _, workdir, res = evaluated
  assert list(res['accuracy']) == ['parallel', 'serial', 'eq9']
  assert res['count'] == 450  # every test example once, padding masked out
  assert res['accuracy']['serial'] == res['accuracy']['parallel'] > 0.3
  assert res['prediction_agreement']['serial'] == 1.0
  assert set(res['spike_agreement']['serial'].values()) == {1.0}
  assert list(res['spike_agreement']['eq9']) == list(res['firing_rates'])  # network order
  assert 0.0 < res['accuracy']['eq9'] <= 1.0
  with open(os.path.join(workdir, 'eval.json')) as f:
    assert json.load(f)['accuracy'] == res['accuracy']


def test_report_json_has_measured_rates(evaluated):
  _, workdir, _ = evaluated
  with open(os.path.join(workdir, 'report.json')) as f:
    report = json.load(f)
  for key, typ in (('params', int), ('deployable_bytes', int), ('fp32_bytes', int),
                   ('sace', int), ('nsace', float), ('layers', list)):
    assert isinstance(report[key], typ), key
  assert report['deployable_bytes'] < report['fp32_bytes']
  for layer in report['layers']:
    assert {'name', 'params', 'macs', 'w_bits', 's_bits', 'firing_rate'} <= set(layer)
    assert isinstance(layer['firing_rate'], float) and 0 <= layer['firing_rate'] <= 1
  assert 0 < report['nsace'] < report['sace']
  assert report['energy_pj']['snn_fp32'] > 0


def test_plots_are_written(evaluated, tmp_path):
  _, workdir, _ = evaluated
  for name in ('training_curves', 'firing_rates', 'm_matrices', 'mode_accuracy'):
    with open(os.path.join(workdir, f'{name}.png'), 'rb') as f:
      blob = f.read()
    assert blob.startswith(PNG) and len(blob) > 2000, name
  # A metrics file cut mid-line (a killed run) still plots.
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 5, "split": "train", "loss": 2.0, "accuracy": 0.1}\n'
                  '{"step": 10, "split": "test", "loss": 1.5, "accuracy": 0.4}\n{"step": 1')
  out = plots.plot_training_curves(plots.read_metrics(str(path)), str(tmp_path / 'c.png'))
  assert os.path.getsize(out) > 2000


def test_report_only_needs_no_checkpoint_or_data(tmp_path):
  workdir = tmp_path / 'r'
  p = run_script(['eval.py', '--config', 'configs/digits.py', '--workdir', str(workdir),
                  '--report_only'])
  assert p.returncode == 0, p.stderr
  assert 'S-ACE' in p.stdout and 'deployable' in p.stdout
  with open(workdir / 'report.json') as f:
    report = json.load(f)
  assert report['nsace'] is None
  assert all(layer['firing_rate'] is None for layer in report['layers'])
  assert isinstance(report['sace'], int) and report['params'] > 0
  assert not (workdir / 'checkpoints').exists()


def test_no_checkpoint_is_one_line_and_exit_2(tmp_path):
  workdir = tmp_path / 'empty'
  p = run_script(['eval.py', '--config', os.path.join(ROOT, 'configs/digits.py'),
                  '--workdir', str(workdir)])
  assert p.returncode == 2
  lines = p.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('error: no checkpoint in'), p.stderr
  assert not workdir.exists()  # looking for a checkpoint creates nothing
