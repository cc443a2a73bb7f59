"""The step as users run it: ``python train.py`` itself, timed from its own ``metrics.jsonl``.

  python -m benchmarks.train_loop                 # cifar10dvs + cifar10; mfp, lif, relu;
                                                  # trainpy + untuned; 3 rounds
  python -m benchmarks.train_loop --configs cifar10dvs --rounds 5 --steps 12 --log-every 3
  python -m benchmarks.train_loop --tiny          # digits, a few steps (the smoke test)

Each run is one ``python train.py --config configs/<name>.py --workdir <tmp>`` process with
the neuron kind changed (``--config.model.neuron.kind``), ``--config.stop_at_step=<steps>``,
``--config.log_every_steps=<k>``, no periodic checkpoint and no progress bar. Everything else
is the user's run: the paper config, ``train.py``'s start-up (``runtime.configure()``), the
input pipeline with augmentation, the jitted step, the metrics buffer. The data are
synthetic, written in the real on-disk formats by ``tests/datagen.py`` (AEDAT4 recordings,
framed once into the on-disk cache before the first run; a prepared tfds array_record
folder), with more training examples than ``batch x (steps + 1)`` so that no epoch ends
(and no evaluation runs) inside the timed steps.

**The rate.** ``metrics.jsonl`` gets one ``train`` line per ``k`` steps, written after the
loop has fetched those steps' metrics, i.e. after they finished. The first interval holds
start-up and compilation and is skipped; the rate is ``(step_last - step_first) /
(time_last - time_first)`` over the later lines (per-interval rates are kept in the JSON).

**Settings** (as ``benchmarks.train_step``): ``trainpy`` is ``train.py`` as it starts (tuned
malloc, XLA:CPU conv flag); ``untuned`` adds ``MFP_JAX_ALLOCATOR=default
MFP_JAX_XLA_CPU=default``; ``malloc_only`` / ``flag_only`` keep one of the two.

**Method.** The contenders are ``(setting, kind)`` pairs. In each of ``--rounds`` rounds every
contender runs once, one process at a time, in an order rotated by one per round. Reported
per contender: the median over rounds of seconds per step; per round and setting, the
ratios of seconds per step MFP / LIF and MFP / ANN (``relu``), and their medians (paired in
time, so a slow phase of a shared machine hits both sides of a ratio alike).

**Batch.** By default each model runs at ``benchmarks.train_step``'s batch (VGGSNN 4,
ResNet19 8: the same step it times bare, so the two scripts' numbers compare); ``--batch
config`` keeps the config's own (64: about 16x longer per step on a CPU), ``--batch N`` sets
one for all. ``eval_batch_size`` is set to the same (the final evaluation is outside the
timed steps; this only keeps it short).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

from benchmarks import common
from benchmarks import train_step

# config name -> the benchmarks.train_step model of the same net (and default batch)
CONFIGS = {'cifar10dvs': 'vggsnn', 'cifar10': 'resnet19', 'digits': 'digits'}
KINDS = train_step.KINDS
TINY = {'configs': 'digits', 'steps': 4, 'log_every': 2, 'rounds': 1, 'batch': '8'}


def write_data(name: str, root: pathlib.Path, n_train: int) -> str | None:
  """Synthetic data of config ``name`` under ``root`` in its real on-disk format, with at
  least ``n_train`` training examples; returns the ``data_dir`` to pass (None: embedded)."""
  sys.path.insert(0, os.path.join(common.ROOT, 'tests'))
  import datagen
  if name == 'cifar10':
    datagen.write_tfds_cifar(root, 'cifar10', n_train=n_train, n_test=16)
  elif name == 'cifar10dvs':
    # A seeded split per class holds out floor(n_c / 10): n_c >= 10 leaves a test split, and
    # n_c >= ceil(n / 9) + 1 leaves >= n to train.
    per_class = max(10, math.ceil(n_train / 9) + 1)
    datagen.write_cifar10dvs(root, per_class=per_class, n_events=4000)
  else:
    return None
  return str(root)


def prepare(name: str, data_dir: str | None, T: int) -> int:
  """Loads the data set once (DVS: frames every recording into the on-disk cache, as a
  user's first run does, so that no timed run pays for it); returns its train size."""
  from mfp_jax import data as data_lib
  cfg = train_step.load_config(f'configs/{name}.py')
  if data_dir is not None:
    cfg.data.data_dir = data_dir
  return len(data_lib.create_dataset(cfg.data, T=T).train)


def train_command(name: str, kind: str, workdir: str, data_dir: str | None, batch: int | None,
                  args) -> list[str]:
  cmd = ['train.py', '--config', f'configs/{name}.py', '--workdir', workdir,
         f'--config.model.neuron.kind={kind}', f'--config.stop_at_step={args.steps}',
         f'--config.log_every_steps={args.log_every}',
         f'--config.checkpoint_every_steps={10**9}', '--config.progress=False']
  if data_dir is not None:
    cmd.append(f'--config.data.data_dir={data_dir}')
  if batch:
    cmd += [f'--config.data.batch_size={batch}', f'--config.data.eval_batch_size={batch}']
  if name == 'digits':
    cmd.append('--config.model.channels=(8,16,16)')  # as tests/helpers.py: seconds on a CPU
  return cmd


def rate(workdir: str) -> dict:
  """Steps/s from the ``train`` lines of ``metrics.jsonl``, the first interval skipped."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    lines = [json.loads(line) for line in f]
  pts = [(m['step'], m['time']) for m in lines if m.get('split') == 'train']
  if len(pts) < 2:
    raise RuntimeError(f'{workdir}: {len(pts)} train line(s) in metrics.jsonl; need >= 2 '
                       f'(steps >= 2 x log_every)')
  (s0, t0), (s1, t1) = pts[0], pts[-1]
  intervals = [(b[0] - a[0]) / (b[1] - a[1]) for a, b in zip(pts, pts[1:])]
  return {'steps_per_s': (s1 - s0) / (t1 - t0), 's_per_step': (t1 - t0) / (s1 - s0),
          'timed_steps': s1 - s0, 'interval_steps_per_s': intervals, 'lines': pts}


def run_once(name: str, setting: str, kind: str, data_dir, batch, args, tmp: str) -> dict:
  workdir = tempfile.mkdtemp(prefix=f'{name}_{setting}_{kind}_', dir=tmp)
  cmd = train_command(name, kind, workdir, data_dir, batch, args)
  load0, w0 = common._loadavg(), time.time()
  r = subprocess.run([sys.executable, *cmd], cwd=common.ROOT, env=train_step._setting_env(setting),
                     capture_output=True, text=True)
  wall = time.time() - w0
  if r.returncode != 0:
    raise RuntimeError(f'{setting} {" ".join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}')
  rec = rate(workdir)
  rec.update(setting=setting, kind=kind, wall_s=wall, first_line_s=rec['lines'][0][1] - w0,
             loadavg=[load0, common._loadavg()],
             command=' '.join(f'{k}={v}' for k, v in train_step.SETTINGS[setting].items())
             + (' ' if train_step.SETTINGS[setting] else '') + 'python ' + ' '.join(cmd))
  print(f'  {name} {setting} {kind}: {rec["steps_per_s"]:.4f} steps/s '
        f'({rec["s_per_step"]:.3f} s/step over {rec["timed_steps"]} steps; run {wall:.0f} s, '
        f'load {load0[0] if load0 else "?"})', file=sys.stderr, flush=True)
  return rec


def ratios(runs: list[dict], settings, rounds: int) -> dict:
  """setting -> {'MFP/LIF': [...], 'MFP/ANN': [...]} per round (seconds per step)."""
  out = {}
  for setting in settings:
    per = {}
    for other, label in (('lif', 'MFP/LIF'), ('relu', 'MFP/ANN')):
      vals = []
      for r in range(rounds):
        got = {x['kind']: x['s_per_step'] for x in runs if x['round'] == r
               and x['setting'] == setting}
        if 'mfp' in got and other in got:
          vals.append(got['mfp'] / got[other])
      if vals:
        per[label] = vals
    out[setting] = per
  return out


def bench_config(name: str, settings, kinds, args, tmp: str) -> dict:
  """Writes the data, then runs every (setting, kind) once per round, round robin."""
  cfg = train_step.load_config(f'configs/{name}.py')
  model = CONFIGS[name]
  if args.batch == 'config':
    batch = None
  elif args.batch:
    batch = int(args.batch)
  else:
    batch = train_step.MODELS[model][1]
  b = batch or cfg.data.batch_size
  need = b * (args.steps + 1)
  root = pathlib.Path(tmp) / f'data_{name}'
  data_dir = write_data(name, root, need)
  n_train = prepare(name, data_dir, cfg.model.T)
  if n_train < need:
    raise RuntimeError(f'{name}: {n_train} training examples, need {need} so that no epoch '
                       f'ends inside the {args.steps} steps')
  contenders = [(s, k) for s in settings for k in kinds]
  runs = []
  for r in range(args.rounds):
    j = r % len(contenders)
    for setting, kind in contenders[j:] + contenders[:j]:
      rec = run_once(name, setting, kind, data_dir, batch, args, tmp)
      runs.append(dict(rec, round=r))
  summary = {}
  for setting, kind in contenders:
    mine = [x for x in runs if x['setting'] == setting and x['kind'] == kind]
    sps = [x['s_per_step'] for x in mine]
    summary[f'{setting}/{kind}'] = {
        'setting': setting, 'kind': kind, 'median_s_per_step': statistics.median(sps),
        'min_s_per_step': min(sps), 'median_steps_per_s': 1.0 / statistics.median(sps),
        's_per_step': sps}
  return {'model': cfg.model.name, 'T': cfg.model.T, 'batch': b, 'train_examples': n_train,
          'steps': args.steps, 'log_every': args.log_every, 'rounds': args.rounds,
          'summary': summary, 'ratios': ratios(runs, settings, args.rounds), 'runs': runs}


def print_tables(name: str, rec: dict) -> None:
  print(f'\n## {name}: {rec["model"]}, T = {rec["T"]}, batch {rec["batch"]}; steps '
        f'{rec["log_every"] + 1}-{rec["steps"]} timed, {rec["rounds"]} rounds\n')
  g = lambda v: f'{v:.4g}'
  rows = [[s['setting'], s['kind'], g(s['median_s_per_step']), g(s['min_s_per_step']),
           g(s['median_steps_per_s']), ', '.join(map(g, s['s_per_step']))]
          for s in rec['summary'].values()]
  print(common.markdown_table(['setting', 'neuron', 'median s/step', 'min s/step',
                               'steps/s', 's/step per round'], rows))
  rows = []
  for setting, per in rec['ratios'].items():
    for label, vals in per.items():
      rows.append([setting, label, statistics.median(vals), ', '.join(f'{v:.3f}' for v in vals)])
  if rows:
    print('\nRatios of s/step (> 1: MFP slower), per round and their median:\n')
    print(common.markdown_table(['setting', 'ratio', 'median', 'per round'], rows))
  first = rec['runs'][0]['command'] if rec['runs'] else ''
  print(f'\nfirst run: `{first}`')


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--configs', default='cifar10dvs,cifar10', help=f'subset of {",".join(CONFIGS)}')
  p.add_argument('--kinds', default=','.join(KINDS), help=f'subset of {",".join(KINDS)}')
  p.add_argument('--settings', default='trainpy,untuned',
                 help=f'process settings: {",".join(train_step.SETTINGS)}')
  p.add_argument('--rounds', type=int, default=3, help='runs per contender (round robin)')
  p.add_argument('--steps', type=int, default=8, help='config.stop_at_step')
  p.add_argument('--log-every', type=int, default=2, help='config.log_every_steps (the first '
                 'interval holds compilation and is skipped)')
  p.add_argument('--batch', default='', help="'' (benchmarks.train_step's per-model batch), "
                 "'config' (the config's own), or an integer")
  p.add_argument('--tiny', action='store_true', help='smoke test: '
                 + ', '.join(f'{k} {v}' for k, v in TINY.items()))
  p.add_argument('--out', default=None, help='JSON path (default: benchmarks/results/)')
  args = p.parse_args(argv)
  if args.tiny:
    for k, v in TINY.items():
      setattr(args, k, v)
  names = [c for c in args.configs.split(',') if c]
  kinds = [k for k in args.kinds.split(',') if k]
  settings = [s for s in args.settings.split(',') if s]
  bad = ((set(names) - set(CONFIGS)) | (set(kinds) - set(KINDS))
         | (set(settings) - set(train_step.SETTINGS)))
  if bad or not (names and kinds and settings):
    p.error(f'unknown configs, kinds or settings {sorted(bad)}; allowed: {list(CONFIGS)}, '
            f'{list(KINDS)}, {list(train_step.SETTINGS)}')
  if args.steps < 2 * args.log_every:
    p.error(f'--steps {args.steps} < 2 x --log-every {args.log_every}: no timed interval')
  if args.batch not in ('', 'config') and not args.batch.isdigit():
    p.error(f"--batch must be '', 'config' or an integer, got {args.batch!r}")
  env = common.environment({'settings': {s: train_step.SETTINGS[s] for s in settings},
                            'rounds': args.rounds, 'steps': args.steps,
                            'log_every': args.log_every})
  print(f'# train.py loop: {", ".join(names)}; settings {", ".join(settings)}; '
        f'{env["cpu"]}, {env["cpu_count"]} cores, load {env["loadavg_start"]}', flush=True)
  results = {}
  with tempfile.TemporaryDirectory() as tmp:
    for name in names:
      results[name] = bench_config(name, settings, kinds, args, tmp)
      print_tables(name, results[name])
  out = common.write_json('train_loop', {'environment': env, 'results': results}, args.out)
  print(f'\nwrote {out}')
  return results


if __name__ == '__main__':
  main()
