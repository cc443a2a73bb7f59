"""What ``eval.py`` does: restore a checkpoint, evaluate parallel / serial / Eq. 9, report costs.

Every process evaluates the whole test split on its local devices (evaluation is cheap next
to training and needs no cross-host batch); only process 0 prints and writes files.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from mfp_jax import accounting
from mfp_jax import checkpoints as ckpt_lib
from mfp_jax import config_lib
from mfp_jax import data as data_lib
from mfp_jax import folding
from mfp_jax import inference
from mfp_jax import models
from mfp_jax import train_lib
from mfp_jax import workdir as workdir_lib

CHECKPOINTS = ('best', 'latest')


def _has_steps(directory: str) -> bool:
  return os.path.isdir(directory) and any(d.isdigit() for d in os.listdir(directory))


def find_checkpoint(workdir: str, which: str = 'best') -> bool:
  """Whether to restore the best (True) or the latest (False) checkpoint of ``workdir``.

  ``best`` falls back to the latest when no evaluation has saved a best one yet. Looks at the
  directories only, so a missing run leaves nothing behind.

  Raises:
    ValueError: ``which`` is not one of :data:`CHECKPOINTS`.
    checkpoints.CheckpointError: no checkpoint at all.
  """
  if which not in CHECKPOINTS:
    raise ValueError(f'--checkpoint must be one of {list(CHECKPOINTS)}, got {which!r}')
  best = _has_steps(os.path.join(workdir, 'best'))
  latest = _has_steps(os.path.join(workdir, 'checkpoints'))
  if not (best or latest):
    raise ckpt_lib.CheckpointError(
        f'no checkpoint in {workdir} (nothing under best/ or checkpoints/); train first: '
        f'python train.py --config <config> --workdir {workdir}')
  return best if which == 'best' else not latest


def _masked_sum(per_example: jax.Array, mask: jax.Array) -> jax.Array:
  return jnp.sum(per_example * mask)


def _example_mean(s: jax.Array) -> jax.Array:
  """``[T, B, ...]`` -> mean per example ``[B]``."""
  return jnp.moveaxis(s, 1, 0).reshape(s.shape[1], -1).astype(jnp.float32).mean(axis=1)


def _spike_agreement(a: jax.Array, b: jax.Array, mask: jax.Array) -> jax.Array:
  """Masked sum over examples of the fraction of equal spikes (``[T, B, ...]``)."""
  return _masked_sum(_example_mean(a == b), mask)


def make_eval_step(model, program: inference.Program | None, mfp: bool):
  """A jitted ``(variables, arrays, image, label, mask) -> sums`` comparing the modes.

  ``program``: the folded serial form (None: the float streaming scan stands in for it when
  the neurons are MFP). ``mfp``: whether serial and Eq. 9 forms exist at all.
  """
  parallel = inference.with_neuron_mode(model, 'parallel')
  eq9 = inference.with_neuron_mode(model, 'eq9') if mfp else None
  serial_float = inference.with_neuron_mode(model, 'serial') if mfp else None

  def step(variables, arrays, image, label, mask):
    logits, spikes, inputs = inference.forward_flax(parallel, variables, image)
    outs = {'parallel': (logits, spikes)}
    if program is not None:
      outs['serial'] = inference.run_program(program.ops, program.meta, arrays, image,
                                             with_spikes=True)
    elif serial_float is not None:
      outs['serial'] = inference.forward_flax(serial_float, variables, image)[:2]
    if eq9 is not None:
      outs['eq9'] = inference.forward_flax(eq9, variables, image)[:2]
    pred = logits.argmax(-1)
    sums = {'count': mask.sum(),
            'correct': {k: _masked_sum(o[0].argmax(-1) == label, mask) for k, o in outs.items()},
            'pred_agree': {k: _masked_sum(o[0].argmax(-1) == pred, mask)
                           for k, o in outs.items() if k != 'parallel'},
            'spike_agree': {k: {n: _spike_agreement(spikes[n], o[1][n], mask) for n in spikes}
                            for k, o in outs.items() if k != 'parallel'},
            'rates': {n: _masked_sum(_example_mean(s), mask) for n, s in spikes.items()},
            'input_rates': {n: _masked_sum(r, mask) for n, r in inputs.items()}}
    return sums

  return jax.jit(step)


def evaluate_modes(model, variables: Mapping[str, Any], dataset: data_lib.Dataset, *,
                   batch_size: int, progress: bool = True) -> dict[str, Any]:
  """Test-split accuracy of each available mode, agreement with parallel, and firing rates.

  Returns:
    ``accuracy {mode: float}``, ``prediction_agreement {mode: float}``, ``spike_agreement
    {mode: {layer: float}}``, ``firing_rates {layer: float}``, ``input_rates {layer: float}``,
    ``count``, ``serial_form`` (how the serial mode ran) and ``unavailable {mode: reason}``.
  """
  unavailable = {}
  program = None
  mfp = folding.all_linear(model, dataset.input_shape)
  try:
    program = inference.build_program(model, variables, dataset.input_shape)
    serial_form = 'folded thresholds on integer spike counts'
  except ValueError as e:
    serial_form = f'float streaming scan ({e})' if mfp else None
  if not mfp:
    kinds = sorted({s.kind for s in folding.neuron_specs(model, dataset.input_shape).values()})
    why = f'serial and Eq. 9 forms are for MFP neurons (LinearNeuron kinds), not {kinds}'
    unavailable = {'serial': why, 'eq9': why}
  step = make_eval_step(model, program, mfp)
  arrays = inference.program_arrays(program) if program is not None else {}
  sums = None
  batches = data_lib.iterate_batches(dataset, 'test', batch_size=batch_size)
  n_batches = data_lib.num_batches(len(dataset.test), batch_size, drop_remainder=False)
  for b in tqdm.tqdm(batches, total=n_batches, desc='eval', leave=False,
                     disable=None if progress else True):
    out = step(variables, arrays, b['image'], b['label'], b['mask'])
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  s = jax.tree.map(lambda v: float(np.asarray(v)), jax.device_get(sums))
  n = max(s['count'], 1.0)
  # Dicts come back from jit with sorted keys: put modes and layers back in network order.
  layer_order = models.spiking_layer_names(model, dataset.input_shape)
  mode_order = [m for m in inference.MODES if m in s['correct']]
  div = lambda d, order: {k: d[k] / n for k in order if k in d}
  return {'count': int(s['count']), 'accuracy': div(s['correct'], mode_order),
          'prediction_agreement': div(s['pred_agree'], mode_order),
          'spike_agreement': {k: div(s['spike_agree'][k], layer_order)
                              for k in mode_order if k in s['spike_agree']},
          'firing_rates': div(s['rates'], layer_order),
          'input_rates': div(s['input_rates'], list(s['input_rates'])),
          'serial_form': serial_form, 'unavailable': unavailable}


def format_modes(res: Mapping[str, Any]) -> str:
  """The three-way table: accuracy, prediction agreement, per-layer spike agreement."""
  modes = list(res['accuracy'])
  lines = [f'{"mode":<10s}{"accuracy":>10s}{"pred agree":>12s}{"spike agree":>13s}']
  for m in modes:
    pa = res['prediction_agreement'].get(m)
    sa = res['spike_agreement'].get(m)
    lines.append(f'{m:<10s}{res["accuracy"][m]:>10.4f}'
                 f'{"-" if pa is None else f"{pa:.4f}":>12s}'
                 f'{"-" if sa is None else f"{np.mean(list(sa.values())):.6f}":>13s}')
  for m, why in res['unavailable'].items():
    lines.append(f'{m:<10s}{"n/a":>10s}  ({why})')
  if res.get('serial_form'):
    lines.append(f'serial form: {res["serial_form"]}')
  others = [m for m in modes if m != 'parallel']
  if others:
    lines.append('')
    lines.append('spike agreement with parallel, per layer (fraction of equal spikes):')
    width = max(len(n) for n in res['firing_rates'])
    lines.append(f'{"layer":<{width}s}{"rate":>8s}' + ''.join(f'{m:>12s}' for m in others))
    for n, r in res['firing_rates'].items():
      lines.append(f'{n:<{width}s}{r:>8.3f}'
                   + ''.join(f'{res["spike_agreement"][m][n]:>12.6f}' for m in others))
  return '\n'.join(lines)


def _write_json(path: str, obj: Any) -> None:
  with open(path, 'w') as f:
    json.dump(obj, f, indent=1)


def _lock_outputs(out_dir: str, *, enabled: bool = True) -> contextlib.ExitStack:
  """:func:`mfp_jax.workdir.lock` on the directory eval.py writes into; when another process
  (a live training run) holds it, the one-line error says to pass ``--out_dir``, not (as for
  training) another ``--workdir``."""
  stack = contextlib.ExitStack()
  try:
    stack.enter_context(workdir_lib.lock(out_dir, enabled=enabled))
  except workdir_lib.WorkdirBusyError as e:
    holder = str(e).rsplit('; ', 1)[0]  # who holds it, without training's advice
    raise workdir_lib.WorkdirBusyError(
        f'{holder}; wait for it to finish, or pass --out_dir=<another directory>: eval.py '
        f'writes its outputs there and only reads --workdir') from None
  return stack


def report_only(config, out_dir: str) -> dict[str, Any]:
  """Cost report from the config alone; writes ``<out_dir>/report.json``, returns it."""
  config_lib.validate(config)
  input_shape, num_classes = accounting.input_spec(config)
  model = models.create_model(config.model, num_classes=num_classes)
  report = accounting.build_report(model, input_shape)
  if jax.process_index() == 0:
    with _lock_outputs(out_dir):
      _write_json(os.path.join(out_dir, 'report.json'), report)
    print(accounting.format_report(report), flush=True)
  return report


def evaluate_run(config, workdir: str, *, checkpoint: str = 'best', write_plots: bool = False,
                 out_dir: str | None = None) -> dict[str, Any]:
  """Restores a run's checkpoint, evaluates the three forms, writes ``eval.json``,
  ``report.json`` (with measured rates) and, if asked, the plots into ``out_dir`` (default
  ``workdir``, which is then locked like a training run's: a second writer is refused).
  Returns the results."""
  config_lib.validate(config)
  best = find_checkpoint(workdir, checkpoint)
  with _lock_outputs(out_dir or workdir, enabled=jax.process_index() == 0):
    return _evaluate_run(config, workdir, best, write_plots, out_dir or workdir)


def _evaluate_run(config, workdir: str, best: bool, write_plots: bool,
                  out_dir: str) -> dict[str, Any]:
  s, state, meta = train_lib.restore_run(config, workdir, best=best)
  model, dataset = s.model, s.dataset
  variables = train_lib.eval_variables(state)
  res = evaluate_modes(model, variables, dataset, batch_size=config.data.eval_batch_size,
                       progress=config.progress)
  which = 'best' if best else 'latest'
  res['checkpoint'] = {'which': which, 'epoch': meta.get('epoch')}
  report = accounting.build_report(model, dataset.input_shape, input_rates=res['input_rates'],
                                   neuron_rates=res['firing_rates'])
  if jax.process_index() != 0:
    return res
  print(f'{config.model.name} on {dataset.name}: {which} checkpoint (epoch '
        f'{meta.get("epoch", "?")}), {res["count"]} test examples')
  print(format_modes(res))
  print()
  print(accounting.format_report(report), flush=True)
  _write_json(os.path.join(out_dir, 'eval.json'), res)
  _write_json(os.path.join(out_dir, 'report.json'), report)
  if write_plots:
    from mfp_jax import plots  # Deferred: matplotlib's first import builds a font cache.
    paths = plots.write_all(out_dir, metrics_dir=workdir,
                            params=jax.device_get(variables['params']),
                            rates=res['firing_rates'], accuracy=res['accuracy'])
    print('plots: ' + ', '.join(paths), flush=True)
  return res
