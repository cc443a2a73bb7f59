"""One training step of mfp_jax beside its PyTorch + SpikingJelly twin, one process each.

  python -m benchmarks.peers --step                       # VGGSNN b4 T=10, ResNet19 b8 T=4
  python -m benchmarks.peers --step --models vggsnn --reps 5 --allocator default,tuned \\
      --jax-python /work/venv/bin/python --torch-python /work/venv-torch/bin/python

Contenders, each the same network from the same config (``configs/cifar10dvs.py``,
``configs/cifar10.py``) with random inputs of the data's shape:

* ``jax:<kind>`` -- ``train_lib.train_step`` jitted with the state donated, as
  ``benchmarks.train_step`` builds it (``mfp``: ``mfp_parallel``; ``lif``: ``lif_bptt``), in
  a process started as train.py starts (``runtime.tune_xla_cpu``: the XLA:CPU conv flag;
  ``MFP_JAX_XLA_CPU=default`` leaves it off);
* ``torch:<kind>`` -- ``benchmarks.torch_twin``: ``mfp`` -> SpikingJelly ``MaskedPSN``,
  ``lif`` -> ``LIFNode`` (SJ picks its CPU kernel itself), ``relu`` -> ``ReLU``; forward,
  loss, backward and the SGD update in eager PyTorch.

Method: a coordinator (this process: it computes nothing) starts one long-lived worker per
contender, one after another, so that JAX's and torch's thread pools and allocators never
share a process and no two builds overlap. Each worker sets the allocator, builds, compiles
and runs ``--warmup`` untimed steps, then waits. In each round the coordinator asks every
worker in turn (the order rotated by one per round, a ``--pause`` before each, so the last
worker's spinning threads have gone to sleep) to run one step; the worker times it itself
(``perf_counter`` around the step until its results are ready). Reported: median and min
wall time, median process CPU time, and the median over rounds of the per-round ratio to
``jax:mfp`` (paired, so a slow phase of a shared machine cancels). Workers talk JSON lines
on stdin/stdout; their stderr goes to a log that is shown when one fails.

Torch needs an environment of its own (its requirements pull a CUDA build otherwise)::

  python3 -m venv /work/venv-torch && . /work/venv-torch/bin/activate
  pip install torch==2.13.0 && pip install --no-deps spikingjelly loguru
  pip install -e /work/main

An interpreter that cannot import its framework is skipped with one line; if that leaves
only one framework (and ``--frameworks`` did not ask for one), nothing else runs.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

from benchmarks import common

FRAMEWORKS = ('jax', 'torch')
KINDS = ('mfp', 'lif', 'relu')
WHAT = {('jax', 'mfp'): 'mfp_jax mfp_parallel', ('jax', 'lif'): 'mfp_jax lif_bptt',
        ('jax', 'relu'): 'mfp_jax ReLU (ANN)', ('torch', 'mfp'): 'SJ MaskedPSN(k=T)',
        ('torch', 'lif'): 'SJ LIFNode', ('torch', 'relu'): 'torch ReLU (ANN)'}
REFERENCE = ('jax', 'mfp')


def contender_config(model_name: str, kind: str):
  """The config ``benchmarks.train_step.build_step`` uses for ``(model_name, kind)``."""
  from benchmarks import train_step
  cfg = train_step.load_config(train_step.MODELS[model_name][0])
  cfg.model.neuron.kind = kind
  if model_name == 'digits':  # as build_step: a tiny net for smoke tests
    cfg.model.channels = (8, 16, 16)
  return cfg


def _optim_field(op, key: str, fallback: float) -> float:
  """``op[key]``, else the registered optimizer builder's default (else ``fallback``)."""
  if key in op:
    return float(op[key] or 0.0)
  try:
    import inspect
    from mfp_jax import optim
    default = inspect.signature(optim.OPTIMIZERS.get(op.name)).parameters[key].default
    return float(default) if isinstance(default, (int, float)) else fallback
  except (ImportError, AttributeError, KeyError, ValueError):
    return fallback


def _quant(q) -> dict:
  return {'bits': int(q.bits), 'scale': q.scale, 'estimator': q.estimator}


