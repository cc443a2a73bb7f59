"""Experiment configs built from the registries, and their validation.

A config is an ``ml_collections.ConfigDict`` with run fields (``seed``, ``num_epochs``, ...),
``anneal`` and four sections. Each section names a registered builder and holds its keyword
arguments, so a user's model, data set, loss or optimizer gets config fields without any edit
here (big_vision's ``Model(**config.model)``):

* ``model``: ``name`` + the model's constructor arguments (:func:`model_config`);
* ``data``: ``name``, ``batch_size``, ``eval_batch_size`` + the loader's arguments;
* ``optim``: ``name``, ``learning_rate``, ``schedule``, ``warmup_epochs``, ``grad_clip``,
  ``ema_decay``, ``lr_mults`` + the optimizer builder's arguments;
* ``loss``: ``name``, ``fr_lambda``, ``fr_target`` + the loss function's arguments.

Every default is written once: builder arguments in the builder's signature, the shared
fields in the tables below. :func:`validate` checks every field before anything is written
or compiled and lists every problem in one message. ``None`` means "not set" (never ``0``);
such fields are typed placeholders, so ``--config.x=3`` still works on the command line.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import typing
from typing import Any, Callable, NamedTuple

import ml_collections
from ml_collections import config_dict

from mfp_jax import data as data_lib
from mfp_jax import losses
from mfp_jax import models
from mfp_jax import optim as optim_lib


class ConfigError(ValueError):
  """A config field is wrong; the message names the field and what is allowed."""


class Field(NamedTuple):
  """A shared field: its default, type and value rule."""
  default: Any
  type: type
  check: Callable[[Any], bool] = lambda v: True
  allowed: str = ''


def _lr_mult_ok(rule) -> bool:
  if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)
          and isinstance(rule[1], (int, float)) and not isinstance(rule[1], bool)
          and _finite(rule[1]) and rule[1] >= 0):
    return False
  try:
    re.compile(rule[0])
  except re.error:
    return False
  return True


def _finite(v) -> bool:
  return math.isfinite(v)


NAN_POLICIES = ('stop', 'skip')
RESUME_POLICIES = ('refuse', 'allow_changes')

RUN_FIELDS = {
    'seed': Field(0, int, lambda v: v >= 0, 'an integer >= 0'),
    'num_epochs': Field(10, int, lambda v: v >= 1, 'an integer >= 1'),
    'stop_at_step': Field(None, int, lambda v: v >= 1, 'None or an integer >= 1 (checkpoint '
                          'and stop there: time-boxed jobs)'),
    'log_every_steps': Field(20, int, lambda v: v >= 1, 'an integer >= 1'),
    'eval_every_epochs': Field(1, int, lambda v: v >= 1, 'an integer >= 1'),
    'checkpoint_every_steps': Field(None, int, lambda v: v >= 1, 'None (at the end of every '
                                    'epoch only) or an integer >= 1'),
    'keep_checkpoints': Field(2, int, lambda v: v >= 1, 'an integer >= 1'),
    'nan_policy': Field('stop', str, lambda v: v in NAN_POLICIES, f'one of {list(NAN_POLICIES)}'),
    'resume_policy': Field('refuse', str, lambda v: v in RESUME_POLICIES,
                           f'one of {list(RESUME_POLICIES)}'),
    'progress': Field(True, bool),
}
# The annealed 1-bit estimator's sharpness t grows log-uniformly over the run (Q-SNN Log_UP).
ANNEAL_FIELDS = {
    't_min': Field(0.1, float, lambda v: _finite(v) and v > 0, 'a finite number > 0'),
    't_max': Field(10.0, float, lambda v: _finite(v) and v > 0, 'a finite number > 0'),
}
DATA_FIELDS = {  # besides name; the rest of config.data goes to the loader
    'batch_size': Field(64, int, lambda v: v >= 1, 'an integer >= 1 (global, over all devices)'),
    'eval_batch_size': Field(256, int, lambda v: v >= 1, 'an integer >= 1'),
    # How train batches are built (mfp_jax.pipeline); never what they hold or their order.
    'num_workers': Field(0, int, lambda v: v >= 0, 'an integer >= 0: worker processes '
                         'building train batches (0: threads of the training process build '
                         'them)'),
    'num_threads': Field(1, int, lambda v: v >= 0, 'an integer >= 0: threads building batches '
                         'in each process (0: each batch is built when the step asks for it; '
                         'above 1: the source is read from several threads at once)'),
    'prefetch': Field(2, int, lambda v: v >= 0, 'an integer >= 0: batches each process builds '
                      'ahead of the step (0: none, each batch is built when the step asks '
                      'for it)'),
}
OPTIM_FIELDS = {  # besides name; the rest of config.optim goes to the builder
    'learning_rate': Field(0.1, float, lambda v: _finite(v) and v > 0, 'a finite number > 0'),
    'schedule': Field('cosine', str, lambda v: v in optim_lib.SCHEDULES,
                      f'one of {list(optim_lib.SCHEDULES)}'),
    'warmup_epochs': Field(0.0, float, lambda v: _finite(v) and v >= 0, 'a finite number >= 0'),
    'grad_clip': Field(None, float, lambda v: _finite(v) and v > 0,
                       'None (off) or a finite number > 0 (global-norm clip)'),
    'ema_decay': Field(0.0, float, lambda v: 0 <= v < 1,
                       'a number in [0, 1): 0 is off, else the decay of the moving average '
                       'of the weights that evaluation uses'),
    'lr_mults': Field((), tuple, lambda v: all(_lr_mult_ok(r) for r in v),
                      "a tuple of (regex, multiplier >= 0) pairs, e.g. (('Stem|Classifier', "
                      "0.1),): each parameter's update is scaled by the multiplier of the "
                      "first regex that re.search-es its path ('Stem_0/QConv_0/kernel')"),
}
LOSS_FIELDS = {  # besides name; the rest of config.loss goes to the loss function
    'fr_lambda': Field(0.0, float, lambda v: _finite(v) and v >= 0, 'a finite number >= 0'),
    'fr_target': Field(0.5, float, lambda v: 0 <= v <= 1, 'a number in [0, 1]'),
}
LOSS_ARGS = ('logits', 'labels', 'mask')  # a loss function's positional inputs, not fields

# section -> (registry, shared fields, builder arguments that are not config fields)
SECTIONS = {
    'model': (models.MODELS, {}, ('num_classes', 'parent', 'name')),
    'data': (data_lib.DATASETS, DATA_FIELDS, ('T',)),
    'optim': (optim_lib.OPTIMIZERS, OPTIM_FIELDS, ('learning_rate',)),
    'loss': (losses.LOSSES, LOSS_FIELDS, LOSS_ARGS),
}


# --- Fields from a builder's signature ---------------------------------------------------------


def _target(builder: Any) -> Callable:
  """The callable whose signature gives a section's fields (a data set's loader)."""
  return builder.load if isinstance(builder, data_lib.DatasetEntry) else builder


def _hints(fn: Any) -> dict[str, Any]:
  try:
    return typing.get_type_hints(fn)
  except Exception:  # a user's annotation that does not resolve: fall back to the defaults
    return {}


def _value_type(hint: Any, default: Any) -> Any:
  """The type a field's values must have (None allowed when the default is None)."""
  args = [a for a in typing.get_args(hint) if a is not type(None)]
  if default is None and len(args) == 1:
    hint = args[0]
  origin = typing.get_origin(hint) or hint
  if origin in (int, float, str, bool):
    return origin
  if isinstance(origin, type) and dataclasses.is_dataclass(origin):
    return origin
  if default is not None:
    return type(default)
  return object


