"""Shared by tests and their subprocess workers."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_digits_config(**overrides):
  """digits with a narrow net and 2 epochs: seconds on CPU, clearly above chance."""
  sys.path.insert(0, ROOT)
  from configs import digits
  c = digits.get_config()
  c.num_epochs = 2
  c.model.channels = (8, 16, 16)
  c.progress = False
  c.log_every_steps = 5
  for k, v in overrides.items():
    node = c
    *path, last = k.split('.')
    for p in path:
      node = node[p]
    node[last] = v
  return c


def run_script(args, *, env=None, timeout=300, devices=None):
  """Runs ``python args...`` from the repo root; returns the CompletedProcess."""
  e = dict(os.environ, JAX_PLATFORMS='cpu', **(env or {}))
  if devices:
    e['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  return subprocess.run([sys.executable] + list(args), cwd=ROOT, env=e, capture_output=True,
                        text=True, timeout=timeout)
