"""``benchmarks.peers --step`` (benchmarks.step_peers) runs end to end at a tiny size.

The workers are subprocesses (one per contender); timings are never checked. CI has no
torch: there the torch side must cost one printed line and a clean exit.
"""

import importlib.util
import json
import sys

import pytest

from benchmarks import peers

TINY = ['--models', 'digits', '--batch', '1', '--kinds', 'mfp', '--reps', '2', '--warmup', '0',
        '--pause', '0']


def _has_torch() -> bool:
  return all(importlib.util.find_spec(m) is not None for m in ('torch', 'spikingjelly'))


@pytest.mark.parametrize('frameworks', ['jax', 'jax,torch'])
def test_step_harness_runs_tiny(frameworks, tmp_path, capsys):
  if 'torch' in frameworks and not _has_torch():
    pytest.skip('torch and spikingjelly are not installed here')
  out = tmp_path / 'step.json'
  assert peers.main(['--step', '--frameworks', frameworks, '--out', str(out)] + TINY) == 0
  printed = capsys.readouterr().out
  assert '| jax:mfp |' in printed and str(out) in printed
  data = json.loads(out.read_text())
  steps = data['results']['digits_b1']['steps']
  assert sorted(steps) == sorted(f'{fw}:mfp' for fw in frameworks.split(','))
  for rec in steps.values():
    assert len(rec['times_ms']) == 2 and rec['x_ref_paired'] > 0
  if 'torch:mfp' in steps:  # the twin has exactly mfp_jax's parameters
    assert steps['torch:mfp']['params'] == steps['jax:mfp']['params']
  assert data['environment']['workers']['jax']['ok']


def test_step_without_torch_prints_one_line(tmp_path, capsys):
  # Where torch is installed, an interpreter that does not exist stands in for one without it.
  python = '/nonexistent/python' if _has_torch() else sys.executable
  out = tmp_path / 'step.json'
  assert peers.main(['--step', '--torch-python', python, '--out', str(out)] + TINY) == 0
  printed = capsys.readouterr().out
  assert printed.count('\n') == 1 and 'torch contenders skipped' in printed
  assert not out.exists()
