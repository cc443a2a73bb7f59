"""The faults of a whole run, end to end: two writers, a changed run, signals at exact points,
``stop_at_step``, and inference on non-finite or very large inputs.

Every ``train.py`` run here is the tiny digits config (2 epochs x 21 steps, a checkpoint every
5 steps) and compares with one uninterrupted reference run of this module, line for line of
``metrics.jsonl`` and array for array of the checkpoints. The runs share a persistent XLA
compilation cache, so each start costs its imports, not a compile. Signals land at exact
points through the test-only hook :data:`mfp_jax.resilience.PAUSE_ENV`: the run waits there
until the signal arrives. What needs no real process runs in-process: eval.py's evaluation next
to a live run (what its ``main`` calls), each changed field alone, ``stop_at_step`` and the
inference checks; the 100,000-row inference runs in a process of its own, for its peak RSS.
"""

import glob
import json
import os
import re
import shutil
import signal
import textwrap

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from eval_helpers import random_variables
from helpers import TINY_TRAIN, Processes, read_metrics, run_script, saved_arrays
from helpers import tiny_digits_config
from mfp_jax import checkpoints
from mfp_jax import cli
from mfp_jax import config_lib
from mfp_jax import data as data_lib
from mfp_jax import deploy
from mfp_jax import eval_lib
from mfp_jax import inference
from mfp_jax import models
from mfp_jax import resilience
from mfp_jax import train_lib

TINY = TINY_TRAIN + ['--config.log_every_steps=5', '--config.checkpoint_every_steps=5']
FINAL = re.compile(r'^final test accuracy: ([\d.]+) on (\d+) examples \(best ([\d.]+), step '
                   r'(\d+)', re.M)
STEPS_PER_EPOCH = 21
DIGITS = (8, 8, 1)
metrics = read_metrics


def tiny_config(**kw):
  """The in-process twin of ``TINY``."""
  return tiny_digits_config(**{'checkpoint_every_steps': 5, **kw})


def upto(lines, step):
  return [m for m in lines if m['step'] <= step]


def committed(workdir, which='checkpoints'):
  d = os.path.join(workdir, which)
  return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def saved_steps(workdir):
  """``{'checkpoints/42': (arrays, meta)}`` of every committed step; ``meta`` without its wall
  time (``elapsed_s``)."""
  out = {}
  for d in sorted(glob.glob(os.path.join(str(workdir), '*', '[0-9]*'))):
    with open(os.path.join(d, 'meta', 'metadata')) as f:
      meta = json.load(f)
    meta.pop('elapsed_s', None)
    out[os.path.relpath(d, workdir)] = (saved_arrays(d), meta)
  return out


def assert_same_checkpoints(workdir, reference_dir):
  got, want = saved_steps(workdir), saved_steps(reference_dir)
  assert got.keys() == want.keys()
  for k, (arrays, meta) in want.items():
    assert got[k][1] == meta, k
    assert got[k][0].keys() == arrays.keys(), k
    assert all(np.array_equal(got[k][0][a], arrays[a]) for a in arrays), k


def last_line(out):
  lines = out.strip().splitlines()
  assert 'Traceback' not in out, out[-3000:]
  assert [l for l in lines if l.startswith(('error:', 'stopped:'))] == lines[-1:], out[-3000:]
  return lines[-1]


class Runs(Processes):
  """Processes of one test sharing the module's XLA compilation cache."""

  def script(self, name, args, env=None):
    return self.start(name, args, env=env)

  def train(self, name, workdir, *extra, env=None):
    return self.script(name, [*TINY, '--workdir', str(workdir), *extra], env=env)

  def held_at(self, name, workdir, point, *, wait=True):
    """train.py that will wait at ``point`` of the pause hook (with ``wait``: returns once it
    waits there)."""
    p = self.train(name, workdir, env={resilience.PAUSE_ENV: point})
    p.point = point
    return self.holding(p) if wait else p

  def holding(self, p):
    self.wait_until(lambda: f'{resilience.PAUSE_ENV}: holding at {p.point}' in self.output(p),
                    p, timeout=180)
    return p

  def stopped(self, p):
    """SIGTERMs ``p``; its one stop line (it must exit 3 with nothing after it)."""
    p.send_signal(signal.SIGTERM)
    rc, out = self.finish(p, timeout=120)
    assert rc == cli.EXIT_PREEMPTED, out[-3000:]
    return last_line(out)