def signature_fields(builder: Any, skip: tuple[str, ...] = ()) -> dict[str, tuple[Any, Any]]:
  """``name -> (default or inspect.Parameter.empty, value type)`` of a builder's keyword
  arguments (a Flax module's dataclass fields, a function's parameters)."""
  fn = _target(builder)
  hints = _hints(fn.__init__ if isinstance(fn, type) and not dataclasses.is_dataclass(fn)
                 else fn)
  out = {}
  for p in inspect.signature(fn).parameters.values():
    if p.name in skip or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
      continue
    default = p.default
    out[p.name] = (default, _value_type(hints.get(p.name), None if default is p.empty
                                        else default))
  return out


def _as_config_value(default: Any, typ: Any) -> Any:
  """A builder default as a ConfigDict value: dataclasses become sections, ``None`` a typed
  placeholder (overridable from the command line)."""
  if dataclasses.is_dataclass(default) and not isinstance(default, type):
    return section_from_dataclass(default)
  if default is None:
    return config_dict.placeholder(typ) if typ in (int, float, str, bool) else None
  if isinstance(default, list):
    return tuple(default)
  return default


def section_from_dataclass(obj: Any) -> ml_collections.ConfigDict:
  """The fields of a dataclass instance (e.g. a ``NeuronSpec``) as a ConfigDict."""
  hints = _hints(type(obj))
  return ml_collections.ConfigDict({
      f.name: _as_config_value(getattr(obj, f.name),
                               _value_type(hints.get(f.name), getattr(obj, f.name)))
      for f in dataclasses.fields(obj)})