def twin_spec(cfg, num_classes: int = 10) -> dict:
  """Plain-JSON description of the flax model ``cfg`` builds, for ``torch_twin.build_twin``.

  Read off the built (uninitialized) flax module rather than the config fields, so the twin
  follows whatever the config schema is. Raises ValueError for what the twin lacks.
  """
  from mfp_jax import models
  model = models.create_model(cfg.model, num_classes=num_classes)
  n, lo, op = model.neuron, cfg.loss, cfg.optim  # sections: only the fields they have
  if getattr(n, 'membrane_bits', None) or getattr(n, 'mode', 'parallel') != 'parallel':
    raise ValueError(f'the torch twin has float membranes and parallel MFP only, got {n}')
  spec = {'T': int(model.T), 'num_classes': int(model.num_classes),
          'neuron': {'kind': n.kind, 'vth': float(n.vth), 'surrogate': n.surrogate,
                     'alpha': None if n.alpha is None else float(n.alpha), 'tau': float(n.tau)},
          'quant': _quant(model.quant), 'edge_quant': _quant(model.edge_quant),
          'loss': {'name': cfg.loss.name, 'fr_lambda': float(lo.get('fr_lambda', 0.0)),
                   'fr_target': float(lo.get('fr_target', 0.5))},
          'optim': {'name': op.name, 'learning_rate': float(op.learning_rate),
                    **{k: _optim_field(op, k, d) for k, d in (
                        ('momentum', 0.0), ('weight_decay', 0.0), ('grad_clip', 0.0),
                        ('b1', 0.9), ('b2', 0.999))}}}
  if hasattr(model, 'layout'):
    spec.update(family='vgg', layout=list(model.layout), global_pool=bool(model.global_pool))
  elif hasattr(model, 'stage_sizes'):
    spec.update(family='resnet', stage_sizes=list(model.stage_sizes), widths=list(model.widths))
  elif hasattr(model, 'channels'):
    spec.update(family='digits', channels=list(model.channels),
                stem_strides=int(getattr(model, 'stem_strides', 1)))
  else:
    raise ValueError(f'no torch twin for {type(model).__name__}')
  return spec


def _random_batch(batch: int, shape, num_classes: int):
  """The arrays ``build_step`` feeds (numpy, so both frameworks get the same values)."""
  import numpy as np
  rng = np.random.default_rng(0)
  image = rng.normal(size=(batch,) + tuple(shape)).astype(np.float32)
  return image, rng.integers(0, num_classes, size=batch).astype(np.int64)


def _build_jax(req: dict):
  """``(run, info)``: ``run()`` does one donated train step and waits for its results."""
  import jax
  from benchmarks import train_step
  step, state, data, anneal = train_step.build_step(req['model'], req['kind'],
                                                    batch=req['batch'])
  t0 = time.perf_counter()
  exe = step.lower(state, data, anneal).compile()
  info = {'compile_s': time.perf_counter() - t0, 'backend': jax.default_backend(),
          'params': int(sum(x.size for x in jax.tree.leaves(state.params)))}
  holder = {'state': state}

  def run():
    holder['state'], metrics = exe(holder['state'], data, anneal)  # the state is donated
    jax.block_until_ready((holder['state'], metrics))

  return run, info


def _build_torch(req: dict):
  import torch
  from benchmarks import torch_twin
  # All the cores this process may use (as JAX does); SJ picks its CPU kernels itself.
  torch.set_num_threads(req['threads'] or len(os.sched_getaffinity(0)))
  info = {'torch_threads': torch.get_num_threads(),
          'torch_interop_threads': torch.get_num_interop_threads(),
          'mkldnn': torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled}
  spec = req['twin']
  net = torch_twin.build_twin(spec, req['input_shape'], channels_last=req['channels_last'])
  opt = torch_twin.create_optimizer(net, spec['optim'])
  image, label = _random_batch(req['batch'], req['input_shape'], spec['num_classes'])
  image, label = torch.from_numpy(image), torch.from_numpy(label)
  info.update(params=torch_twin.num_params(net), channels_last=req['channels_last'])
  return (lambda: torch_twin.train_step(net, opt, image, label, spec)), info


