"""One convolution: forward, dx and dW for JAX autodiff, ``conv2d(dw='taps')`` and PyTorch.

  python -m benchmarks.conv                          # VGGSNN + ResNet19 shapes, default malloc
  python -m benchmarks.conv --allocator tuned
  python -m benchmarks.conv --xla-flags-sweep --shapes vgg3,res_s2   # XLA:CPU flags, see below

The shapes are the convs of VGGSNN on CIFAR10-DVS at 48x48 (T=10 x batch 4 = N 40) and the
stride-2 block of ResNet19 at 32x32 (T=4 x batch 8 = N 32) with its 1x1 shortcut; all fp32,
NHWC/HWIO, SAME padding. Every op is jitted on its own and timed interleaved with the others
(``benchmarks/common.py``):

* ``fwd`` -- ``lax.conv_general_dilated`` (also ``conv2d``'s forward: the same op);
* ``dx`` -- the input gradient alone (``jax.vjp`` w.r.t. ``x``; the forward is dead code);
  ``conv2d``'s dx is autodiff's own transpose, so it is not timed twice;
* ``dW`` -- the weight gradient alone: autodiff (one XLA conv with an ``Ho x Wo`` window)
  vs ``conv2d(dw='taps')`` (one matmul per kernel tap);
* ``train`` -- forward, dx and dW in one function: what a training step pays per conv.

PyTorch (if ``import torch`` works; it is not a dependency): ``F.conv2d`` forward, and
``aten.convolution_backward`` (what autograd calls) for dx alone and dW alone, ``train`` by
autograd; in NCHW and in channels_last (``--torch-layouts``), torch's own thread count.
Asymmetric SAME padding (stride 2 on an even size) is an explicit ``F.pad`` first.

``--xla-flags-sweep`` runs this script again in a fresh process per ``XLA_FLAGS`` setting
(XLA reads them once at start-up), ``--sweep-rounds`` times in rotated order, and tabulates
each setting's medians against the baseline's. In jaxlib 0.10.2 the one that matters is
``conv_not_ynn``: convolutions go to Eigen instead of YNNPACK, and XLA's own dW gets 2.5-4x
cheaper (``mfp_jax.conv`` says what ``dw='auto'`` does with it).

The main case is glibc's default malloc (what a plain ``python train.py`` got before
``mfp_jax.runtime``); ``--allocator tuned`` is the other.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks import common

SHAPES = {  # name -> (N, H, W, C, O, k, stride)
    'vgg1': (40, 48, 48, 2, 64, 3, 1),
    'vgg2': (40, 48, 48, 64, 128, 3, 1),
    'vgg3': (40, 24, 24, 128, 256, 3, 1),
    'vgg4': (40, 24, 24, 256, 256, 3, 1),
    'vgg5': (40, 12, 12, 256, 512, 3, 1),
    'vgg6': (40, 12, 12, 512, 512, 3, 1),
    'vgg7': (40, 6, 6, 512, 512, 3, 1),
    'res_s2': (32, 32, 32, 128, 256, 3, 2),
    'res_sc': (32, 32, 32, 128, 256, 1, 2),
    'reported': (40, 48, 48, 128, 128, 3, 1),  # the colleague's measurement
    'tiny': (2, 6, 6, 4, 8, 3, 1),  # for the smoke test, not for the README
}
DEFAULT_SHAPES = 'vgg1,vgg2,vgg3,vgg4,vgg5,vgg6,vgg7,res_s2,res_sc'
KINDS = ('fwd', 'dx', 'dw', 'train')
_YNN_CONV_OFF = '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution'
# name -> XLA_FLAGS. Names from `strings` on jaxlib 0.10.2's libjax_common.so; all are accepted
# (an unknown one aborts XLA; a bad value prints the flag list with help and defaults).
FLAG_CONFIGS = {
    'baseline': '',
    'conv_not_ynn': _YNN_CONV_OFF,
    'no_ynn': '--xla_cpu_experimental_ynn_fusion_type=',
    'onednn': f'--xla_cpu_use_onednn=true {_YNN_CONV_OFF}',
    'onednn_custom_call': f'--xla_cpu_experimental_onednn_custom_call=true {_YNN_CONV_OFF}',
    'onednn_fusion_dot': ('--xla_cpu_experimental_onednn_fusion_type=dot '
                          '--xla_cpu_experimental_ynn_fusion_type='),
    'xnn_fusion_dot': ('--xla_cpu_experimental_xnn_fusion_type=dot '
                       '--xla_cpu_experimental_ynn_fusion_type='),
    'xnn_graph_greedy': '--xla_cpu_experimental_xnn_graph_fusion_mode=XNN_GRAPH_FUSION_MODE_GREEDY',
    'no_xnnpack': '--xla_cpu_use_xnnpack=false',
    'fast_math': '--xla_cpu_enable_fast_math=true',
    'eigen_one_thread': '--xla_cpu_multi_thread_eigen=false',
    'strict_dot_conv_math': '--xla_cpu_strict_dot_conv_math=true',
    'thunks_off': '--xla_cpu_use_thunk_runtime=false',
}


def make_inputs(shape, seed: int = 0):
  """numpy ``x [N, H, W, C]``, ``w [k, k, C, O]``, ``g [N, Ho, Wo, O]`` (fp32, normal)."""
  import numpy as np
  n, h, w, c, o, k, s = shape
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, h, w, c), np.float32)
  kern = (rng.standard_normal((k, k, c, o), np.float32) / np.sqrt(k * k * c)).astype(np.float32)
  g = rng.standard_normal((n, -(-h // s), -(-w // s), o), np.float32)
  return x, kern, g


def jax_fns(stride: int, kinds) -> dict:
  """name -> function of ``(x, w, g)`` for the JAX contenders."""
  import jax
  from jax import lax
  from mfp_jax import conv

  def ref(x, w):
    return lax.conv_general_dilated(x, w, (stride, stride), 'SAME',
                                    dimension_numbers=('NHWC', 'HWIO', 'NHWC'))

  def taps(x, w):
    return conv.conv2d(x, w, stride=stride, dw='taps')

  fns = {}
  if 'fwd' in kinds:
    fns['jax fwd'] = lambda x, w, g: ref(x, w)
  if 'dx' in kinds:
    fns['jax dx'] = lambda x, w, g: jax.vjp(lambda x: ref(x, w), x)[1](g)[0]
  if 'dw' in kinds:
    fns['jax dW'] = lambda x, w, g: jax.vjp(lambda w: ref(x, w), w)[1](g)[0]
    fns['taps dW'] = lambda x, w, g: jax.vjp(lambda w: taps(x, w), w)[1](g)[0]
  if 'train' in kinds:
    for name, f in (('jax train', ref), ('taps train', taps)):
      fns[name] = lambda x, w, g, f=f: (lambda y, pull: (y,) + pull(g))(*jax.vjp(f, x, w))
  return fns


def jax_contenders(shape, kinds):
  """``(contenders, records)``: compiled JAX calls and their compile time / scratch MiB."""
  import jax
  import numpy as np
  args = [jax.device_put(a) for a in make_inputs(shape)]
  contenders, records = {}, {}
  for name, fn in jax_fns(shape[-1], kinds).items():
    t0 = time.perf_counter()
    exe = jax.jit(fn).lower(*args).compile()
    mem = exe.memory_analysis()
    records[name] = {'compile_s': time.perf_counter() - t0,
                     'temp_mib': common.mib(getattr(mem, 'temp_size_in_bytes', None))}
    contenders[name] = (lambda exe=exe: exe(*args), jax.block_until_ready)
  if 'jax dW' in contenders:  # taps vs autodiff on this very shape
    ref, got = (np.asarray(contenders[n][0]()) for n in ('jax dW', 'taps dW'))
    records['taps dW']['max_rel_err'] = float(np.abs(got - ref).max() / np.abs(ref).max())
  return contenders, records


def torch_contenders(torch, shape, layout: str, kinds) -> dict:
  """name -> (call, wait) for PyTorch in ``layout`` ('nchw' or 'cl' = channels_last)."""
  import torch.nn.functional as F
  n, h, wd, c, o, k, s = shape
  (ht, hb), (wl, wr) = _same_pad(h, k, s), _same_pad(wd, k, s)
  symmetric = ht == hb and wl == wr
  fmt = torch.channels_last if layout == 'cl' else torch.contiguous_format
  x, kern, g = make_inputs(shape)
  x = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(memory_format=fmt)
  w = torch.from_numpy(kern).permute(3, 2, 0, 1).contiguous(memory_format=fmt)  # OIHW
  g = torch.from_numpy(g).permute(0, 3, 1, 2).contiguous(memory_format=fmt)
  pad = [ht, wl] if symmetric else [0, 0]  # else an explicit F.pad (torch pads symmetrically)
  prepad = (lambda t: t) if symmetric else (lambda t: F.pad(t, (wl, wr, ht, hb)))
  xp = prepad(x).contiguous(memory_format=fmt)  # what the forward saved for the backward

  def backward(mask):
    return torch.ops.aten.convolution_backward(g, xp, w, None, [s, s], pad, [1, 1], False,
                                               [0, 0], 1, mask)

  def fwd():
    with torch.no_grad():
      return F.conv2d(prepad(x), w, stride=s, padding=pad)

  def dx():
    out = backward([True, False, False])[0]
    return out if symmetric else out[:, :, ht:ht + h, wl:wl + wd]

  def dw():
    return backward([False, True, False])[1]

  xr, wr_ = x.detach().requires_grad_(True), w.detach().requires_grad_(True)

  def train():
    y = F.conv2d(prepad(xr), wr_, stride=s, padding=pad)
    return (y.detach(),) + torch.autograd.grad(y, (xr, wr_), g)

  nothing = lambda out: None  # torch CPU ops are synchronous
  fns = {'fwd': fwd, 'dx': dx, 'dw': dw, 'train': train}
  return {f'torch/{layout} {kind if kind != "dw" else "dW"}': (fns[kind], nothing)
          for kind in kinds}


def _same_pad(size: int, k: int, s: int) -> tuple[int, int]:
  """XLA's SAME padding ``(low, high)`` (``mfp_jax.conv.same_padding``, without JAX)."""
  out = -(-size // s)
  total = max((out - 1) * s + k - size, 0)
  return total // 2, total - total // 2


def run_shape(name: str, args, torch) -> dict:
  """Times every contender on one shape, interleaved; returns name -> record."""
  shape = SHAPES[name]
  kinds = args.kinds.split(',')
  contenders, records = jax_contenders(shape, kinds)
  if torch is not None:
    for layout in args.torch_layouts.split(','):
      contenders.update(torch_contenders(torch, shape, layout, kinds))
  timings = common.time_interleaved(contenders, reps=args.reps, warmup=args.warmup,
                                    pause_s=args.pause)
  for n, t in timings.items():
    records.setdefault(n, {}).update(t)
  return records


def _sci(v):
  return None if v is None else f'{v:.1e}'


def _best_torch(rec: dict, kind: str, key: str):
  """``(ms, layout)`` of torch's faster layout for ``kind``, or ``(None, None)``."""
  found = [(r[key], k.split()[0].split('/')[1]) for k, r in rec.items()
           if k.startswith('torch/') and k.endswith(' ' + kind)]
  return min(found) if found else (None, None)


def summary_rows(results: dict, with_torch: bool, key: str = 'median_ms') -> list[list]:
  """One row per shape: ``key`` ('median_ms' wall or 'cpu_ms' process CPU) per contender."""
  rows = []
  for name, rec in results.items():
    n, h, w, c, o, k, s = SHAPES[name]
    ms = lambda contender: rec[contender][key] if contender in rec else None
    dw, taps = ms('jax dW'), ms('taps dW')
    row = [name, f'[{n},{h},{w},{c}]->{o} k{k} s{s}', ms('jax fwd'), ms('jax dx'), dw, taps,
           f'{dw / taps:.2f}x' if dw and taps else None, ms('jax train'), ms('taps train')]
    if with_torch:
      for kind in ('fwd', 'dx', 'dW', 'train'):
        t, layout = _best_torch(rec, kind, key)
        row.append(None if t is None else f'{t:.1f} ({layout})')
    rows.append(row)
  return rows


SUMMARY_HEADER = ['shape', 'conv', 'fwd', 'dx', 'dW autodiff', 'dW taps', 'autodiff/taps',
                  'train autodiff', 'train taps']
TORCH_HEADER = ['torch fwd', 'torch dx', 'torch dW', 'torch train']


def _import_torch(disabled: bool):
  if disabled:
    return None, 'disabled by --no-torch'
  try:
    import torch
  except ImportError as e:
    return None, f'{type(e).__name__}: {e}'
  return torch, None


def run_main(args) -> None:
  alloc = common.set_allocator(args.allocator)  # before JAX allocates anything
  torch, why = _import_torch(args.no_torch)
  extra = {'reps': args.reps, 'pause_s': args.pause, 'shapes': {n: SHAPES[n] for n in
                                                                args.shapes.split(',')}}
  if torch is not None:
    extra.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
  env = common.environment(extra)
  print(f'# conv benchmark: allocator {alloc["mode"]} ({alloc["detail"]}), {env["cpu"]}, '
        f'{env["cpu_count"]} cores, XLA_FLAGS={env["xla_flags"]!r}, load {env["loadavg_start"]}')
  if torch is None:
    print(f'torch is absent ({why}): the torch columns are left out')
  else:
    print(f'torch {torch.__version__}, {torch.get_num_threads()} threads, layouts '
          f'{args.torch_layouts}')
  results = {}
  for name in args.shapes.split(','):
    results[name] = rec = run_shape(name, args, torch)
    print(f'\n## {name} {SHAPES[name]}  (load {common._loadavg()})\n')
    rows = [[k, r['median_ms'], r['min_ms'], r['cpu_ms'], r['faults'], r.get('compile_s'),
             r.get('temp_mib'), _sci(r.get('max_rel_err'))] for k, r in rec.items()]
    print(common.markdown_table(['contender', 'median ms', 'min ms', 'cpu ms', 'faults/call',
                                 'compile s', 'scratch MiB', 'max rel err vs autodiff'], rows))
  header = SUMMARY_HEADER + (TORCH_HEADER if torch is not None else [])
  for key, what in (('median_ms', 'median wall ms'), ('cpu_ms', 'median process CPU ms')):
    print(f'\n## Summary: {what} (torch: the faster layout)\n')
    print(common.markdown_table(header, summary_rows(results, torch is not None, key)))
  out = common.write_json(f'conv_{alloc["mode"]}', {'environment': env, 'results': results},
                          args.out)
  print(f'\nwrote {out}')


def _sweep_once(cfg: str, args, out: str) -> dict:
  """One fresh process with ``XLA_FLAGS`` set to ``FLAG_CONFIGS[cfg]``; its JSON results."""
  env = dict(os.environ, XLA_FLAGS=FLAG_CONFIGS[cfg])
  cmd = [sys.executable, '-m', 'benchmarks.conv', '--shapes', args.shapes, '--kinds',
         args.kinds, '--reps', str(args.reps), '--warmup', str(args.warmup), '--pause',
         str(args.pause), '--allocator', args.allocator, '--no-torch', '--out', out]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
  if proc.returncode != 0:
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    return {'error': f'rc {proc.returncode}: ' + (lines[-1][:300] if lines else '')}
  with open(out) as f:
    data = json.load(f)
  return {shape: {k: {'median_ms': r['median_ms'], 'cpu_ms': r['cpu_ms']} for k, r in rec.items()}
          for shape, rec in data['results'].items()}


def run_sweep(args) -> None:
  """Every ``FLAG_CONFIGS`` entry in its own process, rounds rotated; medians over rounds."""
  names = [n for n in args.flag_configs.split(',') if n]
  env = common.environment({'sweep_rounds': args.sweep_rounds, 'reps': args.reps,
                            'flag_configs': {n: FLAG_CONFIGS[n] for n in names}})
  print(f'# XLA flag sweep on {args.shapes}: {len(names)} settings x {args.sweep_rounds} '
        f'rounds, allocator {args.allocator}, load {env["loadavg_start"]}')
  runs = {n: [] for n in names}
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(args.sweep_rounds):
      k = r % len(names)
      for n in names[k:] + names[:k]:
        runs[n].append(_sweep_once(n, args, os.path.join(tmp, f'{n}_{r}.json')))
        print(f'  round {r} {n}: done (load {common._loadavg()})', flush=True)
  results = {n: _median_runs(v) for n, v in runs.items()}
  for key, what in (('median_ms', 'median wall ms'), ('cpu_ms', 'median process CPU ms')):
    print(f'\n## {what} per setting (ratio to baseline in parentheses)\n')
    print(common.markdown_table(*_sweep_table(results, names, key)))
  out = common.write_json('conv_xla_flags', {'environment': env, 'results': results,
                                             'runs': runs}, args.out)
  print(f'\nwrote {out}')


def _median_runs(runs: list[dict]) -> dict:
  errors = [r['error'] for r in runs if 'error' in r]
  if errors:
    return {'error': errors[0]}
  return {shape: {k: {m: statistics.median(r[shape][k][m] for r in runs)
                      for m in ('median_ms', 'cpu_ms')} for k in runs[0][shape]}
          for shape in runs[0]}


def _sweep_table(results: dict, names, key: str) -> tuple[list, list]:
  """Settings x (shape, contender): ``key`` ms, and in parentheses the ratio to baseline."""
  base = results.get('baseline', {})
  first = next((r for r in results.values() if 'error' not in r), {})
  cols = [(s, k) for s in first for k in first[s]]
  header = ['setting', 'XLA_FLAGS'] + [f'{s} {k}' for s, k in cols]
  rows = []
  for n in names:
    r = results[n]
    if 'error' in r:
      rows.append([n, FLAG_CONFIGS[n], r['error']])
      continue
    cells = []
    for s, k in cols:
      v, b = r[s][k][key], base.get(s, {}).get(k, {}).get(key)
      cells.append(f'{v:.0f}' + (f' ({v / b:.2f})' if b and n != 'baseline' else ''))
    rows.append([n, f'`{FLAG_CONFIGS[n]}`' if FLAG_CONFIGS[n] else '(none)'] + cells)
  return header, rows


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--shapes', default=DEFAULT_SHAPES, help=f'subset of {",".join(SHAPES)}')
  p.add_argument('--kinds', default=','.join(KINDS), help=f'subset of {",".join(KINDS)}')
  p.add_argument('--torch-layouts', default='nchw,cl', help='nchw and/or cl (channels_last)')
  p.add_argument('--no-torch', action='store_true', help='leave torch out even if importable')
  p.add_argument('--xla-flags-sweep', action='store_true',
                 help='time every FLAG_CONFIGS setting, each in a fresh process')
  p.add_argument('--flag-configs', default=','.join(FLAG_CONFIGS),
                 help=f'settings for the sweep, subset of {",".join(FLAG_CONFIGS)}')
  p.add_argument('--sweep-rounds', type=int, default=2, help='processes per setting')
  common.add_common_flags(p, reps=7)
  p.set_defaults(allocator='default')  # the main case here (see the module docstring)
  args = p.parse_args(argv)
  for flag, value, allowed in (('--shapes', args.shapes, SHAPES), ('--kinds', args.kinds, KINDS),
                               ('--torch-layouts', args.torch_layouts, ('nchw', 'cl')),
                               ('--flag-configs', args.flag_configs, FLAG_CONFIGS)):
    unknown = set(value.split(',')) - set(allowed)
    if unknown:
      p.error(f'{flag}: unknown {sorted(unknown)}; allowed: {list(allowed)}')
  if args.xla_flags_sweep:
    run_sweep(args)
  else:
    run_main(args)


if __name__ == '__main__':
  main()
