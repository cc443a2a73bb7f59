"""Neuron forward + backward: every MFP formulation, the column form, LIF, and the floor.

  python -m benchmarks.neuron                     # T in {4, 8, 10, 16, 32}, 2^20 neurons, both
                                                  # allocators (one fresh process each)
  python -m benchmarks.neuron --ts 10 --reps 15 --allocator default --cores 1

Each contender is timed in two modes, jitted, on ``x: [T, B, 4, 4, 64]`` (``n`` neurons per
step) with a fixed cotangent ``dS``:

* ``grad`` -- the gradient alone, ``jax.grad`` of ``<dS, neuron(x, M)>`` w.r.t. ``x`` (and
  ``M``): what the backward pass costs once the spikes exist;
* ``both`` -- spikes and gradient, ``jax.vjp`` then the pullback: what a network pays.

The floor is one fused elementwise pass ``x * dS + 1`` over the same arrays: reading two
``[T, n]`` arrays and writing one is the least any gradient of an elementwise neuron costs.
Ratios are to the floor's median from the same interleaved rounds. Scratch memory is XLA's
``compiled.memory_analysis().temp_size_in_bytes`` (buffers other than inputs and outputs).

**Allocators.** ``--allocator tuned,default`` (the default) runs the whole benchmark once per
glibc malloc setting, each in a fresh process (a tuned malloc cannot be undone within a
process), one after the other, and then prints the targets of both side by side. With one
allocator it runs in this process. Under glibc's defaults every fresh ``[T, n]`` buffer of
32 MiB or more page-faults on each call (``faults/call``), the floor included, so the ratios
to the floor are smaller there: the tuned numbers are the strict ones.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from benchmarks import common

FORMS = ('mfp', 'mfp_matmul', 'mfp_einsum', 'mfp_column', 'lif_bptt', 'lif_autodiff')
DESCRIPTION = {
    'floor': 'one fused pass x * dS + 1',
    'mfp': 'mfp_parallel (default): custom VJP, blocked backward',
    'mfp_matmul': 'mfp_parallel_reference: autodiff of tril(M) @ x.reshape(T, -1)',
    'mfp_einsum': "autodiff of einsum('ts,s...->t...', tril(M), x) on the 5-D x",
    'mfp_column': 'mfp_column_parallel: Eq. 6 as a cumsum, autodiff',
    'lif_bptt': 'lif_bptt: hand-written BPTT (custom VJP, reverse scan)',
    'lif_autodiff': 'lif_serial: autodiff through lax.scan (naive BPTT)',
}


def neuron_fns(t: int):
  """name -> ``f(x, m) -> spikes`` for every form (``m`` unused by the LIF forms)."""
  import jax.numpy as jnp
  from mfp_jax import neurons

  def einsum_form(x, m):
    h = jnp.einsum('ts,s...->t...', jnp.tril(m), x)
    return neurons.surrogate_lib.atan(h - 1.0)

  return {
      'mfp': neurons.mfp_parallel,
      'mfp_matmul': neurons.mfp_parallel_reference,
      'mfp_einsum': einsum_form,
      'mfp_column': lambda x, m: neurons.mfp_column_parallel(x, jnp.diagonal(m)),
      'lif_bptt': lambda x, m: neurons.lif_bptt(x),
      'lif_autodiff': lambda x, m: neurons.lif_serial(x),
  }


def _grad_fn(f, uses_m: bool):
  import jax
  import jax.numpy as jnp

  def grad(x, m, g):
    loss = lambda x, m: jnp.vdot(g, f(x, m))
    return jax.grad(loss, argnums=(0, 1) if uses_m else 0)(x, m)

  return grad


def _both_fn(f, uses_m: bool):
  import jax

  def both(x, m, g):
    if uses_m:
      s, pull = jax.vjp(f, x, m)
    else:
      s, pull = jax.vjp(lambda x: f(x, m), x)
    return s, pull(g)

  return both


def inputs(t: int, n: int):
  """``x [T, n/1024, 4, 4, 64]`` around the threshold, ``M`` decaying, ``dS`` normal."""
  import jax
  import jax.numpy as jnp
  if n % 1024:
    raise ValueError(f'n must be a multiple of 1024, got {n}')
  shape = (t, n // 1024, 4, 4, 64)
  kx, kg = jax.random.split(jax.random.key(0))
  x = jax.random.normal(kx, shape, jnp.float32) + 0.5
  g = jax.random.normal(kg, shape, jnp.float32)
  lag = jnp.arange(t)[:, None] - jnp.arange(t)[None, :]
  m = jnp.where(lag >= 0, 0.5**jnp.maximum(lag, 0), 0.0).astype(jnp.float32)
  return x, m, g


def run_t(t: int, n: int, forms, args) -> dict:
  """Compiles and times every contender at one ``T``; returns the per-contender records."""
  import jax
  x, m, g = inputs(t, n)
  fns = neuron_fns(t)
  compiled, records = {}, {}
  floor = jax.jit(lambda x, m, g: x * g + 1.0)
  todo = [('floor', floor)]
  for form in forms:
    uses_m = form.startswith('mfp')
    todo.append((f'{form}/grad', jax.jit(_grad_fn(fns[form], uses_m))))
    todo.append((f'{form}/both', jax.jit(_both_fn(fns[form], uses_m))))
  for name, fn in todo:
    t0 = time.perf_counter()
    exe = fn.lower(x, m, g).compile()
    compile_s = time.perf_counter() - t0
    mem = exe.memory_analysis()
    compiled[name] = exe
    records[name] = {'compile_s': compile_s,
                     'temp_mib': common.mib(getattr(mem, 'temp_size_in_bytes', None)),
                     'output_mib': common.mib(getattr(mem, 'output_size_in_bytes', None))}
  contenders = {name: (lambda exe=exe: exe(x, m, g), jax.block_until_ready)
                for name, exe in compiled.items()}
  timings = common.time_interleaved(contenders, reps=args.reps, warmup=args.warmup,
                                    pause_s=args.pause)
  base = timings['floor']['median_ms']
  for name, rec in records.items():
    rec.update(timings[name])
    rec['x_floor'] = rec['median_ms'] / base
  return records


def _ratio(a: dict, b: dict) -> str:
  """``a / b`` by median wall time, and in parentheses by median process CPU time."""
  return f'{a["median_ms"] / b["median_ms"]:.2f} ({a["cpu_ms"] / b["cpu_ms"]:.2f})'


LIF_FORMS = ('lif_bptt', 'lif_autodiff')
# The README's targets for mfp_parallel at T = 10: (ratio, direction, bound).
TARGET_T = 10
TARGETS = (('MFP grad / floor', '<=', 2.0), ('MFP both / floor', '<=', 3.0),
           ('best LIF both / MFP both', '>=', 1.5))


def best_lif(r: dict) -> str | None:
  """The LIF form with the fastest spikes + gradient (median wall time) in one T's records."""
  forms = [f for f in LIF_FORMS if f'{f}/both' in r]
  return min(forms, key=lambda f: r[f'{f}/both']['median_ms']) if forms else None