def probe(framework: str) -> dict:
  """Versions (and threads) of ``framework`` in this interpreter, or why it cannot run."""
  try:
    if framework == 'jax':
      import importlib
      import jax
      import jaxlib
      importlib.import_module('mfp_jax.train_lib')  # the step needs the package, too
      return {'ok': True, 'jax': jax.__version__, 'jaxlib': jaxlib.__version__,
              'python': sys.executable}
    import importlib.metadata
    import torch
    from spikingjelly.activation_based import neuron
    neuron.MaskedPSN  # noqa: B018  (the MFP twin needs it)
    return {'ok': True, 'torch': torch.__version__, 'python': sys.executable,
            'spikingjelly': importlib.metadata.version('spikingjelly')}
  except (ImportError, AttributeError) as e:
    return {'ok': False, 'why': f'{type(e).__name__}: {e}'}


def worker_main() -> int:
  """One contender: a request line in, then ``step`` / ``quit`` commands, JSON replies out."""
  proto = os.fdopen(os.dup(1), 'w', buffering=1)
  os.dup2(2, 1)  # anything a library prints goes to the log, not into the protocol
  sys.stdout = sys.stderr
  send = lambda obj: proto.write(json.dumps(obj) + '\n')
  req = json.loads(sys.stdin.readline())
  alloc = common.set_allocator(req['allocator'])  # before the framework allocates
  xla_cpu = None
  if req['framework'] == 'jax':  # train.py's XLA:CPU conv flag ($MFP_JAX_XLA_CPU=default: off)
    from mfp_jax import runtime
    xla_cpu = runtime.tune_xla_cpu()
  t0 = time.perf_counter()
  try:
    run, info = (_build_jax if req['framework'] == 'jax' else _build_torch)(req)
    for _ in range(req['warmup']):
      run()
  except Exception as e:  # reported to the coordinator, which prints one line
    traceback.print_exc()
    send({'error': f'{type(e).__name__}: {e}'})
    return 1
  send({'ready': True, 'startup_s': time.perf_counter() - t0, 'allocator': alloc,
        'xla_cpu': xla_cpu, **info})
  for line in sys.stdin:
    if json.loads(line)['cmd'] != 'step':
      break
    gc.collect()  # outside the clock: no collector pause inside a timed step
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    c0, w0 = time.process_time(), time.perf_counter()
    run()
    w1, c1 = time.perf_counter(), time.process_time()
    send({'ms': (w1 - w0) * 1e3, 'cpu_ms': (c1 - c0) * 1e3,
          'faults': resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0})
  return 0


class Worker:
  """A long-lived worker process for one contender (JSON lines both ways)."""

  def __init__(self, python: str, req: dict):
    self.log = tempfile.NamedTemporaryFile('w+', prefix='step_peers_', suffix='.log',
                                           delete=False)
    env = dict(os.environ)
    if req['framework'] == 'jax':
      env.setdefault('JAX_PLATFORMS', 'cpu')  # the twin runs on the CPU: compare like with like
    self.proc = subprocess.Popen([python, '-m', 'benchmarks.step_peers', '--worker'],
                                 cwd=common.ROOT, env=env, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=self.log, text=True, bufsize=1)
    self.ready = self.ask(req)

  def ask(self, obj: dict) -> dict:
    self.proc.stdin.write(json.dumps(obj) + '\n')
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      return {'error': f'worker exited ({self.proc.wait()}); log tail:\n{self.log_tail()}'}
    return json.loads(line)

  def log_tail(self, n: int = 15) -> str:
    self.log.flush()
    with open(self.log.name) as f:
      return ''.join(f.readlines()[-n:])

  def close(self) -> None:
    if self.proc.poll() is None:
      try:
        self.proc.stdin.write(json.dumps({'cmd': 'quit'}) + '\n')
        self.proc.stdin.close()
      except BrokenPipeError:
        pass
      try:
        self.proc.wait(timeout=60)
      except subprocess.TimeoutExpired:
        self.proc.kill()
        self.proc.wait()
    self.log.close()
    os.unlink(self.log.name)


def run_probe(python: str, framework: str) -> dict:
  try:
    out = subprocess.run([python, '-m', 'benchmarks.step_peers', '--probe', framework],
                         cwd=common.ROOT, capture_output=True, text=True, timeout=300)
  except (OSError, subprocess.TimeoutExpired) as e:
    return {'ok': False, 'why': f'{type(e).__name__}: {e}'}
  lines = out.stdout.strip().splitlines()
  if out.returncode or not lines:
    return {'ok': False, 'why': (out.stderr.strip().splitlines() or ['no output'])[-1]}
  return json.loads(lines[-1])


