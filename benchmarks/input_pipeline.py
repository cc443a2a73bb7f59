"""Does the input pipeline starve training? Batches/s of each loader next to the train step.

  python -m benchmarks.input_pipeline                       # all data sets, batch 64
  python -m benchmarks.input_pipeline --datasets digits --batch_size 8 --train_steps 2  # smoke

The real data sets are not on this machine, so each loader reads synthetic examples written in
its real on-disk format by tests/datagen.py (a prepared tfds array_record folder, a folder of
JPEGs, AEDAT4 recordings framed once into the on-disk cache): the same code path and file
formats as real data, at the real image sizes. For each data set: the train split's batches/s
(read + decode + preprocess + augment, one process), the train step's steps/s for that data
set's paper config (its real model, jitted, on this machine's devices), and their ratio
(> 1: the pipeline keeps up). Prints a markdown table; writes JSON.
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


from benchmarks import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, 'tests'))
sys.path.insert(0, ROOT)

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
  path = os.path.join(ROOT, 'configs', f'{CONFIG_OF[name]}.py')
  spec = importlib.util.spec_from_file_location(name, path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def pipeline_rate(dataset, batch_size: int, epochs: int) -> tuple[float, int]:
  """Median batches/s over ``epochs`` passes of the train split (augmentation on)."""
  from mfp_jax import data as data_lib
  rates, nb = [], 0
  for epoch in range(epochs):
    t0 = time.perf_counter()
    nb = sum(1 for _ in data_lib.iterate_batches(dataset, 'train', batch_size=batch_size,
                                                 epoch=epoch))
    rates.append(nb / (time.perf_counter() - t0))
  return statistics.median(rates), nb


def train_step_rate(config, dataset, batch_size: int, steps: int) -> tuple[float, float]:
  """(steps/s median over ``steps`` after one warm-up step, compile seconds)."""
  import jax
  import jax.numpy as jnp
  from mfp_jax import data as data_lib
  from mfp_jax import models
  from mfp_jax import train_lib
  model = models.create_model(config.model, num_classes=dataset.num_classes)
  tx = train_lib.create_optimizer(config.optim, lambda s: 0.01)
  state = train_lib.create_train_state(model, tx, dataset.input_shape, jax.random.key(0))
  step = jax.jit(functools.partial(train_lib.train_step, model=model, tx=tx,
                                   loss_cfg=config.loss, skip_nonfinite=False),
                 donate_argnums=0)
  batch = next(data_lib.iterate_batches(dataset, 'train', batch_size=batch_size))
  batch = jax.device_put(batch)
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


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--datasets', nargs='+', default=list(CONFIG_OF), choices=list(CONFIG_OF))
  p.add_argument('--batch_size', type=int, default=64)
  p.add_argument('--examples', type=int, default=640, help='synthetic train examples')
  p.add_argument('--epochs', type=int, default=3, help='passes timed per pipeline')
  p.add_argument('--train_steps', type=int, default=5,
                 help='timed train steps per config; 0 skips the train step (pipelines only)')
  p.add_argument('--out', default=None, help='JSON path (default benchmarks/results/)')
  args = p.parse_args(argv)
  from mfp_jax import data as data_lib
  rows = []
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
      bps, nb = pipeline_rate(dataset, args.batch_size, args.epochs)
      sps, compile_s = float('nan'), float('nan')
      if args.train_steps > 0:
        sps, compile_s = train_step_rate(config, dataset, args.batch_size, args.train_steps)
      rows.append({'dataset': name, 'model': config.model.name, 'T': config.model.T,
                   'train_examples': len(dataset.train), 'batches': nb,
                   'pipeline_batches_per_s': bps, 'train_steps_per_s': sps,
                   'headroom': bps / sps, 'prepare_s': prepare_s, 'compile_s': compile_s})
      print(f'{name}: {bps:.1f} batches/s vs {sps:.3f} steps/s', file=sys.stderr, flush=True)
  print(common.markdown_table(
      ['data set', 'model, T', 'pipeline batches/s', 'train steps/s', 'headroom'],
      [[r['dataset'], f"{r['model']}, {r['T']}", f"{r['pipeline_batches_per_s']:.1f}",
        f"{r['train_steps_per_s']:.3f}", f"{r['headroom']:.0f}x"] for r in rows]))
  common.write_json('input_pipeline', {'batch_size': args.batch_size, 'rows': rows}, args.out)
  return rows


if __name__ == '__main__':
  main()
