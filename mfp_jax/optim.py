"""Optimizers and learning-rate schedules, registered by name.

An optimizer builder is ``fn(learning_rate, **kwargs) -> optax.GradientTransformation`` with
``learning_rate`` an Optax schedule; register one with :func:`register_optimizer`. A config's
``optim`` section holds ``name``, the fields every optimizer shares (:data:`SHARED_FIELDS`:
``learning_rate``, ``schedule``, ``warmup_epochs``, ``grad_clip``, ``ema_decay``,
``lr_mults``) and the builder's own keyword arguments (``momentum`` and ``weight_decay`` for
``sgd``, ...).

Weight decay applies to conv/dense kernels only (:func:`weight_decay_mask`): never to ``M``,
``tau``, norm scales or biases, as in the Q-SNN recipe.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Sequence

import jax
import optax

from mfp_jax import registry

OPTIMIZERS: registry.Registry[Callable[..., optax.GradientTransformation]] = registry.Registry(
    'optimizer')
register_optimizer = registry.registrar(OPTIMIZERS)

# Fields of config.optim that are not the builder's: the schedule, clipping and per-parameter
# multipliers around it, and the moving average of the weights (kept in the training state:
# train_lib.update_ema).
SHARED_FIELDS = ('name', 'learning_rate', 'schedule', 'warmup_epochs', 'grad_clip',
                 'ema_decay', 'lr_mults')


def weight_decay_mask(params: Any) -> Any:
  """True for conv/dense kernels only: no decay on ``M``, ``tau``, norm scales or biases."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], 'key', None) == 'kernel', params)


@register_optimizer('sgd')
def sgd(learning_rate: optax.Schedule, *, momentum: float = 0.9,
        weight_decay: float = 1e-4) -> optax.GradientTransformation:
  """SGD with momentum and PyTorch-style (coupled) weight decay on kernels."""
  return optax.chain(optax.add_decayed_weights(weight_decay, weight_decay_mask),
                     optax.sgd(learning_rate, momentum=momentum or None))


@register_optimizer('adamw')
def adamw(learning_rate: optax.Schedule, *, weight_decay: float = 1e-4, b1: float = 0.9,
          b2: float = 0.999) -> optax.GradientTransformation:
  """AdamW (decoupled weight decay on kernels)."""
  return optax.adamw(learning_rate, b1=b1, b2=b2, weight_decay=weight_decay,
                     mask=weight_decay_mask)


SCHEDULES: dict[str, Callable[[float, int], optax.Schedule]] = {
    'cosine': lambda lr, steps: optax.cosine_decay_schedule(lr, max(steps, 1)),
    'constant': lambda lr, steps: optax.constant_schedule(lr),
}


def create_learning_rate_fn(optim, steps_per_epoch: int, total_steps: int) -> optax.Schedule:
  """Linear warmup over ``optim.warmup_epochs``, then ``optim.schedule`` (:data:`SCHEDULES`)."""
  warmup = int(round(optim.warmup_epochs * steps_per_epoch))
  lr = optim.learning_rate
  if optim.schedule not in SCHEDULES:
    raise ValueError(f'unknown schedule {optim.schedule!r}; allowed: {list(SCHEDULES)}')
  main = SCHEDULES[optim.schedule](lr, total_steps - warmup)
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


LrMults = Sequence[tuple[str, float]]


def _path_name(path) -> str:
  return jax.tree_util.keystr(path, simple=True, separator='/')


def param_names(params: Any) -> list[str]:
  """Every parameter's path, ``'Stem_0/QConv_0/kernel'``: what ``lr_mults`` patterns see."""
  return [_path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def lr_mult_labels(params: Any, rules: LrMults) -> Any:
  """Each leaf's multiplier as a string label: the first ``(pattern, mult)`` of ``rules``
  whose regex ``re.search``-es the leaf's path (as in :func:`param_names`), else ``'1.0'``."""
  def label(path, _):
    name = _path_name(path)
    return next((repr(float(m)) for p, m in rules if re.search(p, name)), '1.0')
  return jax.tree_util.tree_map_with_path(label, params)


def unmatched_lr_mults(params: Any, rules: LrMults) -> list[str]:
  """The patterns of ``rules`` that match no parameter of ``params`` (typos)."""
  names = param_names(params)
  return [p for p, _ in rules if not any(re.search(p, n) for n in names)]


def scale_by_lr_mults(rules: LrMults) -> optax.GradientTransformation:
  """Scales each leaf's update by its ``lr_mults`` multiplier (big_vision's ``lr_mults``):
  after the optimizer, so the step and any decoupled weight decay scale together."""
  mults = sorted({repr(float(m)) for _, m in rules} | {'1.0'})
  return optax.multi_transform({m: optax.scale(float(m)) for m in mults},
                               lambda params: lr_mult_labels(params, rules))


def create_optimizer(optim, learning_rate_fn: optax.Schedule) -> optax.GradientTransformation:
  """The registered optimizer ``optim.name`` with its keyword arguments from ``optim``,
  behind a global-norm clip when ``optim.grad_clip`` is set, and followed by the per-parameter
  multipliers of ``optim.lr_mults`` when it has rules."""
  from mfp_jax import config_lib  # Deferred: config_lib reads this module's registry.
  tx = config_lib.build(OPTIMIZERS.get(optim.name), optim, learning_rate_fn,
                        skip=SHARED_FIELDS, kind='optim')
  if optim.grad_clip is not None:
    tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip), tx)
  if optim.lr_mults:
    tx = optax.chain(tx, scale_by_lr_mults(optim.lr_mults))
  return tx