@pytest.fixture
def runs(tmp_path, cache_env):
  r = Runs(tmp_path, cache_env)
  yield r
  r.kill_all()


@pytest.fixture(scope='module')
def reference(tmp_path_factory, cache_env):
  """An uninterrupted train.py run: ``(workdir, metrics lines, final-line numbers)``."""
  tmp = tmp_path_factory.mktemp('reference')
  r = Runs(tmp, cache_env)
  try:
    out = r.finish_ok(r.train('run', tmp / 'w'))
  finally:
    r.kill_all()
  return tmp / 'w', metrics(tmp / 'w'), FINAL.search(out).groups()


# --- 1. One writer per workdir --------------------------------------------------------------


def test_two_train_py_on_one_workdir_one_trains_the_other_exits_2(reference, runs, tmp_path):
  w = tmp_path / 'w'
  a, b = runs.train('a', w), runs.train('b', w)  # started together
  (rc_a, out_a), (rc_b, out_b) = runs.finish(a), runs.finish(b)
  assert sorted([rc_a, rc_b]) == [cli.EXIT_OK, cli.EXIT_USAGE], (out_a[-2000:], out_b[-2000:])
  winner, out, loser = (a, out_a, out_b) if rc_a == cli.EXIT_OK else (b, out_b, out_a)
  assert re.fullmatch(rf'error: {re.escape(str(w))} is in use by PID {winner.pid} \(\S*python\S* '
                      r'train\.py .*\), started [\d-]+ [\d:]+; wait for it to finish or use '
                      r'another --workdir\n', loser), loser
  # The winner's files are exactly an uninterrupted run's: nothing of the loser's is in them.
  assert FINAL.search(out).groups() == reference[2]
  assert metrics(w) == reference[1]
  assert_same_checkpoints(w, reference[0])


# --- 2. A changed run is refused -------------------------------------------------------------


REFUSED = re.compile(r'(\S+) holds a checkpoint of a different model or run; changed: (.*)\. Use '
                     r'a new --workdir, the config that made it, or '
                     r'--config\.resume_policy=allow_changes to resume with these changes')


def test_resume_with_changed_fields_is_refused_naming_each(reference, runs, tmp_path):
  refuse, allow = tmp_path / 'refuse', tmp_path / 'allow'
  for d in (refuse, allow, tmp_path / 'inproc'):
    shutil.copytree(reference[0], d)
  p_refuse = runs.train('refuse', refuse, '--config.data.batch_size=32',
                        '--config.optim.learning_rate=0.001', '--config.seed=1',
                        '--config.num_epochs=3')
  p_allow = runs.train('allow', allow, '--config.optim.learning_rate=0.001',
                       '--config.resume_policy=allow_changes')
  # In-process meanwhile: each field alone (nothing is compiled before the refusal).
  for field, value, change in (
      ('data.batch_size', 32, '64 -> 32'), ('optim.learning_rate', 0.001, '0.003 -> 0.001'),
      ('seed', 1, '0 -> 1'), ('num_epochs', 3, '2 -> 3'),
      ('optim.name', 'sgd', "'adamw' -> 'sgd'")):
    with pytest.raises(checkpoints.CheckpointError) as e:
      train_lib.train_and_evaluate(tiny_config(**{field: value}), str(tmp_path / 'inproc'))
    assert REFUSED.fullmatch(str(e.value))[2] == f'{field}: {change}', e.value
  rc, out = runs.finish(p_refuse)
  assert rc == cli.EXIT_USAGE and out.count('\n') == 1, out[-3000:]
  m = REFUSED.fullmatch(out[len('error: '):-1])
  assert out.startswith('error: ') and m and m[1] == str(refuse), out
  assert m[2] == ('data.batch_size: 64 -> 32; num_epochs: 2 -> 3; optim.learning_rate: 0.003 -> '
                  '0.001; seed: 0 -> 1'), out
  out = runs.finish_ok(p_allow)
  assert ('\nwarning: resuming with changed fields (resume_policy=allow_changes): '
          'optim.learning_rate: 0.003 -> 0.001\n') in out, out
  assert FINAL.search(out)[4] == '42'


