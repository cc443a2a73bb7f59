"""Peers: SpikingJelly's PSN and multi-step LIFNode (PyTorch, CPU) beside mfp_jax, one process.

  python -m benchmarks.peers                  # T in {4, 8, 10, 16, 32}, 2^20 neurons
  python -m benchmarks.peers --ts 10 --reps 15 --allocator default
  python -m benchmarks.peers --step           # one training step beside a PyTorch twin

Needs ``torch`` and ``spikingjelly`` (an optional extra, not part of the core install). Their
own requirements pull a CUDA build of torch, so on a CPU machine install them as:

  pip install torch==2.13.0            # a CPU wheel here; other specs pull CUDA
  pip install --no-deps spikingjelly loguru

Without them this prints one line and exits 0. Every contender computes spikes and the
gradient w.r.t. the input and the time-mixing weights for a fixed cotangent ``dS``:

* ``sj_psn`` -- ``spikingjelly.activation_based.neuron.PSN(T)``: ``H = W X + b`` as one
  ``torch.addmm`` over ``[T, N]`` (a full ``T x T`` W), ATan surrogate, torch autograd;
* ``sj_lif`` -- ``neuron.LIFNode(step_mode='m')``, ATan, hard reset, torch autograd;
* ``torch_floor`` -- ``x * dS + 1`` in torch; ``jax_floor``, ``mfp``, ``lif_bptt`` -- as in
  ``benchmarks.neuron`` (``both`` mode), timed in the same interleaved rounds.

Both frameworks allocate through glibc malloc here, so ``--allocator`` applies to both; torch
uses ``torch.get_num_threads()`` threads (stated in the JSON).

``--step`` runs :mod:`benchmarks.step_peers` instead, with the remaining arguments: one full
training step of VGGSNN / ResNet19 in mfp_jax and in the PyTorch + SpikingJelly twin
(:mod:`benchmarks.torch_twin`), each contender in its own process.
"""

from __future__ import annotations

import argparse
import sys

from benchmarks import common


def _import_peers():
  try:
    import torch
    from spikingjelly.activation_based import neuron, surrogate
  except ImportError as e:  # an optional extra: say what is missing and stop cleanly
    return None, f'{type(e).__name__}: {e}'
  return (torch, neuron, surrogate), None


def torch_contenders(torch, sj_neuron, sj_surrogate, t: int, n: int) -> dict:
  """name -> (call, wait) for the torch contenders at ``[T, n]``."""
  gen = torch.Generator().manual_seed(0)
  x = (torch.randn(t, n, generator=gen) + 0.5).requires_grad_(True)
  g = torch.randn(t, n, generator=gen)
  xd = x.detach()
  psn = sj_neuron.PSN(t, surrogate_function=sj_surrogate.ATan())
  lif = sj_neuron.LIFNode(step_mode='m', surrogate_function=sj_surrogate.ATan())
  params = list(psn.parameters())

  def psn_call():
    s = psn(x)
    return (s.detach(),) + torch.autograd.grad(s, [x] + params, grad_outputs=g)

  def lif_call():
    lif.reset()  # SpikingJelly neurons keep their membrane between calls
    s = lif(x)
    return s.detach(), torch.autograd.grad(s, [x], grad_outputs=g)[0]

  def floor_call():
    return xd * g + 1.0

  nothing = lambda out: None  # torch CPU ops are synchronous
  return {'torch_floor': (floor_call, nothing), 'sj_psn': (psn_call, nothing),
          'sj_lif': (lif_call, nothing)}


def jax_contenders(t: int, n: int) -> dict:
  import jax
  import jax.numpy as jnp
  from benchmarks import neuron as nb
  x, m, g = nb.inputs(t, n)
  x, g = x.reshape(t, n), g.reshape(t, n)
  fns = nb.neuron_fns(t)
  out = {'jax_floor': jax.jit(lambda x, m, g: x * g + 1.0)}
  out['mfp'] = jax.jit(nb._both_fn(fns['mfp'], True))
  out['lif_bptt'] = jax.jit(nb._both_fn(fns['lif_bptt'], False))
  del jnp
  return {k: (lambda f=f: f(x, m, g), jax.block_until_ready) for k, f in out.items()}


def main(argv=None):
  argv = sys.argv[1:] if argv is None else list(argv)
  if '--step' in argv:  # the training-step comparison; its own flags (see its --help)
    from benchmarks import step_peers
    return step_peers.main([a for a in argv if a != '--step'])
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--step', action='store_true',
                 help='time one training step beside the PyTorch twin (benchmarks.step_peers)')
  p.add_argument('--ts', default='4,8,10,16,32', help='comma-separated T values')
  p.add_argument('--n', type=int, default=2**20, help='neurons per time step')
  p.add_argument('--no-jax', action='store_true', help='time the torch contenders only')
  common.add_common_flags(p, reps=7)
  args = p.parse_args(argv)
  alloc = common.set_allocator(args.allocator)
  mods, why = _import_peers()
  if mods is None:
    print(f'peers benchmark skipped: torch and spikingjelly are not importable ({why}); '
          f'see `python -m benchmarks.peers --help` for the install')
    return 0
  torch, sj_neuron, sj_surrogate = mods
  import spikingjelly
  env = common.environment({'torch': torch.__version__, 'torch_threads': torch.get_num_threads(),
                            'spikingjelly': getattr(spikingjelly, '__version__', 'unknown'),
                            'n': args.n, 'reps': args.reps})
  print(f'# peers: n = {args.n}, allocator {alloc["mode"]} ({alloc["detail"]}), torch '
        f'{torch.__version__} ({torch.get_num_threads()} threads), load {env["loadavg_start"]}')
  results = {}
  for t in [int(v) for v in args.ts.split(',')]:
    contenders = torch_contenders(torch, sj_neuron, sj_surrogate, t, args.n)
    if not args.no_jax:
      contenders.update(jax_contenders(t, args.n))
    rec = common.time_interleaved(contenders, reps=args.reps, warmup=args.warmup,
                                  pause_s=args.pause)
    for name, r in rec.items():
      floor = rec['jax_floor' if name in ('jax_floor', 'mfp', 'lif_bptt') else 'torch_floor']
      r['x_own_floor'] = r['median_ms'] / floor['median_ms']
    results[str(t)] = rec
    print(f'\n## T = {t}\n')
    rows = [[k, r['median_ms'], r['min_ms'], r['cpu_ms'], r['x_own_floor'], r['faults']]
            for k, r in rec.items()]
    print(common.markdown_table(['contender', 'median ms', 'min ms', 'cpu ms',
                                 'x own floor', 'faults/call'], rows))
    if 'mfp' in rec:
      print(f'\nsj_psn / mfp = {rec["sj_psn"]["median_ms"] / rec["mfp"]["median_ms"]:.2f}, '
            f'sj_lif / mfp = {rec["sj_lif"]["median_ms"] / rec["mfp"]["median_ms"]:.2f}')
  out = common.write_json('peers', {'environment': env, 'results': results}, args.out)
  print(f'\nwrote {out}')
  return 0


if __name__ == '__main__':
  raise SystemExit(main())
