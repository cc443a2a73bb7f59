"""Training: state, pure sharded train/eval steps, the run's set-up, and its entry points.

Data parallel over every device with ``jax.jit`` and ``NamedSharding`` on a ``('data',)`` mesh
(the replacement for ``pmap``): the batch is split along its first axis, the state is
replicated, and XLA inserts the gradient all-reduce (and computes BatchNorm statistics over
the global batch). The same code runs on 1 CPU, 8 TPU cores, or many hosts: each process
feeds its own rows and ``jax.make_array_from_process_local_data`` assembles the global batch.

:func:`train_and_evaluate` takes a config and, optionally, a :class:`~mfp_jax.data.Dataset`
and a model object of the user's own; the epoch loop itself is :mod:`mfp_jax.train_loop`.
"""

from __future__ import annotations

import functools
import json
from typing import Any, Callable, NamedTuple

import flax
import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from mfp_jax import checkpoints as ckpt_lib
from mfp_jax import config_lib
from mfp_jax import data as data_lib
from mfp_jax import layers
from mfp_jax import losses
from mfp_jax import models
from mfp_jax import optim
from mfp_jax import resilience

# The optimizer helpers lived here first.
create_learning_rate_fn = optim.create_learning_rate_fn
create_optimizer = optim.create_optimizer
weight_decay_mask = optim.weight_decay_mask
Preempted = resilience.Preempted
NonFiniteError = resilience.NonFiniteError
all_finite = resilience.all_finite


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (a pytree of arrays)."""
  step: jax.Array  # shape=(), int32
  params: Any
  batch_stats: Any
  opt_state: Any
  # {'params', 'batch_stats'}: their exponential moving average, which evaluation uses
  # (config.optim.ema_decay > 0), or None (off: then no array of the state is added).
  ema: Any = None


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       input_shape: tuple[int, ...], key: jax.Array, *,
                       ema: bool = False) -> TrainState:
  """Initial state for inputs of ``input_shape`` (one example, no batch axis); ``ema``: also
  a moving average of the variables, starting at the initial ones."""
  variables = models.init_variables(model, input_shape, key)
  params, stats = variables['params'], variables.get('batch_stats', {})
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, batch_stats=stats,
                    opt_state=tx.init(params),
                    ema={'params': params, 'batch_stats': stats} if ema else None)


def eval_variables(state: TrainState, *, ema: bool = True) -> dict[str, Any]:
  """``{'params', 'batch_stats'}`` that evaluation, folding and export use: the moving
  average when the state keeps one (and ``ema``), else the trained variables themselves."""
  if ema and state.ema is not None:
    return state.ema
  return {'params': state.params, 'batch_stats': state.batch_stats}


def update_ema(ema: Any, new: Any, step: jax.Array, decay: float) -> Any:
  """``ema * d + new * (1 - d)`` leaf by leaf, with ``d = min(decay, (1 + step) / (10 +
  step))``: early on the average follows the variables (``step`` = updates so far, int32
  scalar), later it spans about ``1 / (1 - decay)`` steps."""
  step = step.astype(jnp.float32)
  d = jnp.minimum(decay, (1.0 + step) / (10.0 + step))
  return optax.incremental_update(new, ema, step_size=1.0 - d)


# --- Steps ---------------------------------------------------------------------------------


def _forward(model, params, batch_stats, image, anneal_t, *, train: bool):
  """Logits ``[T, B, K]``, firing rates ``[L]`` and the updated norm statistics."""
  logits, col = model.apply({'params': params, 'batch_stats': batch_stats}, image, train=train,
                            anneal_t=anneal_t, mutable=['batch_stats', 'intermediates'])
  rates = [r for _, r in layers.firing_rates(col.get('intermediates', {}))]
  rates = jnp.stack(rates) if rates else jnp.zeros((0,), jnp.float32)
  return logits, rates, col.get('batch_stats', {})


def classification_loss(loss_cfg) -> Callable[[jax.Array, jax.Array, jax.Array], jax.Array]:
  """``(logits, labels, mask) -> loss`` of the registered loss ``loss_cfg.name`` with its
  keyword arguments from ``loss_cfg`` (the firing-rate fields excluded)."""
  fn = losses.LOSSES.get(loss_cfg.name)
  return functools.partial(fn, **config_lib.builder_kwargs(
      fn, loss_cfg, skip=tuple(config_lib.LOSS_FIELDS), kind='loss'))


def train_step(state: TrainState, batch: dict[str, jax.Array], anneal_t: jax.Array, *,
               model: nn.Module, tx: optax.GradientTransformation,
               loss_cfg: ml_collections.ConfigDict, skip_nonfinite: bool,
               ema_decay: float = 0.0):
  """One optimizer step. Pure: ``(state, batch, anneal_t) -> (state, metrics)``.

  Args:
    batch: ``image [B, ...]``, ``label [B]``, ``mask [B]`` (global batch, sharded).
    anneal_t: float32 scalar, sharpness of the annealed 1-bit estimator.
    loss_cfg: ``config.loss``: the registered loss and the WS-DR term's ``fr_lambda``,
      ``fr_target``.
    skip_nonfinite: if the loss, a gradient or the new state is not finite, keep the old
      state (the step counter still advances, so the data order is unchanged).
    ema_decay: the decay of ``state.ema`` (:func:`update_ema`; unused when it is None).

  Returns:
    new state; metrics ``loss``, ``ce``, ``fr_loss``, ``accuracy``, ``rates [L]``, ``finite``.
  """
  ce_fn = classification_loss(loss_cfg)

  def loss_fn(params):
    logits, rates, new_stats = _forward(model, params, state.batch_stats, batch['image'],
                                        anneal_t, train=True)
    ce = ce_fn(logits, batch['label'], batch['mask'])
    fr = losses.firing_rate_penalty(rates, target=loss_cfg.fr_target)
    return ce + loss_cfg.fr_lambda * fr, (ce, fr, rates, logits, new_stats)

  (loss, (ce, fr, rates, logits, new_stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  ema = state.ema
  if ema is not None:
    ema = update_ema(ema, {'params': params, 'batch_stats': new_stats}, state.step, ema_decay)
  new = TrainState(step=state.step + 1, params=params, batch_stats=new_stats,
                   opt_state=opt_state, ema=ema)
  # The new state too: a finite gradient times a huge learning rate can still overflow.
  finite = jnp.isfinite(loss) & all_finite((grads, new))
  if skip_nonfinite:
    keep = lambda a, b: jnp.where(finite, a, b)
    new = jax.tree.map(keep, new, state.replace(step=state.step + 1))
  correct = (losses.predictions(logits) == batch['label']) * batch['mask']
  metrics = {'loss': loss, 'ce': ce, 'fr_loss': fr, 'rates': rates, 'finite': finite,
             'accuracy': correct.sum() / jnp.maximum(batch['mask'].sum(), 1.0)}
  return new, metrics


def eval_step(state: TrainState, batch: dict[str, jax.Array], *, model: nn.Module,
              ema: bool = True):
  """Sums over a (padded) eval batch: ``correct``, ``loss`` (CE of the time-mean logits),
  ``count``, rates ``[L]``; of the variables :func:`eval_variables` picks."""
  v = eval_variables(state, ema=ema)
  logits, rates, _ = _forward(model, v['params'], v['batch_stats'], batch['image'],
                              jnp.float32(1.0), train=False)
  mask = batch['mask']
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.mean(axis=0), batch['label'])
  correct = (losses.predictions(logits) == batch['label']) * mask
  return {'correct': correct.sum(), 'loss': (ce * mask).sum(), 'count': mask.sum(),
          'rates': rates}


# --- Devices and batches -------------------------------------------------------------------


def create_mesh() -> jax.sharding.Mesh:
  """1-D ``('data',)`` mesh over every global device, with Auto axes (see STACK.md: the
  default Explicit axes reject a linen step on a ``P('data')`` batch)."""
  return jax.make_mesh((jax.device_count(),), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """This process's rows -> one global array per field, split along ``'data'``."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def host(tree):
  """A pytree of (replicated) device arrays as numpy arrays on this host."""
  return jax.tree.map(np.asarray, jax.device_get(tree))


