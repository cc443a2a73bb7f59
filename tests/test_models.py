import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mfp_jax import config_lib
from mfp_jax import layers
from mfp_jax import models


def model_cfg(name, T=4, kind='mfp', **kw):
  return config_lib.model_config(name, T=T, neuron={'kind': kind}, **kw)


# --- Independent parameter counts, from each architecture's layer list ---------------------


def conv(k, cin, cout):
  return k * k * cin * cout


def bn(c):
  return 2 * c  # scale + bias (running statistics are not parameters)


def neuron(T, kind):
  return {'mfp': T * T, 'mfp_column': T, 'lif': 0, 'relu': 0}[kind]


def dense(i, o):
  return i * o + o


def count_vgg(layout, in_ch, T, kind, classifier_in, classes):
  n, c = 0, in_ch
  for item in layout:
    if item != 'A':
      n += conv(3, c, item) + bn(item) + neuron(T, kind)
      c = item
  return n + dense(classifier_in, classes)


def count_resnet19(T, kind, classes):
  n = conv(3, 3, 128) + bn(128) + neuron(T, kind)
  cin = 128
  for stage, (blocks, w) in enumerate([(3, 128), (3, 256), (2, 512)]):
    for j in range(blocks):
      stride = 2 if stage > 0 and j == 0 else 1
      n += conv(3, cin, w) + bn(w) + neuron(T, kind) + conv(3, w, w) + bn(w)
      if stride != 1 or cin != w:
        n += conv(1, cin, w) + bn(w)
      n += neuron(T, kind)  # after the residual sum
      cin = w
  return n + dense(512, classes)


CASES = {
    # name: (input shape, classes, T, expected count fn)
    'digits_cnn': ((8, 8, 1), 10, 4, lambda T, k: (
        conv(3, 1, 32) + bn(32) + neuron(T, k) + conv(3, 32, 64) + bn(64) + neuron(T, k)
        + conv(3, 64, 128) + bn(128) + neuron(T, k) + dense(2 * 2 * 128, 10))),
    'resnet19': ((32, 32, 3), 10, 4, lambda T, k: count_resnet19(T, k, 10)),
    'vggsnn': ((10, 48, 48, 2), 10, 10, lambda T, k: count_vgg(
        models.VGGSNN_LAYOUT, 2, T, k, 3 * 3 * 512, 10)),
    'vgg16': ((64, 64, 3), 200, 4, lambda T, k: count_vgg(
        models.VGG16_LAYOUT, 3, T, k, 512, 200)),
}


@pytest.mark.parametrize('kind', ['mfp', 'mfp_column', 'lif', 'relu'])
@pytest.mark.parametrize('name', sorted(CASES))
def test_parameter_count(name, kind):
  shape, classes, T, expected = CASES[name]
  model = models.create_model(model_cfg(name, T, kind), num_classes=classes)
  v = jax.eval_shape(lambda: models.init_variables(model, shape, jax.random.key(0)))
  got = sum(x.size for x in jax.tree.leaves(v['params']))
  assert got == expected(T, kind)


def test_known_totals():
  # ResNet19 of TET/tdBN is quoted at ~12.6 M parameters for CIFAR10.
  assert count_resnet19(4, 'mfp', 10) == 12_569_498


@pytest.mark.parametrize('name', sorted(CASES))
def test_forward_on_tiny_batch(name):
  shape, classes, _, _ = CASES[name]
  T = 2
  if len(shape) == 4:
    shape = (T,) + shape[1:]
  model = models.create_model(model_cfg(name, T), num_classes=classes)
  v = models.init_variables(model, shape, jax.random.key(0))
  x = jax.random.uniform(jax.random.key(1), (2,) + shape)
  logits, col = jax.jit(lambda v, x: model.apply(v, x, train=True,
                                                 mutable=['batch_stats', 'intermediates']))(v, x)
  chex.assert_shape(logits, (T, 2, classes))
  chex.assert_tree_all_finite(logits)
  # One firing rate per spiking layer, every one of them sown.
  assert len(jax.tree.leaves(col['intermediates'])) == len(
      models.spiking_layer_names(model, shape)) >= 3


