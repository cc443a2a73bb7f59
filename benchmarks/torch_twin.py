"""The PyTorch + SpikingJelly twin of mfp_jax's models, built from an mfp_jax config.

  python -m benchmarks.torch_twin --check      # parameter counts, shapes, neuron equivalence

Used by ``benchmarks.step_peers`` to time one training step of the same network in both
frameworks. Layer for layer as :mod:`mfp_jax.models` (VGGSNN, ResNet19 and the digits net):

* hidden convs: 1-bit, Q-SNN power-of-two binarizer (:func:`binarize_pow2`), clipped STE or
  the annealed tanh estimator, as the config says; first conv and classifier: 8-bit
  max-scaled (:func:`quantize_max_scale`) or full precision; no conv bias;
* ``BatchNorm2d`` over the folded ``[T*B, C, H, W]`` batch (flax momentum 0.9 = torch 0.1);
  a static image is convolved and normalized once, then repeated over ``T``;
* neurons, one per conv: ``mfp`` -> SpikingJelly ``MaskedPSN(k=T, lambda_init=1)`` (its
  masked weight is ``tril(W)``: MFP's ``M``), its threshold frozen at ``-vth`` so it learns
  ``M`` only, as MFP does; ``lif`` -> ``LIFNode(tau=1/(1-decay), decay_input=False,
  v_reset=0)``, i.e. ``H = decay U + X`` with a hard reset; ``relu`` -> ``nn.ReLU`` (the ANN);
* surrogates: ``atan`` -> ``ATan(alpha)``, ``sigmoid`` -> ``Sigmoid(alpha)``, ``triangle``
  (width ``a``) -> ``PiecewiseQuadratic(alpha=1/a)``: the same gradient in each pair;
* loss: per-step cross-entropy averaged over ``T`` plus ``fr_lambda`` times the WS-DR term
  over the hidden spiking layers; SGD (or AdamW) with weight decay on conv/linear weights.

Tensors enter in mfp_jax's data layout (``[B, H, W, C]`` images, ``[B, T, H, W, C]`` frames)
so both frameworks get the same arrays. ``channels_last`` (the default: oneDNN's CPU layout,
and mfp_jax's NHWC): a neuron sees its input as ``[T, B*H*W*C]`` in memory order, no copy.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F
from spikingjelly.activation_based import functional as sj_functional
from spikingjelly.activation_based import neuron as sj_neuron
from spikingjelly.activation_based import surrogate as sj_surrogate

_SURROGATE_DEFAULT_ALPHA = {'atan': 2.0, 'sigmoid': 4.0, 'triangle': 1.0}


class _Sign(torch.autograd.Function):
  """``sign(w)`` in ``{-1, +1}``. Backward for ``t = None``: the clipped STE ``g * (|w| <=
  1)`` (quant.sign_ste); else the annealed ``g * max(1, 1/t) t / cosh(t w)^2``
  (quant.sign_annealed)."""

  @staticmethod
  def forward(ctx, w, t):
    ctx.save_for_backward(w)
    ctx.t = t
    return torch.where(w >= 0, 1.0, -1.0).to(w.dtype)

  @staticmethod
  def backward(ctx, g):
    (w,), t = ctx.saved_tensors, ctx.t
    if t is None:
      return g * (w.abs() <= 1.0).to(g.dtype), None
    return g * (max(1.0, 1.0 / t) * t / torch.cosh(t * w) ** 2), None


def binarize_pow2(w: torch.Tensor, *, estimator: str = 'ste', t: float = 1.0,
                  eps: float = 1e-5) -> torch.Tensor:
  """Q-SNN binarizer on a torch kernel ``[out, ...]``: standardize per output channel, sign,
  scale ``2^round(log2 mean|w_std|)`` (no gradient through the scale). Shape of ``w``."""
  dims = tuple(range(1, w.dim()))
  mu = w.mean(dim=dims, keepdim=True)
  sd = w.std(dim=dims, keepdim=True, correction=0)
  w_std = (w - mu) / (sd + eps)
  scale = (2.0 ** torch.round(torch.log2(w_std.abs().mean(dim=dims, keepdim=True) + eps)))
  if estimator in ('ste', 'annealed'):
    return scale.detach() * _Sign.apply(w_std, float(t) if estimator == 'annealed' else None)
  raise ValueError(f"unknown estimator {estimator!r}; allowed: ['annealed', 'ste']")


def quantize_max_scale(w: torch.Tensor, bits: int = 8) -> torch.Tensor:
  """Eq. 4 with ``alpha = max|w|`` over the tensor, straight-through inside ``[-alpha,
  alpha]`` (quant.quantize_max_scale). Shape of ``w``."""
  alpha = w.detach().abs().max().clamp_min(torch.finfo(w.dtype).tiny)
  n = 2 ** (bits - 1) - 1
  wc = torch.maximum(torch.minimum(w, alpha), -alpha)
  q = alpha * torch.round(wc / alpha * n) / n
  return wc + (q - wc).detach()


@dataclasses.dataclass(frozen=True)
class Quant:
  """Weight quantizer of a layer (layers.QuantSpec): bits 1, 2..16 or 32."""
  bits: int = 1
  scale: str = 'pow2'
  estimator: str = 'ste'

  def __call__(self, w: torch.Tensor, t: float) -> torch.Tensor:
    if self.bits >= 32:
      return w
    if self.bits == 1:
      if self.scale == 'mean':  # XNOR-Net scale, gradient through alpha and the STE
        dims = tuple(range(1, w.dim()))
        return w.abs().mean(dim=dims, keepdim=True) * _Sign.apply(w, None)
      return binarize_pow2(w, estimator=self.estimator, t=t)
    return quantize_max_scale(w, self.bits)


class QConv(nn.Module):
  """Bias-free ``k x k`` conv with quantized weights on ``[N, C, H, W]``."""

  def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, quant: Quant = Quant()):
    super().__init__()
    self.weight = nn.Parameter(torch.empty(cout, cin, k, k))
    nn.init.kaiming_normal_(self.weight)
    self.stride, self.padding, self.quant = stride, k // 2, quant

  def forward(self, x: torch.Tensor, t: float) -> torch.Tensor:
    return F.conv2d(x, self.quant(self.weight, t), stride=self.stride, padding=self.padding)


class QLinear(nn.Module):
  """Dense layer with quantized weights and a full-precision bias: ``[N, F] -> [N, K]``."""

  def __init__(self, fin: int, fout: int, quant: Quant):
    super().__init__()
    self.weight = nn.Parameter(torch.empty(fout, fin))
    nn.init.normal_(self.weight, std=fin ** -0.5)
    self.bias = nn.Parameter(torch.zeros(fout))
    self.quant = quant

  def forward(self, x: torch.Tensor, t: float) -> torch.Tensor:
    return F.linear(x, self.quant(self.weight, t), self.bias)


def batch_norm(c: int) -> nn.BatchNorm2d:
  """BatchNorm over ``T*B`` (flax ``momentum=0.9`` keeps 0.9 of the old statistics)."""
  return nn.BatchNorm2d(c, eps=1e-5, momentum=0.1)


def sj_surrogate_fn(name: str, alpha: float | None):
  """The SpikingJelly surrogate with the gradient of mfp_jax's ``get_surrogate(name, alpha)``."""
  if name not in _SURROGATE_DEFAULT_ALPHA:
    raise ValueError(f'unknown surrogate {name!r}; allowed: {sorted(_SURROGATE_DEFAULT_ALPHA)}')
  a = float(alpha or _SURROGATE_DEFAULT_ALPHA[name])
  if name == 'atan':
    return sj_surrogate.ATan(alpha=a)
  if name == 'sigmoid':
    return sj_surrogate.Sigmoid(alpha=a)
  # mfp_jax's triangle: max(0, a - |x|) / a^2; SJ's: max(0, b - b^2 |x|) with b = 1/a.
  return sj_surrogate.PiecewiseQuadratic(alpha=1.0 / a)


