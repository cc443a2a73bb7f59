"""The examples run as a user runs them: a data set, a model and a neuron registered from
outside the package, trained through train_and_evaluate, folded, run serially, exported."""

import re

from helpers import run_script


def test_custom_data_example(tmp_path):
  r = run_script(['examples/custom_data.py', '--workdir', str(tmp_path / 'w')], timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  acc = float(re.search(r'^test accuracy ([\d.]+)$', r.stdout, re.M).group(1))
  assert acc > 0.8  # two classes: chance is 0.5
  assert re.search(r'^serial predictions equal parallel on 100\.00% of 128 test images$',
                   r.stdout, re.M), r.stdout
  assert (tmp_path / 'w' / 'checkpoints').is_dir()


def test_custom_model_and_neuron_example(tmp_path):
  r = run_script(['examples/custom_model.py', '--workdir', str(tmp_path / 'w')], timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  m = re.search(r'^serial spikes equal parallel: (\d+) of (\d+) in (\d+) layers$', r.stdout,
                re.M)
  assert m and m[1] == m[2] and int(m[2]) > 0 and int(m[3]) == 5, r.stdout
  m = re.search(r'^exported model: max \|logit difference\| (\S+)$', r.stdout, re.M)
  assert m and float(m[1]) <= 1e-5, r.stdout
