"""Cost accounting against counts worked out by hand."""

import json

import numpy as np
import pytest

from eval_helpers import random_variables
from mfp_jax import accounting
from mfp_jax import config_lib
from mfp_jax import inference
from mfp_jax import layers
from mfp_jax import models

DIGITS = (8, 8, 1)


def small_net(edge_bits=8, kind='mfp'):
  # 8x8x1 -> stem 4 ch -> conv 8 ch -> pool 4x4 -> conv 8 ch -> pool 2x2 -> dense 32 -> 10.
  return models.DigitsNet(num_classes=10, T=2, channels=(4, 8, 8),
                          neuron=layers.NeuronSpec(kind=kind),
                          edge_quant=layers.QuantSpec(bits=edge_bits))


def test_small_net_counts_by_hand():
  r = accounting.build_report(small_net(), DIGITS)
  by = {x['name']: x for x in r['layers']}
  stem, c0, c1, fc = (by['Stem_0/QConv_0'], by['ConvNormSpike_0/QConv_0'],
                      by['ConvNormSpike_1/QConv_0'], by['Classifier_0/QDense_0'])
  # params: kernel (+ bias); MACs per example and step: output positions x Cout x fan-in
  assert (stem['params'], stem['macs']) == (3 * 3 * 1 * 4, 8 * 8 * 4 * (3 * 3 * 1))
  assert (c0['params'], c0['macs']) == (3 * 3 * 4 * 8, 8 * 8 * 8 * (3 * 3 * 4))
  assert (c1['params'], c1['macs']) == (3 * 3 * 8 * 8, 4 * 4 * 8 * (3 * 3 * 8))
  assert (fc['params'], fc['macs']) == (32 * 10 + 10, 32 * 10)
  assert [x['w_bits'] for x in r['layers']] == [8, 1, 1, 8]
  assert [x['s_bits'] for x in r['layers']] == [1, 1, 1, 1]
  assert [x['role'] for x in r['layers']] == ['first', 'hidden', 'hidden', 'last']
  assert stem['executions'] == 1 and c0['executions'] == 2  # a static image is convolved once
  # all params: 4 kernels/bias + 3 norms (scale, bias) + 3 M of T x T
  assert r['params'] == 36 + 288 + 576 + 330 + 2 * (4 + 8 + 8) + 3 * 2 * 2
  # deployable: int8 levels + scale; packed signs; folded a, c per conv channel; M; bias
  stem_b = 36 + 4 + 2 * 4 * 4
  c0_b = 288 // 8 + 2 * 4 * 8
  c1_b = 576 // 8 + 2 * 4 * 8
  fc_b = 320 + 4 + 4 * 10
  assert [x['deploy_bytes'] for x in r['layers']] == [stem_b, c0_b, c1_b, fc_b]
  assert r['deployable_bytes'] == stem_b + c0_b + c1_b + fc_b + 3 * 4 * 2 * 2
  assert r['fp32_bytes'] == 4 * r['params']
  # inference state: 8x8x4 + 8x8x8 + 4x4x8 neurons; O(T) floats each (exact), 1 (column)
  n = 256 + 512 + 128
  assert r['neuron_count'] == n
  assert r['state_bytes'] == {'exact_serial': n * 4 * 2, 'column': n * 4}
  assert r['nsace'] is None and r['sops'] is None
  json.dumps(r)