def evaluate(state: TrainState, dataset: data_lib.Dataset, eval_fn: Callable, *,
             batch_size: int, sharding: NamedSharding) -> dict[str, Any]:
  """Test-split accuracy, loss and mean firing rates over every process's shard.

  Each process feeds its own rows (``iterate_batches`` shards by process and pads with
  ``mask = 0`` rows); ``eval_fn`` sums over the *global* batch and returns replicated sums,
  so every process gets the global numbers and each test example counts exactly once.
  """
  pc, pi = jax.process_count(), jax.process_index()
  sums = None
  for local in data_lib.iterate_batches(dataset, 'test', batch_size=batch_size // pc,
                                        process_index=pi, process_count=pc):
    out = eval_fn(state, global_batch(local, sharding))
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  s = host(sums)
  n = max(float(s['count']), 1.0)
  num_batches = data_lib.num_batches(-(-len(dataset.test) // pc), batch_size // pc,
                                     drop_remainder=False)
  return {'accuracy': float(s['correct']) / n, 'loss': float(s['loss']) / n,
          'count': int(s['count']), 'rates': (s['rates'] / max(num_batches, 1)).tolist()}


# --- What a run is: set-up and fingerprint -------------------------------------------------

# Loader arguments that say where the data is or how it is read, not what it is.
_NOT_TRAJECTORY = ('data_dir', 'cache_dir', 'workers', 'eval_batch_size', 'num_workers',
                   'num_threads', 'prefetch')


def run_fingerprint(config: ml_collections.ConfigDict, dataset: data_lib.Dataset,
                    model: nn.Module, *, user_dataset: bool, user_model: bool) -> dict[str, Any]:
  """Everything that changes the training trajectory: a resume must match it.

  The model, the data and its order (loader arguments, batch size), the optimizer and its
  schedule, the loss, the annealing, the seed and the number of epochs. A model or data set
  passed as an object is identified by its repr / name, shapes and sizes.
  """
  data = {k: v for k, v in json.loads(config.data.to_json()).items() if k not in _NOT_TRAJECTORY}
  if user_dataset:
    data = {'object': dataset.name, 'input_shape': list(dataset.input_shape),
            'num_classes': dataset.num_classes, 'train': len(dataset.train),
            'test': len(dataset.test), 'batch_size': config.data.batch_size}
  as_json = lambda c: json.loads(c.to_json())
  return {'model': {'object': repr(model)} if user_model else as_json(config.model),
          'data': data, 'optim': as_json(config.optim), 'loss': as_json(config.loss),
          'anneal': as_json(config.anneal), 'seed': config.seed,
          'num_epochs': config.num_epochs}


# Fields added after checkpoints were made, with the value that an older run had implicitly:
# a fingerprint without one matches the default, so old workdirs still resume.
_ADDED_FIELDS = {'optim.ema_decay': 0.0, 'optim.lr_mults': [],
                 'model.pool_padding': 'VALID'}


def fingerprint_changes(old: Any, new: dict[str, Any]) -> list[str]:
  """``'field: old -> new'`` for every field that differs (empty: the same run)."""
  if not isinstance(old, dict):
    return [f'(the checkpoint has no comparable fingerprint: {str(old)[:80]})']
  a = traverse_util.flatten_dict(old, sep='.')
  b = traverse_util.flatten_dict(new, sep='.')
  missing = object()
  get = lambda d, k: d.get(k, _ADDED_FIELDS.get(k, missing))
  return [f'{k}: {get(a, k)!r} -> {get(b, k)!r}'.replace(repr(missing), '(none)')
          for k in sorted(set(a) | set(b)) if get(a, k) != get(b, k)]


class Setup(NamedTuple):
  """What a config (and the user's objects) describe, before anything is written."""
  dataset: data_lib.Dataset
  model: nn.Module
  lr_fn: optax.Schedule
  tx: optax.GradientTransformation
  init: Callable[[jax.Array], TrainState]  # key -> replicated initial state (jitted)
  abstract: TrainState  # shapes, dtypes and shardings of the state (restore target)
  steps_per_epoch: int
  total_steps: int
  fingerprint: dict[str, Any]


def setup(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, *,
          dataset: data_lib.Dataset | None = None, model: nn.Module | None = None) -> Setup:
  """Validates ``config`` and builds the data set, model, optimizer and state initializer.

  Raises:
    config_lib.ConfigError: a bad config, or a data set the model cannot take.
    data_lib.DataNotFoundError: the data set is missing.
  """
  config_lib.validate(config)
  config_lib.check_devices(config, jax.device_count(), jax.process_count())
  user_dataset, user_model = dataset is not None, model is not None
  T = model.T if user_model and hasattr(model, 'T') else config.model.T
  dataset = dataset if user_dataset else data_lib.create_dataset(config.data, T=T)
  if dataset.is_sequence and dataset.input_shape[0] != T:
    raise config_lib.ConfigError(f'data {dataset.name} has T = {dataset.input_shape[0]} '
                                 f'steps per example, the model T = {T}')
  steps_per_epoch = len(dataset.train) // config.data.batch_size
  if steps_per_epoch < 1:
    raise config_lib.ConfigError(f'config.data.batch_size = {config.data.batch_size} exceeds '
                                 f'the {len(dataset.train)} training examples')
  total_steps = steps_per_epoch * config.num_epochs
  if not user_model:
    model = models.create_model(config.model, num_classes=dataset.num_classes)
  lr_fn = create_learning_rate_fn(config.optim, steps_per_epoch, total_steps)
  tx = create_optimizer(config.optim, lr_fn)
  init = jax.jit(functools.partial(create_train_state, model, tx, dataset.input_shape,
                                   ema=config.optim.ema_decay > 0),
                 out_shardings=NamedSharding(mesh, P()))
  try:  # Shapes only: a model that cannot take this data fails here, in one line.
    abstract = jax.eval_shape(init, jax.random.key(config.seed))
  except (ValueError, TypeError, ZeroDivisionError) as e:  # (too deep a net: 0-sized maps)
    first = (str(e).strip().splitlines() or [''])[0][:300]
    raise config_lib.ConfigError(
        f'model {type(model).__name__} cannot take data {dataset.name} (one example '
        f'{tuple(dataset.input_shape)}): {type(e).__name__}: {first}') from e
  unmatched = optim.unmatched_lr_mults(abstract.params, config.optim.lr_mults)
  if unmatched:
    raise config_lib.ConfigError(
        f'config.optim.lr_mults: {unmatched} match no parameter of {type(model).__name__} '
        f'(paths look like {optim.param_names(abstract.params)[0]!r})')
  fp = run_fingerprint(config, dataset, model, user_dataset=user_dataset, user_model=user_model)
  return Setup(dataset, model, lr_fn, tx, init, abstract, steps_per_epoch, total_steps, fp)


class RunResult(NamedTuple):
  """What :func:`train_and_evaluate` returns."""
  state: TrainState       # the final (replicated) state
  metrics: dict[str, Any]  # last test metrics + step, best_accuracy, wall_s


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       dataset: data_lib.Dataset | None = None,
                       model: nn.Module | None = None) -> RunResult:
  """Trains ``config`` in ``workdir`` (resuming if it holds a checkpoint) and evaluates.

  Args:
    config: the experiment (see :mod:`mfp_jax.config_lib`).
    workdir: checkpoints, ``metrics.jsonl``, TensorBoard files.
    dataset: train on this :class:`~mfp_jax.data.Dataset` instead of ``config.data.name``
      (``config.data`` still gives the batch sizes).
    model: train this Flax module (``apply(v, x, train=, anneal_t=)`` -> ``[T, B, K]``)
      instead of ``config.model``.

  Returns:
    the final state, and the last evaluation's metrics plus ``step``, ``best_accuracy`` and
    ``wall_s``.

  Raises:
    config_lib.ConfigError: a bad config (before anything is written or compiled).
    data_lib.DataNotFoundError: the data set is missing (likewise).
    ckpt_lib.CheckpointError: ``workdir`` holds another run's checkpoint, or a damaged one.
    NonFiniteError: non-finite loss/gradient with ``nan_policy = 'stop'`` (nothing non-finite
      is ever saved).
    Preempted: SIGTERM/SIGINT arrived; the run saved a checkpoint first.
  """
  from mfp_jax import train_loop  # Deferred: the loop imports this module.
  mesh = create_mesh()
  s = setup(config, mesh, dataset=dataset, model=model)
  return train_loop.run(config, workdir, mesh, s)


