"""Spiking networks: a small net for the embedded digits, ResNet19, VGGSNN and VGG16.

Every model maps an input batch to per-step logits ``[T, B, num_classes]``:
static images ``[B, H, W, C]`` are repeated over time (direct encoding); event frames
``[B, T, H, W, C]`` are moved time-major. Hidden convs use ``quant`` (1-bit by default); the
first conv and the classifier use ``edge_quant`` (full precision or 8-bit, by config).

Call ``model.apply(variables, x, train=..., anneal_t=..., mutable=[...])``; ``anneal_t`` is
the sharpness of the annealed 1-bit estimator (a float32 scalar, ignored otherwise).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mfp_jax import layers
from mfp_jax.layers import FULL_PRECISION, NeuronSpec, QuantSpec


class Stem(nn.Module):
  """First conv + norm + neuron. Static input: conv once on ``[B, ...]``, then repeat over T."""
  features: int
  T: int
  quant: QuantSpec = FULL_PRECISION
  neuron: NeuronSpec = NeuronSpec()

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, anneal_t=None) -> jax.Array:
    conv = layers.QConv(self.features, 3, 1, self.quant)
    norm = layers.batch_norm(train)
    if x.ndim == 4:
      # The T copies of a static image are identical: convolve and normalize once (the norm
      # statistics over T*B equal those over B).
      y = layers.direct_encode(norm(conv(x, anneal_t)), self.T)
    elif x.ndim == 5:
      if x.shape[1] != self.T:
        raise ValueError(f'event input must be [B, T={self.T}, H, W, C], got {x.shape}')
      xt = layers.frames_to_time_major(x)
      y = layers.unfold_time(norm(conv(layers.fold_time(xt), anneal_t)), self.T)
    else:
      raise ValueError(f'input must be [B, H, W, C] (images) or [B, T, H, W, C] (frames), '
                       f'got shape {x.shape}')
    return layers.SpikingNeuron(self.neuron)(y)


class Classifier(nn.Module):
  """Per-step logits from ``[T, B, ...]`` features: global average pool (optional) + dense."""
  num_classes: int
  quant: QuantSpec = FULL_PRECISION
  global_pool: bool = True

  @nn.compact
  def __call__(self, x: jax.Array, anneal_t=None) -> jax.Array:
    t = x.shape[0]
    y = layers.fold_time(x)
    y = y.mean(axis=(1, 2)) if self.global_pool else y.reshape(y.shape[0], -1)
    return layers.unfold_time(layers.QDense(self.num_classes, quant=self.quant)(y, anneal_t), t)


class _SpikingNet(nn.Module):
  """Fields shared by all models."""
  num_classes: int = 10
  T: int = 4
  neuron: NeuronSpec = NeuronSpec()
  quant: QuantSpec = QuantSpec()
  edge_quant: QuantSpec = FULL_PRECISION


class DigitsNet(_SpikingNet):
  """Small conv net for 8x8 digits: stem, two 1-bit conv stages with 2x2 pooling, dense."""
  channels: Sequence[int] = (32, 64, 128)

  @nn.compact
  def __call__(self, x, *, train: bool = False, anneal_t=None):
    c0, *rest = self.channels
    h = Stem(c0, self.T, self.edge_quant, self.neuron)(x, train=train, anneal_t=anneal_t)
    for c in rest:
      h = layers.ConvNormSpike(c, 1, self.quant, self.neuron)(h, train=train, anneal_t=anneal_t)
      h = layers.unfold_time(layers.avg_pool(layers.fold_time(h)), self.T)
    return Classifier(self.num_classes, self.edge_quant, global_pool=False)(h, anneal_t)


class BasicBlock(nn.Module):
  """ResNet basic block: conv-norm-spike-conv-norm, plus shortcut (1x1 conv + norm on a
  shape change), then a spike after the sum."""
  features: int
  strides: int = 1
  quant: QuantSpec = QuantSpec()
  neuron: NeuronSpec = NeuronSpec()

  @nn.compact
  def __call__(self, x, *, train: bool, anneal_t=None):
    t = x.shape[0]
    h = layers.ConvNormSpike(self.features, self.strides, self.quant, self.neuron)(
        x, train=train, anneal_t=anneal_t)
    h = layers.QConv(self.features, 3, 1, self.quant)(layers.fold_time(h), anneal_t)
    h = layers.batch_norm(train)(h)
    sc = layers.fold_time(x)
    if self.strides != 1 or x.shape[-1] != self.features:
      sc = layers.QConv(self.features, 1, self.strides, self.quant, name='shortcut_conv')(
          sc, anneal_t)
      sc = layers.batch_norm(train, name='shortcut_norm')(sc)
    return layers.SpikingNeuron(self.neuron)(layers.unfold_time(h + sc, t))


class ResNet19(_SpikingNet):
  """ResNet19 of tdBN/TET for CIFAR: 3x3 stem to 128, BasicBlocks [3, 3, 2] at 128/256/512
  (strides 1, 2, 2), global average pool, linear classifier."""
  stage_sizes: Sequence[int] = (3, 3, 2)
  widths: Sequence[int] = (128, 256, 512)

  @nn.compact
  def __call__(self, x, *, train: bool = False, anneal_t=None):
    h = Stem(self.widths[0], self.T, self.edge_quant, self.neuron)(
        x, train=train, anneal_t=anneal_t)
    for i, (n, w) in enumerate(zip(self.stage_sizes, self.widths)):
      for j in range(n):
        strides = 2 if (i > 0 and j == 0) else 1
        h = BasicBlock(w, strides, self.quant, self.neuron)(h, train=train, anneal_t=anneal_t)
    return Classifier(self.num_classes, self.edge_quant, global_pool=True)(h, anneal_t)


class VGG(_SpikingNet):
  """VGG-style stack: ints are 3x3 conv widths, ``'A'`` a 2x2 average pool."""
  layout: Sequence[Any] = ()
  global_pool: bool = False

  @nn.compact
  def __call__(self, x, *, train: bool = False, anneal_t=None):
    first, *rest = self.layout
    h = Stem(first, self.T, self.edge_quant, self.neuron)(x, train=train, anneal_t=anneal_t)
    for item in rest:
      if item == 'A':
        h = layers.unfold_time(layers.avg_pool(layers.fold_time(h)), self.T)
      else:
        h = layers.ConvNormSpike(int(item), 1, self.quant, self.neuron)(
            h, train=train, anneal_t=anneal_t)
    return Classifier(self.num_classes, self.edge_quant, self.global_pool)(h, anneal_t)


# TET's VGGSNN for CIFAR10-DVS at 48x48: four pools leave 3x3x512 for the linear classifier.
VGGSNN_LAYOUT = (64, 128, 'A', 256, 256, 'A', 512, 512, 'A', 512, 512, 'A')
# VGG16 (13 convs) for 64x64 Tiny-ImageNet: five pools leave 2x2x512, globally averaged.
VGG16_LAYOUT = (64, 64, 'A', 128, 128, 'A', 256, 256, 256, 'A', 512, 512, 512, 'A',
                512, 512, 512, 'A')

MODELS = ('digits_cnn', 'resnet19', 'vggsnn', 'vgg16')


def create_model(cfg, *, num_classes: int) -> nn.Module:
  """Builds the model named ``cfg.name`` from a config's ``model`` section.

  Fields (see :func:`mfp_jax.config_lib.base_config`): ``name``, ``T``, ``neuron`` (kind,
  vth, surrogate, surrogate_alpha (0: default), tau, membrane_bits (0: float)),
  ``weight_bits``, ``first_last_bits``, ``binary_scale``, ``estimator``, and ``channels``
  for ``digits_cnn``.

  Raises:
    ValueError: unknown model name or bad field values, listing what is allowed.
  """
  n = cfg.neuron
  neuron = NeuronSpec(kind=n.kind, vth=float(n.vth), surrogate=n.surrogate,
                      alpha=float(n.surrogate_alpha) or None, tau=float(n.tau),
                      membrane_bits=int(n.membrane_bits) or None)
  q = QuantSpec(bits=int(cfg.weight_bits), scale=cfg.binary_scale, estimator=cfg.estimator)
  edge = QuantSpec(bits=int(cfg.first_last_bits))
  common = dict(num_classes=num_classes, T=int(cfg.T), neuron=neuron, quant=q, edge_quant=edge)
  if cfg.name == 'digits_cnn':
    return DigitsNet(channels=tuple(cfg.channels), **common)
  if cfg.name == 'resnet19':
    return ResNet19(**common)
  if cfg.name == 'vggsnn':
    return VGG(layout=VGGSNN_LAYOUT, global_pool=False, **common)
  if cfg.name == 'vgg16':
    return VGG(layout=VGG16_LAYOUT, global_pool=True, **common)
  raise ValueError(f'unknown model {cfg.name!r}; allowed: {list(MODELS)}')


def init_variables(model: nn.Module, input_shape: Sequence[int], key: jax.Array) -> dict:
  """Initial ``{'params', 'batch_stats'}`` for one example of ``input_shape`` (no batch axis)."""
  x = jnp.zeros((1,) + tuple(input_shape), jnp.float32)
  variables = model.init(key, x, train=False)
  return {k: v for k, v in variables.items() if k != 'intermediates'}


def spiking_layer_names(model: nn.Module, input_shape: Sequence[int]) -> list[str]:
  """Module paths of the spiking layers in call order (the order of the firing rates that
  :func:`mfp_jax.layers.firing_rates` returns inside a traced ``apply``). Costs no compute:
  it traces with shapes only."""
  names: list[str] = []
  x = jnp.zeros((1,) + tuple(input_shape), jnp.float32)

  def trace(variables):
    _, col = model.apply(variables, x, mutable=['intermediates'])
    # The order is read during tracing: a dict returned across eval_shape has sorted keys.
    names.extend(n for n, _ in layers.firing_rates(col['intermediates']))
    return 0

  variables = jax.eval_shape(lambda: init_variables(model, input_shape, jax.random.key(0)))
  jax.eval_shape(trace, variables)
  return names
