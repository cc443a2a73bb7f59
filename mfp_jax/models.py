"""Spiking networks: a small conv net, ResNet19, VGGSNN, VGG16 and a dense net for sequences.

Every model maps an input batch to per-step logits ``[T, B, num_classes]``: static images
``[B, H, W, C]`` are repeated over time (direct encoding); event frames ``[B, T, H, W, C]`` and
sequences ``[B, T, F]`` are moved time-major. Hidden layers use ``quant`` (1-bit by default);
the first layer and the classifier use ``edge_quant`` (full precision or 8-bit, by config).

The model protocol (what ``train.py``, folding and accounting call)::

  logits = model.apply(variables, x, train=..., anneal_t=..., mutable=[...])

``anneal_t`` is the sharpness of the annealed 1-bit estimator (a float32 scalar, ignored
otherwise). Models are registered by name (:func:`register_model`); a config's ``model``
section, without ``name``, holds the builder's keyword arguments (``num_classes`` comes from
the data set). A model assembled from this module's blocks (:class:`Stem`, :class:`DenseStem`,
:class:`BasicBlock`, :class:`Classifier`) and :mod:`mfp_jax.layers`' ``ConvNormSpike``,
``DenseNormSpike`` and ``AvgPool`` folds for exact serial inference (:mod:`mfp_jax.folding`).
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mfp_jax import layers
from mfp_jax import registry
from mfp_jax.layers import FULL_PRECISION, NeuronSpec, QuantSpec

MODELS: registry.Registry[Any] = registry.Registry('model')
register_model = registry.registrar(MODELS)


class Stem(nn.Module):
  """First conv + norm + neuron. Static input: conv once on ``[B, ...]``, then repeat over T."""
  features: int
  T: int
  quant: QuantSpec = FULL_PRECISION
  neuron: NeuronSpec = NeuronSpec()
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, anneal_t=None) -> jax.Array:
    conv = layers.QConv(self.features, 3, self.strides, self.quant)
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


class DenseStem(nn.Module):
  """First dense layer + norm + neuron of a sequence model: ``[B, T, F] -> [T, B, features]``."""
  features: int
  T: int
  quant: QuantSpec = FULL_PRECISION
  neuron: NeuronSpec = NeuronSpec()

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, anneal_t=None) -> jax.Array:
    if x.ndim != 3 or x.shape[1] != self.T:
      raise ValueError(f'sequence input must be [B, T={self.T}, F], got shape {x.shape}')
    y = layers.QDense(self.features, use_bias=False, quant=self.quant)(
        layers.fold_time(layers.frames_to_time_major(x)), anneal_t)
    y = layers.unfold_time(layers.batch_norm(train)(y), self.T)
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
  """Fields shared by the built-in models."""
  num_classes: int = 10
  T: int = 4
  neuron: NeuronSpec = NeuronSpec()
  quant: QuantSpec = QuantSpec()
  edge_quant: QuantSpec = FULL_PRECISION

  @classmethod
  def config_problems(cls, fields: dict[str, Any]) -> list[tuple[str, str]]:
    """``(field, what is allowed)`` for bad values among a config's ``fields`` (see
    :func:`mfp_jax.config_lib.validate`); types are checked there."""
    out = []
    t = fields.get('T')
    if not isinstance(t, int) or isinstance(t, bool) or not 1 <= t <= 1024:
      out.append(('T', 'an integer in [1, 1024]'))
    edge = fields.get('edge_quant')
    if isinstance(edge, QuantSpec) and edge.bits == 1:
      out.append(('edge_quant.bits', '2..16 or 32 (the first layer sees real-valued input)'))
    return out


@register_model('digits_cnn')
class DigitsNet(_SpikingNet):
  """Small conv net: stem, then 1-bit conv stages each followed by 2x2 pooling, dense.

  Built for the 8x8 digits; with ``stem_strides=2`` it suits 28x28 images on a CPU.
  ``pool_padding='SAME'`` keeps the last row and column of odd maps (7x7 -> 4x4, not 3x3).
  """
  channels: Sequence[int] = (32, 64, 128)
  stem_strides: int = 1
  pool_padding: str = 'VALID'

  @classmethod
  def config_problems(cls, fields):
    out = super().config_problems(fields)
    c = fields.get('channels')
    if not (isinstance(c, (tuple, list)) and c and all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in c)):
      out.append(('channels', 'a non-empty tuple of positive ints'))
    if fields.get('stem_strides') not in (1, 2):
      out.append(('stem_strides', '1 or 2'))
    if fields.get('pool_padding') not in layers.POOL_PADDINGS:
      out.append(('pool_padding', ' or '.join(map(repr, layers.POOL_PADDINGS))))
    return out

  @nn.compact
  def __call__(self, x, *, train: bool = False, anneal_t=None):
    c0, *rest = self.channels
    h = Stem(c0, self.T, self.edge_quant, self.neuron, self.stem_strides)(
        x, train=train, anneal_t=anneal_t)
    for c in rest:
      h = layers.ConvNormSpike(c, 1, self.quant, self.neuron)(h, train=train, anneal_t=anneal_t)
      h = layers.AvgPool(2, self.pool_padding)(h)
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


@register_model('resnet19')
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
        h = layers.AvgPool(2)(h)
      else:
        h = layers.ConvNormSpike(int(item), 1, self.quant, self.neuron)(
            h, train=train, anneal_t=anneal_t)
    return Classifier(self.num_classes, self.edge_quant, self.global_pool)(h, anneal_t)


# TET's VGGSNN for CIFAR10-DVS at 48x48: four pools leave 3x3x512 for the linear classifier.
VGGSNN_LAYOUT = (64, 128, 'A', 256, 256, 'A', 512, 512, 'A', 512, 512, 'A')
# VGG16 (13 convs) for 64x64 Tiny-ImageNet: five pools leave 2x2x512, globally averaged.
VGG16_LAYOUT = (64, 64, 'A', 128, 128, 'A', 256, 256, 256, 'A', 512, 512, 512, 'A',
                512, 512, 512, 'A')


@register_model('vggsnn')
class VGGSNN(VGG):
  """TET's VGGSNN (CIFAR10-DVS, 48x48 event frames)."""
  layout: Sequence[Any] = VGGSNN_LAYOUT
  global_pool: bool = False


