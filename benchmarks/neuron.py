"""Neuron forward + backward: every MFP formulation, the column form, LIF, and the floor.

  python -m benchmarks.neuron                     # T in {4, 8, 10, 16, 32}, 2^20 neurons
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
"""

from __future__ import annotations

import argparse
import os
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


def summary_rows(results: dict, ts) -> list[list]:
  """Per T: the README's targets, as ratios to the floor and to the best LIF."""
  rows = []
  for t in ts:
    r = results[str(t)]
    if 'mfp/both' not in r:
      continue
    fl = r['floor']
    row = [t, fl['median_ms'], _ratio(r['mfp/grad'], fl), _ratio(r['mfp/both'], fl)]
    if 'lif_bptt/both' in r:
      row += [_ratio(r['lif_bptt/both'], r['mfp/both']), _ratio(r['lif_bptt/grad'], r['mfp/grad']),
              r['mfp/both']['temp_mib'], r['lif_bptt/both']['temp_mib']]
    if 'mfp_matmul/both' in r:
      row.append(_ratio(r['mfp_matmul/both'], r['mfp/both']))
    rows.append(row)
  return rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--ts', default='4,8,10,16,32', help='comma-separated T values')
  p.add_argument('--n', type=int, default=2**20, help='neurons per time step')
  p.add_argument('--forms', default=','.join(FORMS), help=f'subset of {",".join(FORMS)}')
  p.add_argument('--cores', type=int, default=0, help='pin to this many cores (0: all)')
  common.add_common_flags(p, reps=7)
  args = p.parse_args(argv)
  if args.cores:
    os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:args.cores]))
  alloc = common.set_allocator(args.allocator)  # before JAX allocates anything
  ts = [int(v) for v in args.ts.split(',')]
  forms = [f for f in args.forms.split(',') if f]
  unknown = set(forms) - set(FORMS)
  if unknown:
    p.error(f'unknown forms {sorted(unknown)}; allowed: {list(FORMS)}')
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
    print('\n## Targets (ratios of median wall times; of median CPU times in parentheses)\n')
    header = ['T', 'floor ms', 'MFP grad / floor', 'MFP both / floor']
    if 'lif_bptt' in forms:
      header += ['LIF both / MFP both', 'LIF grad / MFP grad', 'MFP scratch MiB',
                 'LIF scratch MiB']
    if 'mfp_matmul' in forms:
      header.append('matmul both / MFP both')
    print(common.markdown_table(header, rows))
  out = common.write_json('neuron', {'environment': env, 'descriptions': DESCRIPTION,
                                     'results': results}, args.out)
  print(f'\nwrote {out}')


if __name__ == '__main__':
  main()