def restore_run(config: ml_collections.ConfigDict, workdir: str, *, best: bool = False,
                step: int | None = None, dataset: data_lib.Dataset | None = None,
                model: nn.Module | None = None) -> tuple[Setup, TrainState, dict[str, Any]]:
  """The run's :class:`Setup` and a checkpoint's state, replicated over every device, and
  meta, without training (eval, export). Arguments as :func:`load_checkpoint`."""
  s = setup(config, create_mesh(), dataset=dataset, model=model)
  ckpts = ckpt_lib.RunCheckpoints(workdir, keep=config.keep_checkpoints)
  try:
    meta = ckpts.read_meta(step, best=best)
    if meta is None:
      raise ckpt_lib.CheckpointError(f'no checkpoint in {workdir}')
    changes = check_resume(meta, s.fingerprint, config, workdir)
    state, meta = restore_state(ckpts, s.abstract, changes, step=step, best=best)
    return s, state, meta
  finally:
    ckpts.close()


def load_checkpoint(config: ml_collections.ConfigDict, workdir: str, *, best: bool = False,
                    step: int | None = None, dataset: data_lib.Dataset | None = None,
                    model: nn.Module | None = None) -> tuple[TrainState, dict[str, Any]]:
  """Restores a run's state, replicated over every device, without training (eval, export).

  Args:
    best: the best checkpoint instead of the latest.
    step: a particular step (default: the newest).
    dataset, model: as for :func:`train_and_evaluate`.

  Returns:
    ``(state, meta)``; ``meta`` holds ``epoch``, ``best_accuracy`` and, after an epoch, ``test``.

  Raises:
    config_lib.ConfigError, data_lib.DataNotFoundError: as for training.
    ckpt_lib.CheckpointError: no checkpoint, another run's, or a damaged one.
  """
  _, state, meta = restore_run(config, workdir, best=best, step=step, dataset=dataset,
                               model=model)
  return state, meta