def _section(kind: str, name: str, overrides: dict[str, Any]) -> ml_collections.ConfigDict:
  registry, shared, skip = SECTIONS[kind]
  fields = signature_fields(registry.get(name), skip)
  c = ml_collections.ConfigDict({'name': name})
  for k, f in shared.items():
    c[k] = _as_config_value(f.default, f.type)
  for k, (default, typ) in fields.items():
    if default is not inspect.Parameter.empty:
      c[k] = _as_config_value(default, typ)
  unknown = sorted(set(overrides) - set(fields) - set(shared))
  if unknown:
    raise ConfigError(f'{kind} {name!r} has no field(s) {unknown}; its fields are: '
                      f'{", ".join(sorted(set(fields) | set(shared)))}')
  for k, v in overrides.items():
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
      v = section_from_dataclass(v)
    if isinstance(v, dict) and isinstance(c.get(k), ml_collections.ConfigDict):
      c[k].update(v)
    else:
      c[k] = tuple(v) if isinstance(v, list) else v
  return c


def model_config(name: str, **overrides) -> ml_collections.ConfigDict:
  """``config.model`` for the registered model ``name``: every constructor argument with its
  default, then ``overrides`` (a dict updates a nested section such as ``neuron``)."""
  return _section('model', name, overrides)


def data_config(name: str, **overrides) -> ml_collections.ConfigDict:
  """``config.data`` for the registered data set ``name`` (loader arguments + batch sizes)."""
  return _section('data', name, overrides)


def optim_config(name: str, **overrides) -> ml_collections.ConfigDict:
  """``config.optim`` for the registered optimizer ``name`` (schedule + builder arguments)."""
  return _section('optim', name, overrides)


def loss_config(name: str, **overrides) -> ml_collections.ConfigDict:
  """``config.loss`` for the registered loss ``name`` (firing-rate term + its arguments)."""
  return _section('loss', name, overrides)


def base_config() -> ml_collections.ConfigDict:
  """The defaults every experiment starts from: the digits net on the embedded digits."""
  c = ml_collections.ConfigDict({k: _as_config_value(f.default, f.type)
                                 for k, f in RUN_FIELDS.items()})
  c.anneal = ml_collections.ConfigDict({k: f.default for k, f in ANNEAL_FIELDS.items()})
  c.model = model_config('digits_cnn')
  c.data = data_config('digits')
  c.optim = optim_config('sgd')
  c.loss = loss_config('per_step_ce')
  return c


def _plain(v: Any) -> Any:
  return v.to_dict() if isinstance(v, ml_collections.ConfigDict) else v