def _start_workers(model: str, batch: int, contenders, args, pythons) -> dict:
  """name -> Worker, started one at a time (each ready: built, compiled, warmed up)."""
  cfg = contender_config(model, 'mfp')
  from benchmarks import train_step
  shape = list(train_step.input_shape(cfg))
  workers = {}
  for fw, kind, alloc in contenders:
    name = f'{fw}:{kind}' + (f' ({alloc})' if len(args.allocators) > 1 else '')
    req = {'framework': fw, 'model': model, 'kind': kind, 'batch': batch, 'allocator': alloc,
           'warmup': args.warmup, 'threads': args.threads, 'input_shape': shape,
           'channels_last': not args.torch_nchw}
    if fw == 'torch':
      req['twin'] = twin_spec(contender_config(model, kind))
    w = Worker(pythons[fw], req)
    if 'error' in w.ready:
      print(f'{name}: skipped, the worker failed: {w.ready["error"]}')
      w.close()
      continue
    print(f'  {name}: ready in {w.ready["startup_s"]:.1f} s', file=sys.stderr)
    workers[name] = w
  return workers


def _rounds(workers: dict, reps: int, pause: float) -> dict:
  """name -> list of per-round replies; round r starts at worker r mod n."""
  names = list(workers)
  out = {n: [] for n in names}
  for r in range(reps):
    k = r % len(names)
    for n in names[k:] + names[:k]:
      time.sleep(pause)
      rep = workers[n].ask({'cmd': 'step'})
      if 'ms' not in rep:
        raise RuntimeError(f'{n} failed in round {r}: {rep.get("error", rep)}')
      out[n].append(rep)
  return out


def summarize(replies: dict, ready: dict, ref: str | None) -> dict:
  """Median/min/cpu per contender, and the median of per-round ratios to ``ref``."""
  res = {}
  for n, reps in replies.items():
    ms = [r['ms'] for r in reps]
    rec = {'median_ms': statistics.median(ms), 'min_ms': min(ms),
           'cpu_ms': statistics.median([r['cpu_ms'] for r in reps]),
           'faults': statistics.median([r['faults'] for r in reps]),
           'times_ms': [round(v, 2) for v in ms],
           **{k: v for k, v in ready[n].items() if k != 'ready'}}
    if ref in replies:
      rec['x_ref_paired'] = statistics.median(
          a['ms'] / b['ms'] for a, b in zip(reps, replies[ref]))
      rec['x_ref_medians'] = rec['median_ms'] / statistics.median(
          r['ms'] for r in replies[ref])
    res[n] = rec
  return res


def time_model(model: str, batch: int, contenders, args, pythons) -> dict:
  """Starts the workers of one ``(model, batch)``, runs the rounds, stops the workers."""
  load0 = os.getloadavg()
  t = int(contender_config(model, 'mfp').model.T)
  workers = _start_workers(model, batch, contenders, args, pythons)
  try:
    replies = _rounds(workers, args.reps, args.pause) if workers else {}
  finally:
    for w in workers.values():
      w.close()
  ref = next((n for n in replies if n.startswith(f'{REFERENCE[0]}:{REFERENCE[1]}')), None)
  return {'batch': batch, 'T': t, 'reference': ref,
          'loadavg': [list(load0), list(os.getloadavg())],
          'steps': summarize(replies, {n: w.ready for n, w in workers.items()}, ref)}


def print_table(model: str, rec: dict) -> None:
  steps = rec['steps']
  print(f'\n## {model}, batch {rec["batch"]}, T = {rec["T"]}; load '
        f'{rec["loadavg"][0][0]:.1f} -> {rec["loadavg"][1][0]:.1f}\n')
  rows = []
  for n, s in steps.items():
    fw, kind = n.split(' ')[0].split(':')
    rows.append([n, WHAT[(fw, kind)], s['median_ms'], s['min_ms'], s['cpu_ms'],
                 s.get('x_ref_paired'), s['params'], s['startup_s']])
  print(common.markdown_table(['contender', 'what', 'median ms', 'min ms', 'cpu ms',
                               f'x {rec["reference"]} (paired)', 'params', 'startup s'], rows))
  counts = {}
  for n, s in steps.items():
    counts.setdefault(n.split(':')[1].split(' ')[0], set()).add(s['params'])
  bad = {k: sorted(v) for k, v in counts.items() if len(v) > 1}
  if bad:
    print(f'\nwarning: parameter counts differ between the frameworks: {bad}')