def test_firing_rates_in_call_order():
  model = models.create_model(model_cfg('resnet19', 1), num_classes=10)
  names = models.spiking_layer_names(model, (32, 32, 3))
  # stem, then per block: inner neuron and post-sum neuron, blocks in order 0..7.
  assert names[0] == 'Stem_0/SpikingNeuron_0'
  assert names[1:3] == ['BasicBlock_0/ConvNormSpike_0/SpikingNeuron_0',
                        'BasicBlock_0/SpikingNeuron_0']
  assert names[-1] == 'BasicBlock_7/SpikingNeuron_0' and len(names) == 17


def test_time_folding_and_encoding():
  x = jnp.arange(2 * 3 * 4).reshape(2, 3, 4)
  np.testing.assert_array_equal(layers.unfold_time(layers.fold_time(x), 2), x)
  img = jnp.ones((5, 8, 8, 1))
  assert layers.direct_encode(img, 3).shape == (3, 5, 8, 8, 1)
  frames = jnp.zeros((5, 3, 8, 8, 2))
  assert layers.frames_to_time_major(frames).shape == (3, 5, 8, 8, 2)


def test_m_init_is_decaying_lower_triangular():
  m = layers.decaying_m_init(0.5)(None, (4, 4))
  np.testing.assert_allclose(m, [[1, 0, 0, 0], [0.5, 1, 0, 0], [0.25, 0.5, 1, 0],
                                 [0.125, 0.25, 0.5, 1]])


@pytest.mark.parametrize('bits,levels', [(1, 2), (8, None), (32, None)])
def test_quant_spec_levels(bits, levels, rng):
  w = jnp.asarray(rng.normal(size=(3, 3, 4, 5)), jnp.float32)
  q = layers.QuantSpec(bits=bits)(w, None)
  per_channel = [np.unique(np.asarray(q[..., o])) for o in range(5)]
  if bits == 1:
    # pow2 scale: +-2^k per output channel
    for u in per_channel:
      assert len(u) == 2 and u[0] == -u[1] and np.log2(u[1]) == np.round(np.log2(u[1]))
  elif bits == 8:
    # Eq. 4 levels: alpha * k / 127 for integer k in [-127, 127], alpha = max |w|.
    alpha = np.abs(np.asarray(w)).max()
    k = np.asarray(q) / alpha * 127
    np.testing.assert_allclose(k, np.round(k), atol=1e-4)
    assert 2 < len(np.unique(np.round(k))) <= 255 and not np.allclose(q, w)
  else:
    np.testing.assert_array_equal(q, w)


def test_bad_names():
  with pytest.raises(ValueError, match="allowed: \\['digits_cnn'"):
    models.create_model(model_cfg('resnet50'), num_classes=10)
  model = models.create_model(model_cfg('digits_cnn', kind='izhikevich'), num_classes=10)
  with pytest.raises(ValueError, match="allowed: \\['mfp', 'mfp_column', 'lif', 'relu'\\]"):
    models.init_variables(model, (8, 8, 1), jax.random.key(0))
  model = models.create_model(model_cfg('digits_cnn'), num_classes=10)
  with pytest.raises(ValueError, match=r'\[B, H, W, C\]'):
    models.init_variables(model, (8, 8), jax.random.key(0))


def test_same_pool_keeps_the_odd_edge():
  # 3x3 -> 2x2: 'SAME' pads the far row and column with zeros and still divides by 4.
  x = jnp.arange(1.0, 10.0).reshape(1, 3, 3, 1)
  np.testing.assert_array_equal(layers.avg_pool(x, 2, 'SAME')[0, ..., 0],
                                [[(1 + 2 + 4 + 5) / 4, (3 + 6) / 4], [(7 + 8) / 4, 9 / 4]])
  np.testing.assert_array_equal(layers.avg_pool(x, 2)[0, ..., 0], [[3.0]])
  with pytest.raises(ValueError, match="pool padding must be one of .* got 'same'"):
    layers.avg_pool(x, 2, 'same')
  # digits_cnn at 14x14 with a stride-2 stem: 7x7 pools to 4x4 (not 3x3) under 'SAME'.
  shapes = {}
  for padding in layers.POOL_PADDINGS:
    model = models.DigitsNet(channels=(4, 8), T=2, stem_strides=2, pool_padding=padding)
    v = jax.eval_shape(lambda m=model: models.init_variables(m, (14, 14, 1), jax.random.key(0)))
    shapes[padding] = v['params']['Classifier_0']['QDense_0']['kernel'].shape
  assert shapes == {'VALID': (3 * 3 * 8, 10), 'SAME': (4 * 4 * 8, 10)}