def test_allowed_change_of_the_optimizer_is_refused_naming_it_not_as_damaged(reference,
                                                                             tmp_path):
  # allow_changes cannot carry AdamW's state into SGD's: the arrays differ. That is the
  # change's fault, not the checkpoint's: deleting it (as "damaged" would advise) won't help.
  shutil.copytree(reference[0], tmp_path / 'w')
  config = tiny_config(**{'optim.name': 'sgd', 'resume_policy': 'allow_changes'})
  with pytest.raises(checkpoints.CheckpointError) as e:
    train_lib.train_and_evaluate(config, str(tmp_path / 'w'))
  msg = str(e.value)
  assert '\n' not in msg and 'damaged' not in msg and 'delete' not in msg, msg
  assert re.fullmatch(rf"{re.escape(str(tmp_path / 'w'))} holds a checkpoint of a different "
                      r"model or run; changed: optim\.name: 'adamw' -> 'sgd'\. These change the "
                      r"arrays of the training state .*: use a new --workdir or the config that "
                      r"made it", msg), msg


def test_a_net_too_deep_for_its_data_is_a_config_error():
  config = tiny_digits_config(**{'model.channels': (8, 16, 16, 16, 16)})  # 8x8 pooled to 0x0
  with pytest.raises(config_lib.ConfigError, match=r'^model DigitsNet cannot take data digits '
                     r'\(one example \(8, 8, 1\)\): ZeroDivisionError'):
    train_lib.setup(config, train_lib.create_mesh())


# --- 3. Signals at exact points, and eval.py next to a live run ------------------------------


def _eval_next_to_a_live_run(runs, w, live, out_dir, capsys):
  """eval.py's evaluation (in-process) into ``w``, held by ``live``, is refused in one line
  naming ``--out_dir``; into ``out_dir`` it works, reading ``w``'s latest checkpoint."""
  runs.wait_until(lambda: (w / 'checkpoints' / '20').is_dir(), live)  # saves land in the back
  capsys.readouterr()
  with pytest.raises(SystemExit) as e:  # what eval.py's main does with it
    cli.run_or_exit(lambda: eval_lib.evaluate_run(tiny_config(), str(w), checkpoint='latest'))
  err = capsys.readouterr().err
  assert e.value.code == cli.EXIT_USAGE and err.count('\n') == 1, err
  assert re.fullmatch(rf'error: {re.escape(str(w))} is in use by PID {live.pid} \(.*train\.py .*'
                      r'\), started [\d-]+ [\d:]+; wait for it to finish, or pass '
                      r'--out_dir=<another directory>: eval\.py writes its outputs there and '
                      r'only reads --workdir\n', err), err
  res = eval_lib.evaluate_run(tiny_config(), str(w), checkpoint='latest', out_dir=str(out_dir))
  with open(out_dir / 'eval.json') as f:
    assert json.load(f)['checkpoint'] == res['checkpoint'] == {'which': 'latest', 'epoch': 0}
  assert not [n for n in os.listdir(w) if n.endswith('.json')]
  assert live.poll() is None


def test_sigterm_at_every_point_stops_cleanly_and_the_rerun_matches(reference, runs, tmp_path,
                                                                     capsys):
  w, ref, last = tmp_path / 'w', reference[1], 2 * STEPS_PER_EPOCH
  ck = w / 'checkpoints'
  saved = lambda step, then='rerun the same command to resume': (
      f'stopped: SIGTERM: saved a checkpoint at step {step} in {ck / str(step)}; {then}')
  # Meanwhile, on a copy of the finished reference run: during the final evaluation of its
  # rerun there is nothing new to save, and it stops at once.
  done = tmp_path / 'done'
  shutil.copytree(reference[0], done)
  p_done = runs.held_at('done', done, f'eval:{last}', wait=False)
  # a. During the first epoch's steps: that step is saved.
  assert runs.stopped(runs.held_at('a', w, 'step:7')) == saved(7)
  assert committed(w)[-1] == 7 and metrics(w) == upto(ref, 7)
  _stop_a_finished_run(runs, p_done, done, last)

  # b. During epoch 1's evaluation (eval.py meanwhile works next to the live run): the
  # evaluation finishes, the epoch's last step is saved, and no further step is taken.
  p = runs.held_at('b', w, f'eval:{STEPS_PER_EPOCH}')
  assert f'resuming from {ck / "7"} (step 7)' in runs.output(p)
  _eval_next_to_a_live_run(runs, w, p, tmp_path / 'eval_out', capsys)
  assert runs.stopped(p) == saved(STEPS_PER_EPOCH)
  assert committed(w)[-1] == committed(w, 'best')[-1] == STEPS_PER_EPOCH
  assert int(saved_arrays(str(ck / str(STEPS_PER_EPOCH)))["['step']"]) == STEPS_PER_EPOCH
  assert metrics(w) == upto(ref, STEPS_PER_EPOCH)
  assert metrics(w)[-1]['split'] == 'test'  # the interrupted evaluation was logged

  # c. During the final epoch's evaluation: saved like any epoch's end.
  assert runs.stopped(runs.held_at('c', w, f'eval:{last}')) == saved(
      last, 'training had finished: a rerun only re-evaluates')
  assert committed(w)[-1] == last and metrics(w) == ref

  # d. The rerun to the end: every number as if never interrupted.
  out = runs.finish_ok(runs.train('d', w))
  assert f'resuming from {ck / str(last)} (step {last})' in out
  assert FINAL.search(out).groups() == reference[2]
  assert metrics(w) == ref
  assert_same_checkpoints(w, reference[0])