def _parse(argv):
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--models', default='vggsnn,resnet19', help='vggsnn, resnet19, digits (tiny)')
  p.add_argument('--batch', default='', help='comma-separated batch sizes (default: '
                 'benchmarks.train_step per-model defaults: vggsnn 4, resnet19 8)')
  p.add_argument('--kinds', default=','.join(KINDS), help=f'subset of {",".join(KINDS)}')
  p.add_argument('--frameworks', default=None, help='jax,torch (default: both, and nothing '
                 'runs unless both can)')
  p.add_argument('--jax-python', default=sys.executable, help='interpreter of the JAX workers')
  p.add_argument('--torch-python', default=sys.executable, help='interpreter of the torch workers')
  p.add_argument('--allocator', default='default', help='default, tuned, or default,tuned '
                 '(both, interleaved); applied in every worker before its framework allocates')
  p.add_argument('--threads', type=int, default=0, help='torch threads (0: all usable cores)')
  p.add_argument('--torch-nchw', action='store_true', help='torch twin in NCHW instead of '
                 'channels_last')
  p.add_argument('--reps', type=int, default=5, help='timed rounds')
  p.add_argument('--warmup', type=int, default=2, help='untimed steps per worker')
  p.add_argument('--pause', type=float, default=0.25, help='seconds before each timed step')
  p.add_argument('--out', default=None, help='JSON path (default: benchmarks/results/)')
  args = p.parse_args(argv)
  args.allocators = [a for a in args.allocator.split(',') if a]
  kinds = [k for k in args.kinds.split(',') if k]
  fws = [f for f in (args.frameworks or ','.join(FRAMEWORKS)).split(',') if f]
  bad = ((set(args.allocators) - set(common.ALLOCATORS)) | (set(kinds) - set(KINDS))
         | (set(fws) - set(FRAMEWORKS)))
  if bad:
    p.error(f'unknown {sorted(bad)}; allowed: allocators {list(common.ALLOCATORS)}, kinds '
            f'{list(KINDS)}, frameworks {list(FRAMEWORKS)}')
  return args, kinds, fws


def main(argv=None) -> int:
  args, kinds, fws = _parse(argv)
  pythons = {'jax': args.jax_python, 'torch': args.torch_python}
  probes = {}
  for fw in sorted(fws, key=lambda f: f != 'torch'):  # the likelier one to be missing first
    probes[fw] = run_probe(pythons[fw], fw)
    if not probes[fw]['ok']:
      print(f'step peers: {fw} contenders skipped: {pythons[fw]} cannot import them '
            f'({probes[fw]["why"]}); see `python -m benchmarks.step_peers --help`')
      if args.frameworks is None:
        return 0  # the comparison needs both sides; --frameworks asks for one
  fws = [fw for fw in fws if probes[fw]['ok']]
  if not fws:
    return 0
  from benchmarks import train_step
  env = common.environment({'workers': probes, 'reps': args.reps, 'warmup': args.warmup,
                            'pause_s': args.pause, 'allocators': args.allocators,
                            'torch_layout': 'NCHW' if args.torch_nchw else 'channels_last',
                            'torch_threads': args.threads or len(os.sched_getaffinity(0))})
  print(f'# step peers: allocator {",".join(args.allocators)}, {env["cpu"]}, '
        f'{env["cpu_count"]} cores, load {env["loadavg_start"]}; '
        + ', '.join(f'{k} {v}' for fw in fws for k, v in probes[fw].items()
                    if k not in ('ok', 'python')))
  contenders = [(fw, k, a) for a in args.allocators for fw in fws for k in kinds]
  results = {}
  for model in [m for m in args.models.split(',') if m]:
    batches = [int(b) for b in args.batch.split(',') if b] or [train_step.MODELS[model][1]]
    for batch in batches:
      rec = time_model(model, batch, contenders, args, pythons)
      results[f'{model}_b{batch}'] = dict(rec, model=model)
      print_table(model, rec)
  out = common.write_json('step_peers', {'environment': env, 'results': results}, args.out)
  print(f'\nwrote {out}')
  return 0


if __name__ == '__main__':
  if '--probe' in sys.argv:
    print(json.dumps(probe(sys.argv[sys.argv.index('--probe') + 1])))
    raise SystemExit(0)
  if '--worker' in sys.argv:
    raise SystemExit(worker_main())
  raise SystemExit(main())
