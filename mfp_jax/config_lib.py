"""The one config schema every experiment starts from, and its validation.

``configs/<exp>.py`` calls :func:`base_config` and overrides fields; because the returned
``ConfigDict`` is locked, a misspelt field is an error, not a silently ignored value.
:func:`validate` checks every field at start-up (types, ranges, allowed names) and lists all
problems in one message, before anything is compiled.
"""

from __future__ import annotations

import ml_collections

from mfp_jax import data as data_lib
from mfp_jax import layers
from mfp_jax import losses
from mfp_jax import models
from mfp_jax import surrogate


class ConfigError(ValueError):
  """A config field is wrong; the message names the field and what is allowed."""


def base_config() -> ml_collections.ConfigDict:
  """Every field with its default. Experiments override; nothing else may be added."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_epochs = 10
  c.stop_at_step = -1           # > 0: checkpoint and stop at this global step (time-boxed jobs)
  c.log_every_steps = 20
  c.eval_every_epochs = 1
  c.checkpoint_every_steps = 0  # 0: checkpoint at the end of every epoch only
  c.keep_checkpoints = 2
  c.nan_policy = 'stop'         # 'stop': raise naming the step; 'skip': drop the update
  c.progress = True

  c.model = ml_collections.ConfigDict()
  c.model.name = 'digits_cnn'
  c.model.T = 4
  c.model.weight_bits = 1       # hidden layers: 1, 2..16 (Eq. 4) or 32
  c.model.first_last_bits = 32  # first conv and classifier: 32 or 8
  c.model.binary_scale = 'pow2'
  c.model.estimator = 'ste'
  c.model.anneal_t_min = 0.1    # annealed estimator: log-uniform sharpness schedule
  c.model.anneal_t_max = 10.0
  c.model.channels = (32, 64, 128)  # digits_cnn only
  c.model.neuron = ml_collections.ConfigDict()
  c.model.neuron.kind = 'mfp'
  c.model.neuron.vth = 1.0
  c.model.neuron.surrogate = 'atan'
  c.model.neuron.surrogate_alpha = 0.0  # 0: the surrogate's default
  c.model.neuron.tau = 0.5
  c.model.neuron.membrane_bits = 0      # LIF only; 0: float membrane

  c.data = ml_collections.ConfigDict()
  c.data.name = 'digits'
  c.data.data_dir = ''
  c.data.batch_size = 64        # global, over all devices and processes
  c.data.eval_batch_size = 256
  c.data.test_fraction = 0.25   # digits only
  c.data.split_seed = 0         # digits and cifar10dvs: the fixed train/test split
  c.data.cutout = 0             # cifar: Cutout hole side in pixels, 0 = off
  c.data.size = 48              # cifar10dvs: frame side after resizing

  c.optim = ml_collections.ConfigDict()
  c.optim.name = 'sgd'
  c.optim.learning_rate = 0.1
  c.optim.momentum = 0.9
  c.optim.weight_decay = 1e-4
  c.optim.warmup_epochs = 0.0
  c.optim.schedule = 'cosine'
  c.optim.grad_clip = 0.0       # global-norm clip, 0 = off

  c.loss = ml_collections.ConfigDict()
  c.loss.name = 'per_step_ce'
  c.loss.tet_lambda = 1e-3
  c.loss.fr_lambda = 0.0
  c.loss.fr_target = 0.5
  return c


OPTIMIZERS = ('sgd', 'adamw')
SCHEDULES = ('cosine', 'constant')
NAN_POLICIES = ('stop', 'skip')

# field -> (type, check, what is allowed); check() True means fine.
_INT, _FLOAT, _STR = int, (int, float), str


def _rule(typ, check, allowed):
  return typ, check, allowed


_RULES = {
    'seed': _rule(_INT, lambda v: v >= 0, 'an integer >= 0'),
    'num_epochs': _rule(_INT, lambda v: v >= 1, 'an integer >= 1'),
    'stop_at_step': _rule(_INT, lambda v: v == -1 or v >= 1, '-1 or an integer >= 1'),
    'log_every_steps': _rule(_INT, lambda v: v >= 1, 'an integer >= 1'),
    'eval_every_epochs': _rule(_INT, lambda v: v >= 1, 'an integer >= 1'),
    'checkpoint_every_steps': _rule(_INT, lambda v: v >= 0, 'an integer >= 0'),
    'keep_checkpoints': _rule(_INT, lambda v: v >= 1, 'an integer >= 1'),
    'nan_policy': _rule(_STR, lambda v: v in NAN_POLICIES, f'one of {list(NAN_POLICIES)}'),
    'progress': _rule(bool, lambda v: True, 'True or False'),
    'model.name': _rule(_STR, lambda v: v in models.MODELS, f'one of {list(models.MODELS)}'),
    'model.T': _rule(_INT, lambda v: 1 <= v <= 1024, 'an integer in [1, 1024]'),
    'model.weight_bits': _rule(_INT, lambda v: v == 1 or 2 <= v <= 16 or v == 32,
                               '1, 2..16 or 32'),
    'model.first_last_bits': _rule(_INT, lambda v: v in (8, 32), '8 or 32'),
    'model.binary_scale': _rule(_STR, lambda v: v in layers.BINARY_SCALES,
                                f'one of {list(layers.BINARY_SCALES)}'),
    'model.estimator': _rule(_STR, lambda v: v in layers.ESTIMATORS,
                             f'one of {list(layers.ESTIMATORS)}'),
    'model.anneal_t_min': _rule(_FLOAT, lambda v: v > 0, 'a number > 0'),
    'model.anneal_t_max': _rule(_FLOAT, lambda v: v > 0, 'a number > 0'),
    'model.channels': _rule((tuple, list), lambda v: len(v) >= 1 and all(
        isinstance(c, int) and c >= 1 for c in v), 'a non-empty tuple of positive ints'),
    'model.neuron.kind': _rule(_STR, lambda v: v in layers.NEURONS,
                               f'one of {list(layers.NEURONS)}'),
    'model.neuron.vth': _rule(_FLOAT, lambda v: v > 0, 'a number > 0'),
    'model.neuron.surrogate': _rule(_STR, lambda v: v in surrogate.SURROGATES,
                                    f'one of {sorted(surrogate.SURROGATES)}'),
    'model.neuron.surrogate_alpha': _rule(_FLOAT, lambda v: v >= 0,
                                          'a number >= 0 (0: the default)'),
    'model.neuron.tau': _rule(_FLOAT, lambda v: 0 < v <= 1, 'a number in (0, 1]'),
    'model.neuron.membrane_bits': _rule(_INT, lambda v: 0 <= v <= 16,
                                        'an integer in [0, 16] (0: float)'),
    'data.name': _rule(_STR, lambda v: v in data_lib.DATASETS,
                       f'one of {list(data_lib.DATASETS)}'),
    'data.data_dir': _rule(_STR, lambda v: True, 'a path'),
    'data.batch_size': _rule(_INT, lambda v: v >= 1, 'an integer >= 1'),
    'data.eval_batch_size': _rule(_INT, lambda v: v >= 1, 'an integer >= 1'),
    'data.test_fraction': _rule(_FLOAT, lambda v: 0 < v < 1, 'a number in (0, 1)'),
    'data.split_seed': _rule(_INT, lambda v: v >= 0, 'an integer >= 0'),
    'data.cutout': _rule(_INT, lambda v: v >= 0, 'an integer >= 0'),
    'data.size': _rule(_INT, lambda v: 8 <= v <= 128, 'an integer in [8, 128]'),
    'optim.name': _rule(_STR, lambda v: v in OPTIMIZERS, f'one of {list(OPTIMIZERS)}'),
    'optim.learning_rate': _rule(_FLOAT, lambda v: v > 0, 'a number > 0'),
    'optim.momentum': _rule(_FLOAT, lambda v: 0 <= v < 1, 'a number in [0, 1)'),
    'optim.weight_decay': _rule(_FLOAT, lambda v: v >= 0, 'a number >= 0'),
    'optim.warmup_epochs': _rule(_FLOAT, lambda v: v >= 0, 'a number >= 0'),
    'optim.schedule': _rule(_STR, lambda v: v in SCHEDULES, f'one of {list(SCHEDULES)}'),
    'optim.grad_clip': _rule(_FLOAT, lambda v: v >= 0, 'a number >= 0 (0: off)'),
    'loss.name': _rule(_STR, lambda v: v in losses.LOSSES, f'one of {list(losses.LOSSES)}'),
    'loss.tet_lambda': _rule(_FLOAT, lambda v: 0 <= v <= 1, 'a number in [0, 1]'),
    'loss.fr_lambda': _rule(_FLOAT, lambda v: v >= 0, 'a number >= 0'),
    'loss.fr_target': _rule(_FLOAT, lambda v: 0 <= v <= 1, 'a number in [0, 1]'),
}


def _flatten(cfg, prefix=''):
  for k, v in cfg.items():
    name = f'{prefix}{k}'
    if isinstance(v, ml_collections.ConfigDict):
      yield from _flatten(v, name + '.')
    else:
      yield name, v


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Checks every field; raises :class:`ConfigError` listing every problem at once.

  Also rejects fields that :func:`base_config` does not define (a config file that built its
  own ``ConfigDict`` cannot smuggle in a typo).
  """
  errors = []
  seen = set()
  for name, value in _flatten(cfg):
    seen.add(name)
    if name not in _RULES:
      errors.append(f'unknown field config.{name}')
      continue
    typ, check, allowed = _RULES[name]
    ok_type = isinstance(value, typ) and not (isinstance(value, bool) and typ is not bool)
    if not ok_type or not check(value):
      errors.append(f'config.{name} = {value!r}: must be {allowed}')
  errors += [f'missing field config.{n}' for n in sorted(set(_RULES) - seen)]
  if not errors and cfg.model.anneal_t_min > cfg.model.anneal_t_max:
    errors.append('config.model.anneal_t_min must be <= config.model.anneal_t_max')
  if not errors and cfg.model.neuron.membrane_bits and cfg.model.neuron.kind != 'lif':
    errors.append('config.model.neuron.membrane_bits is for kind = lif (MFP keeps no membrane)')
  if not errors and cfg.data.name == 'digits' and cfg.model.name != 'digits_cnn':
    errors.append(f'data digits (8x8) needs model digits_cnn, got {cfg.model.name!r}')
  if errors:
    raise ConfigError('invalid config:\n  ' + '\n  '.join(errors))


def check_devices(cfg: ml_collections.ConfigDict, num_devices: int, num_processes: int) -> None:
  """The global batches must split evenly over devices (and hence processes)."""
  for field in ('batch_size', 'eval_batch_size'):
    b = cfg.data[field]
    if b % num_devices:
      raise ConfigError(f'config.data.{field} = {b} must be divisible by the {num_devices} '
                        f'devices ({num_processes} processes); e.g. {max(1, b // num_devices) * num_devices}')
