"""mfp_jax.runtime.tune_allocator: it must change what page faults cost, and be opt-out-able.

The glibc setting is process-wide and cannot be undone, so every check that really tunes
runs in a fresh interpreter; in this process only the 'default' mode and a faked missing
glibc are used. Page faults are counted, never timings.
"""

import importlib.util
import json
import os
import resource
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNTIME = os.path.join(ROOT, 'mfp_jax', 'runtime.py')
BUF = 64 << 20  # above glibc's largest dynamic mmap threshold (32 MiB)
PAGES = BUF // resource.getpagesize()

# Loads runtime.py alone (the mfp_jax package's __init__ imports jax), tunes, then allocates,
# writes and frees a 64 MiB numpy buffer 5 times, counting minor faults per round. A raw
# libc malloc/memset/free round follows as a control for what numpy's allocator does.
PROBE = f"""
import ctypes, importlib.util, json, resource, sys
spec = importlib.util.spec_from_file_location('rt', {RUNTIME!r})
rt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rt)
arg = sys.argv[1]
state = rt.tune_allocator(None if arg == 'none' else arg)
import numpy as np
from numpy._core.multiarray import get_handler_name
flt = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
numpy_faults, raw_faults = [], []
for _ in range(5):
  f0 = flt()
  a = np.empty({BUF} // 8)
  a.fill(1.0)
  del a
  numpy_faults.append(flt() - f0)
libc = ctypes.CDLL('libc.so.6')
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
for _ in range(3):
  f0 = flt()
  p = libc.malloc({BUF})
  ctypes.memset(p, 1, {BUF})
  libc.free(p)
  raw_faults.append(flt() - f0)
print(json.dumps(dict(state=state, numpy=numpy_faults, raw=raw_faults,
                      handler=get_handler_name(), jax_imported='jax' in sys.modules)))
"""


def _probe(arg, env_value=None):
  env = dict(os.environ, NUMPY_MADVISE_HUGEPAGE='0')  # numpy would madvise 2 MiB pages
  env.pop('MFP_JAX_ALLOCATOR', None)
  if env_value is not None:
    env['MFP_JAX_ALLOCATOR'] = env_value
  out = subprocess.run([sys.executable, '-c', PROBE, arg], env=env, capture_output=True,
                       text=True, timeout=60, check=True)
  return json.loads(out.stdout)


def _fresh_runtime():
  spec = importlib.util.spec_from_file_location('fresh_runtime', RUNTIME)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def _needs_glibc():
  try:
    import ctypes
    ctypes.CDLL('libc.so.6').gnu_get_libc_version
  except (OSError, AttributeError):
    pytest.skip('glibc is absent: tuning is a no-op here')


def test_tuned_removes_page_faults_default_keeps_them():
  _needs_glibc()
  tuned, default = _probe('tuned'), _probe('default')
  assert tuned['handler'] == default['handler'] == 'default_allocator'  # numpy -> malloc
  assert not tuned['jax_imported']
  assert tuned['state']['mode'] == 'tuned' and default['state']['mode'] == 'default'
  # Round 1 touches fresh pages either way; later rounds reuse them only when tuned.
  assert max(tuned['numpy'][1:]) <= 0.01 * PAGES, tuned
  assert min(default['numpy'][1:]) >= 0.9 * PAGES, default  # ~16k faults of 4 KiB
  # Raw malloc behaves the same, so numpy adds no caching of its own at this size.
  assert max(tuned['raw']) <= 0.01 * PAGES and min(default['raw']) >= 0.9 * PAGES


def test_env_var_opt_out_and_default_choice():
  _needs_glibc()
  opted_out = _probe('none', env_value='default')
  assert opted_out['state'] == {'mode': 'default', 'detail': 'glibc malloc, default settings',
                                'requested': 'default'}
  assert min(opted_out['numpy'][1:]) >= 0.9 * PAGES
  unset = _probe('none')
  assert unset['state']['mode'] == 'tuned' and unset['state']['requested'] == 'tuned'
  assert 'M_ARENA_MAX=1' in unset['state']['detail']
  assert max(unset['numpy'][1:]) <= 0.01 * PAGES