def masked_psn(t: int, vth: float, decay: float, surrogate_fn) -> sj_neuron.MaskedPSN:
  """``MaskedPSN(k=T)`` with ``lambda=1`` (weight ``tril(W)``), ``W[t, i] = decay^(t-i)``
  initially (MFP's ``M`` init) and the threshold a fixed buffer ``-vth``: MFP exactly."""
  psn = sj_neuron.MaskedPSN(k=t, T=t, lambda_init=1.0, surrogate_function=surrogate_fn,
                            step_mode='m')
  lag = torch.arange(t)[:, None] - torch.arange(t)[None, :]
  with torch.no_grad():
    psn.weight.copy_(torch.where(lag >= 0, decay ** lag.clamp_min(0).float(), 0.0))
  del psn.bias  # a learnable [T, 1] threshold in SJ; MFP's vth is a constant
  psn.register_buffer('bias', torch.full((t, 1), -float(vth)))
  return psn


class Spiking(nn.Module):
  """One neuron layer on folded ``[T*B, ...]`` activations; keeps its firing rate.

  The SpikingJelly neuron sees ``[T, N]`` in memory order (a view, channels_last or not);
  ``rate`` (a scalar tensor in the graph) is the mean output, as mfp_jax sows it.
  """

  def __init__(self, kind: str, t: int, neuron: Mapping[str, Any]):
    super().__init__()
    self.kind, self.t = kind, t
    sur = sj_surrogate_fn(neuron['surrogate'], neuron.get('alpha'))
    if kind == 'mfp':
      self.node = masked_psn(t, neuron['vth'], neuron['tau'], sur)
    elif kind == 'lif':
      # SJ (decay_input=False): H = V - V / tau + X, so mfp_jax's decay d is tau = 1 / (1 - d).
      self.node = sj_neuron.LIFNode(tau=1.0 / (1.0 - float(neuron['tau'])), decay_input=False,
                                    v_threshold=float(neuron['vth']), v_reset=0.0,
                                    surrogate_function=sur, detach_reset=False, step_mode='m')
    elif kind == 'relu':
      self.node = nn.ReLU()
    else:
      raise ValueError(f"unknown neuron {kind!r}; allowed: ['lif', 'mfp', 'relu']")
    self.rate = None

  def forward(self, y: torch.Tensor, *, repeat: bool = False) -> torch.Tensor:
    """``y``: ``[T*B, C, H, W]`` (or ``[B, C, H, W]`` with ``repeat``: one copy per step)."""
    nhwc = y.dim() == 4 and not y.is_contiguous() and y.is_contiguous(
        memory_format=torch.channels_last)
    z = y.permute(0, 2, 3, 1) if nhwc else y  # contiguous in both cases
    flat = z.reshape(1, -1).expand(self.t, -1) if repeat else z.reshape(self.t, -1)
    s = self.node(flat)
    self.rate = s.mean()
    out_shape = ((self.t * z.shape[0],) if repeat else (z.shape[0],)) + tuple(z.shape[1:])
    s = s.reshape(out_shape)
    return s.permute(0, 3, 1, 2) if nhwc else s


