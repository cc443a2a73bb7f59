"""The extension points: registries, configs from builder signatures, folding by structure."""

import os

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest

from eval_helpers import random_variables
from helpers import ROOT
from mfp_jax import config_lib
from mfp_jax import folding
from mfp_jax import inference
from mfp_jax import layers
from mfp_jax import models
from mfp_jax import registry
from mfp_jax import train_lib

DIGITS = (8, 8, 1)


def test_registry_refuses_duplicates_and_lists_names():
  r = registry.Registry('widget')
  r.register('a', 1)
  r.register('b')(2)  # decorator form
  with pytest.raises(ValueError, match="widget 'a' is already registered"):
    r.register('a', 3)
  with pytest.raises(ValueError, match=r"unknown widget 'c'; allowed: \['a', 'b'\]"):
    r.get('c')
  assert r.unregister('a') == 1 and r.names() == ['b'] and 'a' not in r
  with pytest.raises(ValueError, match='non-empty string'):
    r.register('', 4)


def test_builtins_are_registered_through_the_registries():
  assert models.MODELS.names()[:4] == ['digits_cnn', 'resnet19', 'vggsnn', 'vgg16']
  from mfp_jax import data, losses, neuron_kinds, optim
  assert data.DATASETS.names()[:2] == ['digits', 'cifar10']
  assert neuron_kinds.NEURONS.names() == ['mfp', 'mfp_column', 'lif', 'relu']
  assert losses.LOSSES.names() == ['per_step_ce', 'mean_ce', 'tet']
  assert optim.OPTIMIZERS.names() == ['sgd', 'adamw']


class TinyNet(nn.Module):
  """A user's model with a field of every kind a config can hold."""
  num_classes: int
  T: int = 2
  width: int = 4
  gain: float | None = None
  neuron: layers.NeuronSpec = layers.NeuronSpec()

  @nn.compact
  def __call__(self, x, *, train=False, anneal_t=None):
    h = models.Stem(self.width, self.T, neuron=self.neuron)(x, train=train)
    return models.Classifier(self.num_classes)(h)


@pytest.fixture
def tiny_net():
  models.register_model('test_tiny_net', TinyNet)
  yield
  models.MODELS.unregister('test_tiny_net')


def test_model_config_comes_from_the_builder_signature(tiny_net):
  c = config_lib.model_config('test_tiny_net', width=6, neuron={'kind': 'lif'})
  assert c.name == 'test_tiny_net' and c.width == 6 and c.T == 2
  assert c.neuron.kind == 'lif' and c.neuron.vth == 1.0  # a nested dataclass: a section
  assert c.gain is None
  c.gain = 2.5  # a typed placeholder: None by default, still settable (and from the CLI)
  model = models.create_model(c, num_classes=3)
  assert isinstance(model, TinyNet) and model.neuron == layers.NeuronSpec(kind='lif')
  assert model.gain == 2.5 and model.num_classes == 3
  with pytest.raises(config_lib.ConfigError, match=r"no field\(s\) \['widht'\]"):
    config_lib.model_config('test_tiny_net', widht=3)


def test_validation_reads_the_signature(tiny_net):
  c = config_lib.base_config()
  c.model = config_lib.model_config('test_tiny_net')
  config_lib.validate(c)
  # A config file can build a section by hand (ConfigDict itself refuses a retyped field).
  fields = c.model.to_dict()
  fields.update(width='wide', depth=3)
  fields['neuron']['vth'] = -1.0
  c.model = ml_collections.ConfigDict(fields)
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c)
  msg = str(e.value)
  assert "config.model.width = 'wide': must be an integer" in msg
  assert 'config.model.neuron.vth = -1.0: must be a number > 0' in msg
  assert "unknown field config.model.depth (model 'test_tiny_net' takes: T, gain, neuron" in msg


def test_none_means_unset_never_zero():
  c = config_lib.base_config()
  for field in ('stop_at_step', 'checkpoint_every_steps'):
    assert c[field] is None
  assert c.optim.grad_clip is None and c.model.neuron.alpha is None
  assert c.model.neuron.membrane_bits is None
  c.stop_at_step = 0
  with pytest.raises(config_lib.ConfigError, match='stop_at_step = 0: must be None or'):
    config_lib.validate(c)


def test_label_smoothing_is_a_validated_loss_field():
  c = config_lib.base_config()
  c.loss = config_lib.loss_config('mean_ce', label_smoothing=0.1)
  config_lib.validate(c)
  assert train_lib.classification_loss(c.loss).keywords == {'label_smoothing': 0.1}
  c.loss.label_smoothing = 1.5
  with pytest.raises(config_lib.ConfigError,
                     match=r'config.loss.label_smoothing = 1.5: must be a number in \[0, 1\)'):
    config_lib.validate(c)


