"""One full training step (forward, loss, backward, optimizer update): MFP vs LIF vs the ANN.

  python -m benchmarks.train_step                       # VGGSNN 48x48 T=10, ResNet19 32x32 T=4
  python -m benchmarks.train_step --settings trainpy,untuned,malloc_only,flag_only
  python -m benchmarks.train_step --models resnet19 --reps 9 --mem-ts 2,4,8 \\
      --compute-dtype float32,bfloat16

The configs are the paper's (``configs/cifar10dvs.py``: VGGSNN on [B, T, 48, 48, 2] event
frames; ``configs/cifar10.py``: ResNet19 on [B, 32, 32, 3] images, direct encoding), with only
the neuron kind changed (and ``model.quant.compute_dtype`` with ``--compute-dtype``):

* ``mfp`` -- ``mfp_parallel`` (the default, blocked backward);
* ``lif`` -- LIF with hand-written BPTT (``lif_bptt``);
* ``relu`` -- the same 1-bit convs, norms and classifier with ReLU instead of a spiking
  neuron: an ANN on a batch of ``B*T`` images, the floor a spiking net cannot beat.

**Settings.** glibc malloc's tuning and XLA's flags hold for a whole process and are fixed
when it starts, so each setting runs in a fresh process of its own (one after another;
nothing else runs beside it). Each does exactly what ``train.py`` does at start-up,
``mfp_jax.runtime.configure()`` before JAX computes, with the environment that picks it:

* ``trainpy`` -- no opt-out: the tuned allocator and the XLA:CPU conv flag (what users get);
* ``untuned`` -- ``MFP_JAX_ALLOCATOR=default MFP_JAX_XLA_CPU=default``: glibc's defaults and
  XLA's own convs;
* ``malloc_only`` -- ``MFP_JAX_XLA_CPU=default``: the tuned allocator alone;
* ``flag_only`` -- ``MFP_JAX_ALLOCATOR=default``: the conv flag alone.

Within a process the contenders (kinds x compute dtypes) are timed interleaved
(``benchmarks/common.py``). The step is ``train_lib.train_step`` jitted with the state
donated, fed random data of the right shape (no data set needed). Peak scratch memory is
XLA's compiled ``memory_analysis().temp_size_in_bytes`` of the step against ``T`` (compile
only; once per XLA flag setting, since the allocator does not change what XLA compiles).
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks import common

MODELS = {  # name -> (config file, default batch)
    'vggsnn': ('configs/cifar10dvs.py', 4),
    'resnet19': ('configs/cifar10.py', 8),
    'digits': ('configs/digits.py', 8),  # tiny: for the smoke test, not for the README
}
KINDS = ('mfp', 'lif', 'relu')
COMPUTE_DTYPES = ('float32', 'bfloat16')
ALLOCATOR_ENV, XLA_ENV = 'MFP_JAX_ALLOCATOR', 'MFP_JAX_XLA_CPU'
# setting -> the opt-out variables its process starts with (the others are removed).
SETTINGS = {
    'trainpy': {},
    'untuned': {ALLOCATOR_ENV: 'default', XLA_ENV: 'default'},
    'malloc_only': {XLA_ENV: 'default'},
    'flag_only': {ALLOCATOR_ENV: 'default'},
}


def load_config(path: str):
  """``get_config()`` of a config file in this repository."""
  spec = importlib.util.spec_from_file_location('bench_config', os.path.join(common.ROOT, path))
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
               abstract: bool = False, compute_dtype: str = 'float32'):
  """``(jitted step, state, batch dict, anneal_t)`` for one model and neuron kind.

  ``abstract``: the state as shapes only (enough to compile; no initialization run).
  ``compute_dtype``: ``model.quant.compute_dtype`` (the hidden 1-bit layers).
  """
  import jax
  import jax.numpy as jnp
  import numpy as np
  from mfp_jax import models, train_lib
  cfg = load_config(MODELS[model_name][0])
  cfg.model.neuron.kind = kind
  cfg.model.quant.compute_dtype = compute_dtype
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


def contender_name(kind: str, dtype: str, dtypes) -> str:
  return kind if len(dtypes) == 1 else f'{kind}/{dtype}'


def time_model(model_name: str, batch: int, kinds, args, dtypes=('float32',)) -> dict:
  """Compiles every (kind, dtype) contender of one model and times them interleaved."""
  import jax
  records, contenders = {}, {}
  for dtype in dtypes:
    for kind in kinds:
      step, state, data, anneal = build_step(model_name, kind, batch=batch, compute_dtype=dtype)
      t0 = time.perf_counter()
      exe = step.lower(state, data, anneal).compile()
      rec = {'kind': kind, 'compute_dtype': dtype, 'compile_s': time.perf_counter() - t0,
             'temp_mib': common.mib(exe.memory_analysis().temp_size_in_bytes)}
      holder = {'state': state}

      def call(exe=exe, holder=holder, data=data, anneal=anneal):
        holder['state'], metrics = exe(holder['state'], data, anneal)  # the state is donated
        return metrics

      name = contender_name(kind, dtype, dtypes)
      contenders[name] = (call, lambda out, holder=holder: jax.block_until_ready(
          (out, holder['state'])))
      records[name] = rec
  timings = common.time_interleaved(contenders, reps=args.reps, warmup=args.warmup,
                                    pause_s=args.pause)
  for name, rec in records.items():
    rec.update(timings[name])
    ann = contender_name('relu', rec['compute_dtype'], dtypes)
    if ann in timings:
      rec['x_ann'] = rec['median_ms'] / timings[ann]['median_ms']
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


# --- One setting: runs in its own process -----------------------------------------------------


def run_setting(args, names, kinds, dtypes) -> dict:
  """Everything one setting measures, in this (fresh) process: ``configure()`` first, under
  the setting's opt-out variables (and no others)."""
  for k in (ALLOCATOR_ENV, XLA_ENV):
    os.environ.pop(k, None)
  os.environ.update(SETTINGS[args.worker])
  from mfp_jax import runtime  # imports JAX, computes nothing (as train.py does)
  rt = runtime.configure()
  env = common.environment({'setting': args.worker, 'runtime': rt, 'allocator': rt['allocator'],
                            'xla_flags': os.environ.get('XLA_FLAGS', ''),
                            'opt_outs': {k: os.environ[k] for k in (ALLOCATOR_ENV, XLA_ENV)
                                         if k in os.environ},
                            'reps': args.reps, 'cores_pinned': args.cores or None})
  print(f'# {args.worker}: allocator {rt["allocator"]["mode"]}, XLA:CPU {rt["xla_cpu"]["mode"]}'
        f' ({rt["xla_cpu"]["detail"]}); load {env["loadavg_start"]}', file=sys.stderr, flush=True)
  results = {}
  mem_ts = [int(v) for v in args.mem_ts.split(',') if v]
  for name in names:
    cfg = load_config(MODELS[name][0])
    batch = args.batch or MODELS[name][1]
    rec = time_model(name, batch, kinds, args, dtypes)
    mem = memory_vs_t(name, batch, mem_ts, kinds) if mem_ts else {}
    results[name] = {'T': cfg.model.T, 'batch': batch, 'steps': rec, 'memory_mib_vs_T': mem}
    print(f'  {args.worker} {name}: ' + ', '.join(f'{k} {r["median_ms"]:.0f} ms'
                                                  for k, r in rec.items()),
          file=sys.stderr, flush=True)
  env['loadavg_end'] = common._loadavg()
  return {'environment': env, 'results': results}


