"""Does the input pipeline starve training? Batches/s of each loader next to the train step.

  python -m benchmarks.input_pipeline                       # all data sets, batch 64
  python -m benchmarks.input_pipeline --datasets digits --batch_size 8 --train_steps 2  # smoke

The real data sets are not on this machine, so each loader reads synthetic examples written in
its real on-disk format by tests/datagen.py (a prepared tfds array_record folder, a folder of
JPEGs, AEDAT4 recordings framed once into the on-disk cache): the same code path and file
formats as real data, at the real image sizes.

1. Loading: the train split's batches/s (read + decode + preprocess + augment) through
   ``data.iterate_batches`` in the calling thread (what train.py did before
   ``mfp_jax.pipeline``), then through ``pipeline.load_batches`` with ``--threads`` threads
   in this process and with each of ``--workers`` worker processes. Rates are steady state:
   the clock starts once the batches buffered while the pipeline started are taken; the
   start itself (worker processes spawn and import) is reported as ``start_s``.
2. The train step's steps/s for that data set's paper config (its real model, jitted, on
   this machine's devices), and the headroom: the best loading rate over the step rate.
3. Overlap (``--overlap``): train.py's step loop (batch to
   device, jitted step, async dispatch) on a small digits_cnn, fed by each loading setting;
   its ms/step next to the loading alone (L, in one thread) and the step alone (S). Serial
   loading costs L + S per step, one loader overlapped with the step max(L, S), and k
   loaders max(L / k, S). Default case: digits behind a source that waits
   ``--read_latency_ms`` per batch (storage latency: loading that does not compete with the
   step for this machine's two cores); ``--overlap tinyimagenet`` adds PIL-decoded JPEGs.

Prints markdown tables; writes JSON.
"""

from __future__ import annotations

import argparse
import functools
import os
import pathlib
import statistics
import sys
import tempfile
import time
from typing import Any

from benchmarks import common

sys.path.insert(0, os.path.join(common.ROOT, 'tests'))
sys.path.insert(0, common.ROOT)

CONFIG_OF = {'digits': 'digits', 'cifar10': 'cifar10', 'tinyimagenet': 'tinyimagenet',
             'cifar10dvs': 'cifar10dvs'}


