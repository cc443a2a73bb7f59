"""PNG plots of a run: training curves, firing rates, the learned ``M`` matrices, mode accuracy.

Uses matplotlib's object API (``Figure`` + Agg), so it never touches pyplot's global state or
needs a display. Each function writes one PNG and returns its path.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from mfp_jax import run_log


def read_metrics(path: str) -> run_log.Records:
  """The log records of a ``metrics.jsonl``, in order.

  Anything else is skipped and counted in the result's ``skipped``: half a line left by a
  kill, bytes that are not UTF-8, JSON that is not an object with an int ``step`` and a str
  ``split``.
  """
  return run_log.read_records(path)


def plot_training_curves(records: Sequence[Mapping[str, Any]], path: str) -> str:
  """Loss and accuracy against step, train and test splits.

  Args:
    records: ``metrics.jsonl`` lines: ``{"step", "split": "train"|"test", "loss",
      "accuracy", ...}``.
    path: output PNG.
  """
  fig = Figure(figsize=(10, 4), layout='constrained')
  axes = fig.subplots(1, 2)
  for ax, key in zip(axes, ('loss', 'accuracy')):
    for split, style in (('train', '-'), ('test', 'o-')):
      pts = [(r['step'], r[key]) for r in records if r.get('split') == split and key in r]
      if pts:
        steps, vals = zip(*pts)
        ax.plot(steps, vals, style, label=split, markersize=3)
    ax.set_xlabel('step')
    ax.set_ylabel(key)
    ax.grid(alpha=0.3)
    ax.legend()
  fig.suptitle('training curves')
  fig.savefig(path, dpi=100)
  return path


def plot_firing_rates(rates: Mapping[str, float], path: str) -> str:
  """Horizontal bars: firing rate of every spiking layer, in network order."""
  names = list(rates)
  fig = Figure(figsize=(8, 0.4 * len(names) + 1.2), layout='constrained')
  ax = fig.subplots()
  y = np.arange(len(names))
  ax.barh(y, [rates[n] for n in names], color='tab:blue')
  ax.set_yticks(y, [n.replace('/SpikingNeuron_0', '') for n in names], fontsize=8)
  ax.invert_yaxis()
  ax.set_xlabel('firing rate (mean spikes per neuron and step)')
  ax.set_xlim(0, max(1e-3, max(rates.values(), default=0) * 1.15))
  ax.grid(axis='x', alpha=0.3)
  fig.savefig(path, dpi=100)
  return path


def plot_m_matrices(ms: Mapping[str, np.ndarray], path: str) -> str:
  """Heatmaps of each layer's learned ``[T, T]`` ``M`` (upper triangle blank: unused)."""
  names = list(ms)
  cols = min(4, max(1, len(names)))
  rows = max(1, math.ceil(len(names) / cols))
  fig = Figure(figsize=(3.2 * cols, 3 * rows), layout='constrained')
  axes = np.atleast_1d(fig.subplots(rows, cols)).reshape(-1)
  for ax in axes[len(names):]:
    ax.set_axis_off()
  for ax, name in zip(axes, names):
    m = np.asarray(ms[name], np.float32)
    lim = float(np.abs(np.tril(m)).max()) or 1.0
    im = ax.imshow(np.ma.masked_where(np.triu(np.ones_like(m, bool), 1), m), cmap='RdBu_r',
                   vmin=-lim, vmax=lim)
    ax.set_title(name.replace('/SpikingNeuron_0', ''), fontsize=8)
    ax.set_xlabel('input step i')
    ax.set_ylabel('output step t')
    fig.colorbar(im, ax=ax, shrink=0.8)
  fig.suptitle('learned M[t, i]')
  fig.savefig(path, dpi=100)
  return path


def plot_mode_accuracy(accuracy: Mapping[str, float], path: str) -> str:
  """Bars: test accuracy of the parallel, exact serial and Eq. 9 forms."""
  names = list(accuracy)
  fig = Figure(figsize=(5, 3.5), layout='constrained')
  ax = fig.subplots()
  bars = ax.bar(names, [accuracy[n] for n in names],
                color=['tab:blue', 'tab:green', 'tab:red', 'tab:gray'][:len(names)])
  for b, n in zip(bars, names):
    ax.annotate(f'{accuracy[n]:.4f}', (b.get_x() + b.get_width() / 2, b.get_height()),
                ha='center', va='bottom', fontsize=9)
  ax.set_ylim(0, 1.08)
  ax.set_ylabel('test accuracy')
  ax.set_title('parallel vs serial vs Eq. 9')
  fig.savefig(path, dpi=100)
  return path


def neuron_matrices(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """``{neuron path: M [T, T]}`` of every MFP neuron in a params tree (``tau`` -> column M)."""
  from flax import traverse_util  # Deferred: plotting a metrics file needs no JAX.
  from mfp_jax import folding
  by_layer: dict[str, dict[str, Any]] = {}
  for k, v in traverse_util.flatten_dict(params).items():
    by_layer.setdefault('/'.join(k[:-1]), {})[k[-1]] = v
  return {path: folding.neuron_matrix(p) for path, p in by_layer.items()
          if 'M' in p or 'tau' in p}


def write_all(workdir: str, *, metrics_dir: str | None = None,
              params: Mapping[str, Any] | None = None,
              rates: Mapping[str, float] | None = None,
              accuracy: Mapping[str, float] | None = None) -> list[str]:
  """Writes every plot whose inputs exist into ``workdir`` (the run's ``metrics.jsonl`` is
  read from ``metrics_dir``, default ``workdir``); returns the paths written."""
  written = []
  metrics = os.path.join(metrics_dir or workdir, 'metrics.jsonl')
  if os.path.exists(metrics):
    records = read_metrics(metrics)
    if records.skipped:
      print(f'plots: skipped {records.skipped} lines of {metrics} that are not log records',
            flush=True)
    written.append(plot_training_curves(records, os.path.join(workdir, 'training_curves.png')))
  if rates:
    written.append(plot_firing_rates(rates, os.path.join(workdir, 'firing_rates.png')))
  ms = neuron_matrices(params) if params is not None else {}
  if rates:  # network order (a params tree comes back with sorted keys)
    ms = {**{k: ms[k] for k in rates if k in ms}, **ms}
  if ms:
    written.append(plot_m_matrices(ms, os.path.join(workdir, 'm_matrices.png')))
  if accuracy:
    written.append(plot_mode_accuracy(accuracy, os.path.join(workdir, 'mode_accuracy.png')))
  return written
