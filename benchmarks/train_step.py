"""One full training step (forward, loss, backward, optimizer update): MFP vs LIF vs the ANN.

  python -m benchmarks.train_step                       # VGGSNN 48x48 T=10, ResNet19 32x32 T=4
  python -m benchmarks.train_step --models resnet19 --batch 8 --reps 9 --mem-ts 2,4,8

The configs are the paper's (``configs/cifar10dvs.py``: VGGSNN on [B, T, 48, 48, 2] event
frames; ``configs/cifar10.py``: ResNet19 on [B, 32, 32, 3] images, direct encoding), with only
the neuron kind changed:

* ``mfp`` -- ``mfp_parallel`` (the default, blocked backward);
* ``lif`` -- LIF with hand-written BPTT (``lif_bptt``);
* ``relu`` -- the same 1-bit convs, norms and classifier with ReLU instead of a spiking
  neuron: an ANN on a batch of ``B*T`` images, the floor a spiking net cannot beat.

The step is ``train_lib.train_step`` jitted with the state donated, fed random data of the
right shape (no data set needed). Peak scratch memory is XLA's compiled
``memory_analysis().temp_size_in_bytes`` of the step, reported against ``T``.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import os
import time

from benchmarks import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = {  # name -> (config file, default batch)
    'vggsnn': ('configs/cifar10dvs.py', 4),
    'resnet19': ('configs/cifar10.py', 8),
    'digits': ('configs/digits.py', 8),  # tiny: for the smoke test, not for the README
}
KINDS = ('mfp', 'lif', 'relu')


def load_config(path: str):
  """``get_config()`` of a config file in this repository."""
  spec = importlib.util.spec_from_file_location('bench_config', os.path.join(ROOT, path))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config()


def input_shape(cfg) -> tuple[int, ...]:
  if cfg.model.name == 'vggsnn':
    return (cfg.model.T, cfg.data.size, cfg.data.size, 2)  # event frames [T, H, W, P]
  if cfg.model.name == 'digits_cnn':
    return (8, 8, 1)
  return (32, 32, 3)


def build_step(model_name: str, kind: str, *, t: int | None = None, batch: int,
               abstract: bool = False):
  """``(jitted step, state, batch dict, anneal_t)`` for one model and neuron kind.

  ``abstract``: the state as shapes only (enough to compile; no initialization run).
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  from mfp_jax import models, train_lib
  cfg = load_config(MODELS[model_name][0])
  cfg.model.neuron.kind = kind
  if model_name == 'digits':
    cfg.model.channels = (8, 16, 16)
  if t is not None:
    cfg.model.T = t
  shape = input_shape(cfg)
  model = models.create_model(cfg.model, num_classes=10)
  tx = train_lib.create_optimizer(cfg.optim,
                                  train_lib.create_learning_rate_fn(cfg.optim, 100, 1000))
  init = functools.partial(train_lib.create_train_state, model, tx, shape)
  state = (jax.eval_shape if abstract else jax.jit(init))(
      *([init] if abstract else []), jax.random.key(0))
  rng = np.random.default_rng(0)
  data = {'image': jnp.asarray(rng.normal(size=(batch,) + shape), jnp.float32),
          'label': jnp.asarray(rng.integers(0, 10, size=batch), jnp.int32),
          'mask': jnp.ones((batch,), jnp.float32)}
  step = jax.jit(functools.partial(train_lib.train_step, model=model, tx=tx, loss_cfg=cfg.loss,
                                   skip_nonfinite=False), donate_argnums=0)
  return step, state, data, jnp.float32(1.0)