class ConvNormSpike(nn.Module):
  """``QConv -> BatchNorm -> neuron`` on folded ``[T*B, C, H, W]``."""

  def __init__(self, cin: int, cout: int, stride: int, quant: Quant, make_neuron):
    super().__init__()
    self.conv, self.norm = QConv(cin, cout, 3, stride, quant), batch_norm(cout)
    self.neuron = make_neuron()

  def forward(self, x: torch.Tensor, t: float) -> torch.Tensor:
    return self.neuron(self.norm(self.conv(x, t)))


class BasicBlock(nn.Module):
  """ResNet basic block: conv-norm-spike-conv-norm plus the shortcut (1x1 conv + norm on a
  shape change), then a neuron after the sum."""

  def __init__(self, cin: int, cout: int, stride: int, quant: Quant, make_neuron):
    super().__init__()
    self.inner = ConvNormSpike(cin, cout, stride, quant, make_neuron)
    self.conv2, self.norm2 = QConv(cout, cout, 3, 1, quant), batch_norm(cout)
    self.shortcut = None
    if stride != 1 or cin != cout:
      self.shortcut = nn.ModuleList([QConv(cin, cout, 1, stride, quant), batch_norm(cout)])
    self.neuron = make_neuron()

  def forward(self, x: torch.Tensor, t: float) -> torch.Tensor:
    h = self.norm2(self.conv2(self.inner(x, t), t))
    sc = x if self.shortcut is None else self.shortcut[1](self.shortcut[0](x, t))
    return self.neuron(h + sc)


