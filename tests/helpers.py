"""Shared by tests and their subprocess workers: configs, launchers, readers of a run's files."""

import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# train.py's twin of tiny_digits_config() (without its log and checkpoint intervals).
TINY_TRAIN = ['train.py', '--config', 'configs/digits.py', '--config.num_epochs=2',
              '--config.model.channels=(8,16,16)', '--config.progress=False']


def tiny_digits_config(**overrides):
  """digits with a narrow net and 2 epochs: seconds on CPU, clearly above chance."""
  sys.path.insert(0, ROOT)
  from configs import digits
  c = digits.get_config()
  c.num_epochs = 2
  c.model.channels = (8, 16, 16)
  c.progress = False
  c.log_every_steps = 5
  c.update_from_flattened_dict(overrides)
  return c


def run_script(args, *, env=None, timeout=300, devices=None):
  """Runs ``python args...`` from the repo root; returns the CompletedProcess."""
  e = dict(os.environ, JAX_PLATFORMS='cpu', **(env or {}))
  if devices:
    e['XLA_FLAGS'] = (f"{os.environ.get('XLA_FLAGS', '')} "
                      f'--xla_force_host_platform_device_count={devices}')
  return subprocess.run([sys.executable] + list(args), cwd=ROOT, env=e, capture_output=True,
                        text=True, timeout=timeout)


class Processes:
  """Long-running ``python`` subprocesses of one test (train.py runs to kill or signal).

  Output goes to files (a full pipe would stall a child); ``kill_all`` ends what is left.
  """

  def __init__(self, tmp_path, env=None):
    self.tmp, self.env, self.all = tmp_path, dict(env or {}), []

  def start(self, name, args, *, env=None):
    e = dict(os.environ, JAX_PLATFORMS='cpu', **self.env)
    e.update(env or {})
    log = self.tmp / f'{name}.log'
    with open(log, 'w') as f:
      p = subprocess.Popen([sys.executable, *args], cwd=ROOT, env=e, stdout=f,
                           stderr=subprocess.STDOUT)
    p.log = log
    self.all.append(p)
    return p

  @staticmethod
  def output(p):
    return p.log.read_text()

  def wait_until(self, cond, p, timeout=90):
    t0 = time.time()
    while not cond():
      assert p.poll() is None, f'exited early ({p.returncode}):\n{self.output(p)[-3000:]}'
      assert time.time() - t0 < timeout, f'timed out:\n{self.output(p)[-3000:]}'
      time.sleep(0.02)

  def finish(self, p, timeout=180):
    """``(exit code, output)`` once ``p`` ends."""
    p.wait(timeout=timeout)
    return p.returncode, self.output(p)

  def finish_ok(self, p, timeout=180):
    """The output of ``p``, which must exit 0."""
    rc, out = self.finish(p, timeout)
    assert rc == 0, out[-3000:]
    return out

  def kill_all(self):
    for p in self.all:
      if p.poll() is None:
        p.kill()
        p.wait()


def read_metrics(workdir, *, keep_time=False):
  """``metrics.jsonl`` of a run as dicts (without the wall-clock ``time`` unless asked)."""
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    lines = [json.loads(line) for line in f]
  return lines if keep_time else [{k: v for k, v in m.items() if k != 'time'} for m in lines]


def saved_arrays(step_dir):
  """One step's saved state as ``{path: numpy array}``, read without a model, onto this
  process's first device (it may have been saved from several)."""
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  path = os.path.join(step_dir, 'state')
  one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as c:
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=one),
                          c.metadata(path).item_metadata)
    flat = jax.tree_util.tree_flatten_with_path(c.restore(path, target))[0]
  return {jax.tree_util.keystr(k): np.asarray(v) for k, v in flat}
