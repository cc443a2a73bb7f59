"""Shared by the benchmark scripts: allocator setting, interleaved timing, tables, JSON.

Importable without JAX or torch (the peers script runs in an environment that may lack one
of them). The timing method, stated in every JSON file it writes:

* every contender is compiled and run ``warmup`` times first (compile time is reported
  separately, never mixed into a timing);
* then ``reps`` rounds; each round runs every contender once, in an order rotated by one
  per round, so slow phases of a shared machine hit all of them alike;
* before each timed call the previous result has been freed and the script sleeps
  ``pause_s`` (~20 ms): freeing a large buffer is deferred and would otherwise land in the
  next contender's timing, and a buffer not yet freed forces a fresh, page-faulting one;
* a call is timed from dispatch until its outputs are ready; the result is freed after the
  clock stops. Reported: the median (and min) wall time, the median process CPU time
  (all threads: close to wall time x cores used), and minor page faults per call.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import resource
import subprocess
import statistics
import sys
import time
from typing import Any, Callable, Sequence

ALLOCATORS = ('tuned', 'default')
_ALLOCATOR = {'mode': 'default', 'detail': 'glibc malloc, default settings'}


def _runtime():
  """``mfp_jax.runtime`` without importing the ``mfp_jax`` package (its ``__init__`` imports
  JAX, and this module must import without it); the loaded module if it is there already."""
  mod = sys.modules.get('mfp_jax.runtime') or sys.modules.get('_mfp_jax_runtime')
  if mod is None:
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'mfp_jax',
                        'runtime.py')  # benchmarks/ always runs from the checkout beside it
    spec = importlib.util.spec_from_file_location('_mfp_jax_runtime', path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    sys.modules['_mfp_jax_runtime'] = mod
  return mod


def set_allocator(mode: str) -> dict:
  """Sets glibc malloc up for ``mode`` before any large allocation; returns what was done.

  Delegates to ``mfp_jax.runtime.tune_allocator`` (its docstring says why). ``'tuned'``:
  large buffers come from one heap and stay there after ``free``, so a steady-state loop
  reuses warm pages; ``'default'``: glibc's defaults, where buffers over 32 MiB are fresh
  ``mmap`` pages on every call whose page faults (about 10 ms per 40 MiB here) then dominate
  elementwise timings. The mode is also exported as ``$MFP_JAX_ALLOCATOR``, so library code
  that calls ``tune_allocator()`` later, and any subprocess, follows the benchmark's choice.
  """
  if mode not in ALLOCATORS:
    raise ValueError(f'unknown allocator {mode!r}; allowed: {list(ALLOCATORS)}')
  runtime = _runtime()
  os.environ[runtime.ENV_VAR] = mode
  state = runtime.tune_allocator(mode)
  _ALLOCATOR.update(mode=state['mode'], detail=state['detail'])
  return dict(_ALLOCATOR)


def add_common_flags(parser, *, reps: int = 7) -> None:
  parser.add_argument('--allocator', choices=ALLOCATORS, default='tuned',
                      help='malloc setting (see benchmarks/common.py); default: tuned')
  parser.add_argument('--reps', type=int, default=reps, help='timed rounds (median of these)')
  parser.add_argument('--warmup', type=int, default=2, help='untimed calls per contender')
  parser.add_argument('--pause', type=float, default=0.02, help='seconds between calls')
  parser.add_argument('--out', default=None, help='JSON output path (default: benchmarks/results/)')


def _faults() -> int:
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def time_interleaved(contenders: dict[str, tuple[Callable[[], Any], Callable[[Any], None]]], *,
                     reps: int, warmup: int = 2, pause_s: float = 0.02) -> dict[str, dict]:
  """Times ``call()`` for every contender, interleaved; see the module docstring.

  Args:
    contenders: name -> ``(call, wait)``: ``call()`` starts the work and returns its
      result, ``wait(result)`` blocks until it is ready.
    reps: timed rounds; warmup: untimed calls each first; pause_s: sleep before each call.

  Returns:
    name -> ``{'median_ms', 'min_ms', 'cpu_ms', 'faults', 'times_ms'}``.
  """
  for call, wait in contenders.values():
    for _ in range(warmup):
      out = call()
      wait(out)
      del out
  names = list(contenders)
  wall = {n: [] for n in names}
  cpu = {n: [] for n in names}
  faults = {n: [] for n in names}
  for r in range(reps):
    k = r % len(names)
    for n in names[k:] + names[:k]:
      call, wait = contenders[n]
      time.sleep(pause_s)
      f0, c0, t0 = _faults(), time.process_time(), time.perf_counter()
      out = call()
      wait(out)
      t1, c1, f1 = time.perf_counter(), time.process_time(), _faults()
      del out
      wall[n].append((t1 - t0) * 1e3)
      cpu[n].append((c1 - c0) * 1e3)
      faults[n].append(f1 - f0)
  return {n: {'median_ms': statistics.median(wall[n]), 'min_ms': min(wall[n]),
              'cpu_ms': statistics.median(cpu[n]), 'faults': statistics.median(faults[n]),
              'times_ms': [round(v, 3) for v in wall[n]]} for n in names}


def environment(extra: dict | None = None) -> dict:
  """Machine, versions, allocator and load: what a reader needs to weigh the numbers."""
  env = {'python': sys.version.split()[0], 'platform': platform.platform(),
         'cpu': _cpu_model(), 'cpu_count': os.cpu_count(), 'allocator': dict(_ALLOCATOR),
         'xla_flags': os.environ.get('XLA_FLAGS', ''), 'loadavg_start': _loadavg(),
         'command': ' '.join([os.path.basename(sys.executable), '-m',
                              sys.modules['__main__'].__spec__.name if getattr(
                                  sys.modules['__main__'], '__spec__', None) else sys.argv[0]]
                             + sys.argv[1:])}
  try:
    import jax
    import jaxlib
    env.update(jax=jax.__version__, jaxlib=jaxlib.__version__,
               device=str(jax.devices()[0].device_kind), backend=jax.default_backend(),
               num_devices=jax.device_count())
  except ImportError:
    pass
  env.update(extra or {})
  return env


def _cpu_model() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor()


def _loadavg() -> list[float] | None:
  try:
    return list(os.getloadavg())
  except OSError:
    return None


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  def fmt(v):
    if isinstance(v, float):
      return f'{v:.2f}' if abs(v) < 1000 else f'{v:.0f}'
    return '' if v is None else str(v)

  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  lines += ['| ' + ' | '.join(fmt(v) for v in r) + ' |' for r in rows]
  return '\n'.join(lines)


def write_json(name: str, payload: dict, out: str | None) -> str:
  """Writes ``payload`` (plus the environment, with the load at the end) as JSON."""
  if out is None:
    out = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'results', f'{name}.json')
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  payload = dict(payload)
  payload.setdefault('environment', environment())
  payload['environment']['loadavg_end'] = _loadavg()
  with open(out, 'w') as f:
    json.dump(payload, f, indent=1)
  return out


def mib(nbytes: float | None) -> float | None:
  return None if nbytes is None else nbytes / 2**20


# --- Runs of the scripts users run (train.py / eval.py in subprocesses) -------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


def _run_script(args: list[str]) -> tuple[subprocess.CompletedProcess, float]:
  t0 = time.perf_counter()
  r = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                     env=dict(os.environ, JAX_PLATFORMS=os.environ.get('JAX_PLATFORMS', 'cpu')))
  return r, time.perf_counter() - t0


def run_train_py(config: str, overrides: Sequence[str], seed: int, workdir: str, *,
                 epochs: int | None = None) -> dict:
  """``python train.py --config <config> --workdir <workdir> --config.seed=<seed> ...`` in a
  fresh subprocess; returns its final accuracy and wall seconds (start-up included)."""
  args = ['train.py', '--config', config, '--workdir', workdir, f'--config.seed={seed}',
          '--config.progress=False', *overrides]
  if epochs:
    args.append(f'--config.num_epochs={epochs}')
  r, wall = _run_script(args)
  m = re.search(r'final test accuracy: ([0-9.]+)', r.stdout)
  if r.returncode != 0 or not m:
    raise RuntimeError(f'{" ".join(args)} failed ({r.returncode}):\n{r.stderr[-2000:]}')
  return {'seed': seed, 'accuracy': float(m.group(1)), 'wall_s': wall, 'workdir': workdir}


def run_eval_py(config: str, overrides: Sequence[str], seed: int, workdir: str, *,
                epochs: int | None = None) -> dict:
  """``python eval.py`` on a run of :func:`run_train_py` with the same arguments (the best
  checkpoint); returns its ``eval.json``."""
  args = ['eval.py', '--config', config, '--workdir', workdir, f'--config.seed={seed}',
          '--config.progress=False', *overrides] + ([f'--config.num_epochs={epochs}'] if epochs else [])
  r, _ = _run_script(args)
  if r.returncode != 0:
    raise RuntimeError(f'{" ".join(args)} failed ({r.returncode}):\n{r.stderr[-2000:]}')
  with open(os.path.join(workdir, 'eval.json')) as f:
    return json.load(f)