def _stop_a_finished_run(runs, p, w, last):
  """SIGTERM to ``p``, held in the final evaluation of a finished run's rerun: it exits 3
  saying so, and saves nothing."""
  runs.holding(p)
  steps = lambda: {d: os.stat(d).st_mtime_ns for d in glob.glob(str(w / '*' / '[0-9]*'))}
  before = steps()
  assert runs.stopped(p) == (f'stopped: SIGTERM: the run had finished; its checkpoint is at '
                             f'step {last} in {w / "checkpoints" / str(last)}; a rerun only '
                             f're-evaluates')
  assert steps() == before


# --- 4. stop_at_step -------------------------------------------------------------------------


def test_stop_at_step_mid_epoch_reports_the_evaluation_of_that_step(tmp_path):
  result = train_lib.train_and_evaluate(tiny_config(stop_at_step=30), str(tmp_path))
  assert result.metrics['step'] == int(result.state.step) == 30
  assert committed(tmp_path)[-1] == 30
  s, state, _ = train_lib.restore_run(tiny_config(), str(tmp_path), step=30)
  mesh = train_lib.create_mesh()
  p_eval = jax.jit(lambda st, b: train_lib.eval_step(st, b, model=s.model),
                   out_shardings=NamedSharding(mesh, P()))
  ev = train_lib.evaluate(state, s.dataset, p_eval, batch_size=tiny_config().data.eval_batch_size,
                          sharding=NamedSharding(mesh, P('data')))
  assert {k: result.metrics[k] for k in ev} == ev  # the saved step-30 state's evaluation
  (epoch1,) = [m for m in metrics(tmp_path) if m['split'] == 'test']
  assert epoch1['step'] == STEPS_PER_EPOCH and epoch1['loss'] != ev['loss']


# --- 5. Inference: non-finite and very large inputs ------------------------------------------


@pytest.fixture(scope='module')
def tiny_net():
  model = models.DigitsNet(channels=(4, 8), T=2)
  ds = data_lib.load_digits()
  x, _ = ds.test.get_batch(np.arange(16))
  return model, random_variables(model, DIGITS), ds.preprocess(x).astype(np.float32)


def test_nonfinite_pixels_are_refused_in_every_mode_and_by_deployed_files(tiny_net, tmp_path):
  model, variables, x = tiny_net
  bad = x.copy()
  bad[3, 2, 2, 0], bad[5, 0, 7, 0], bad[9, 4, 4, 0] = np.nan, np.inf, -np.inf
  good = np.setdiff1d(np.arange(len(x)), [3, 5, 9])
  refused = r'^input has NaN or inf values in 3 of 16 rows \(first: \[3, 5, 9\]\).*check_finite'
  program = inference.build_program(model, variables, DIGITS)
  packed, exported = str(tmp_path / 'w.npz'), str(tmp_path / 'f.mfpx')
  deploy.save_packed(program, packed)
  deploy.export_serial(program, exported)
  for fn in (deploy.packed_infer_fn(packed), deploy.load_exported(exported)):
    with pytest.raises(ValueError, match=refused):
      fn(bad)
  for mode in inference.MODES:
    make = lambda **kw: inference.make_infer_fn(model, variables, mode=mode, input_shape=DIGITS,
                                                **kw)
    with pytest.raises(ValueError, match=refused):
      make()(bad)
    unchecked = make(check_finite=False)
    out = np.asarray(unchecked(bad))  # runs anyway, and the other rows are unaffected
    assert out.shape == (16, 10)
    np.testing.assert_array_equal(out[good], np.asarray(unchecked(x))[good])