def test_bad_modes_raise(monkeypatch):
  rt = _fresh_runtime()
  with pytest.raises(ValueError, match='allowed'):
    rt.tune_allocator('jemalloc')
  monkeypatch.setenv('MFP_JAX_ALLOCATOR', 'fast')
  with pytest.raises(ValueError, match='MFP_JAX_ALLOCATOR'):
    rt.tune_allocator()


def test_default_does_nothing_and_the_first_decision_sticks(monkeypatch):
  rt = _fresh_runtime()
  monkeypatch.setenv('MFP_JAX_ALLOCATOR', 'default')
  first = rt.tune_allocator()
  assert first == {'mode': 'default', 'detail': 'glibc malloc, default settings',
                   'requested': 'default'}
  monkeypatch.setenv('MFP_JAX_ALLOCATOR', 'tuned')
  assert rt.tune_allocator() == first  # library calls do not override a decision


def test_no_glibc_reports_default(monkeypatch):
  rt = _fresh_runtime()

  def no_libc(name):
    raise OSError(f'{name}: cannot open shared object file')

  monkeypatch.setattr(rt.ctypes, 'CDLL', no_libc)
  state = rt.tune_allocator('tuned')
  assert state['mode'] == 'default' and 'unavailable' in state['detail']


def test_benchmarks_common_delegates_without_jax():
  _needs_glibc()
  code = ('import json, sys; from benchmarks import common; '
          'print(json.dumps([common.set_allocator("default"), common.set_allocator("tuned"), '
          'common.set_allocator("default"), "jax" in sys.modules]))')
  out = subprocess.run([sys.executable, '-c', code], cwd=ROOT, capture_output=True, text=True,
                       timeout=60, check=True)
  default, tuned, after, jax_imported = json.loads(out.stdout)
  assert default == {'mode': 'default', 'detail': 'glibc malloc, default settings'}
  assert tuned == {'mode': 'tuned', 'detail': 'glibc mallopt: M_MMAP_THRESHOLD=1GiB, '
                                              'M_TRIM_THRESHOLD=2GiB, M_ARENA_MAX=1'}
  assert after['mode'] == 'tuned'  # glibc cannot be untuned
  assert not jax_imported


# Sets the XLA:CPU flag the way train.py does, then compiles and runs a conv and its
# gradient: an XLA that did not know the flag would abort here.
XLA_PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])
from mfp_jax import runtime
state = runtime.tune_xla_cpu(None)
import os
import jax, jax.numpy as jnp
from mfp_jax import conv
x, w = jnp.ones((2, 6, 6, 8)), jnp.ones((3, 3, 8, 4))
g = jax.grad(lambda w: conv.conv2d(x, w).sum())(w)
print(json.dumps({'state': state, 'flags': os.environ.get('XLA_FLAGS', ''),
                  'ynn': conv.cpu_convs_use_ynn(), 'dw': float(g.sum())}))
"""


@pytest.mark.parametrize('env,tuned', [({}, True), ({'MFP_JAX_XLA_CPU': 'default'}, False)])
def test_xla_cpu_conv_flag_is_set_and_accepted(env, tuned):
  e = dict(os.environ, JAX_PLATFORMS='cpu', XLA_FLAGS='--xla_backend_optimization_level=1',
           **env)
  r = subprocess.run([sys.executable, '-c', XLA_PROBE, ROOT], env=e, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  out = json.loads(r.stdout.strip().splitlines()[-1])
  # SAME on 6x6: the centre tap sees 36 positions, 4 edge taps 30, 4 corners 25 (256 in all);
  # times 8 input channels, 4 outputs and a batch of 2.
  assert out['dw'] == 2 * 256 * 8 * 4
  assert out['flags'].startswith('--xla_backend_optimization_level=1')  # the user's kept
  assert (out['state']['mode'] == 'tuned') == tuned and out['ynn'] == (not tuned)
  assert ('individual_convolution' in out['flags']) == tuned
