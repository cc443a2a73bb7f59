"""Process set-up that has to happen before JAX starts: glibc malloc and XLA:CPU's conv path.

``train.py`` and ``eval.py`` call :func:`configure` first thing; a library user who wants
the same speed calls it before their first JAX computation. Each part has an opt-out
environment variable: ``MFP_JAX_ALLOCATOR=default`` and ``MFP_JAX_XLA_CPU=default``.

**The allocator.**
Why: XLA:CPU takes its buffers from glibc ``malloc``. With glibc's defaults every fresh
buffer of 32 MiB or more (the dynamic mmap threshold's ceiling) is new ``mmap`` memory, which
page-faults on its first write -- about 10 ms per 40 MiB on the development CPU, as much as
an elementwise op on that buffer costs. Raising ``M_MMAP_THRESHOLD`` alone is not enough:
XLA allocates from its worker threads, each thread gets its own arena, and a non-main arena
serves large requests from ``mmap`` again and unmaps freed heaps. ``'tuned'`` sets

* ``M_MMAP_THRESHOLD = 1 GiB``: large buffers come from the heap, not fresh ``mmap``;
* ``M_TRIM_THRESHOLD = 2 GiB``: freed heap memory is kept, not returned to the kernel;
* ``M_ARENA_MAX = 1``: every thread uses the main arena, so the two settings above apply to
  XLA's workers too,

so a training loop reuses warm pages after its first step, as a GPU framework's caching
allocator would. The cost: the resident set stays at its peak instead of shrinking.

When: before the first JAX computation (which starts the backend and its thread pool);
threads that already have their own arena keep it. Importing this module does not import
JAX (``mfp_jax/__init__.py`` does, so load this file alone where that matters). On systems
without glibc (macOS, musl) nothing is changed and the result says ``'default'``.
"""

from __future__ import annotations

import ctypes
import importlib.metadata
import os
import sys

ALLOCATORS = ('tuned', 'default')
ENV_VAR = 'MFP_JAX_ALLOCATOR'

# glibc <malloc.h> mallopt parameters.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD, _M_ARENA_MAX = -1, -3, -8
_TUNED = ((_M_MMAP_THRESHOLD, 1 << 30), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_ARENA_MAX, 1))
_TUNED_DETAIL = 'glibc mallopt: M_MMAP_THRESHOLD=1GiB, M_TRIM_THRESHOLD=2GiB, M_ARENA_MAX=1'

# What this process has done so far; None until the first call decides.
_STATE: dict | None = None


def tune_allocator(mode: str | None = None) -> dict:
  """Sets glibc malloc up for ``mode`` and returns what was done.

  Args:
    mode: ``'tuned'`` (see the module docstring), ``'default'`` (change nothing), or None:
      the process-wide choice: ``$MFP_JAX_ALLOCATOR`` (``tuned`` unless set to
      ``default``) on the first call; later calls with None keep whatever an earlier call
      decided, so library code can call this without overriding a script's explicit mode.

  Returns:
    ``{'mode': 'tuned' | 'default', 'detail': str, 'requested': str}``: ``mode`` is what
    is in effect (``'default'`` when mallopt is unavailable; still ``'tuned'`` after an
    earlier tuned call, which glibc cannot undo).

  Raises:
    ValueError: on an unknown mode, from the argument or the environment variable.
  """
  global _STATE
  if mode is None:
    if _STATE is not None:
      return dict(_STATE)
    mode = os.environ.get(ENV_VAR, 'tuned').strip().lower() or 'tuned'
    if mode not in ALLOCATORS:
      raise ValueError(f'unknown ${ENV_VAR}={mode!r}; allowed: {list(ALLOCATORS)}')
  elif mode not in ALLOCATORS:
    raise ValueError(f'unknown allocator {mode!r}; allowed: {list(ALLOCATORS)}')
  if mode == 'tuned':
    detail = _TUNED_DETAIL if _mallopt_tuned() else (
        'requested tuned, but glibc mallopt is unavailable: default malloc')
    state = {'mode': 'tuned' if detail == _TUNED_DETAIL else 'default', 'detail': detail}
  elif _STATE is not None and _STATE['mode'] == 'tuned':
    state = {'mode': 'tuned', 'detail': _TUNED_DETAIL + ' (set earlier in this process)'}
  else:
    state = {'mode': 'default', 'detail': 'glibc malloc, default settings'}
  if state['mode'] == 'tuned' and _jax_backend_started():
    state['detail'] += ('; set after the JAX backend started: threads that already own an '
                        'arena keep it')
  _STATE = dict(state, requested=mode)
  return dict(_STATE)