HUNDRED_K = textwrap.dedent(r'''
    import json, logging, re, sys
    import jax
    import numpy as np
    sys.path.insert(0, 'tests')
    from eval_helpers import random_variables
    from mfp_jax import data as data_lib, inference, models

    compiled = []  # the input shapes of every compiled program
    logging.getLogger('jax').addHandler(type('H', (logging.Handler,), {
        'emit': lambda self, r: compiled.append(r.getMessage())})())
    logging.getLogger('jax').setLevel(logging.WARNING)
    jax.config.update('jax_log_compiles', True)

    def status(field):  # bytes
      with open('/proc/self/status') as f:
        return int(re.search(rf'^{field}:\s*(\d+) kB', f.read(), re.M)[1]) * 1024

    model = models.DigitsNet(channels=(4, 8), T=2)
    variables = random_variables(model, (8, 8, 1))
    ds = data_lib.load_digits()
    x, _ = ds.test.get_batch(np.arange(len(ds.test)))
    big = np.resize(ds.preprocess(x).astype(np.float32), (100_000, 8, 8, 1))
    chunk, out = inference.DEFAULT_CHUNK, {}
    for mode in ('parallel', 'serial'):
      infer = inference.make_infer_fn(model, variables, mode=mode, input_shape=(8, 8, 1))
      infer(big[:chunk])  # compiled at the chunk's shape
      # The peak RSS (VmHWM) restarts here. (Not ru_maxrss: it also holds the RSS of the
      # process that exec'ed this one, e.g. a large pytest.)
      with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')
      before = status('VmRSS')
      y = np.asarray(infer(big))
      grew = status('VmHWM') - before
      # The same rows chunk by chunk (every 8th chunk and the last, padded like run_chunked's).
      starts = list(range(0, len(big), chunk))
      equal = []
      for start in starts[::8] + starts[-1:]:
        part = big[start:start + chunk]
        padded = np.concatenate([part, np.zeros((chunk - len(part), 8, 8, 1), np.float32)])
        equal.append(np.array_equal(y[start:start + chunk], np.asarray(infer(padded))[:len(part)]))
      out[mode] = {'grew': grew, 'shape': list(y.shape), 'equal': bool(all(equal)),
                   'compared': len(equal)}
    big[-1, 0, 0, 0] = np.nan
    try:
      infer(big)
    except ValueError as e:
      out['refused'] = str(e)
    out['compiled'] = [m for m in compiled if m.startswith('Compiling')]
    print(json.dumps(out))
''')


def test_100k_rows_run_in_chunks_with_memory_of_a_chunk():
  # Execution-bound (100k rows, twice), so at XLA's full optimization, unlike the other runs.
  r = run_script(['-c', HUNDRED_K], env={'XLA_FLAGS': ''}, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  chunk, n, t, widest = inference.DEFAULT_CHUNK, 100_000, 2, 8
  # One layer's float32 activations [T, rows, 8, 8, C]: for the whole batch they alone are
  # 410 MB; the run may grow by a few chunks' worth plus the outputs and allocator slack.
  layer = lambda rows: t * rows * 8 * 8 * widest * 4
  bound = 96 * 2**20 + 16 * layer(chunk)
  assert bound < layer(n) / 3
  for mode in ('parallel', 'serial'):
    assert out[mode]['shape'] == [n, 10] and out[mode]['equal'], (mode, out[mode])
    assert out[mode]['compared'] == 50, out[mode]  # 391 chunks: 0, 8, ..., 384 and 390
    assert out[mode]['grew'] < bound, (mode, out[mode]['grew'] / 2**20)
  # And no program for more rows than a chunk was ever compiled.
  shapes = [m for m in out['compiled'] if 'float32[' in m]
  assert any(f'float32[{chunk},8,8,1]' in m for m in shapes), out['compiled']
  assert not any(str(n) in m for m in out['compiled']), out['compiled']
  assert out['refused'].startswith(f'input has NaN or inf values in 1 of {n} rows (first: '
                                   f'[{n - 1}])'), out['refused']