def _other_builders_default(kind: str, name: str, field: str, value: Any) -> bool:
  """Whether ``field`` is a keyword argument of another registered builder of ``kind`` and
  ``value`` is its default there: a section switched to ``name`` from the command line
  (``--config.optim.name=sgd`` on an AdamW config) still holds it, and it means nothing."""
  registry, _, skip = SECTIONS[kind]
  for other in registry:
    if other == name:
      continue
    default = signature_fields(registry.get(other), skip).get(field, (inspect.Parameter.empty,))[0]
    if default is not inspect.Parameter.empty and _plain(_as_config_value(default, object)) \
        == _plain(value):
      return True
  return False


def builder_kwargs(builder: Any, section: Any, *, skip: tuple[str, ...] = (),
                   kind: str | None = None) -> dict[str, Any]:
  """A builder's keyword arguments from a config section: nested sections become the
  dataclasses the builder's defaults are (``neuron`` -> ``NeuronSpec``), lists tuples.

  ``name`` and ``skip`` are left out; with ``kind`` (a section of :data:`SECTIONS`), so are
  fields the builder does not take that another builder of that section takes, at its
  default (see :func:`validate`)."""
  fields = signature_fields(builder)
  kwargs = {}
  for k, v in section.items():
    if k in skip or k == 'name':
      continue
    if k not in fields and kind and _other_builders_default(kind, section.name, k, v):
      continue
    default = fields[k][0] if k in fields else None
    if isinstance(v, ml_collections.ConfigDict) and dataclasses.is_dataclass(default):
      v = type(default)(**v.to_dict())
    elif isinstance(v, list):
      v = tuple(v)
    kwargs[k] = v
  return kwargs


def build(builder: Any, section: Any, *args, skip: tuple[str, ...] = (),
          kind: str | None = None, **extra):
  """``builder(*args, **builder_kwargs(builder, section, ...), **extra)``."""
  return _target(builder)(*args, **builder_kwargs(builder, section, skip=skip, kind=kind),
                          **extra)


# --- Validation --------------------------------------------------------------------------------

_TYPE_TEXT = {int: 'an integer', float: 'a number', str: 'a string', bool: 'True or False',
              tuple: 'a tuple'}


def _type_ok(value: Any, typ: Any) -> bool:
  if typ is object:
    return True
  if isinstance(value, bool) and typ is not bool:
    return False
  if typ is float:
    return isinstance(value, (int, float))
  if typ in (tuple, list):
    return isinstance(value, (tuple, list))
  return isinstance(value, typ)


def _check(path: str, value: Any, typ: Any, default: Any, check=None, allowed: str = ''):
  """Problems of one field (a list of messages)."""
  if value is None and default is None:
    return []
  if dataclasses.is_dataclass(typ):
    return _check_dataclass(path, value, typ)
  what = allowed or _TYPE_TEXT.get(typ, f'a {getattr(typ, "__name__", typ)}')
  if default is None and not allowed:
    what = f'None or {what}'
  if not _type_ok(value, typ) or (check is not None and not check(value)):
    return [f'config.{path} = {value!r}: must be {what}']
  return []


def _check_dataclass(path: str, value: Any, typ: Any) -> list[str]:
  if not isinstance(value, (ml_collections.ConfigDict, dict)):
    return [f'config.{path} = {value!r}: must be a section with the fields of {typ.__name__}']
  hints = _hints(typ)
  fields = {f.name: f for f in dataclasses.fields(typ)}
  errors = [f'unknown field config.{path}.{k} ({typ.__name__} has: {", ".join(fields)})'
            for k in value if k not in fields]
  for k, v in value.items():
    if k in fields:
      d = fields[k].default
      errors += _check(f'{path}.{k}', v, _value_type(hints.get(k), d), d)
  if errors:
    return errors
  obj = typ(**dict(value))
  return [f'config.{path}.{k} = {getattr(obj, k.split(".")[0])!r}: must be {allowed}'
          for k, allowed in (obj.problems() if hasattr(obj, 'problems') else [])]