def summary_rows(results: dict, ts) -> list[list]:
  """Per T: the README's targets, as ratios to the floor and to the best LIF."""
  rows = []
  for t in ts:
    r = results[str(t)]
    if 'mfp/both' not in r:
      continue
    fl = r['floor']
    row = [t, fl['median_ms'], fl['faults'], _ratio(r['mfp/grad'], fl),
           _ratio(r['mfp/both'], fl)]
    lif = best_lif(r)
    if lif:
      row += [lif, _ratio(r[f'{lif}/both'], r['mfp/both']),
              _ratio(r[f'{lif}/grad'], r['mfp/grad']), r['mfp/both']['temp_mib'],
              r[f'{lif}/both']['temp_mib']]
    if 'mfp_matmul/both' in r:
      row.append(_ratio(r['mfp_matmul/both'], r['mfp/both']))
    rows.append(row)
  return rows


def summary_header(forms) -> list[str]:
  header = ['T', 'floor ms', 'floor faults/call', 'MFP grad / floor', 'MFP both / floor']
  if set(LIF_FORMS) & set(forms):
    header += ['best LIF', 'best LIF both / MFP both', 'its grad / MFP grad', 'MFP scratch MiB',
               'LIF scratch MiB']
  if 'mfp_matmul' in forms:
    header.append('matmul both / MFP both')
  return header


def target_rows(by_allocator: dict) -> list[list]:
  """At ``TARGET_T``: each target's measured ratio (wall; CPU) per allocator, and whether it
  is met by the median wall times."""
  rows = []
  for alloc, payload in by_allocator.items():
    r = payload['results'].get(str(TARGET_T))
    if not r or 'mfp/both' not in r:
      continue
    fl, lif = r['floor'], best_lif(r)
    got = [(r['mfp/grad'], fl), (r['mfp/both'], fl)]
    got.append((r[f'{lif}/both'], r['mfp/both']) if lif else None)
    row = [alloc, payload['environment']['loadavg_start'][0], fl['median_ms'], fl['faults']]
    for (_, direction, bound), pair in zip(TARGETS, got):
      if pair is None:
        row.append('')
        continue
      value = pair[0]['median_ms'] / pair[1]['median_ms']
      met = value <= bound if direction == '<=' else value >= bound
      row.append(f'{_ratio(*pair)} {"met" if met else "missed"}')
    rows.append(row)
  return rows


def spawn_allocators(allocators, argv: list[str]) -> dict:
  """This script once per allocator, each in a fresh process; allocator -> its JSON."""
  out = {}
  with tempfile.TemporaryDirectory() as tmp:
    for alloc in allocators:
      path = os.path.join(tmp, f'{alloc}.json')
      cmd = [sys.executable, '-m', 'benchmarks.neuron', *argv, '--allocator', alloc,
             '--out', path]
      print(f'\n# --- allocator {alloc}: a fresh process ---', flush=True)
      r = subprocess.run(cmd, cwd=common.ROOT, env=dict(os.environ, JAX_PLATFORMS=os.environ.get(
          'JAX_PLATFORMS', 'cpu')))
      if r.returncode != 0:
        raise RuntimeError(f'allocator {alloc} failed ({r.returncode}): {" ".join(cmd)}')
      with open(path) as f:
        out[alloc] = json.load(f)
  return out


