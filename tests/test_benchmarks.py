"""Every benchmark script runs end to end at tiny sizes and writes its JSON.

Timings are never checked here (the machines are shared and noisy); only that each script
runs, prints its table and records the environment it ran in. Scripts that compare process
settings (allocator, XLA flags) start a fresh process per setting; their smoke runs keep to
the fewest processes that still cover that path.
"""

import importlib
import json

import pytest

# The default allocator in-process: the tuned one changes glibc settings for the whole test
# process.
COMMON = ['--reps', '1', '--warmup', '0', '--pause', '0']
TINY = {
    'neuron': ['--ts', '2', '--n', '1024', '--forms', 'mfp,mfp_matmul,lif_bptt',
               '--allocator', 'default'],
    'inference': ['--ts', '2', '--hw', '4', '--channels', '8', '--allocator', 'default'],
    'peers': ['--ts', '2', '--n', '1024', '--allocator', 'default'],
}


@pytest.mark.parametrize('name', sorted(TINY))
def test_benchmark_runs_at_tiny_size(name, tmp_path, capsys):
  mod = importlib.import_module(f'benchmarks.{name}')
  out = tmp_path / f'{name}.json'
  mod.main(TINY[name] + COMMON + ['--out', str(out)])
  printed = capsys.readouterr().out
  if name == 'peers' and 'skipped' in printed:
    assert printed.count('\n') == 1 and not out.exists()  # one line, nothing written
    pytest.skip('torch and spikingjelly are not installed: the peers ran nothing')
  assert '| ' in printed and str(out) in printed
  data = json.loads(out.read_text())
  env = data['environment']
  assert env['allocator']['mode'] == 'default' and env['jax'] and env['cpu_count'] >= 1
  assert data['results']


def test_neuron_both_allocators_in_fresh_processes(tmp_path, capsys):
  from benchmarks import neuron
  out = tmp_path / 'neuron.json'
  neuron.main(['--ts', '10', '--n', '1024', '--forms', 'mfp,lif_bptt'] + COMMON
              + ['--out', str(out)])
  printed = capsys.readouterr().out
  assert 'The README targets at T = 10' in printed and str(out) in printed
  data = json.loads(out.read_text())
  allocs = data['allocators']
  assert list(allocs) == ['tuned', 'default']
  assert [a['environment']['allocator']['mode'] for a in allocs.values()] == ['tuned', 'default']
  assert all(set(a['results']['10']) >= {'floor', 'mfp/both', 'lif_bptt/both'}
             for a in allocs.values())


def test_train_step_runs_each_setting_in_its_own_process(tmp_path, capsys):
  from benchmarks import train_step
  out = tmp_path / 'train_step.json'
  train_step.main(['--models', 'digits', '--batch', '2', '--mem-ts', '', '--kinds', 'relu',
                   '--settings', 'trainpy,untuned'] + COMMON + ['--out', str(out)])
  printed = capsys.readouterr().out
  assert 'trainpy (malloc tuned, conv flag on)' in printed and str(out) in printed
  data = json.loads(out.read_text())
  runtimes = {s: v['environment']['runtime'] for s, v in data['settings'].items()}
  assert runtimes['trainpy']['allocator']['mode'] == 'tuned'  # what train.py sets up
  assert runtimes['untuned']['allocator']['mode'] == 'default'
  assert runtimes['untuned']['xla_cpu']['mode'] == 'default'
  for v in data['settings'].values():
    steps = v['results']['digits']['steps']
    assert set(steps) == {'relu'} and steps['relu']['x_ann'] == 1.0


def test_train_step_memory_vs_t_compiles_only():
  from benchmarks import train_step
  mem = train_step.memory_vs_t('digits', 2, [2], ['relu'])
  assert list(mem) == ['2'] and mem['2']['relu'] > 0


def test_train_step_bad_flags_are_refused():
  from benchmarks import train_step
  with pytest.raises(SystemExit):
    train_step.main(['--settings', 'fast'])
  with pytest.raises(SystemExit):
    train_step.main(['--allocator', 'tuned'])  # a process setting: --settings


def test_train_loop_times_train_py_from_its_metrics(tmp_path, capsys):
  from benchmarks import train_loop
  out = tmp_path / 'train_loop.json'
  train_loop.main(['--tiny', '--kinds', 'mfp', '--settings', 'untuned', '--out', str(out)])
  printed = capsys.readouterr().out
  assert '| untuned | mfp |' in printed and str(out) in printed
  rec = json.loads(out.read_text())['results']['digits']
  (run,) = rec['runs']
  assert [s for s, _ in run['lines']] == [2, 4] and run['timed_steps'] == 2
  assert run['command'].startswith('MFP_JAX_ALLOCATOR=default MFP_JAX_XLA_CPU=default python '
                                   'train.py --config configs/digits.py')


def test_train_loop_ratios_are_per_round_and_setting():
  from benchmarks import train_loop
  runs = [{'round': r, 'setting': s, 'kind': k, 's_per_step': v}
          for r, s, k, v in [(0, 'a', 'mfp', 2.0), (0, 'a', 'lif', 4.0), (0, 'a', 'relu', 1.0),
                             (1, 'a', 'mfp', 3.0), (1, 'a', 'lif', 3.0), (1, 'a', 'relu', 2.0),
                             (0, 'b', 'mfp', 1.0), (0, 'b', 'relu', 0.5)]]
  assert train_loop.ratios(runs, ['a', 'b'], 2) == {
      'a': {'MFP/LIF': [0.5, 1.0], 'MFP/ANN': [2.0, 1.5]}, 'b': {'MFP/ANN': [2.0]}}