def _setting_env(setting: str) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in (ALLOCATOR_ENV, XLA_ENV)}
  env.update(SETTINGS[setting])
  env.setdefault('JAX_PLATFORMS', 'cpu')
  return env


def spawn_setting(setting: str, argv: list[str], mem_ts: str) -> dict:
  """Runs this script for one setting in a fresh process; returns what it measured."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, 'setting.json')
    cmd = [sys.executable, '-m', 'benchmarks.train_step', *argv, '--worker', setting,
           '--mem-ts', mem_ts, '--out', out]
    r = subprocess.run(cmd, cwd=common.ROOT, env=_setting_env(setting), stdout=subprocess.PIPE,
                       text=True)
    if r.returncode != 0 or not os.path.exists(out):
      raise RuntimeError(f'setting {setting} failed ({r.returncode}): {" ".join(cmd)}\n'
                         f'{r.stdout[-2000:]}')
    with open(out) as f:
      return json.load(f)


def print_tables(by_setting: dict, names, kinds) -> None:
  first = next(iter(by_setting))
  for name in names:
    any_rec = by_setting[first]['results'][name]
    print(f'\n## {name}, T = {any_rec["T"]}, batch {any_rec["batch"]} '
          f'({any_rec["batch"] * any_rec["T"]} images for the ANN)\n')
    rows = []
    for setting, rec in by_setting.items():
      env = rec['environment']
      where = (f'{setting} (malloc {env["runtime"]["allocator"]["mode"]}, '
               f'conv flag {"on" if env["runtime"]["xla_cpu"]["mode"] == "tuned" else "off"})')
      for cname, r in rec['results'][name]['steps'].items():
        base = by_setting[first]['results'][name]['steps'].get(cname)
        rows.append([where, cname, r['median_ms'], r['min_ms'], r['cpu_ms'], r.get('x_ann'),
                     r['median_ms'] / base['median_ms'] if base else None, r['faults'],
                     r['temp_mib'], r['compile_s'], env['loadavg_start'][0]])
    print(common.markdown_table(
        ['setting', 'neuron', 'median ms', 'min ms', 'cpu ms', 'x ANN', f'x {first}',
         'faults/step', 'scratch MiB', 'compile s', 'load'], rows))
    for setting, rec in by_setting.items():
      mem = rec['results'][name]['memory_mib_vs_T']
      if mem:
        print(f'\nPeak compiled scratch memory (MiB) vs T, batch {any_rec["batch"]}, '
              f'{setting} (XLA_FLAGS {rec["environment"]["xla_flags"] or "unset"!r}):\n')
        print(common.markdown_table(['T'] + kinds, [[t] + [mem[t][k] for k in kinds]
                                                    for t in mem]))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--models', default='vggsnn,resnet19', help=f'subset of {",".join(MODELS)}')
  p.add_argument('--batch', type=int, default=0, help='batch size (0: per-model default)')
  p.add_argument('--kinds', default=','.join(KINDS), help=f'subset of {",".join(KINDS)}')
  p.add_argument('--compute-dtype', default='float32',
                 help='model.quant.compute_dtype: float32, bfloat16, or both (interleaved)')
  p.add_argument('--settings', default='trainpy,untuned',
                 help=f'process settings, each in a fresh process: {",".join(SETTINGS)}')
  p.add_argument('--mem-ts', default='2,4,8,10,16', help='T values for the memory table '
                 '("" to skip)')
  p.add_argument('--cores', type=int, default=0, help='pin to this many cores (0: all)')
  p.add_argument('--worker', default=None, help=argparse.SUPPRESS)  # one setting, in-process
  common.add_common_flags(p, reps=5)
  p.set_defaults(allocator=None)
  argv = sys.argv[1:] if argv is None else list(argv)
  args = p.parse_args(argv)
  if args.allocator is not None:
    p.error('--allocator is not used here: pick process settings with --settings '
            f'({",".join(SETTINGS)})')
  names = [m for m in args.models.split(',') if m]
  kinds = [k for k in args.kinds.split(',') if k]
  dtypes = [d for d in args.compute_dtype.split(',') if d]
  settings = [s for s in args.settings.split(',') if s]
  bad = ((set(names) - set(MODELS)) | (set(kinds) - set(KINDS)) | (set(dtypes) - set(
      COMPUTE_DTYPES)) | (set(settings) - set(SETTINGS)) | ({args.worker} - {None, *SETTINGS}))
  if bad or not settings:
    p.error(f'unknown models, kinds, dtypes or settings {sorted(bad)}; allowed: {list(MODELS)}, '
            f'{list(KINDS)}, {list(COMPUTE_DTYPES)}, {list(SETTINGS)}')
  if args.cores:
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:args.cores]))
  if args.worker:
    payload = run_setting(args, names, kinds, dtypes)
    with open(args.out, 'w') as f:
      json.dump(payload, f, indent=1)
    return payload

  env = common.environment({'settings': {s: SETTINGS[s] for s in settings},
                            'compute_dtypes': dtypes, 'reps': args.reps,
                            'cores_pinned': args.cores or None})
  print(f'# training step: settings {", ".join(settings)}, {env["cpu"]}, {env["cpu_count"]} '
        f'cores, load {env["loadavg_start"]}; one fresh process per setting')
  passthrough = [a for i, a in enumerate(argv) if not _drop(argv, i)]
  by_setting, mem_done = {}, set()
  for setting in settings:
    flag_on = SETTINGS[setting].get(XLA_ENV) != 'default'
    mem_ts = '' if flag_on in mem_done else args.mem_ts  # the allocator changes no compile
    mem_done.add(flag_on)
    by_setting[setting] = spawn_setting(setting, passthrough, mem_ts)
  print_tables(by_setting, names, kinds)
  out = common.write_json('train_step', {'environment': env, 'settings': by_setting}, args.out)
  print(f'\nwrote {out}')
  return by_setting


_OWN = ('--settings', '--mem-ts', '--out', '--worker')


def _drop(argv, i) -> bool:
  """Whether ``argv[i]`` is one of the flags the coordinator sets for its workers itself."""
  return argv[i].split('=', 1)[0] in _OWN or (i > 0 and argv[i - 1] in _OWN)


if __name__ == '__main__':
  main()