class TwinNet(nn.Module):
  """Stem, a body of blocks and ``'A'`` pools, and a classifier: per-step logits.

  ``forward(x, anneal_t)``: ``x`` in the data layout, ``[B, H, W, C]`` (static, direct
  encoding) or ``[B, T, H, W, C]`` (event frames); returns ``(logits [T, B, K], rates [L])``.
  """

  def __init__(self, t: int, cin: int, body: list, feat: int, num_classes: int, *,
               global_pool: bool, edge: Quant, make_neuron, stem_width: int,
               stem_stride: int = 1):
    super().__init__()
    self.t, self.global_pool = t, global_pool
    self.stem_conv = QConv(cin, stem_width, 3, stem_stride, edge)
    self.stem_norm = batch_norm(stem_width)
    self.stem_neuron = make_neuron()
    self.body = nn.ModuleList(body)
    self.classifier = QLinear(feat, num_classes, edge)
    self.neurons = [m for m in self.modules() if isinstance(m, Spiking)]  # call order
    self.memory_format = torch.contiguous_format  # build_twin sets channels_last

  def forward(self, x: torch.Tensor, anneal_t: float = 1.0):
    t, fmt = self.t, self.memory_format
    if x.dim() == 4:  # the T copies of a static image are identical: conv and norm once
      xb = x.permute(0, 3, 1, 2).contiguous(memory_format=fmt)  # a view for channels_last
      h = self.stem_neuron(self.stem_norm(self.stem_conv(xb, anneal_t)), repeat=True)
    else:  # [B, T, H, W, C] -> time-major, folded [T*B, C, H, W]
      xt = x.transpose(0, 1).reshape((-1,) + tuple(x.shape[2:])).permute(0, 3, 1, 2)
      h = self.stem_neuron(self.stem_norm(self.stem_conv(xt.contiguous(memory_format=fmt),
                                                         anneal_t)))
    for block in self.body:
      h = block(h) if isinstance(block, nn.AvgPool2d) else block(h, anneal_t)
    h = h.mean(dim=(2, 3)) if self.global_pool else h.flatten(1)
    logits = self.classifier(h, anneal_t)
    return logits.view(t, -1, logits.shape[-1]), torch.stack([m.rate for m in self.neurons])


def _vgg_body(layout, cin: int, size: int, quant: Quant, make_neuron):
  """Blocks of a VGG layout after the stem; returns ``(body, channels, spatial size)``."""
  body, c = [], cin
  for item in layout:
    if item == 'A':
      body.append(nn.AvgPool2d(2))
      size //= 2
    else:
      body.append(ConvNormSpike(c, int(item), 1, quant, make_neuron))
      c = int(item)
  return body, c, size


def _resnet_body(stage_sizes, widths, quant: Quant, make_neuron):
  body, c = [], widths[0]
  for i, (n, w) in enumerate(zip(stage_sizes, widths)):
    for j in range(n):
      body.append(BasicBlock(c, w, 2 if (i > 0 and j == 0) else 1, quant, make_neuron))
      c = w
  return body, c