def test_train_loop_rate_skips_the_first_interval(tmp_path):
  from benchmarks import train_loop
  lines = [{'step': 2, 'split': 'train', 'time': 100.0}, {'step': 4, 'split': 'train',
           'time': 101.0}, {'step': 4, 'split': 'test', 'time': 150.0},
           {'step': 8, 'split': 'train', 'time': 103.0}]
  (tmp_path / 'metrics.jsonl').write_text(''.join(json.dumps(m) + '\n' for m in lines))
  r = train_loop.rate(str(tmp_path))
  assert r['steps_per_s'] == 2.0 and r['interval_steps_per_s'] == [2.0, 2.0]


def test_allocator_modes():
  from benchmarks import common
  with pytest.raises(ValueError, match='allowed'):
    common.set_allocator('jemalloc')
  assert common.markdown_table(['a', 'b'], [[1, 2.5]]).splitlines()[2] == '| 1 | 2.50 |'


def test_membrane_bits_rows_train_at_their_neurons_rate():
  from benchmarks import membrane_bits as mb
  rates = {row: [o for o in ov if o.startswith('--config.optim.learning_rate=')]
           for row, (_, ov) in mb.ROWS.items()}
  assert all(len(r) == 1 and float(r[0].split('=')[1]) in mb.LR_GRID for r in rates.values())
  for tau in (0.5, 0.9):  # a LIF's quantized membranes train at its float row's rate
    assert len({rates[r][0] for r in rates if r.startswith(f'lif_t{tau}_')}) == 1


def test_membrane_bits_takes_finished_cells_without_training(tmp_path, capsys, monkeypatch):
  from benchmarks import membrane_bits as mb

  def cell(row, weights, accs):
    runs = [{'seed': s, 'accuracy': a, 'wall_s': 10.0} for s, a in enumerate(accs)]
    return {'row': row, 'weights': weights, 'runs': runs, 'mean': sum(accs) / len(accs),
            'std': 0.01, 'wall_s': 10.0}

  def write(path, cells, seeds, sha=mb.config_sha256()):
    path.write_text(json.dumps({'config': mb.CONFIG, 'config_sha256': sha, 'seeds': seeds,
                                'epochs_override': None, 'cells': cells}))

  # Two earlier invocations with the same seeds; one with other seeds and one run under an
  # edited config file: neither is taken.
  write(tmp_path / 'a.json', [cell('mfp', 'fp32', [0.86, 0.87])], [0, 1])
  write(tmp_path / 'b.json', [cell('lif_t0.9_m1', 'fp32', [0.80, 0.82])], [0, 1])
  write(tmp_path / 'c.json', [cell('mfp_column', 'fp32', [0.5, 0.5])], [0, 2])
  write(tmp_path / 'd.json', [cell('mfp_column', 'fp32', [0.6, 0.6])], [0, 1], sha='0' * 64)
  trained = []
  monkeypatch.setattr(mb, 'run_cell', lambda row, w, *a, **k: trained.append(row) or
                      cell(row, w, [0.7, 0.7]))
  out = tmp_path / 'all.json'
  mb.main(['--seeds', '0', '1', '--weights', 'fp32', '--rows', 'mfp', 'lif_t0.9_m1',
           'mfp_column', '--out', str(out), '--merge', str(tmp_path / 'a.json'),
           str(tmp_path / 'b.json'), str(tmp_path / 'c.json'), str(tmp_path / 'd.json')])
  assert trained == ['mfp_column']
  printed = capsys.readouterr().out
  assert '| MFP (learned [T, T] M) | 86.50 +- 1.00 (10 s) |' in printed
  assert '| LIF tau 0.9, 1-bit membrane | 81.00 +- 1.00 (10 s) |' in printed
  assert '| MFP column form (Eq. 6) | 70.00 +- 1.00 (10 s) |' in printed
  assert 'three forms' not in printed  # no cell has eval.py's comparison: no empty table
  assert [c['row'] for c in json.loads(out.read_text())['cells']] == [
      'mfp', 'lif_t0.9_m1', 'mfp_column']
  # A rerun with the same --out trains nothing and keeps the other cells in it;
  # --table_only leaves unfinished cells out.
  mb.main(['--seeds', '0', '1', '--weights', 'fp32', '--rows', 'mfp_column', '--out', str(out)])
  assert len(json.loads(out.read_text())['cells']) == 3
  mb.main(['--seeds', '0', '1', '--weights', 'fp32', '1bit', '--rows', 'mfp', '--table_only',
           '--out', str(tmp_path / 'table.json'), '--merge', str(out)])
  assert trained == ['mfp_column']
  assert '| MFP (learned [T, T] M) | 86.50 +- 1.00 (10 s) | - |' in capsys.readouterr().out
  evaluated = cell('mfp', 'fp32', [0.86])
  evaluated['runs'][0]['eval'] = {
      'accuracy': {'parallel': 0.86, 'serial': 0.86, 'eq9': 0.5},
      'prediction_agreement': {'serial': 1.0, 'eq9': 0.5},
      'spike_agreement': {'serial': {'a': 1.0, 'b': 1.0}, 'eq9': {'a': 0.8, 'b': 0.6}}}
  mb.print_tables([evaluated], ['mfp'], ['fp32'], [0])
  printed = capsys.readouterr().out
  assert '## The trained MFP nets in three forms' in printed
  assert '| mfp, fp32 | eq9 | 50.00% | 50.00% | 70.0000% |' in printed