def write_data(name: str, root: pathlib.Path, n: int) -> None:
  """Synthetic examples in the data set's real on-disk format under ``root``."""
  import datagen
  if name == 'cifar10':
    datagen.write_tfds_cifar(root, 'cifar10', n_train=n, n_test=16)
  elif name == 'tinyimagenet':
    datagen.write_tinyimagenet(root / 'tiny-imagenet-200', wnids=tuple(
        f'n{i:08d}' for i in range(10)), n_train=max(n // 10, 1), n_val=16)
  elif name == 'cifar10dvs':
    datagen.write_cifar10dvs(root, per_class=max(n // 10, 10), n_events=20000)


def load_config(name: str):
  import importlib.util
  path = os.path.join(common.ROOT, 'configs', f'{CONFIG_OF[name]}.py')
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def settings(threads: list[int], workers: list[int], prefetch: int) -> dict[str, dict | None]:
  """Loading settings by name: ``None`` is ``data.iterate_batches`` in the caller's thread."""
  out: dict[str, dict | None] = {'in-thread': None}
  for t in threads:
    out[f'{t} thread{"s" * (t > 1)}'] = dict(num_workers=0, num_threads=t, prefetch=prefetch)
  for w in workers:
    if w:
      out[f'{w} worker{"s" * (w > 1)}'] = dict(num_workers=w, num_threads=1, prefetch=prefetch)
  return out


def open_batches(dataset, setting: dict | None, batch_size: int, epoch: int = 0):
  from mfp_jax import data as data_lib
  from mfp_jax import pipeline
  kw = dict(batch_size=batch_size, epoch=epoch)
  if setting is None:
    return data_lib.iterate_batches(dataset, 'train', **kw)
  return pipeline.load_batches(dataset, 'train', **kw, **setting)


def _buffered(setting: dict | None) -> int:
  """Batches a pipeline may hold when its first batch arrives (not counted in a rate)."""
  if not setting:
    return 0
  return setting['prefetch'] * max(setting['num_workers'], 1)


MIN_TIMED = 8  # batches after the buffered ones; fewer are not a steady rate (reported nan)


def loading_rate(dataset, setting: dict | None, batch_size: int,
                 epochs: int) -> dict[str, Any]:
  """Steady batches/s (median over ``epochs``; nan when an epoch has fewer than
  ``MIN_TIMED`` batches beyond those buffered at the start) and seconds to the first batch."""
  rates, starts, nb = [], [], 0
  for epoch in range(epochs):
    t0 = time.perf_counter()
    it = open_batches(dataset, setting, batch_size, epoch)
    next(it)
    starts.append(time.perf_counter() - t0)
    nb = 1
    for _ in range(_buffered(setting)):  # built while it started: not a steady rate
      nb += next(it, None) is not None
    t1, k = time.perf_counter(), 0
    for _ in it:
      k += 1
    t2 = time.perf_counter()
    nb += k
    it.close()  # not timed: after the last batch, workers exit in the background
    if k >= MIN_TIMED:
      rates.append(k / (t2 - t1))
  return {'batches_per_s': statistics.median(rates) if rates else float('nan'),
          'start_s': statistics.median(starts), 'batches': nb, 'timed_batches': k}


def create_step(config, dataset):
  """(jitted train step with donated state, initial state) for ``config.model``."""
  import jax
  from mfp_jax import models
  from mfp_jax import train_lib
  model = models.create_model(config.model, num_classes=dataset.num_classes)
  tx = train_lib.create_optimizer(config.optim, lambda s: 0.01)
  state = train_lib.create_train_state(model, tx, dataset.input_shape, jax.random.key(0))
  step = jax.jit(functools.partial(train_lib.train_step, model=model, tx=tx,
                                   loss_cfg=config.loss, skip_nonfinite=False),
                 donate_argnums=0)
  return step, state


def train_step_rate(config, dataset, batch_size: int, steps: int) -> tuple[float, float]:
  """(steps/s median over ``steps`` after one warm-up step, compile seconds)."""
  import jax
  import jax.numpy as jnp
  from mfp_jax import data as data_lib
  step, state = create_step(config, dataset)
  batch = jax.device_put(next(data_lib.iterate_batches(dataset, 'train',
                                                       batch_size=batch_size)))
  t0 = time.perf_counter()
  state, m = step(state, batch, jnp.float32(1.0))
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    state, m = step(state, batch, jnp.float32(1.0))
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  return 1.0 / statistics.median(times), compile_s


# --- Overlap: train.py's loop fed by each setting ------------------------------------------


class SlowSource:
  """A source that waits ``latency_s`` per batch read (storage latency; the GIL is free)."""

  def __init__(self, source, latency_s: float):
    self.source, self.latency_s = source, latency_s

  def __len__(self) -> int:
    return len(self.source)

  def get_batch(self, indices):
    time.sleep(self.latency_s)
    return self.source.get_batch(indices)


def step_loop(step, state, batches, t) -> tuple[Any, float, int]:
  """train_loop.Run.train_epoch's loop: (state, seconds per step after the first batch
  arrived, steps). Each batch goes to the device and into the jitted step (async dispatch);
  the clock stops when the last step is done."""
  import jax
  t0, n, m = None, 0, None
  for local in batches:
    if t0 is None:
      t0 = time.perf_counter()
    state, m = step(state, jax.device_put(local), t)
    n += 1
  jax.block_until_ready(m)
  return state, (time.perf_counter() - t0) / n, n


def overlap(name: str, dataset, batch_size: int, named: dict[str, dict | None], reps: int,
            channels: tuple[int, ...]) -> dict[str, Any]:
  """ms/step of the step loop fed by each setting, next to loading alone and the step alone
  (the digits config's digits_cnn, with ``channels``, on ``dataset``'s inputs)."""
  import jax
  import jax.numpy as jnp
  from mfp_jax import data as data_lib
  config = load_config('digits')
  config.model.channels = tuple(channels)
  step, state = create_step(config, dataset)
  t = jnp.float32(1.0)
  batch = jax.device_put(next(data_lib.iterate_batches(dataset, 'train', batch_size=batch_size)))
  state, m = step(state, batch, t)  # compile
  jax.block_until_ready(m)
  nb = len(data_lib.EpochBatches(dataset, 'train', batch_size=batch_size))
  row: dict[str, Any] = {'case': name, 'batches': nb, 'channels': list(channels)}
  step_s, load_s, loops = [], [], {k: [] for k in named}
  for rep in range(reps):  # interleaved, so a slow phase of the machine hits all alike
    t0 = time.perf_counter()
    for _ in range(nb):
      state, m = step(state, batch, t)
    jax.block_until_ready(m)
    step_s.append((time.perf_counter() - t0) / nb)
    t0 = time.perf_counter()
    for _ in data_lib.iterate_batches(dataset, 'train', batch_size=batch_size, epoch=rep):
      pass
    load_s.append((time.perf_counter() - t0) / nb)
    for k, setting in named.items():
      batches = open_batches(dataset, setting, batch_size, epoch=rep)
      state, per_step, _ = step_loop(step, state, batches, t)
      batches.close()
      loops[k].append(per_step)
  ms = lambda v: 1e3 * statistics.median(v)
  row.update({'load_ms': ms(load_s), 'step_ms': ms(step_s)})
  row['serial_ms'] = row['load_ms'] + row['step_ms']
  row['overlapped_ms'] = max(row['load_ms'], row['step_ms'])
  row['loop_ms'] = {k: ms(v) for k, v in loops.items()}
  return row


def with_latency(dataset, latency_ms: float):
  import dataclasses
  return dataclasses.replace(dataset, name=f'{dataset.name}+{latency_ms:g}ms',
                             train=SlowSource(dataset.train, latency_ms / 1e3))


# --- Main --------------------------------------------------------------------------------


def _rate_table(rows, names) -> str:
  head = ['data set', 'model, T', 'train steps/s'] + [f'{n} b/s' for n in names] + [
      'worker start s', 'headroom']
  body = []
  for r in rows:
    s = r['settings']
    starts = [f"{s[n]['start_s']:.1f}" for n in names if 'worker' in n]
    body.append([r['dataset'], f"{r['model']}, {r['T']}", f"{r['train_steps_per_s']:.3f}"] +
                [f"{s[n]['batches_per_s']:.1f}" for n in names] +
                ['/'.join(starts) or '-', f"{r['headroom']:.0f}x"])
  return common.markdown_table(head, body)


def _overlap_table(rows, names) -> str:
  head = ['case', 'load L ms', 'step S ms', 'L + S', 'max(L, S)'] + [f'{n} ms' for n in names]
  body = [[r['case'], f"{r['load_ms']:.1f}", f"{r['step_ms']:.1f}", f"{r['serial_ms']:.1f}",
           f"{r['overlapped_ms']:.1f}"] + [f"{r['loop_ms'][n]:.1f}" for n in names]
          for r in rows]
  return common.markdown_table(head, body)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--datasets', nargs='+', default=list(CONFIG_OF), choices=list(CONFIG_OF))
  p.add_argument('--batch_size', type=int, default=64)
  p.add_argument('--examples', type=int, default=640, help='synthetic train examples')
  p.add_argument('--epochs', type=int, default=3, help='passes timed per loading setting')
  p.add_argument('--threads', type=int, nargs='+', default=[1, 2],
                 help='thread counts timed in this process (pipeline.load_batches)')
  p.add_argument('--workers', type=int, nargs='+', default=[1, 2],
                 help='worker-process counts timed (0 or nothing: none)')
  p.add_argument('--prefetch', type=int, default=4, help='batches built ahead per process')
  p.add_argument('--train_steps', type=int, default=5,
                 help="timed train steps of each paper config; 0 skips them")
  p.add_argument('--overlap', nargs='*', default=['digits'],
                 help='data sets (of --datasets) timed in the step loop, digits behind '
                      '--read_latency_ms; --overlap alone: none. (Tiny-ImageNet: its '
                      '64x64 step takes ~2 s on 2 CPU cores, so the loop is step-bound '
                      'whatever feeds it)')
  p.add_argument('--read_latency_ms', type=float, default=60.0)
  p.add_argument('--overlap_channels', type=int, nargs='+', default=[8, 16, 16],
                 help="digits_cnn's channels in the step loop (a step of tens of ms here)")
  p.add_argument('--overlap_reps', type=int, default=3)
  p.add_argument('--out', default=None, help='JSON path (default benchmarks/results/)')
  args = p.parse_args(argv)
  from mfp_jax import data as data_lib
  named = settings(args.threads, args.workers, args.prefetch)
  rows, overlaps = [], []
  load_avg = os.getloadavg()
  with tempfile.TemporaryDirectory() as tmp:
    for name in args.datasets:
      root = pathlib.Path(tmp) / name
      write_data(name, root, args.examples)
      config = load_config(name)
      if 'data_dir' in config.data:
        config.data.data_dir = str(root)
      t0 = time.perf_counter()
      dataset = data_lib.create_dataset(config.data, T=config.model.T)
      prepare_s = time.perf_counter() - t0  # DVS: framing every recording into the cache
      per = {k: loading_rate(dataset, s, args.batch_size, args.epochs) for k, s in named.items()}
      for k, v in per.items():
        print(f'{name} {k}: {v["batches_per_s"]:.1f} batches/s (start {v["start_s"]:.2f} s)',
              file=sys.stderr, flush=True)
      sps, compile_s = float('nan'), float('nan')
      if args.train_steps > 0:
        sps, compile_s = train_step_rate(config, dataset, args.batch_size, args.train_steps)
      best = max(v['batches_per_s'] for v in per.values())
      rows.append({'dataset': name, 'model': config.model.name, 'T': config.model.T,
                   'train_examples': len(dataset.train), 'batches': per['in-thread']['batches'],
                   'pipeline_batches_per_s': per['in-thread']['batches_per_s'],
                   'settings': per, 'best_batches_per_s': best, 'train_steps_per_s': sps,
                   'headroom': best / sps, 'prepare_s': prepare_s, 'compile_s': compile_s})
      print(f'{name}: best {best:.1f} batches/s vs {sps:.3f} steps/s', file=sys.stderr,
            flush=True)
      if name in args.overlap:
        case = dataset if name != 'digits' else with_latency(dataset, args.read_latency_ms)
        overlaps.append(overlap(case.name, case, args.batch_size, named, args.overlap_reps,
                                args.overlap_channels))
        print(f'overlap {case.name}: {overlaps[-1]}', file=sys.stderr, flush=True)
  names = list(named)
  print(f'batch {args.batch_size}; load average {load_avg[0]:.1f} {load_avg[1]:.1f} '
        f'{load_avg[2]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end '
        f'({os.cpu_count()} cores); prefetch {args.prefetch}')
  print(_rate_table(rows, names))
  if overlaps:
    print()
    print(_overlap_table(overlaps, names))
  common.write_json('input_pipeline', {
      'batch_size': args.batch_size, 'prefetch': args.prefetch, 'settings': named,
      'load_average': {'start': load_avg, 'end': os.getloadavg()}, 'rows': rows,
      'overlap': overlaps}, args.out)
  return rows


if __name__ == '__main__':
  main()
