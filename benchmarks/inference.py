"""Inference of one spiking layer, one sample: exact serial scans vs the parallel window.

  python -m benchmarks.inference                  # T in {4, 10}, a 32x32x128 layer, batch 1
  python -m benchmarks.inference --ts 4,10,32 --hw 16 --channels 256

Inputs are what a deployed 1-bit layer produces: integer counts ``C = sign(W) S`` per channel,
with the weight scale and normalization folded into ``X = a C + c``. Contenders (forward only,
jitted, latency of one sample = all ``T`` steps):

* ``serial_folded`` -- ``folded_serial``: the deployable scan on integer counts against folded
  per-step thresholds (exact); a spike at step ``t`` is out as soon as ``C[t]`` is in;
* ``serial_float`` -- ``mfp_serial``: the exact streaming scan in float;
* ``parallel_window`` -- ``mfp_parallel`` on the whole window: no output before all ``T``
  inputs are in;
* ``column_serial`` -- ``mfp_column_serial`` (Eq. 6, one accumulator);
* ``lif_serial`` -- the LIF baseline's scan.

State per neuron is what each form must keep between steps (from the carries in
``mfp_jax/neurons.py``), in bytes at float32/int32.
"""

from __future__ import annotations

import argparse

from benchmarks import common


def state_bytes(t: int) -> dict[str, int]:
  """Bytes kept per neuron between time steps (float32 / int32)."""
  return {
      'serial_folded': 4 * t,    # partial sums for the current and all future steps
      'serial_float': 4 * t,     # the same carry P[t'] in float
      'parallel_window': 4 * t,  # the T inputs of the window, buffered until the last arrives
      'column_serial': 4,        # one accumulator A
      'lif_serial': 4,           # one membrane U
  }


def contenders(t: int, hw: int, channels: int):
  import jax
  import jax.numpy as jnp
  import numpy as np
  from mfp_jax import neurons
  rng = np.random.default_rng(0)
  fan_in = 9 * channels
  counts = jnp.asarray(rng.binomial(fan_in, 0.5, size=(t, 1, hw, hw, channels)) - fan_in // 2,
                       jnp.int32)
  a = jnp.asarray(rng.normal(scale=0.05, size=channels), jnp.float32)
  c = jnp.asarray(rng.normal(loc=0.5, scale=0.2, size=channels), jnp.float32)
  lag = np.arange(t)[:, None] - np.arange(t)[None, :]
  m = jnp.asarray(np.where(lag >= 0, 0.5**np.maximum(lag, 0), 0.0), jnp.float32)
  folded = neurons.fold_thresholds(m, 1.0, a, c)
  tau = jnp.diagonal(m)
  current = lambda cnt: a * cnt.astype(jnp.float32) + c
  fns = {
      'serial_folded': jax.jit(lambda cnt, f: neurons.folded_serial(cnt, f)),
      'serial_float': jax.jit(lambda cnt, f: neurons.mfp_serial(current(cnt), m)),
      'parallel_window': jax.jit(lambda cnt, f: neurons.mfp_parallel(current(cnt), m)),
      'column_serial': jax.jit(lambda cnt, f: neurons.mfp_column_serial(current(cnt), tau)),
      'lif_serial': jax.jit(lambda cnt, f: neurons.lif_serial(current(cnt))),
  }
  # The exact forms agree with the parallel window (up to float near-ties).
  ref = fns['parallel_window'](counts, folded)
  agree = {k: float(jnp.mean(fns[k](counts, folded) == ref))
           for k in ('serial_folded', 'serial_float')}
  return {k: (lambda f=f: f(counts, folded), jax.block_until_ready) for k, f in fns.items()}, agree


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--ts', default='4,10', help='comma-separated T values')
  p.add_argument('--hw', type=int, default=32, help='feature map side')
  p.add_argument('--channels', type=int, default=128, help='channels of the layer')
  common.add_common_flags(p, reps=15)
  args = p.parse_args(argv)
  alloc = common.set_allocator(args.allocator)
  n = args.hw * args.hw * args.channels
  env = common.environment({'neurons_per_step': n, 'batch': 1, 'reps': args.reps})
  print(f'# inference, one sample, one layer of {args.hw}x{args.hw}x{args.channels} = {n} '
        f'neurons, allocator {alloc["mode"]}, load {env["loadavg_start"]}')
  results = {}
  for t in [int(v) for v in args.ts.split(',')]:
    cont, agree = contenders(t, args.hw, args.channels)
    rec = common.time_interleaved(cont, reps=args.reps, warmup=args.warmup, pause_s=args.pause)
    sb = state_bytes(t)
    for k, r in rec.items():
      r['state_bytes_per_neuron'] = sb[k]
      r['spike_agreement_with_parallel'] = agree.get(k, 1.0 if k == 'parallel_window' else None)
    results[str(t)] = rec
    print(f'\n## T = {t}\n')
    print(common.markdown_table(
        ['form', 'median ms / sample', 'min ms', 'ms per step (median / T)',
         'state bytes / neuron', 'spikes == parallel'],
        [[k, r['median_ms'], r['min_ms'], r['median_ms'] / t, r['state_bytes_per_neuron'],
          r['spike_agreement_with_parallel']] for k, r in rec.items()]))
  out = common.write_json('inference', {'environment': env, 'results': results}, args.out)
  print(f'\nwrote {out}')


if __name__ == '__main__':
  main()