@register_model('vgg16')
class VGG16(VGG):
  """VGG16 with global average pooling (Tiny-ImageNet, 64x64)."""
  layout: Sequence[Any] = VGG16_LAYOUT
  global_pool: bool = True


@register_model('seq_mlp')
class SeqMLP(_SpikingNet):
  """Dense 1-bit net for sequences ``[B, T, F]`` (e.g. row-sequential images, one row per
  step): a dense stem, 1-bit ``DenseNormSpike`` layers (norm over ``T*B``), a per-step
  readout. Time-major inside like every other model."""
  T: int = 28
  hidden: Sequence[int] = (256, 256)

  @nn.compact
  def __call__(self, x, *, train: bool = False, anneal_t=None):
    first, *rest = self.hidden
    h = DenseStem(first, self.T, self.edge_quant, self.neuron)(x, train=train, anneal_t=anneal_t)
    for w in rest:
      h = layers.DenseNormSpike(w, self.quant, self.neuron)(h, train=train, anneal_t=anneal_t)
    return Classifier(self.num_classes, self.edge_quant, global_pool=False)(h, anneal_t)


def create_model(cfg, *, num_classes: int) -> nn.Module:
  """Builds the registered model ``cfg.name`` from a config's ``model`` section.

  Every other field of the section is a keyword argument of the builder (nested sections
  become the dataclasses the builder expects: ``neuron`` a :class:`NeuronSpec`, ``quant`` and
  ``edge_quant`` :class:`QuantSpec`); ``num_classes`` comes from the data set.

  Raises:
    ValueError: unknown model name (listing the registered ones) or fields the builder does
      not take.
  """
  from mfp_jax import config_lib  # Deferred: config_lib reads this module's registry.
  return config_lib.build(MODELS.get(cfg.name), cfg, num_classes=num_classes, kind='model')


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