def test_sace_and_nsace_follow_the_bit_budget_formula():
  # S-ACE = sum_l MACs_l * T * w_l * s_l (paper Eq. 4, 8); fp32 counted as 16-bit (BF16).
  T = 2
  macs = {'Stem_0/QConv_0': 2304, 'ConvNormSpike_0/QConv_0': 18432,
          'ConvNormSpike_1/QConv_0': 9216, 'Classifier_0/QDense_0': 320}
  for edge, ace_bits in ((8, 8), (32, 16)):
    w = {'Stem_0/QConv_0': ace_bits, 'ConvNormSpike_0/QConv_0': 1,
         'ConvNormSpike_1/QConv_0': 1, 'Classifier_0/QDense_0': ace_bits}
    r = accounting.build_report(small_net(edge), DIGITS)
    assert r['sace'] == sum(macs[k] * T * w[k] * 1 for k in macs)
  assert r['sace'] == 2304 * 2 * 16 + 18432 * 2 + 9216 * 2 + 320 * 2 * 16
  rates = {'ConvNormSpike_0/QConv_0': 0.25, 'ConvNormSpike_1/QConv_0': 0.5,
           'Classifier_0/QDense_0': 0.125, 'Stem_0/QConv_0': 0.9}
  r = accounting.build_report(small_net(8), DIGITS, input_rates=rates)
  # NS-ACE (Eq. 9): rate x S-ACE per layer; the first layer sees pixels and is charged in full.
  assert r['nsace'] == pytest.approx(2304 * 2 * 8 + 0.25 * 18432 * 2 + 0.5 * 9216 * 2
                                     + 0.125 * 320 * 2 * 8)
  sops = (0.25 * 18432 + 0.5 * 9216 + 0.125 * 320) * T
  assert r['sops'] == pytest.approx(sops)
  assert r['energy_pj']['snn_fp32'] == pytest.approx(2304 * (3.7 + 0.9) + sops * 0.9)
  assert r['energy_pj']['ann_fp32'] == pytest.approx(sum(macs.values()) * 4.6)
  assert [x['firing_rate'] for x in r['layers']] == [1.0, 0.25, 0.5, 0.125]


def test_residual_net_macs_include_strides_and_shortcut():
  model = models.ResNet19(num_classes=10, T=3, stage_sizes=(1, 1), widths=(8, 16))
  r = accounting.build_report(model, (8, 8, 3))
  by = {x['name']: x['macs'] for x in r['layers']}
  assert by['BasicBlock_0/ConvNormSpike_0/QConv_0'] == 8 * 8 * 8 * (9 * 8)
  assert by['BasicBlock_1/ConvNormSpike_0/QConv_0'] == 4 * 4 * 16 * (9 * 8)  # stride 2
  assert by['BasicBlock_1/QConv_0'] == 4 * 4 * 16 * (9 * 16)
  assert by['BasicBlock_1/shortcut_conv'] == 4 * 4 * 16 * 8  # 1x1, stride 2
  assert by['Classifier_0/QDense_0'] == 16 * 10  # after global average pooling
  assert len(r['neurons']) == 5


@pytest.mark.parametrize('edge_bits', [8, 32])
def test_deployable_bytes_equal_the_packed_program(edge_bits):
  for model, shape in ((small_net(edge_bits, 'mfp_column'), DIGITS),
                       (models.ResNet19(num_classes=10, T=3, stage_sizes=(1, 1), widths=(8, 16),
                                        edge_quant=layers.QuantSpec(bits=edge_bits)),
                        (8, 8, 3))):
    program = inference.build_program(model, random_variables(model, shape), shape)
    stored = sum(a.nbytes for a in program.arrays.values())
    assert accounting.build_report(model, shape)['deployable_bytes'] == stored


def test_input_spec_from_config_alone():
  c = config_lib.base_config()
  assert accounting.input_spec(c) == ((8, 8, 1), 10)
  c.data, c.model.T = config_lib.data_config('cifar10dvs', data_dir='/nowhere', size=48), 5
  assert accounting.input_spec(c) == ((5, 48, 48, 2), 10)
  c.data = config_lib.data_config('cifar100', data_dir='/nowhere')
  assert accounting.input_spec(c) == ((32, 32, 3), 100)


def test_relu_floor_counts_float_activations():
  r = accounting.build_report(small_net(32, 'relu'), DIGITS)
  assert r['spike_bits'] == 32 and r['state_bytes'] is None
  assert r['sace'] == 16 * 16 * 2 * 2304 + 16 * 2 * (18432 + 9216) + 16 * 16 * 2 * 320
  assert np.isfinite(r['energy_pj']['ann_fp32'])
