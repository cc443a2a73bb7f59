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

import ctypes
import json
import os
import platform
import resource
import statistics
import sys
import time
from typing import Any, Callable, Sequence

# glibc mallopt parameters.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
ALLOCATORS = ('tuned', 'default')
_ALLOCATOR = {'mode': 'default', 'detail': 'glibc malloc, default settings'}


def set_allocator(mode: str) -> dict:
  """Sets glibc malloc up for ``mode`` before any large allocation; returns what was done.

  ``'tuned'``: large buffers come from one heap and stay there after ``free`` (mmap threshold
  1 GiB, trim threshold 2 GiB, one arena), so a steady-state loop reuses warm pages -- what a
  caching allocator gives a GPU framework. ``'default'``: glibc's defaults: buffers over
  32 MiB are fresh ``mmap`` pages on every call, and writing them costs page faults (about
  10 ms per 40 MiB here), which then dominate elementwise timings.
  """
  if mode not in ALLOCATORS:
    raise ValueError(f'unknown allocator {mode!r}; allowed: {list(ALLOCATORS)}')
  if mode == 'tuned':
    try:
      libc = ctypes.CDLL('libc.so.6')
      ok = (libc.mallopt(_M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1)
            and libc.mallopt(_M_ARENA_MAX, 1))
    except OSError:
      ok = False
    detail = ('glibc mallopt: M_MMAP_THRESHOLD=1GiB, M_TRIM_THRESHOLD=2GiB, M_ARENA_MAX=1'
              if ok else 'requested tuned, but glibc mallopt is unavailable: default malloc')
    _ALLOCATOR.update(mode='tuned' if ok else 'default', detail=detail)
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
