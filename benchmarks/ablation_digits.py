"""Ablation of the recipe on the embedded digits data: 3 seeds per variant, accuracy and time.

  python -m benchmarks.ablation_digits                 # the full table (~30 min on 2 cores)
  python -m benchmarks.ablation_digits --seeds 0 --variants default --epochs 1   # smoke

Each run is the README's command, `python train.py --config configs/digits.py ...` with the
variant's overrides, in a fresh subprocess; wall time is that subprocess's, start-up and
compilation included. Prints a markdown table and writes JSON (default
benchmarks/results/ablation_digits.json).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import numpy as np

from benchmarks import common


VARIANTS = {
    'default': ('MFP, 1-bit hidden (pow2, clipped STE), fp first/last, lambda 0', []),
    'annealed': ('annealed tanh estimator instead of clipped STE',
                 ['--config.model.quant.estimator=annealed']),
    'wsdr': ('WS-DR firing-rate term, lambda 5e-3', ['--config.loss.fr_lambda=0.005']),
    'fp_weights': ('full-precision hidden weights', ['--config.model.quant.bits=32']),
    'edges_8bit': ('8-bit first conv and classifier', ['--config.model.edge_quant.bits=8']),
    'recipe': ('paper recipe: annealed + lambda 5e-3 + 8-bit first/last',
               ['--config.model.quant.estimator=annealed', '--config.loss.fr_lambda=0.005',
                '--config.model.edge_quant.bits=8']),
    'lif': ('LIF neurons (float membrane, hard reset)', ['--config.model.neuron.kind=lif']),
    'lif_m8': ('LIF, membrane quantized to 8 bits',
               ['--config.model.neuron.kind=lif', '--config.model.neuron.membrane_bits=8']),
    'lif_m2': ('LIF, membrane quantized to 2 bits',
               ['--config.model.neuron.kind=lif', '--config.model.neuron.membrane_bits=2']),
    'lif_m1': ('LIF, membrane quantized to 1 bit',
               ['--config.model.neuron.kind=lif', '--config.model.neuron.membrane_bits=1']),
}

def run_one(overrides: list[str], seed: int, workdir: str, epochs: int | None) -> dict:
  """One `train.py` run in a subprocess; returns accuracy and wall seconds."""
  return common.run_train_py('configs/digits.py', overrides, seed, workdir, epochs=epochs)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
  p.add_argument('--variants', nargs='+', default=list(VARIANTS), choices=list(VARIANTS))
  p.add_argument('--epochs', type=int, default=None, help='override num_epochs (smoke runs)')
  p.add_argument('--out', default=None, help='JSON path (default benchmarks/results/)')
  args = p.parse_args(argv)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    for name in args.variants:
      desc, overrides = VARIANTS[name]
      runs = [run_one(overrides, s, os.path.join(tmp, f'{name}_{s}'), args.epochs)
              for s in args.seeds]
      acc = np.array([r['accuracy'] for r in runs])
      rows.append({'variant': name, 'description': desc, 'overrides': overrides, 'runs': runs,
                   'mean_accuracy': float(acc.mean()), 'worst_accuracy': float(acc.min()),
                   'mean_wall_s': float(np.mean([r['wall_s'] for r in runs]))})
      print(f'{name}: {acc.round(4).tolist()} ({rows[-1]["mean_wall_s"]:.1f} s/run)',
            file=sys.stderr, flush=True)
  print(common.markdown_table(
      ['variant', 'what', 'mean acc', 'worst acc', 's/run'],
      [[r['variant'], r['description'], f"{100 * r['mean_accuracy']:.2f}%",
        f"{100 * r['worst_accuracy']:.2f}%", f"{r['mean_wall_s']:.0f}"] for r in rows]))
  common.write_json('ablation_digits', {'seeds': args.seeds, 'epochs_override': args.epochs,
                                        'rows': rows}, args.out)
  return rows


if __name__ == '__main__':
  main()
