"""What a hostile but realistic user does to a run, each at the smallest size that shows it.

Most checks call the library in-process on a tiny checkpoint (a dozen 8-float arrays, no
model, no training). A real process is started only where the fault lives in one: a second
holder of a workdir lock, a process that exits right after a damaged restore, a full disk
under ``train.py``, a signal during ``train.py``'s imports, and a broken config file.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import flax
import jax
import numpy as np
import pytest

from helpers import ROOT, run_script
from mfp_jax import checkpoints
from mfp_jax import cli
from mfp_jax import deploy
from mfp_jax import plots
from mfp_jax import resilience
from mfp_jax import run_log
from mfp_jax import workdir

TINY = ['train.py', '--config', 'configs/digits.py', '--config.model.channels=(8,16,16)',
        '--config.progress=False']
WORKDIR_PY = os.path.join(ROOT, 'mfp_jax', 'workdir.py')


@contextlib.contextmanager
def mounted(path, *options):
  """A tmpfs (or bind) mount at ``path`` for the block; skips the test if mounting fails."""
  os.makedirs(path, exist_ok=True)
  r = subprocess.run(['mount', *options, str(path)], capture_output=True, text=True)
  if r.returncode:
    pytest.skip(f'cannot mount ({r.stderr.strip() or r.returncode}); needs root')
  try:
    yield path
  finally:
    subprocess.run(['umount', '-l', str(path)], capture_output=True)


@contextlib.contextmanager
def read_only(path):
  """``path`` bind-mounted onto itself, then remounted read-only."""
  with mounted(path, '--bind', str(path)):
    r = subprocess.run(['mount', '-o', 'remount,ro,bind', str(path)], capture_output=True)
    if r.returncode:
      pytest.skip(f'cannot remount read-only ({r.stderr.strip()})')
    yield path


# --- 1. Workdir lock -----------------------------------------------------------------------

HOLD = textwrap.dedent(f'''
    import importlib.util, sys, time
    spec = importlib.util.spec_from_file_location('workdir', {WORKDIR_PY!r})
    m = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(m)
    with m.lock(sys.argv[1]):
      print('held', flush=True)
      time.sleep(120)
''')


def test_second_holder_of_a_workdir_is_refused_naming_the_first(tmp_path):
  w, hold = tmp_path / 'w', tmp_path / 'hold.py'
  hold.write_text(HOLD)
  p = subprocess.Popen([sys.executable, str(hold), str(w), '--tag=first'],
                       stdout=subprocess.PIPE, text=True)
  try:
    assert p.stdout.readline() == 'held\n'
    with pytest.raises(workdir.WorkdirBusyError) as e:
      with workdir.lock(str(w)):
        pass
    msg = str(e.value)
    assert '\n' not in msg
    assert re.fullmatch(rf'{re.escape(str(w))} is in use by PID {p.pid} \(.*--tag=first\), '
                        r'started \d{4}-\d\d-\d\d \d\d:\d\d:\d\d; wait for it to finish or use '
                        r'another --workdir', msg), msg
    assert workdir.holder(str(w)) == msg.split(';')[0]
  finally:
    p.kill()  # SIGKILL: no clean-up runs, the lock file stays behind
    p.wait()
  assert (w / workdir.LOCK_NAME).exists() and workdir.holder(str(w)) is None
  with workdir.lock(str(w)):  # a dead holder's file is not a lock
    assert json.loads((w / workdir.LOCK_NAME).read_text())['pid'] == os.getpid()
  assert not (w / workdir.LOCK_NAME).exists()


def test_a_long_holder_command_is_cut_in_the_middle_keeping_its_flags():
  # CI's deep virtualenv and tmp paths once cut '--tag=first' off the end of the holder's line.
  cmd = '/a/very/deep/venv/bin/python ' + 'x' * 300 + '/train.py --config=c.py --tag=first'
  line = {'pid': 7, 'host': workdir.socket.gethostname(), 'command': cmd,
          'started': '2026-12-02 04:11:19'}
  msg = workdir._describe_holder('/w', json.dumps(line))
  held = re.fullmatch(r'/w is in use by PID 7 \((.*)\), started 2026-12-02 04:11:19', msg)
  assert held, msg
  assert len(held[1]) <= 200
  assert held[1].startswith('/a/very/deep/venv/bin/python x') and ' ... ' in held[1]
  assert held[1].endswith('/train.py --config=c.py --tag=first')


def test_lock_leaves_no_empty_directories_it_created(tmp_path):
  with workdir.lock(str(tmp_path / 'runs' / 'a')):
    os.makedirs(tmp_path / 'runs' / 'a' / 'checkpoints')  # opened, nothing saved
  assert os.listdir(tmp_path) == []
  with workdir.lock(str(tmp_path / 'b')):
    (tmp_path / 'b' / 'metrics.jsonl').write_text('{}\n')
  assert os.listdir(tmp_path / 'b') == ['metrics.jsonl']
  with workdir.lock(str(tmp_path / 'c'), enabled=False):  # multi-host, process != 0
    pass
  assert not (tmp_path / 'c').exists()
  with workdir.lock(str(tmp_path / 'd')):
    workdir.release_all()  # what train.py's signal handler does before os._exit
    assert not (tmp_path / 'd').exists()
  assert os.listdir(tmp_path) == ['b']


def test_workdir_errors_exit_2_with_one_line(capsys):
  for err in (workdir.WorkdirBusyError('/w is in use by PID 1'),
              workdir.WorkdirWriteError('cannot write /w/x: read-only file system')):
    def boom():
      raise err
    with pytest.raises(SystemExit) as e:
      cli.run_or_exit(boom)
    assert e.value.code == cli.EXIT_USAGE == 2
    assert capsys.readouterr().err == f'error: {err}\n'


# --- 2. Checkpoints ------------------------------------------------------------------------


@flax.struct.dataclass
class State:
  step: jax.Array
  params: dict


def state(step, n=12):
  return State(step=np.int32(step), params={f'w{i:02d}': np.full(8, step + i, np.float32)
                                            for i in range(n)})


def abstract(s):
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), s)


def saved(w, steps, *, best=()):
  c = checkpoints.RunCheckpoints(str(w), keep=5)
  for s in steps:
    c.save(s, state(s), {'epoch': 0})
  for s in best:
    c.save(s, state(s), {'epoch': 0}, best=True)
  c.close()
  return w


def test_checkpoint_copied_to_another_step_is_refused_before_anything_is_deleted(tmp_path):
  w = saved(tmp_path / 'w', [5, 10], best=[10])
  shutil.copytree(w / 'checkpoints' / '5', w / 'checkpoints' / '99')
  c = checkpoints.RunCheckpoints(str(w), keep=5)
  try:
    with pytest.raises(checkpoints.CheckpointError) as e:
      c.restore(abstract(state(0)))
    ck = re.escape(f'{w}/checkpoints/99')
    assert re.search(rf'{ck} holds step 5, not 99.*delete {ck} to fall back to step 10 '
                     r'\(89 steps are redone\), or use a new --workdir', str(e.value)), e.value
    with pytest.raises(checkpoints.CheckpointError, match='step 5 is not the newest'):
      c.discard_after(5)  # what a resume from the restored step 5 would have done
    assert c.latest.all_steps() == [5, 10, 99] and c.latest_step(best=True) == 10
    restored, _ = c.restore(abstract(state(0)), 10)
    assert int(restored.step) == 10
  finally:
    c.close()


@pytest.mark.parametrize('steps,damaged,best,fallback', [
    ([5, 10], 10, False, 'delete {w}/checkpoints/10 to fall back to step 5 (5 steps are redone)'),
    ([7], 7, False, 'delete {w}/checkpoints/7 and the run restarts from step 0 (7 steps are '
     'redone)'),
    ([7], 7, True, 'delete {w}/best/7 to fall back to the latest checkpoint'),
])
def test_every_checkpoint_error_says_what_to_delete(tmp_path, steps, damaged, best, fallback):
  w = saved(tmp_path / 'w', steps, best=[damaged] if best else [])
  step_dir = w / ('best' if best else 'checkpoints') / str(damaged)
  c = checkpoints.RunCheckpoints(str(w))
  try:
    for damage in ('checksum', 'arrays', 'meta'):
      if damage == 'checksum':
        meta = json.loads((step_dir / 'meta' / 'metadata').read_text())
        (step_dir / 'meta' / 'metadata').write_text(json.dumps({**meta, 'checksum': '0'}))
      elif damage == 'arrays':
        os.remove(step_dir / 'state' / 'manifest.ocdbt')
      else:
        (step_dir / 'meta' / 'metadata').write_text('{"epoch": ')
      with pytest.raises(checkpoints.CheckpointError) as e:
        c.restore(abstract(state(0)), best=best)
      assert fallback.format(w=w) + ', or use a new --workdir' in str(e.value), e.value
  finally:
    c.close()
  (step_dir / '_CHECKPOINT_METADATA').write_text('[1]')  # damaged where the manager opens
  with pytest.raises(checkpoints.CheckpointError) as e:
    checkpoints.RunCheckpoints(str(w))
  assert fallback.format(w=w) in str(e.value), e.value


def test_unfinished_saves_are_removed_before_the_manager_opens(tmp_path, monkeypatch):
  # Orbax's own clean-up runs in a background thread that close() does not wait for; a
  # process that exits right after then prints "cannot schedule new futures after
  # interpreter shutdown". Slow that clean-up down: none of it may be left after close().
  from orbax.checkpoint._src.path import temporary_paths
  original = temporary_paths.cleanup_temporary_paths

  async def slow(*a, **k):
    time.sleep(0.5)
    return await original(*a, **k)

  monkeypatch.setattr(temporary_paths, 'cleanup_temporary_paths', slow)
  w = saved(tmp_path / 'w', [5])
  tmp = w / 'checkpoints' / f'10{ocp_tmp_suffix()}'
  os.makedirs(tmp / 'state')
  checkpoints.RunCheckpoints(str(w), cleanup_tmp=True).close()
  assert not tmp.exists()
  assert os.listdir(w / 'checkpoints') == ['5']


def ocp_tmp_suffix():
  import orbax.checkpoint as ocp
  return ocp.path.atomicity.TMP_DIR_SUFFIX


RESTORE_DAMAGED = textwrap.dedent('''
    import sys
    import jax
    import numpy as np
    from mfp_jax import checkpoints
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    tree = {f'w{i:02d}': jax.ShapeDtypeStruct((8,), np.float32, sharding=one)
            for i in range(40)}
    for _ in range(4):  # each failure used to leave a few reads behind, printing later
      c = checkpoints.RunCheckpoints(sys.argv[1])
      try:
        c.restore(tree)
      except checkpoints.CheckpointError as e:
        print(f'error: {e}', file=sys.stderr, flush=True)
      finally:
        c.close()
    sys.exit(2)  # at once, as train.py does after its one line
''')


def test_damaged_restore_leaves_nothing_running_behind(tmp_path):
  # A missing manifest fails one array read while the others are still in flight; their
  # completions used to land on Orbax's closed event loop: "Event loop is closed" tracebacks
  # after the one-line error, 0 to 23 of them per process.
  w = tmp_path / 'w'
  c = checkpoints.RunCheckpoints(str(w))
  c.save(3, state(3, n=40).params, {})
  c.close()
  os.remove(w / 'checkpoints' / '3' / 'state' / 'manifest.ocdbt')
  r = run_script(['-c', RESTORE_DAMAGED, str(w)], timeout=120)
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and len(lines) == 4, r.stderr[-3000:]
  assert all(l.startswith(f'error: cannot restore checkpoint {w}/checkpoints/3') for l in lines)


def test_library_error_text_never_ends_in_a_method_repr():
  # Orbax formats TensorStore's ``t.spec`` (a method) into its read errors.
  class Spec:
    def spec(self):
      pass

  try:
    try:
      raise ValueError('NOT_FOUND: Error reading "d/abc": file missing')
    except ValueError as cause:
      raise Exception(f'Encountered error while reading array index: (slice(0, 8, 1),). '
                      f'See full TensorStore details: {Spec().spec}.') from cause
  except Exception as e:  # pylint: disable=broad-except
    text = checkpoints._describe(e)
  assert '<bound method' not in text and 'See full' not in text, text
  assert text == ('Exception: Encountered error while reading array index: (slice(0, 8, 1),). '
                  '(ValueError: NOT_FOUND: Error reading "d/abc": file missing)'), text


# --- 2d. Full disk, read-only workdir ------------------------------------------------------


def test_full_disk_during_a_save_is_one_error_naming_path_and_free_space(tmp_path, capfd):
  with mounted(tmp_path / 'small', '-t', 'tmpfs', '-o', 'size=64k', 'tmpfs') as small:
    c = checkpoints.RunCheckpoints(str(small / 'w'))
    noise = np.random.default_rng(0).random(128 * 1024, np.float32)  # 512 KiB, incompressible
    big = State(step=np.int32(1), params={'w': noise})
    with pytest.raises(workdir.WorkdirWriteError) as e:
      c.save(1, big, {})
      c.wait()  # the save is asynchronous: its error surfaces here (or at the next save)
    with contextlib.suppress(workdir.WorkdirWriteError):
      c.close()
    time.sleep(0.5)  # give leftover writes time to report
  msg = str(e.value)
  assert re.fullmatch(rf'no space left on device writing {re.escape(str(small))}/w/checkpoints/1 '
                      r'\(.* free of '
                      r'64\.0 KiB\); everything written before it is intact: .* rerun the same '
                      r'command, which resumes from the last complete checkpoint', msg), msg
  err = capfd.readouterr().err
  assert 'Traceback' not in err and 'Event loop is closed' not in err, err[-3000:]


def test_full_disk_under_train_py_is_one_line_and_exit_2(tmp_path):
  # The first save (step 1) does not fit.
  with mounted(tmp_path / 'small', '-t', 'tmpfs', '-o', 'size=128k', 'tmpfs') as small:
    r = run_script(TINY + ['--config.stop_at_step=1', '--workdir', str(small / 'run')],
                   timeout=240)
  lines = r.stderr.strip().splitlines()
  assert r.returncode == 2 and len(lines) == 1, r.stderr[-3000:]
  assert lines[0].startswith(f'error: no space left on device writing {small}/run/'), lines
  assert 'free of 128.0 KiB' in lines[0] and 'resumes from the last complete' in lines[0]


def test_read_only_workdir_is_one_line_and_exit_2(tmp_path, capsys):
  w = saved(tmp_path / 'w', [5])
  (w / 'metrics.jsonl').write_text('{"step": 5, "split": "train"}\n{"step": 9, "split": "x"}\n')
  os.makedirs(w / 'checkpoints' / f'7{ocp_tmp_suffix()}')  # left by a killed save
  with read_only(w):
    for opener in (lambda: workdir.lock(str(w)).__enter__(),
                   lambda: run_log.RunLog(str(w), start_step=5),
                   lambda: checkpoints.RunCheckpoints(str(w), cleanup_tmp=True),
                   lambda: open(w / 'eval.json', 'w')):  # eval.py, after all its work
      with pytest.raises(SystemExit) as e:
        cli.run_or_exit(opener)
      err = capsys.readouterr().err
      assert e.value.code == 2 and err.count('\n') == 1, err
      assert re.match(rf'error: cannot write {re.escape(str(w))}\S*: read-only file system; '
                      r'nothing was changed', err), err


# --- 3. metrics.jsonl ----------------------------------------------------------------------


def rec(step, split='train', **kw):
  return json.dumps({'step': step, 'split': split, 'loss': 1.0, **kw}).encode() + b'\n'


def test_metrics_repair_keeps_every_valid_record_up_to_the_resume_step(tmp_path, capsys):
  path = tmp_path / 'metrics.jsonl'
  path.write_bytes(
      rec(5) + b'{"step": 10, "split": "train", "loss": \xff}\n'  # one invalid UTF-8 byte
      + rec(10, 'test') + b'[1, 2]\n' + b'{"loss": 3}\n' + b'{"step": "15", "split": "a"}\n'
      + rec(15)[:20] + rec(15)  # cut mid-line, the resumed run's line appended onto it
      + rec(20) + rec(25) + rec(30)[:-1])  # cut at the end, after the resume step
  log = run_log.RunLog(str(tmp_path), start_step=20)
  log.close()
  assert path.read_bytes() == rec(5) + rec(10, 'test') + rec(15) + rec(20)
  out = capsys.readouterr().out
  assert out == ('metrics.jsonl: dropped 7 lines: 2 after step 20 (they are redone) and 5 that '
                 'were damaged or not log records\n'), out
  assert not [n for n in os.listdir(tmp_path) if n.startswith('metrics.jsonl.')]
  run_log.RunLog(str(tmp_path), start_step=20).close()  # nothing more to drop: silent
  assert capsys.readouterr().out == '' and path.read_bytes().endswith(rec(20))


def test_read_metrics_skips_and_counts_what_is_not_a_record(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_bytes(rec(5) + b'[1]\n' + b'"x"\n' + b'{"split": "train"}\n' + b'\xff\xfe\n'
                   + rec(10, 'test', accuracy=0.5) + b'{"step": 1')
  records = plots.read_metrics(str(path))
  assert [r['step'] for r in records] == [5, 10] and records.skipped == 5
  plots.plot_training_curves(records, str(tmp_path / 'c.png'))
  assert plots.write_all(str(tmp_path)) == [str(tmp_path / 'training_curves.png')]


# --- 4. Broken config files ----------------------------------------------------------------

BROKEN = {
    'syntax': ('def get_config(:\n', r'SyntaxError: .* \(line 1\)'),
    'raises': ('def get_config():\n  return 1 / 0\n',
               r'ZeroDivisionError: division by zero \(line 2\)'),
    'no_get_config': ('x = 1\n', 'it defines no get_config\\(\\) function'),
    'not_a_config': ('def get_config():\n  return {"model": 1}\n',
                     'get_config\\(\\) returned dict, not an ml_collections.ConfigDict'),
    'missing': (None, 'No such file or directory'),
}


@pytest.mark.parametrize('case', list(BROKEN))
def test_broken_config_file_is_one_clear_error(case, tmp_path):
  text, reason = BROKEN[case]
  path = tmp_path / f'{case}.py'
  if text is not None:
    path.write_text(text)
  with pytest.raises(cli.ConfigFileError) as e:
    cli.load_config_file(str(path))
  assert re.fullmatch(rf'cannot load the config file {re.escape(str(path))}: {reason}',
                      str(e.value)), e.value


def test_config_file_argument_is_passed_to_get_config(tmp_path):
  path = tmp_path / 'arg.py'
  path.write_text('import ml_collections\n'
                  'def get_config(arg=None):\n'
                  '  return ml_collections.ConfigDict({"arg": arg})\n')
  assert cli.load_config_file(f'{path}:wide').arg == 'wide'
  assert cli.load_config_file(str(path)).arg is None


def test_broken_config_file_under_train_py_is_one_line_and_exit_2(tmp_path):
  path = tmp_path / 'bad.py'
  path.write_text('def get_config():\n  raise KeyError("T")\n')
  r = run_script(['train.py', '--config', str(path), '--workdir', str(tmp_path / 'w')],
                 timeout=120)
  assert r.returncode == 2 and r.stderr == (
      f"error: cannot load the config file {path}: KeyError: 'T' (line 2)\n"), r.stderr
  assert not (tmp_path / 'w').exists()


# --- 5. Signals before training ------------------------------------------------------------


def catches(pid, sig):
  """Whether process ``pid`` has a handler installed for ``sig`` (from /proc)."""
  with open(f'/proc/{pid}/status') as f:
    mask = int(re.search(r'^SigCgt:\s*([0-9a-f]+)$', f.read(), re.M)[1], 16)
  return bool(mask >> (sig - 1) & 1)


@pytest.mark.parametrize('script', ['train.py', 'eval.py'])
def test_sigterm_during_imports_exits_3_with_one_line(script, tmp_path):
  p = subprocess.Popen([sys.executable, script, '--config', 'configs/digits.py', '--workdir',
                        str(tmp_path / 'w')], cwd=ROOT, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, env=dict(os.environ,
                                                                    JAX_PLATFORMS='cpu'))
  t0 = time.time()
  while not catches(p.pid, signal.SIGTERM):  # the handler is the script's first statement
    assert p.poll() is None and time.time() - t0 < 30
    time.sleep(0.005)
  p.send_signal(signal.SIGTERM)
  out, err = p.communicate(timeout=60)
  what = 'before training started' if script == 'train.py' else 'before the evaluation ended'
  assert (p.returncode, out, err) == (3, f'stopped: SIGTERM {what}; nothing to save\n', '')
  assert not (tmp_path / 'w').exists()


def test_stop_request_hands_over_to_an_after_loop_handler():
  # After the loop the first-line handler ("nothing to save") would be wrong: the loop has
  # saved; a stop then must let the pending saves finish (the finally blocks) and exit 3.
  calls = []

  def first_line(signum, frame):
    calls.append(signum)

  first_line.before_training = True
  old = signal.signal(signal.SIGTERM, first_line)
  try:
    with resilience.StopRequest():
      assert signal.getsignal(signal.SIGTERM) is not first_line
    after = signal.getsignal(signal.SIGTERM)
    with pytest.raises(resilience.Preempted, match='^SIGTERM after the training loop'):
      after(signal.SIGTERM, None)
    assert not calls
  finally:
    signal.signal(signal.SIGTERM, old)


@pytest.mark.parametrize('script', ['train.py', 'eval.py'])
def test_scripts_set_signals_and_allocator_before_any_heavy_import(script):
  import ast
  body = ast.parse(open(os.path.join(ROOT, script)).read()).body
  first = next(i for i, n in enumerate(body) if isinstance(n, ast.If))  # __main__ guard
  src = ast.unparse(body[first])
  assert 'signal.signal(signal.SIGTERM' in src and 'signal.SIGINT' in src, src
  imports = [ast.unparse(n) for n in body[:first] if isinstance(n, (ast.Import, ast.ImportFrom))]
  assert all(i.split()[1].split('.')[0] in ('os', 'signal', 'sys') for i in imports), imports
  rest = '\n'.join(ast.unparse(n) for n in body[first + 1:])
  assert rest.index('runtime.configure()') < rest.index('from absl')


# --- 6. Messages ---------------------------------------------------------------------------


def test_loading_a_file_that_is_not_npz_is_one_clean_line(tmp_path):
  for name, blob, hint in (
      ('model.mfpx', deploy.EXPORT_MAGIC + b'\0' * 64, 'deploy.load_exported'),
      ('junk.npz', b'\x80\x04junk' * 8, 'not an .npz')):
    (tmp_path / name).write_bytes(blob)
    with pytest.raises(deploy.ArtifactError) as e:
      deploy.load_packed(str(tmp_path / name))
    msg = str(e.value)
    assert '\n' not in msg and 'pickle' not in msg and 'unsafe' not in msg, msg
    assert msg.startswith(f'{tmp_path / name}: not a packed weight file') and hint in msg, msg
