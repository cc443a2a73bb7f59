"""2-D SAME convolution whose weight gradient is per-tap matmuls instead of one XLA:CPU conv.

Autodiff of ``lax.conv_general_dilated`` gives the weight gradient as a second convolution,
``x (*) dy`` with an ``Ho x Wo`` window, which XLA:CPU runs far slower than the forward
(``benchmarks/conv.py``, ``[40, 48, 48, 128] -> 128``, 3x3, in process CPU time: forward
0.22 s, XLA's dW 1.25-1.6 s, PyTorch/oneDNN's dW 0.18-0.2 s). The same numbers come out of
one matmul per kernel tap ``(i, j)``::

  dW[i, j] = x_pad[:, i::s, j::s, :][:, :Ho, :Wo, :].reshape(-1, C).T @ dy.reshape(-1, O)

which takes 0.55 s there. ``conv2d`` keeps the forward and the input gradient as XLA's own
ops (bit-identical to plain autodiff) and swaps only the weight gradient.

The slow dW conv is YNNPACK's, where jaxlib 0.10's XLA:CPU sends convolutions by default.
With ``XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`` they run
on Eigen, whose dW took 0.32 s there and beat the taps; ``dw='auto'`` reads that flag.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
from jax import lax
import jax.numpy as jnp

DW_MODES = ('auto', 'taps', 'xla')
_DIMS = ('NHWC', 'HWIO', 'NHWC')


def same_padding(size: int, k: int, stride: int) -> tuple[int, int]:
  """XLA's SAME padding of one spatial axis: ``(low, high)``, the odd element at the end.

  ``out = ceil(size / stride)``, ``total = max((out - 1) * stride + k - size, 0)``,
  ``low = total // 2`` (the same as ``lax.padtype_to_pads(..., 'SAME')``).
  """
  out = -(-size // stride)
  total = max((out - 1) * stride + k - size, 0)
  return total // 2, total - total // 2


def _forward(x, w, stride, preferred_element_type):
  return lax.conv_general_dilated(x, w, (stride, stride), 'SAME', dimension_numbers=_DIMS,
                                  preferred_element_type=preferred_element_type)


def _dx(x, w, g, stride, preferred_element_type):
  """The input gradient exactly as autodiff computes it: the transpose of the conv in ``x``.

  ``linear_transpose`` applies JAX's own transpose rule for ``conv_general_dilated`` (the
  one ``jax.grad`` uses), so the result is bit-identical to autodiff without running the
  forward again, as ``jax.vjp`` would outside ``jit``.
  """
  f = lambda x_: _forward(x_, w, stride, preferred_element_type)
  (dx,) = jax.linear_transpose(f, jax.ShapeDtypeStruct(x.shape, x.dtype))(g)
  return dx


def _dw_xla(x, w, g, stride, preferred_element_type):
  """The weight gradient as autodiff computes it (one conv with an ``Ho x Wo`` window)."""
  f = lambda w_: _forward(x, w_, stride, preferred_element_type)
  (dw,) = jax.linear_transpose(f, jax.ShapeDtypeStruct(w.shape, w.dtype))(g)
  return dw


def _dw_taps(x, w, g, stride, preferred_element_type):
  """The weight gradient as one ``[C, N*Ho*Wo] @ [N*Ho*Wo, O]`` matmul per kernel tap.

  A ``scan`` over the taps keeps one shifted slice of ``x`` alive at a time. Unrolled, XLA
  materialized all ``kh * kw`` slices at once (3x the scratch of XLA's own dW conv; the
  scan needs ~0.7x) and, with glibc's default malloc, page-faulted on every fresh slice.

  Args:
    x: ``[N, H, W, C]`` input; w: ``[kh, kw, C, O]`` (only its shape and dtype are used);
    g: ``[N, Ho, Wo, O]`` output cotangent.

  Returns:
    ``[kh, kw, C, O]`` in ``w.dtype``.
  """
  n, h, wd, c = x.shape
  kh, kw, _, o = w.shape
  _, ho, wo, _ = g.shape
  (hl, hh), (wl, wh) = same_padding(h, kh, stride), same_padding(wd, kw, stride)
  if x.dtype != g.dtype:  # as autodiff's transpose rule does: promote x to the cotangent's type
    x = x.astype(g.dtype)
  xp = jnp.pad(x, ((0, 0), (hl, hh), (wl, wh), (0, 0)))
  g2 = g.reshape(n * ho * wo, o)
  window = (n, (ho - 1) * stride + 1, (wo - 1) * stride + 1, c)  # the rows/cols one tap reads

  def tap(_, t):
    xs = lax.dynamic_slice(xp, (0, t // kw, t % kw, 0), window)
    if stride > 1:
      xs = xs[:, ::stride, ::stride, :]
    return None, lax.dot_general(xs.reshape(n * ho * wo, c), g2, (((0,), (0,)), ((), ())),
                                 preferred_element_type=preferred_element_type)

  _, taps = lax.scan(tap, None, jnp.arange(kh * kw))
  return taps.reshape(kh, kw, c, o).astype(w.dtype)


# Below this many input channels the per-tap matmuls ([C, N*Ho*Wo] @ [N*Ho*Wo, O]) are too
# thin to beat XLA's dW conv on CPU (benchmarks/conv.py: C=2 1.5x slower, C=8 about even).
AUTO_TAPS_MIN_CHANNELS = 8
_YNN_FLAG = '--xla_cpu_experimental_ynn_fusion_type='


def cpu_convs_use_ynn() -> bool:
  """Whether XLA:CPU hands convolutions to YNNPACK, judged from ``$XLA_FLAGS``.

  jaxlib 0.10 does by default, and YNNPACK's weight-gradient conv (a window as large as the
  image) is the slow one. ``--xla_cpu_experimental_ynn_fusion_type=-individual_convolution``
  (or an overwrite list without ``individual_convolution``) sends them to Eigen instead.
  """
  value = None
  for flag in os.environ.get('XLA_FLAGS', '').split():
    if flag.startswith(_YNN_FLAG):
      value = flag[len(_YNN_FLAG):]
  if value is None:
    return True
  items = [v for v in value.split(',') if v]
  if items and all(v[0] in '+-' for v in items):
    return '-individual_convolution' not in items
  return 'individual_convolution' in items


def _cpu_prefers_taps(x, w) -> bool:
  """The CPU choice of ``'auto'``, from benchmarks/conv.py (jaxlib 0.10.2, process CPU time).

  With YNNPACK convs (the default) the taps took 1.5-2.4x less than XLA's dW for the 3x3
  convs of VGGSNN and ResNet19 with C >= 64 (1.1x at 6x6 spatial); with Eigen convs XLA's dW
  took 1.1-2.1x less than the taps. A 1x1 kernel is one matmul: 2-7x faster either way.
  """
  if x.shape[3] < AUTO_TAPS_MIN_CHANNELS:
    return False
  return w.shape[0] * w.shape[1] == 1 or cpu_convs_use_ynn()


def _dw_auto(x, w, g, stride, preferred_element_type):
  # Chosen when XLA lowers for a platform, not from jax.default_backend() at trace time, so a
  # function jitted for another device gets that device's choice. GPU/TPU: never measured
  # (no such device was available), so they keep XLA's own dW.
  static = dict(stride=stride, preferred_element_type=preferred_element_type)
  xla = functools.partial(_dw_xla, **static)
  if not _cpu_prefers_taps(x, w):
    return xla(x, w, g)
  return lax.platform_dependent(x, w, g, cpu=functools.partial(_dw_taps, **static), default=xla)


_DW_FNS = {'taps': _dw_taps, 'xla': _dw_xla, 'auto': _dw_auto}


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv2d_custom(x, w, stride, dw, preferred_element_type):
  return _forward(x, w, stride, preferred_element_type)


def _conv2d_fwd(x, w, stride, dw, preferred_element_type):
  return _forward(x, w, stride, preferred_element_type), (x, w)


def _conv2d_bwd(stride, dw, preferred_element_type, res, g):
  x, w = res
  return (_dx(x, w, g, stride, preferred_element_type),
          _DW_FNS[dw](x, w, g, stride, preferred_element_type))


_conv2d_custom.defvjp(_conv2d_fwd, _conv2d_bwd)


def conv2d(x: jax.Array, w: jax.Array, *, stride: int = 1, dw: str = 'auto',
           preferred_element_type: Any = None) -> jax.Array:
  """SAME 2-D convolution, NHWC/HWIO, with a choice of weight-gradient algorithm.

  The forward is ``lax.conv_general_dilated(x, w, (stride, stride), 'SAME',
  dimension_numbers=('NHWC', 'HWIO', 'NHWC'))`` itself (bit-identical output), and the input
  gradient is autodiff's. Only ``dW`` differs between the modes.

  Args:
    x: ``[N, H, W, C]`` input.
    w: ``[kh, kw, C, O]`` kernel (any size; odd sizes centre like ``'SAME'`` always does).
    stride: the same stride on both spatial axes.
    dw: ``'taps'``: one matmul per kernel tap; ``'xla'``: plain autodiff (one conv with an
      ``Ho x Wo`` window); ``'auto'``: ``'taps'`` on CPU when ``C >= 8`` and either the
      kernel is 1x1 or XLA:CPU runs convs with YNNPACK (its default; see
      ``cpu_convs_use_ynn``), else ``'xla'``; the platform is the one XLA compiles for.
    preferred_element_type: accumulation/output type of the forward conv, and the
      accumulation type of both gradients (e.g. ``jnp.float32`` for bfloat16 ``x`` and ``w``).

  Returns:
    ``[N, ceil(H / stride), ceil(W / stride), O]``, in ``preferred_element_type`` if given.

  Raises:
    ValueError: on a bad ``dw`` or ``stride``, or if ``x`` and ``w`` do not fit together.

  ``'taps'`` and ``'auto'`` are a ``jax.custom_vjp``: reverse mode only (``jax.jvp`` raises);
  ``'xla'`` is the plain op, for forward mode.
  """
  if dw not in DW_MODES:
    raise ValueError(f'unknown dw {dw!r}; allowed: {list(DW_MODES)}')
  if not isinstance(stride, int) or stride < 1:
    raise ValueError(f'stride must be a positive int, got {stride!r}')
  if x.ndim != 4 or w.ndim != 4 or x.shape[3] != w.shape[2]:
    raise ValueError(f'conv2d needs x [N, H, W, C] and w [kh, kw, C, O] with the same C, got x '
                     f'{tuple(x.shape)} and w {tuple(w.shape)}')
  if dw == 'xla':
    return _forward(x, w, stride, preferred_element_type)
  return _conv2d_custom(x, w, stride, dw, preferred_element_type)