def _mallopt_tuned() -> bool:
  try:
    libc = ctypes.CDLL('libc.so.6')
    libc.gnu_get_libc_version  # only glibc has it (and mallopt with these parameters)
  except (OSError, AttributeError):
    return False
  return all(libc.mallopt(param, value) == 1 for param, value in _TUNED)


def _jax_backend_started() -> bool:
  """True if JAX has created a backend (read without importing JAX)."""
  bridge = sys.modules.get('jax._src.xla_bridge')
  return bool(getattr(bridge, '_backends', None))


# --- XLA:CPU's convolutions ----------------------------------------------------------------

XLA_ENV_VAR = 'MFP_JAX_XLA_CPU'
# jaxlib 0.10's XLA:CPU runs convolutions through YNNPACK, whose weight gradient (one conv
# with an image-sized window) took 2.2-4.4x the time of Eigen's on VGGSNN's 3x3 layers, and
# whose forward 1.1-1.8x (python -m benchmarks.conv). This flag sends convolutions to Eigen
# and leaves matmuls on YNNPACK. It is "experimental": an XLA that does not know a flag
# aborts at start-up, so it is set only for the jaxlib versions it was measured on.
CONV_FLAG = '--xla_cpu_experimental_ynn_fusion_type=-individual_convolution'
_FLAG_NAME = CONV_FLAG.split('=', 1)[0]
VERIFIED_JAXLIB = ('0.10.',)


def tune_xla_cpu(mode: str | None = None) -> dict:
  """Adds :data:`CONV_FLAG` to ``$XLA_FLAGS`` (before JAX's backend starts); returns what was
  done: ``{'mode': 'tuned' | 'default', 'detail': str}``.

  Args:
    mode: ``'tuned'``, ``'default'`` (leave ``$XLA_FLAGS`` alone) or None: ``$MFP_JAX_XLA_CPU``
      (``tuned`` unless ``default``). A flag of that name the user set already wins, and a
      jaxlib outside :data:`VERIFIED_JAXLIB` is left alone.
  """
  if mode is None:
    mode = os.environ.get(XLA_ENV_VAR, 'tuned').strip().lower() or 'tuned'
  if mode not in ALLOCATORS:
    raise ValueError(f'unknown XLA:CPU mode {mode!r} (${XLA_ENV_VAR}); allowed: '
                     f'{list(ALLOCATORS)}')
  flags = os.environ.get('XLA_FLAGS', '')
  if mode == 'default':
    return {'mode': 'default', 'detail': 'XLA_FLAGS left as they are'}
  if _FLAG_NAME in flags:
    return {'mode': 'default', 'detail': f'{_FLAG_NAME} already set in XLA_FLAGS'}
  try:
    version = importlib.metadata.version('jaxlib')
  except importlib.metadata.PackageNotFoundError:
    version = ''
  if not version.startswith(VERIFIED_JAXLIB):
    return {'mode': 'default', 'detail': f'jaxlib {version or "(absent)"}: the conv flag is '
                                         f'verified on {VERIFIED_JAXLIB} only'}
  os.environ['XLA_FLAGS'] = f'{flags} {CONV_FLAG}'.strip()
  detail = f'XLA_FLAGS += {CONV_FLAG} (convolutions on Eigen, not YNNPACK)'
  if _jax_backend_started():
    detail += '; set after the JAX backend started: no effect in this process'
  return {'mode': 'tuned', 'detail': detail}


def configure() -> dict:
  """Both settings of this module, as ``train.py`` and ``eval.py`` make them at start-up:
  ``{'allocator': tune_allocator(), 'xla_cpu': tune_xla_cpu()}``."""
  return {'allocator': tune_allocator(), 'xla_cpu': tune_xla_cpu()}
