"""What a model costs: parameters, MACs, bits, deployable bytes, inference state, S-ACE/NS-ACE.

Everything structural comes from the model and one example's shape via ``jax.eval_shape``
(no data, no compute). Measured firing rates (from ``eval.py``) add NS-ACE, synaptic
operations and an energy estimate.

Conventions (the Bit Budget paper, Shen et al., "Is Conventional SNN Really Efficient? A
Perspective from Network Quantization", CVPR 2024):

* ``S-ACE = sum_l MACs_l * T * w_l * s_l`` (Eq. 4, 8: bit budget ``T * w * s`` per MAC).
  ``MACs_l`` are per example and time step; ``w_l`` is the layer's weight bits and ``s_l``
  its input's spike bits. As in the paper's tables, *every* layer is counted, the first
  (encoding) conv and the classifier included, at ``T`` steps and at the network's spike bits
  (1): the paper's S-ACE equals its SOPs (``MACs * T * S``) times ``W`` for the whole network,
  with no special case for the first layer's real-valued input. Also as in the paper (Table 1
  caption), 32-bit float operations are counted as 16-bit (BF16). The per-layer records keep
  the raw numbers, so a stricter count (e.g. 8-bit pixels into the first conv, once per image)
  is one sum away.
* ``NS-ACE = sum_l fr_l * MACs_l * T * w_l * s_l`` (Eq. 9) with ``fr_l`` the measured rate of
  the layer's input spikes. The first layer's input is dense pixels, not events: it is
  charged in full (``fr = 1``).
* Energy: the common SNN estimate ``E = E_MAC * MACs(first layer) + E_AC * SOPs`` with
  ``SOPs = sum_{l > 1} fr_l * MACs_l * T`` and 45 nm figures from M. Horowitz, "Computing's
  energy problem (and what we can do about it)", ISSCC 2014: 32-bit float add 0.9 pJ,
  multiply 3.7 pJ (MAC 4.6 pJ). The ANN line is the same network as a float32 ANN (one pass,
  every MAC). Neuron updates, memory traffic and the integer/1-bit savings are not in it.
* Deployable bytes: exactly what :func:`mfp_jax.deploy.save_packed` stores -- 1-bit hidden
  weights packed 8 per byte, per-channel folded scale and shift (float32) for every conv's
  norm, ``M`` (float32 ``[T, T]``) per neuron layer, first/last layers as int8 levels + one
  float32 scale (``first_last_bits = 8``) or float32, classifier bias. ``fp32_bytes`` is the
  same model with every parameter in float32 (``4 * params``).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax

from flax import traverse_util

from mfp_jax import config_lib
from mfp_jax import data as data_lib
from mfp_jax import folding
from mfp_jax import layers
from mfp_jax import models
from mfp_jax import neuron_kinds

HOROWITZ_45NM_PJ = {'fp32_add': 0.9, 'fp32_mult': 3.7}
ENERGY_SOURCE = ('M. Horowitz, "Computing\'s energy problem (and what we can do about it)", '
                 'ISSCC 2014 (45 nm): 32-bit float add 0.9 pJ, multiply 3.7 pJ')
ACE_MAX_BITS = 16  # the paper counts FP32 operations as BF16

def input_spec(config) -> tuple[tuple[int, ...], int]:
  """``(input_shape, num_classes)`` of ``config.data`` without loading it (the registered
  data set's :class:`~mfp_jax.data.DataSpec`)."""
  try:
    spec = data_lib.data_spec(config.data, T=int(config.model.T) if 'T' in config.model
                              else None)
  except (TypeError, ValueError) as e:
    raise config_lib.ConfigError(f'no input spec for data set {config.data.name!r}: {e}') from e
  return tuple(spec.input_shape), int(spec.num_classes)


def trace_layers(model: nn.Module, input_shape: Sequence[int]
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """Weight layers and spiking layers of ``model`` in call order, from shapes only.

  Returns:
    ``(weights, neurons)``: weights have ``name``, ``kind`` (conv/dense), ``kernel``,
    ``in_shape``/``out_shape`` (batch 1; time-folded layers lead with ``T``), ``bits``,
    ``bias``; neurons have ``name``, ``kind``, ``shape`` (``[T, 1, ...]``) and ``params``
    (their parameter count).
  """
  root, _ = folding.trace_calls(model, input_shape)
  abstract = jax.eval_shape(lambda: models.init_variables(model, input_shape,
                                                          jax.random.key(0)))
  params = traverse_util.flatten_dict(abstract['params'], sep='/')
  weights, spiking = [], []
  for c in folding.walk_calls(root):
    if isinstance(c.module, (layers.QConv, layers.QDense)):
      weights.append({'name': c.path,
                      'kind': 'conv' if isinstance(c.module, layers.QConv) else 'dense',
                      'kernel': tuple(params[f'{c.path}/kernel'].shape),
                      'bias': f'{c.path}/bias' in params,
                      'in_shape': tuple(c.inp.shape), 'out_shape': tuple(c.out.shape),
                      'bits': int(c.module.quant.bits)})
    elif isinstance(c.module, layers.SpikingNeuron):
      own = [v for k, v in params.items() if k.startswith(f'{c.path}/')]
      spiking.append({'name': c.path, 'kind': c.module.spec.kind, 'shape': tuple(c.out.shape),
                      'params': int(sum(math.prod(v.shape) for v in own))})
  return weights, spiking


def count_params(model: nn.Module, input_shape: Sequence[int]) -> int:
  """Trainable parameters (``params`` collection; BatchNorm statistics excluded)."""
  v = jax.eval_shape(lambda: models.init_variables(model, input_shape, jax.random.key(0)))
  return int(sum(math.prod(a.shape) for a in jax.tree.leaves(v['params'])))


def weight_bytes(n: int, bits: int) -> int:
  """Bytes of ``n`` weights as deployed: packed signs, int levels + one scale, or float32."""
  if bits == 1:
    return (n + 7) // 8
  if bits >= 32:
    return 4 * n
  return n * (1 if bits <= 8 else 2) + 4


def _layer_record(w: dict[str, Any], T: int, s_bits: int, first: bool) -> dict[str, Any]:
  n_kernel = math.prod(w['kernel'])
  cout = w['kernel'][-1]
  fan_in = n_kernel // cout
  macs = math.prod(w['out_shape'][1:]) * fan_in  # per example and time step
  params = n_kernel + (cout if w['bias'] else 0)
  # Every conv is followed by a norm, deployed as a folded per-channel scale and shift.
  norm = 2 * cout if w['kind'] == 'conv' else 0
  ace_w, ace_s = min(w['bits'], ACE_MAX_BITS), min(s_bits, ACE_MAX_BITS)
  # A static image enters the first conv once (the model repeats its output over T).
  executions = T if (w['in_shape'][0] == T or not first) else 1
  return {'name': w['name'], 'kind': w['kind'], 'role': 'first' if first else 'hidden',
          'kernel': list(w['kernel']), 'params': params, 'macs': macs, 'w_bits': w['bits'],
          's_bits': s_bits, 'executions': executions, 'sace': macs * T * ace_w * ace_s,
          'deploy_bytes': weight_bytes(n_kernel, w['bits']) + 4 * norm
                          + (4 * cout if w['bias'] else 0),
          'fp32_bytes': 4 * (params + norm), 'firing_rate': None, 'nsace': None, 'sops': None}


def _neuron_record(n: dict[str, Any], T: int) -> dict[str, Any]:
  count = math.prod(n['shape'][2:])  # neurons per example (per time step)
  kind = neuron_kinds.NEURONS.get(n['kind'])
  per_neuron = kind.state_bytes(T)
  linear = isinstance(kind, neuron_kinds.LinearNeuron)
  return {'name': n['name'], 'kind': n['kind'], 'neurons': count, 'm_params': n['params'],
          # the program stores M / vth as float32 [T, T] for every MFP-type kind
          'deploy_bytes': 4 * T * T if linear else 0,
          'state_bytes_per_neuron': per_neuron, 'state_bytes': count * per_neuron,
          'firing_rate': None}


def build_report(model: nn.Module, input_shape: Sequence[int], *,
                 input_rates: Mapping[str, float] | None = None,
                 neuron_rates: Mapping[str, float] | None = None) -> dict[str, Any]:
  """The full cost report of ``model`` (JSON-able).

  Args:
    model: a model of :mod:`mfp_jax.models`.
    input_shape: one example, e.g. ``(32, 32, 3)``.
    input_rates: measured mean input per weight layer (``{layer path: rate}``); enables
      NS-ACE, SOPs and energy.
    neuron_rates: measured firing rate per spiking layer.

  Returns:
    dict with ``params``, ``deployable_bytes``, ``fp32_bytes``, ``sace``, ``nsace`` (None
    without rates), ``sops``, ``energy_pj``, ``state_bytes``, ``layers``, ``neurons``, ...
  """
  weights, spk = trace_layers(model, input_shape)
  T = int(spk[0]['shape'][0]) if spk else 1
  kinds = list(dict.fromkeys(n['kind'] for n in spk))
  spiking = any(neuron_kinds.NEURONS.get(k).spiking for k in kinds)
  s_bits = 1 if spiking else 32
  recs = [_layer_record(w, T, s_bits, i == 0) for i, w in enumerate(weights)]
  if recs and weights[-1]['kind'] == 'dense':
    recs[-1]['role'] = 'last'
  nrecs = [_neuron_record(n, T) for n in spk]
  for r in nrecs:
    if neuron_rates is not None and r['name'] in neuron_rates:
      r['firing_rate'] = float(neuron_rates[r['name']])
  if input_rates is not None:
    for r in recs:
      fr = 1.0 if r['role'] == 'first' else float(input_rates[r['name']])
      r['firing_rate'], r['nsace'] = fr, fr * r['sace']
      r['sops'] = fr * r['macs'] * T
  n_neurons = sum(r['neurons'] for r in nrecs)
  mfp_kinds = [k for k in kinds if neuron_kinds.is_linear(k)]
  bits = lambda roles: sorted({r['w_bits'] for r in recs if r['role'] in roles})
  one = lambda v: v[0] if len(v) == 1 else v
  report = {
      'model': type(model).__name__, 'neuron': one(kinds) if kinds else None, 'T': T,
      'input_shape': list(input_shape),
      'num_classes': int(weights[-1]['out_shape'][-1]) if weights else None,
      'params': count_params(model, input_shape),
      'macs_per_step': sum(r['macs'] for r in recs),
      'weight_bits': {'hidden': one(bits(('hidden',))), 'first_last': one(bits(('first',
                                                                               'last')))},
      'spike_bits': s_bits,
      'deployable_bytes': sum(r['deploy_bytes'] for r in recs + nrecs),
      'fp32_bytes': sum(r['fp32_bytes'] for r in recs) + 4 * sum(r['m_params'] for r in nrecs),
      'sace': sum(r['sace'] for r in recs),
      'nsace': None if input_rates is None else sum(r['nsace'] for r in recs),
      'neurons': nrecs,
      'neuron_count': n_neurons,
      'state_bytes_per_neuron': {'exact_serial': 4 * T, 'column': 4} if mfp_kinds else None,
      'state_bytes': ({'exact_serial': 4 * T * n_neurons, 'column': 4 * n_neurons}
                      if mfp_kinds else None),
      'layers': recs,
  }
  report.update(energy(recs, T, rates_known=input_rates is not None))
  return report


def energy(recs: Sequence[Mapping[str, Any]], T: int, *, rates_known: bool) -> dict[str, Any]:
  """SOPs and the Horowitz (45 nm) energy estimate per inference of one example (pJ)."""
  e_mac = HOROWITZ_45NM_PJ['fp32_add'] + HOROWITZ_45NM_PJ['fp32_mult']
  total_macs = sum(r['macs'] for r in recs)
  out: dict[str, Any] = {'energy_source': ENERGY_SOURCE, 'energy_pj_per_op': {
      'mac_fp32': e_mac, 'ac_fp32': HOROWITZ_45NM_PJ['fp32_add']}, 'sops': None,
      'energy_pj': {'ann_fp32': total_macs * e_mac, 'snn_fp32': None}}
  if rates_known:
    first = [r for r in recs if r['role'] == 'first']
    rest = [r for r in recs if r['role'] != 'first']
    sops = sum(r['sops'] for r in rest)
    first_macs = sum(r['macs'] * r['executions'] for r in first)
    out['sops'] = sops
    out['energy_pj']['snn_fp32'] = first_macs * e_mac + sops * HOROWITZ_45NM_PJ['fp32_add']
  return out


def _si(x: float | None) -> str:
  if x is None:
    return '-'
  for unit, scale in (('G', 1e9), ('M', 1e6), ('k', 1e3)):
    if abs(x) >= scale:
      return f'{x / scale:.3g}{unit}'
  return f'{x:.3g}'


def format_report(report: Mapping[str, Any]) -> str:
  """A readable table of :func:`build_report`'s output."""
  head = ('layer', 'params', 'MACs/step', 'W', 'S', 'in rate', 'S-ACE', 'NS-ACE', 'deploy B',
          'fp32 B')
  rows = [head]
  for r in report['layers']:
    rate = '-' if r['firing_rate'] is None else f'{r["firing_rate"]:.3f}'
    rows.append((r['name'], str(r['params']), _si(r['macs']), str(r['w_bits']),
                 str(r['s_bits']), rate, _si(r['sace']), _si(r['nsace']),
                 str(r['deploy_bytes']), str(r['fp32_bytes'])))
  widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
  fmt = lambda row: '  '.join(c.ljust(w) if i == 0 else c.rjust(w)
                              for i, (c, w) in enumerate(zip(row, widths)))
  lines = [fmt(r) for r in rows]
  lines.insert(1, '-' * len(lines[0]))
  lines.append('')
  lines.append('spiking layer                                  neurons  fire rate  state B '
               '(exact serial / column)')
  for n in report['neurons']:
    rate = '-' if n['firing_rate'] is None else f'{n["firing_rate"]:.3f}'
    col = 4 * n['neurons'] if n['kind'] in ('mfp', 'mfp_column') else n['state_bytes']
    lines.append(f'{n["name"]:<46s} {n["neurons"]:>7d}  {rate:>9s}  {n["state_bytes"]} / {col}')
  r = report
  ratio = r['fp32_bytes'] / max(r['deployable_bytes'], 1)
  lines += [
      '',
      f'{r["model"]} ({r["neuron"]}, T = {r["T"]}, weights {r["weight_bits"]["hidden"]}-bit '
      f'hidden / {r["weight_bits"]["first_last"]}-bit first+last, spikes {r["spike_bits"]}-bit)',
      f'params {r["params"]:,}   MACs/step {r["macs_per_step"]:,}',
      f'deployable {r["deployable_bytes"]:,} B vs fp32 {r["fp32_bytes"]:,} B ({ratio:.1f}x '
      'smaller)',
      f'S-ACE {_si(r["sace"])}   NS-ACE {_si(r["nsace"])}   SOPs {_si(r["sops"])}',
  ]
  if r['state_bytes'] is not None:
    lines.append(f'inference state: {r["state_bytes"]["exact_serial"]:,} B exact serial '
                 f'({r["state_bytes_per_neuron"]["exact_serial"]} B/neuron, O(T)) vs '
                 f'{r["state_bytes"]["column"]:,} B column form (4 B/neuron, O(1))')
  e = r['energy_pj']
  snn = '-' if e['snn_fp32'] is None else f'{e["snn_fp32"] / 1e6:.4g} uJ'
  lines.append(f'energy/example: SNN {snn} vs fp32 ANN {e["ann_fp32"] / 1e6:.4g} uJ '
               f'({r["energy_source"]})')
  return '\n'.join(lines)