def check_resume(meta: dict[str, Any], fingerprint: dict[str, Any],
                 config: ml_collections.ConfigDict, workdir: str) -> list[str]:
  """Refuses a checkpoint of another run: one line naming each differing field, old and new.

  With ``config.resume_policy = 'allow_changes'`` the differences are returned (to be logged)
  instead. Returns the differences.
  """
  changes = fingerprint_changes(meta.get('fingerprint'), fingerprint)
  if changes and config.resume_policy != 'allow_changes':
    raise ckpt_lib.CheckpointError(
        f'{workdir} holds a checkpoint of a different model or run; changed: '
        f'{"; ".join(changes)}. '
        f'Use a new --workdir, the config that made it, or '
        f'--config.resume_policy=allow_changes to resume with these changes')
  return changes


def _saved_arrays_fit(step_dir: str, abstract: TrainState) -> bool:
  """Whether the arrays saved in ``step_dir`` have the shapes and dtypes of ``abstract``'s
  leaves (names aside). Unreadable metadata counts as fitting: the restore's error stands."""
  import orbax.checkpoint as ocp  # Deferred: only a failed restore with changes needs it.
  from etils import epath
  handler = ocp.StandardCheckpointHandler()
  try:
    saved = jax.tree.leaves(handler.metadata(epath.Path(step_dir) / 'state'))
  except Exception:  # pylint: disable=broad-except  # damaged: let the restore error speak
    return True
  finally:
    handler.close()
  spec = lambda a: (tuple(a.shape), np.dtype(a.dtype).str)
  return sorted(map(spec, saved)) == sorted(map(spec, jax.tree.leaves(abstract)))


def restore_state(ckpts: ckpt_lib.RunCheckpoints, abstract: TrainState, changes: list[str],
                  *, step: int | None = None, best: bool = False
                  ) -> tuple[TrainState, dict[str, Any]]:
  """``ckpts.restore(abstract, step, best=best)``, after :func:`check_resume` allowed
  ``changes``: when they alter the state's arrays (another model or optimizer), the error
  names them instead of calling the checkpoint damaged (deleting it would not help)."""
  try:
    return ckpts.restore(abstract, step, best=best)
  except ckpt_lib.CheckpointError as e:
    step = ckpts.latest_step(best=best) if step is None else step
    if not changes or step is None or _saved_arrays_fit(ckpts.path(step, best=best), abstract):
      raise
    raise ckpt_lib.CheckpointError(
        f'{ckpts.workdir} holds a checkpoint of a different model or run; changed: '
        f'{"; ".join(changes)}. These change the arrays of the training state (another model '
        f'or optimizer), which no checkpoint can carry over, not even with '
        f'resume_policy=allow_changes: use a new --workdir or the config that made it') from e