def _check_shared(prefix: str, section: Any, fields: dict[str, Field]) -> list[str]:
  errors = []
  for k, f in fields.items():
    if k not in section:
      errors.append(f'missing field config.{prefix}{k}')
    else:
      errors += _check(prefix + k, section[k], f.type, f.default, f.check, f.allowed)
  return errors


def _check_section(kind: str, section: Any) -> list[str]:
  registry, shared, skip = SECTIONS[kind]
  if not isinstance(section, ml_collections.ConfigDict):
    return [f'config.{kind} must be a section (e.g. config_lib.{kind}_config(name))']
  name = section.get('name')
  if name not in registry:
    return [f'config.{kind}.name = {name!r}: must be one of {registry.names()}']
  errors = _check_shared(f'{kind}.', section, shared)
  fields = signature_fields(registry.get(name), skip)
  for k, v in section.items():
    if k == 'name' or k in shared:
      continue
    if k not in fields and _other_builders_default(kind, name, k, v):
      continue  # another builder's field at its default: a section switched by name
    if k not in fields:
      errors.append(f'unknown field config.{kind}.{k} ({registry.kind} {name!r} takes: '
                    f'{", ".join(sorted(set(fields) | set(shared))) or "nothing"})')
      continue
    default, typ = fields[k]
    errors += _check(f'{kind}.{k}', v, typ, None if default is inspect.Parameter.empty
                     else default)
  errors += [f'missing field config.{kind}.{k} (required by {registry.kind} {name!r})'
             for k, (d, _) in fields.items() if d is inspect.Parameter.empty and k not in section]
  hook = getattr(_target(registry.get(name)), 'config_problems', None)
  if hook is not None:
    try:
      kwargs = {k: (typ(**section[k].to_dict()) if dataclasses.is_dataclass(typ)
                    else section[k]) for k, (_, typ) in fields.items() if k in section}
    except TypeError:  # a nested section with unknown fields: reported above
      return errors
    errors += [f'config.{kind}.{k} = {_get(section, k)!r}: must be {allowed}'
               for k, allowed in hook(kwargs)]
  return errors


def _get(section: Any, dotted: str) -> Any:
  for part in dotted.split('.'):
    section = section[part]
  return section


def validate(cfg: ml_collections.ConfigDict) -> None:
  """Checks every field; raises :class:`ConfigError` listing every problem at once.

  Types come from the builders' signatures and the shared tables, values from the rules
  there and from each object's ``problems()`` / ``config_problems()``. Fields that neither
  defines are refused (a config file cannot smuggle in a typo).
  """
  known = set(RUN_FIELDS) | set(SECTIONS) | {'anneal'}
  errors = [f'unknown field config.{k}' for k in cfg if k not in known]
  errors += _check_shared('', cfg, RUN_FIELDS)
  anneal = cfg.get('anneal')
  if isinstance(anneal, ml_collections.ConfigDict):
    errors += [f'unknown field config.anneal.{k}' for k in anneal if k not in ANNEAL_FIELDS]
    errors += _check_shared('anneal.', anneal, ANNEAL_FIELDS)
    if not errors and anneal.t_min > anneal.t_max:
      errors.append('config.anneal.t_min must be <= config.anneal.t_max')
  else:
    errors.append('missing section config.anneal')
  for kind in SECTIONS:
    errors += _check_section(kind, cfg.get(kind)) if kind in cfg else [
        f'missing section config.{kind}']
  if errors:
    raise ConfigError('invalid config:\n  ' + '\n  '.join(errors))


def check_devices(cfg: ml_collections.ConfigDict, num_devices: int, num_processes: int) -> None:
  """The global batches must split evenly over devices (and hence processes)."""
  for field in ('batch_size', 'eval_batch_size'):
    b = cfg.data[field]
    if b % num_devices:
      raise ConfigError(f'config.data.{field} = {b} must be divisible by the {num_devices} '
                        f'devices ({num_processes} processes); e.g. '
                        f'{max(1, b // num_devices) * num_devices}')