def build_twin(spec: Mapping[str, Any], input_shape, *, channels_last: bool = True) -> TwinNet:
  """The twin of the flax model that ``spec`` describes, for inputs of ``input_shape``.

  Args:
    spec: plain dict from ``benchmarks.step_peers.twin_spec`` (read off the built flax model,
      so it follows the config exactly): ``family`` (``'vgg'``, ``'resnet'``, ``'digits'``),
      ``T``, ``num_classes``, ``neuron`` (kind, vth, surrogate, alpha, tau), ``quant`` and
      ``edge_quant`` (bits, scale, estimator), and the family's fields (``layout`` and
      ``global_pool``; ``stage_sizes`` and ``widths``; ``channels``).
    input_shape: one example in the data layout, ``[H, W, C]`` or ``[T, H, W, C]``.
    channels_last: keep conv activations NHWC in memory (oneDNN's fast path on CPU).

  Raises:
    ValueError: a family, neuron or surrogate the twin does not have.
  """
  t, k = int(spec['T']), int(spec['num_classes'])
  quant, edge = Quant(**spec['quant']), Quant(**spec['edge_quant'])
  make_neuron = lambda: Spiking(spec['neuron']['kind'], t, spec['neuron'])
  size, cin = input_shape[-3], input_shape[-1]
  family = spec['family']
  if family in ('vgg', 'digits'):
    layout = (spec['layout'] if family == 'vgg'
              else [spec['channels'][0]] + [v for w in spec['channels'][1:] for v in (w, 'A')])
    first, *rest = layout
    stride = int(spec.get('stem_strides', 1))
    body, c, s = _vgg_body(rest, int(first), -(-size // stride), quant, make_neuron)
    pool = bool(spec.get('global_pool', False))
    net = TwinNet(t, cin, body, c if pool else c * s * s, k, global_pool=pool, edge=edge,
                  make_neuron=make_neuron, stem_width=int(first), stem_stride=stride)
  elif family == 'resnet':
    body, c = _resnet_body(spec['stage_sizes'], spec['widths'], quant, make_neuron)
    net = TwinNet(t, cin, body, c, k, global_pool=True, edge=edge, make_neuron=make_neuron,
                  stem_width=int(spec['widths'][0]))
  else:
    raise ValueError(f"no twin for model family {family!r}; allowed: ['digits', 'resnet', 'vgg']")
  if channels_last:
    net.memory_format = torch.channels_last
    net.to(memory_format=torch.channels_last)
  return net


def num_params(net: nn.Module) -> int:
  """Trainable parameters (MaskedPSN's frozen threshold is a buffer, not counted)."""
  return sum(p.numel() for p in net.parameters() if p.requires_grad)


def twin_loss(logits: torch.Tensor, labels: torch.Tensor, rates: torch.Tensor,
              loss_cfg: Mapping[str, Any]) -> torch.Tensor:
  """Per-step CE of ``logits [T, B, K]`` (int ``labels [B]``) averaged over ``T`` plus
  ``fr_lambda`` times the WS-DR term ``mean_l (rates[l] - target)^2`` over ``rates [L]``'s
  hidden layers (all but the first and the last), as losses.firing_rate_penalty."""
  if loss_cfg['name'] != 'per_step_ce':
    raise ValueError(f"the twin has only the per_step_ce loss, got {loss_cfg['name']!r}")
  t, b, k = logits.shape
  loss = F.cross_entropy(logits.reshape(t * b, k), labels.repeat(t))
  if loss_cfg['fr_lambda'] and rates.shape[0] > 2:
    loss = loss + loss_cfg['fr_lambda'] * ((rates[1:-1] - loss_cfg['fr_target']) ** 2).mean()
  return loss


def create_optimizer(net: nn.Module, optim: Mapping[str, Any]) -> torch.optim.Optimizer:
  """SGD with momentum (coupled weight decay, as optax add_decayed_weights + sgd) or AdamW,
  decaying only conv/linear weights (train_lib.weight_decay_mask); constant learning rate."""
  kernels = {id(mod.weight) for mod in net.modules() if isinstance(mod, (QConv, QLinear))}
  decay = [p for p in net.parameters() if id(p) in kernels]
  rest = [p for p in net.parameters() if id(p) not in kernels]
  groups = [{'params': decay, 'weight_decay': optim['weight_decay']},
            {'params': rest, 'weight_decay': 0.0}]
  if optim['name'] == 'sgd':
    return torch.optim.SGD(groups, lr=optim['learning_rate'], momentum=optim['momentum'],
                           foreach=True)
  if optim['name'] == 'adamw':
    return torch.optim.AdamW(groups, lr=optim['learning_rate'], foreach=True,
                             betas=(optim.get('b1', 0.9), optim.get('b2', 0.999)))
  raise ValueError(f"unknown optimizer {optim['name']!r}; allowed: ['adamw', 'sgd']")


def train_step(net: TwinNet, opt: torch.optim.Optimizer, image: torch.Tensor,
               label: torch.Tensor, spec: Mapping[str, Any],
               anneal_t: float = 1.0) -> torch.Tensor:
  """Forward, loss, backward, (clip,) update; returns the loss (detached). ``reset_net``
  first: SJ neurons keep their state (the LIF membrane, with its autograd graph) after a
  forward, and the next step would start from it."""
  sj_functional.reset_net(net)
  opt.zero_grad(set_to_none=True)
  logits, rates = net(image, anneal_t)
  loss = twin_loss(logits, label, rates, spec['loss'])
  loss.backward()
  if spec['optim'].get('grad_clip'):
    torch.nn.utils.clip_grad_norm_(net.parameters(), spec['optim']['grad_clip'])
  opt.step()
  return loss.detach()


def check_neurons(t: int = 6, n: int = 512, seed: int = 0) -> dict:
  """Max |difference| of spikes and gradients: MaskedPSN twin vs ``mfp_parallel``, LIFNode
  twin vs ``lif_serial``, and the twin's binarizers vs ``quant``'s, on random inputs."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from mfp_jax import layers, neurons, quant, surrogate
  rng = np.random.default_rng(seed)
  x = rng.normal(0.6, 1.0, size=(t, n)).astype(np.float32)
  g = rng.normal(size=(t, n)).astype(np.float32)
  spec = {'vth': 1.0, 'surrogate': 'triangle', 'alpha': 1.0, 'tau': 0.5}
  out = {}
  for kind in ('mfp', 'lif'):
    node = Spiking(kind, t, spec)
    xt = torch.tensor(x, requires_grad=True)
    s = node(xt.view(t, n, 1, 1))
    params = list(node.parameters())
    grads = torch.autograd.grad(s, [xt] + params, torch.tensor(g).view(t, n, 1, 1))
    fn = surrogate.get_surrogate('triangle', 1.0)
    if kind == 'mfp':
      m = jnp.asarray(layers.decaying_m_init(0.5)(None, (t, t)))
      sj, vjp = jax.vjp(lambda x, m: neurons.mfp_parallel(x, m, vth=1.0, surrogate=fn), x, m)
    else:
      sj, vjp = jax.vjp(lambda x: neurons.lif_serial(x, tau=0.5, vth=1.0, surrogate=fn), x)
    ref = vjp(jnp.asarray(g))
    out[kind] = {'spikes': float(np.abs(s.detach().numpy().reshape(t, n) - sj).max()),
                 'grads': [float(np.abs(a.numpy().reshape(np.shape(b)) - np.asarray(b)).max())
                           for a, b in zip(grads, ref)]}
  w = rng.normal(size=(8, 4, 3, 3)).astype(np.float32)  # torch [out, in, kh, kw]
  hwio = lambda a: np.transpose(np.asarray(a), (2, 3, 1, 0))
  for name, tf, jf in (
      ('binarize_pow2', lambda v: binarize_pow2(v, estimator='annealed', t=0.7),
       lambda v: quant.binarize_pow2(v, estimator='annealed', t=0.7)),
      ('quantize_max_scale', quantize_max_scale, quant.quantize_max_scale)):
    wt = torch.tensor(w, requires_grad=True)
    y = tf(wt)
    (gw,) = torch.autograd.grad((y * y).sum() + y.sum(), wt)
    wj = jnp.asarray(hwio(w))
    gj = jax.grad(lambda v: (jf(v) ** 2).sum() + jf(v).sum())(wj)
    out[name] = {'values': float(np.abs(hwio(y.detach()) - np.asarray(jf(wj))).max()),
                 'grads': float(np.abs(hwio(gw) - np.asarray(gj)).max())}
  return out


def check_models(names=('digits', 'vggsnn', 'resnet19'), kinds=('mfp', 'lif', 'relu')) -> list:
  """Per model and kind: parameter counts (twin vs ``jax.eval_shape`` of mfp_jax's init),
  per-step logits shapes and the number of spiking layers, from a batch-2 training forward."""
  import jax
  from benchmarks import step_peers, train_step
  from mfp_jax import models
  rows = []
  for name in names:
    for kind in kinds:
      cfg = step_peers.contender_config(name, kind)
      shape = tuple(train_step.input_shape(cfg))
      spec = step_peers.twin_spec(cfg)
      model = models.create_model(cfg.model, num_classes=10)
      x = jax.ShapeDtypeStruct((2,) + shape, 'float32')
      v = jax.eval_shape(lambda: models.init_variables(model, shape, jax.random.key(0)))
      logits = jax.eval_shape(lambda v, x: model.apply(v, x, train=True,
                                                       mutable=['batch_stats'])[0], v, x)
      net = build_twin(spec, shape)
      out, rates = net(torch.randn((2,) + shape))
      rows.append({'model': name, 'kind': kind,  # counted as tests/test_models.py does
                   'params_jax': sum(a.size for a in jax.tree.leaves(v['params'])),
                   'params_torch': num_params(net),
                   'logits_jax': tuple(logits.shape), 'logits_torch': tuple(out.shape),
                   'spiking_layers_jax': len(models.spiking_layer_names(model, shape)),
                   'spiking_layers_torch': int(rates.shape[0])})
  return rows


def check_memory_module(t: int = 4, n: int = 64) -> dict:
  """Does a second call on the same input repeat the first (SJ keeps a LIFNode's membrane
  until ``functional.reset_net``; MaskedPSN in multi-step mode carries nothing)?"""
  x, out = (torch.rand(t, n) * 2).view(t, n, 1, 1), {}
  for kind in ('lif', 'mfp'):
    node = Spiking(kind, t, {'vth': 1.0, 'surrogate': 'atan', 'alpha': None, 'tau': 0.5})
    with torch.no_grad():
      first, again = node(x).clone(), node(x).clone()
      sj_functional.reset_net(node)
      out[kind] = {'repeats': bool(torch.equal(first, again)),
                   'repeats_after_reset_net': bool(torch.equal(first, node(x)))}
  return out


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  p.add_argument('--check', action='store_true', help='compare the twin with mfp_jax')
  p.add_argument('--models', default='digits,vggsnn,resnet19')
  args = p.parse_args(argv)
  if not args.check:
    p.print_help()
    return 0
  ok = True
  for r in check_models([m for m in args.models.split(',') if m]):
    same = (r['params_jax'] == r['params_torch'] and r['logits_jax'] == r['logits_torch']
            and r['spiking_layers_jax'] == r['spiking_layers_torch'])
    ok &= same
    print(('ok  ' if same else 'DIFF') + f' {r}')
  print('neurons and quantizers, max |twin - mfp_jax|:', check_neurons())
  print('memory modules:', check_memory_module())
  return 0 if ok else 1


if __name__ == '__main__':
  raise SystemExit(main())