def _without(argv: list[str], flags) -> list[str]:
  """``argv`` without ``flags`` and their values (``--flag v`` or ``--flag=v``)."""
  keep, skip = [], False
  for a in argv:
    if skip:
      skip = False
    elif a in flags:
      skip = True
    elif a.split('=', 1)[0] not in flags:
      keep.append(a)
  return keep


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0], conflict_handler='resolve')
  p.add_argument('--ts', default='4,8,10,16,32', help='comma-separated T values')
  p.add_argument('--n', type=int, default=2**20, help='neurons per time step')
  p.add_argument('--forms', default=','.join(FORMS), help=f'subset of {",".join(FORMS)}')
  p.add_argument('--cores', type=int, default=0, help='pin to this many cores (0: all)')
  common.add_common_flags(p, reps=7)
  p.add_argument('--allocator', default=','.join(common.ALLOCATORS),
                 help='malloc settings (see benchmarks/common.py), comma-separated; more than '
                 'one: a fresh process each, then both side by side (default: tuned,default)')
  argv = sys.argv[1:] if argv is None else list(argv)
  args = p.parse_args(argv)
  allocators = [a for a in args.allocator.split(',') if a]
  ts = [int(v) for v in args.ts.split(',')]
  forms = [f for f in args.forms.split(',') if f]
  unknown = (set(forms) - set(FORMS)) | (set(allocators) - set(common.ALLOCATORS))
  if unknown or not allocators:
    p.error(f'unknown forms or allocators {sorted(unknown)}; allowed: {list(FORMS)}, '
            f'{list(common.ALLOCATORS)}')
  if len(allocators) > 1:
    return _main_allocators(allocators, args, argv, forms)
  if args.cores:
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:args.cores]))
  alloc = common.set_allocator(allocators[0])  # before JAX allocates anything
  env = common.environment({'n': args.n, 'reps': args.reps, 'pause_s': args.pause,
                            'cores_pinned': args.cores or None})
  print(f'# neuron benchmark: n = {args.n} neurons/step, allocator {alloc["mode"]} '
        f'({alloc["detail"]}), {env["cpu"]}, {env["cpu_count"]} cores, load {env["loadavg_start"]}')
  results = {}
  for t in ts:
    results[str(t)] = run_t(t, args.n, forms, args)
    rows = [[name, rec['median_ms'], rec['min_ms'], rec['cpu_ms'], rec['x_floor'],
             rec['temp_mib'], rec['faults'], rec['compile_s']]
            for name, rec in results[str(t)].items()]
    print(f'\n## T = {t}\n')
    print(common.markdown_table(['contender', 'median ms', 'min ms', 'cpu ms', 'x floor',
                                 'scratch MiB', 'faults/call', 'compile s'], rows))
  rows = summary_rows(results, ts)
  if rows:
    print(f'\n## Targets, allocator {alloc["mode"]} (ratios of median wall times; of median '
          f'CPU times in parentheses)\n')
    print(common.markdown_table(summary_header(forms), rows))
  payload = {'environment': env, 'descriptions': DESCRIPTION, 'results': results}
  out = common.write_json('neuron', payload, args.out)
  print(f'\nwrote {out}')
  return payload


def _main_allocators(allocators, args, argv, forms) -> dict:
  """Every allocator in a fresh process of its own, then their targets side by side."""
  env = common.environment({'allocators': allocators, 'n': args.n, 'reps': args.reps,
                            'pause_s': args.pause, 'cores_pinned': args.cores or None})
  print(f'# neuron benchmark: allocators {", ".join(allocators)} (a fresh process each), '
        f'{env["cpu"]}, {env["cpu_count"]} cores, load {env["loadavg_start"]}', flush=True)
  by_alloc = spawn_allocators(allocators, _without(argv, ('--allocator', '--out')))
  print('\n## Targets by allocator (ratios of median wall times; of median CPU times in '
        'parentheses)\n')
  header = ['allocator', 'load'] + summary_header(forms)
  rows = []
  for alloc, payload in by_alloc.items():
    load = payload['environment']['loadavg_start'][0]
    ts = [int(t) for t in payload['results']]
    rows += [[payload['environment']['allocator']['mode'], load] + row
             for row in summary_rows(payload['results'], ts)]
  print(common.markdown_table(header, rows))
  rows = target_rows(by_alloc)
  if rows:
    print(f'\n## The README targets at T = {TARGET_T}, n = {args.n}\n')
    print(common.markdown_table(
        ['allocator', 'load', 'floor ms', 'floor faults/call']
        + [f'{name} ({direction} {bound})' for name, direction, bound in TARGETS], rows))
  payload = {'environment': env, 'descriptions': DESCRIPTION, 'allocators': by_alloc}
  out = common.write_json('neuron', payload, args.out)
  print(f'\nwrote {out}')
  return payload


if __name__ == '__main__':
  main()
