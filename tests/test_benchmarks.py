"""Every benchmark script runs end to end at tiny sizes and writes its JSON.

Timings are never checked here (the machines are shared and noisy); only that each script
runs, prints its table and records the environment it ran in.
"""

import importlib
import json

import pytest

TINY = {
    'neuron': ['--ts', '2', '--n', '1024', '--forms', 'mfp,mfp_matmul,lif_bptt'],
    'inference': ['--ts', '2', '--hw', '4', '--channels', '8'],
    'train_step': ['--models', 'digits', '--batch', '2', '--mem-ts', '2', '--kinds', 'mfp,relu'],
    'peers': ['--ts', '2', '--n', '1024'],
}


@pytest.mark.parametrize('name', sorted(TINY))
def test_benchmark_runs_at_tiny_size(name, tmp_path, capsys):
  mod = importlib.import_module(f'benchmarks.{name}')
  out = tmp_path / f'{name}.json'
  # The default allocator: the tuned one changes glibc settings for the whole test process.
  mod.main(TINY[name] + ['--reps', '1', '--warmup', '0', '--pause', '0', '--allocator',
                         'default', '--out', str(out)])
  printed = capsys.readouterr().out
  if name == 'peers' and 'skipped' in printed:
    assert printed.count('\n') == 1 and not out.exists()  # one line, nothing written
    pytest.skip('torch and spikingjelly are not installed: the peers ran nothing')
  assert '| ' in printed and str(out) in printed
  data = json.loads(out.read_text())
  env = data['environment']
  assert env['allocator']['mode'] == 'default' and env['jax'] and env['cpu_count'] >= 1
  assert data['results']


def test_allocator_modes():
  from benchmarks import common
  with pytest.raises(ValueError, match='allowed'):
    common.set_allocator('jemalloc')
  assert common.markdown_table(['a', 'b'], [[1, 2.5]]).splitlines()[2] == '| 1 | 2.50 |'
