"""The paper's Fig. 1 claim on a real temporal task: a low-bit LIF membrane loses history, MFP not.

  python -m benchmarks.membrane_bits                     # the full table (hours on 2 cores)
  python -m benchmarks.membrane_bits --seeds 0 --rows mfp lif_t0.5_m1 --epochs 1   # smoke

Task: row-sequential Fashion-MNIST (`configs/seq_fashion_mnist.py`: one 28-pixel row per step,
T = 28, dense 28-256-256-10). Rows: the MFP neuron (learned [T, T] M), its column form (Eq. 6),
and LIF with tau 0.5 and 0.9, each with a float, 8-, 2- and 1-bit membrane. Columns:
full-precision and 1-bit hidden weights. Every cell is the README's command, `python train.py
--config configs/seq_fashion_mnist.py ...` with the row's and column's overrides, in a fresh
subprocess, once per seed: mean +- std of the final test accuracy over the seeds, and the mean
wall time per run (start-up and compilation included). On the trained MFP nets, `eval.py` then
compares the exact serial form (folded integer thresholds with 1-bit weights; a float streaming
scan with full-precision ones) and the paper's Eq. 9 with the parallel form.

Baselines are not tuned down: every row uses the config's optimizer, schedule and epochs, at
its neuron's own best learning rate (:data:`LEARNING_RATES`).
Prints markdown tables; writes JSON (default benchmarks/results/membrane_bits.json) after every
cell. A rerun with the same ``--out`` keeps its finished cells (same config file contents,
seeds and epochs), and ``--merge A.json B.json`` takes cells from other invocations: a table
split over several runs is printed whole without retraining.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile

import numpy as np

from benchmarks import common

CONFIG = 'configs/seq_fashion_mnist.py'
LIF = '--config.model.neuron.kind=lif'


def config_sha256(path: str = CONFIG) -> str:
  """The config file's content hash: finished cells are reused only under the same config
  (an edited learning rate or epoch count retrains them)."""
  with open(os.path.join(common.ROOT, path), 'rb') as f:
    return hashlib.sha256(f.read()).hexdigest()


# Each neuron's AdamW learning rate (the config's cosine schedule and epochs): the best of
# LR_GRID on seed 0 with full-precision weights (README, "Results on real data"), so that every
# baseline trains at its own best rate. A LIF's quantized-membrane rows take its float row's.
LR_GRID = (2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1)
LEARNING_RATES = {'mfp': 2e-2, 'mfp_column': 2e-2, 'lif_t0.5': 5e-2, 'lif_t0.9': 5e-2}


def _lr(family: str) -> list[str]:
  return [f'--config.optim.learning_rate={LEARNING_RATES[family]}']


def _lif(tau: float, bits: int | None) -> list[str]:
  out = [LIF, f'--config.model.neuron.tau={tau}'] + _lr(f'lif_t{tau}')
  return out + ([f'--config.model.neuron.membrane_bits={bits}'] if bits else [])


ROWS = {
    'mfp': ('MFP (learned [T, T] M)', _lr('mfp')),
    'mfp_column': ('MFP column form (Eq. 6)',
                   ['--config.model.neuron.kind=mfp_column'] + _lr('mfp_column')),
    **{f'lif_t{tau}_{"float" if b is None else f"m{b}"}': (
        f'LIF tau {tau}, {"float" if b is None else f"{b}-bit"} membrane', _lif(tau, b))
       for tau in (0.5, 0.9) for b in (None, 8, 2, 1)},
}
WEIGHTS = {'fp32': ['--config.model.quant.bits=32'], '1bit': []}


def run_cell(row: str, weights: str, seeds: list[int], tmp: str, epochs: int | None,
             evaluate: bool) -> dict:
  """One table cell: train.py once per seed; for MFP also eval.py's three-way comparison."""
  runs = []
  for seed in seeds:
    workdir = os.path.join(tmp, f'{row}_{weights}_{seed}')
    overrides = ROWS[row][1] + WEIGHTS[weights]
    run = common.run_train_py(CONFIG, overrides, seed, workdir, epochs=epochs)
    if evaluate:
      run['eval'] = common.run_eval_py(CONFIG, overrides, seed, workdir, epochs=epochs)
    runs.append(run)
  acc = np.array([r['accuracy'] for r in runs])
  return {'row': row, 'weights': weights, 'runs': runs, 'mean': float(acc.mean()),
          'std': float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
          'wall_s': float(np.mean([r['wall_s'] for r in runs]))}