def test_pool_padding_is_a_validated_model_field():
  c = config_lib.base_config()
  assert c.model.pool_padding == 'VALID'
  c.model.pool_padding = 'same'
  with pytest.raises(config_lib.ConfigError,
                     match="config.model.pool_padding = 'same': must be 'VALID' or 'SAME'"):
    config_lib.validate(c)


def test_neuron_mode_switches_a_model_of_any_structure():
  model = models.DigitsNet(channels=(4, 8), T=3)
  v = random_variables(model, DIGITS)
  x = jax.random.uniform(jax.random.key(0), (4,) + DIGITS)
  run = jax.jit(lambda v, x: model.apply(v, x))
  with layers.neuron_mode('eq9'):
    eq9 = jax.jit(lambda v, x: model.apply(v, x))(v, x)
  par = run(v, x)
  assert not np.array_equal(np.asarray(par), np.asarray(eq9))  # M is not diagonal
  np.testing.assert_array_equal(eq9, inference.with_neuron_mode(model, 'eq9').apply(v, x))
  with pytest.raises(ValueError, match='unknown neuron mode'):
    with layers.neuron_mode('fast'):
      pass


class PoolThenStem(nn.Module):
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, *, train=False, anneal_t=None):
    h = models.Stem(4, 2)(x, train=train)
    h = h * 1.0  # an op outside any block: the chain is broken
    return models.Classifier(self.num_classes)(h)


class Opaque(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.Dense(3)(x)


class WithOpaque(nn.Module):
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, *, train=False, anneal_t=None):
    h = models.Stem(4, 2)(x, train=train)
    h = Opaque()(h)
    return models.Classifier(self.num_classes)(h)


class MyConvNormSpike(layers.ConvNormSpike):
  """A user's subclass of a library block: folds by the parent's rule (MRO)."""


class SubclassNet(nn.Module):
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, *, train=False, anneal_t=None):
    h = models.Stem(4, 2)(x, train=train)
    h = MyConvNormSpike(8)(h, train=train)
    h = layers.AvgPool(2)(h)
    return models.Classifier(self.num_classes, global_pool=False)(h)


def test_folding_walks_structure_and_refuses_what_it_cannot_fold():
  with pytest.raises(ValueError, match='not the output of the block before it'):
    inference.build_program(PoolThenStem(), random_variables(PoolThenStem(), DIGITS), DIGITS)
  with pytest.raises(ValueError, match='no fold rule'):
    folding.build_program(WithOpaque(), random_variables(WithOpaque(), DIGITS), DIGITS)
  model = SubclassNet()
  v = random_variables(model, DIGITS)
  x = jax.random.uniform(jax.random.key(1), (8,) + DIGITS)
  lp, sp = inference.make_infer_fn(model, v, input_shape=DIGITS, with_spikes=True)(x)
  ls, ss = inference.make_infer_fn(model, v, mode='serial', input_shape=DIGITS,
                                   with_spikes=True)(x)
  assert set(sp) == set(ss) == {'Stem_0/SpikingNeuron_0', 'MyConvNormSpike_0/SpikingNeuron_0'}
  assert all(np.array_equal(sp[k], ss[k]) for k in sp)
  np.testing.assert_allclose(lp, ls, rtol=1e-5, atol=1e-5)


def test_folding_uses_no_automatic_flax_names():
  src = open(os.path.join(ROOT, 'mfp_jax', 'folding.py')).read()
  assert "_0'" not in src and 'isinstance(model, models.' not in src


def test_sequence_model_folds_and_runs_serially():
  model = models.SeqMLP(num_classes=4, T=5, hidden=(6, 7))
  shape = (5, 3)
  v = random_variables(model, shape)
  x = jax.random.uniform(jax.random.key(2), (16,) + shape)
  lp, sp = inference.make_infer_fn(model, v, input_shape=shape, with_spikes=True)(x)
  ls, ss = inference.make_infer_fn(model, v, mode='serial', input_shape=shape,
                                   with_spikes=True)(x)
  assert len(sp) == 2 and all(np.array_equal(sp[k], ss[k]) for k in sp)
  assert 0.05 < float(np.mean([np.mean(s) for s in ss.values()])) < 0.95  # not degenerate
  np.testing.assert_array_equal(np.argmax(lp, -1), np.argmax(ls, -1))