def time_model(model_name: str, batch: int, kinds, args) -> dict:
  import jax
  records, contenders = {}, {}
  for kind in kinds:
    step, state, data, anneal = build_step(model_name, kind, batch=batch)
    t0 = time.perf_counter()
    exe = step.lower(state, data, anneal).compile()
    rec = {'compile_s': time.perf_counter() - t0,
           'temp_mib': common.mib(exe.memory_analysis().temp_size_in_bytes)}
    holder = {'state': state}

    def call(exe=exe, holder=holder, data=data, anneal=anneal):
      holder['state'], metrics = exe(holder['state'], data, anneal)  # the state is donated
      return metrics

    contenders[kind] = (call, lambda out, holder=holder: jax.block_until_ready(
        (out, holder['state'])))
    records[kind] = rec
  timings = common.time_interleaved(contenders, reps=args.reps, warmup=args.warmup,
                                    pause_s=args.pause)
  for kind, rec in records.items():
    rec.update(timings[kind])
    if 'relu' in timings:
      rec['x_ann'] = rec['median_ms'] / timings['relu']['median_ms']
  return records


def memory_vs_t(model_name: str, batch: int, ts, kinds) -> dict:
  """Compiled peak scratch (MiB) of the step for each ``T`` and kind (compile only)."""
  out = {}
  for t in ts:
    out[str(t)] = {}
    for kind in kinds:
      step, state, data, anneal = build_step(model_name, kind, t=t, batch=batch, abstract=True)
      mem = step.lower(state, data, anneal).compile().memory_analysis()
      out[str(t)][kind] = common.mib(mem.temp_size_in_bytes)
  return out


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--models', default='vggsnn,resnet19', help=f'subset of {",".join(MODELS)}')
  p.add_argument('--batch', type=int, default=0, help='batch size (0: per-model default)')
  p.add_argument('--kinds', default=','.join(KINDS), help=f'subset of {",".join(KINDS)}')
  p.add_argument('--mem-ts', default='2,4,8,10,16', help='T values for the memory table '
                 '("" to skip)')
  p.add_argument('--cores', type=int, default=0, help='pin to this many cores (0: all)')
  common.add_common_flags(p, reps=5)
  args = p.parse_args(argv)
  if args.cores:
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:args.cores]))
  alloc = common.set_allocator(args.allocator)
  names = [m for m in args.models.split(',') if m]
  kinds = [k for k in args.kinds.split(',') if k]
  bad = (set(names) - set(MODELS)) | (set(kinds) - set(KINDS))
  if bad:
    p.error(f'unknown models or kinds {sorted(bad)}; allowed: {list(MODELS)}, {list(KINDS)}')
  env = common.environment({'reps': args.reps, 'cores_pinned': args.cores or None})
  print(f'# training step: allocator {alloc["mode"]}, {env["cpu"]}, {env["cpu_count"]} cores, '
        f'load {env["loadavg_start"]}')
  results = {}
  for name in names:
    cfg = load_config(MODELS[name][0])
    batch = args.batch or MODELS[name][1]
    rec = time_model(name, batch, kinds, args)
    mem_ts = [int(v) for v in args.mem_ts.split(',') if v]
    mem = memory_vs_t(name, batch, mem_ts, kinds) if mem_ts else {}
    results[name] = {'T': cfg.model.T, 'batch': batch, 'steps': rec, 'memory_mib_vs_T': mem}
    print(f'\n## {name}, T = {cfg.model.T}, batch {batch} ({batch * cfg.model.T} images '
          f'for the ANN)\n')
    print(common.markdown_table(
        ['neuron', 'median ms', 'min ms', 'cpu ms', 'x ANN', 'scratch MiB', 'compile s'],
        [[k, r['median_ms'], r['min_ms'], r['cpu_ms'], r.get('x_ann'), r['temp_mib'],
          r['compile_s']] for k, r in rec.items()]))
    if mem:
      print(f'\nPeak compiled scratch memory (MiB) vs T, batch {batch}:\n')
      print(common.markdown_table(['T'] + kinds, [[t] + [mem[t][k] for k in kinds]
                                                  for t in mem]))
  out = common.write_json('train_step', {'environment': env, 'results': results}, args.out)
  print(f'\nwrote {out}')


if __name__ == '__main__':
  main()