def _pct(cell: dict | None) -> str:
  if cell is None:
    return '-'
  return f'{100 * cell["mean"]:.2f} +- {100 * cell["std"]:.2f} ({cell["wall_s"]:.0f} s)'


def eval_table(cells: list[dict]) -> str | None:
  """Exact serial and Eq. 9 against parallel, on the trained MFP nets (mean over seeds);
  ``None`` when no cell has eval.py's comparison."""
  rows = []
  for c in cells:
    evals = [r['eval'] for r in c['runs'] if r.get('eval')]
    if not evals:
      continue
    for mode in ('parallel', 'serial', 'eq9'):
      mean = lambda f: float(np.mean([f(e) for e in evals]))
      rows.append([f'{c["row"]}, {c["weights"]}', mode,
                   f'{100 * mean(lambda e: e["accuracy"][mode]):.2f}%',
                   '-' if mode == 'parallel' else
                   f'{100 * mean(lambda e: e["prediction_agreement"][mode]):.2f}%',
                   '-' if mode == 'parallel' else
                   f'{100 * mean(lambda e: np.mean(list(e["spike_agreement"][mode].values()))):.4f}%'])
  return common.markdown_table(['net', 'form', 'accuracy', 'predictions = parallel',
                                'spikes = parallel'], rows) if rows else None


def _done_cells(paths: list[str], sha: str, seeds: list[int], epochs: int | None) -> dict:
  """Finished cells from earlier JSON files of this benchmark run with the same config file
  contents (``sha``, :func:`config_sha256`), seeds and epochs (a long table is resumable, and
  can be split over several invocations)."""
  done = {}
  for path in paths:
    if not os.path.exists(path):
      continue
    with open(path) as f:
      prev = json.load(f)
    if (prev.get('config_sha256') == sha and prev.get('seeds') == seeds
        and prev.get('epochs_override') == epochs):
      done.update({(c['row'], c['weights']): c for c in prev['cells']})
  return done


def print_tables(cells: list[dict], rows: list[str], weights: list[str], seeds: list[int]):
  """The markdown tables of the README from the cells."""
  by = {(c['row'], c['weights']): c for c in cells}
  print(f'## Fig. 1 on row-sequential Fashion-MNIST (T = 28), {len(seeds)} seeds: '
        f'test accuracy % mean +- std (mean wall time per run)\n')
  print(common.markdown_table(['neuron'] + [f'{w} hidden weights' for w in weights],
                              [[ROWS[r][0]] + [_pct(by.get((r, w))) for w in weights]
                               for r in rows]))
  table = eval_table(cells)
  if table:
    print(f'\n## The trained MFP nets in three forms\n\n{table}')


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
  p.add_argument('--rows', nargs='+', default=list(ROWS), choices=list(ROWS))
  p.add_argument('--weights', nargs='+', default=list(WEIGHTS), choices=list(WEIGHTS))
  p.add_argument('--epochs', type=int, default=None, help='override num_epochs (smoke runs)')
  p.add_argument('--out', default=None, help='JSON path (default benchmarks/results/); '
                 'rewritten after every cell, and its finished cells are kept on a rerun')
  p.add_argument('--merge', nargs='+', default=[],
                 help='also take finished cells (same seeds and epochs) from these JSON files')
  p.add_argument('--table_only', action='store_true',
                 help='train nothing: print the tables of the finished cells (- for the rest)')
  args = p.parse_args(argv)
  out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results',
                                 'membrane_bits.json')
  sha = config_sha256()
  done = _done_cells(args.merge + [out], sha, args.seeds, args.epochs)
  wanted = {(r, w) for r in args.rows for w in args.weights}
  others = [c for k, c in done.items() if k not in wanted]  # kept in --out, not printed
  cells = []
  with tempfile.TemporaryDirectory() as tmp:
    for row in args.rows:
      for w in args.weights:
        cell = done.get((row, w))
        if cell is None and args.table_only:
          continue
        if cell is None:
          cell = run_cell(row, w, args.seeds, tmp, args.epochs,
                          evaluate=row in ('mfp', 'mfp_column'))
        cells.append(cell)
        print(f'{row} {w}: {_pct(cell)}', file=sys.stderr, flush=True)
        common.write_json('membrane_bits', {'config': CONFIG, 'config_sha256': sha,
                                            'seeds': args.seeds,
                                            'epochs_override': args.epochs,
                                            'cells': cells + others}, out)
  print_tables(cells, args.rows, args.weights, args.seeds)
  print(f'\nwrote {out}')
  return cells


if __name__ == '__main__':
  main()
