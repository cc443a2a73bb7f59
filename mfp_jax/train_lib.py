"""Training: state, optimizer, pure sharded train/eval steps, and the epoch loop.

Data parallel over every device with ``jax.jit`` and ``NamedSharding`` on a ``('data',)`` mesh
(the replacement for ``pmap``): the batch is split along its first axis, the state is
replicated, and XLA inserts the gradient all-reduce (and computes BatchNorm statistics over
the global batch). The same code runs on 1 CPU, 8 TPU cores, or many hosts: each process
feeds its own rows and ``jax.make_array_from_process_local_data`` assembles the global batch.
"""

from __future__ import annotations

import functools
import json
import signal
import time
from typing import Any, Callable, NamedTuple

import flax
import flax.linen as nn
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
from mfp_jax import quant
from mfp_jax import resilience
from mfp_jax import run_log


@flax.struct.dataclass
class TrainState:
  """Everything that changes during training (a pytree of arrays)."""
  step: jax.Array  # shape=(), int32
  params: Any
  batch_stats: Any
  opt_state: Any


# --- Optimizer -----------------------------------------------------------------------------


def create_learning_rate_fn(optim: ml_collections.ConfigDict, steps_per_epoch: int,
                            total_steps: int) -> optax.Schedule:
  """Linear warmup over ``warmup_epochs``, then cosine decay to 0 (or constant)."""
  warmup = int(round(optim.warmup_epochs * steps_per_epoch))
  lr = optim.learning_rate
  if optim.schedule == 'constant':
    main = optax.constant_schedule(lr)
  else:
    main = optax.cosine_decay_schedule(lr, max(total_steps - warmup, 1))
  if warmup == 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def weight_decay_mask(params: Any) -> Any:
  """True for conv/dense kernels only: no decay on ``M``, ``tau``, norm scales or biases."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], 'key', None) == 'kernel', params)


def create_optimizer(optim: ml_collections.ConfigDict,
                     learning_rate_fn: optax.Schedule) -> optax.GradientTransformation:
  """SGD with momentum (PyTorch-style coupled weight decay) or AdamW, optional clipping."""
  if optim.name == 'sgd':
    tx = optax.chain(optax.add_decayed_weights(optim.weight_decay, weight_decay_mask),
                     optax.sgd(learning_rate_fn, momentum=optim.momentum or None))
  elif optim.name == 'adamw':
    tx = optax.adamw(learning_rate_fn, weight_decay=optim.weight_decay, mask=weight_decay_mask)
  else:
    raise ValueError(f'unknown optimizer {optim.name!r}; allowed: {list(config_lib.OPTIMIZERS)}')
  if optim.grad_clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(optim.grad_clip), tx)
  return tx


def create_train_state(model: nn.Module, tx: optax.GradientTransformation,
                       input_shape: tuple[int, ...], key: jax.Array) -> TrainState:
  """Initial state for inputs of ``input_shape`` (one example, no batch axis)."""
  variables = models.init_variables(model, input_shape, key)
  params = variables['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    batch_stats=variables.get('batch_stats', {}), opt_state=tx.init(params))


# --- Steps ---------------------------------------------------------------------------------


def _forward(model, params, batch_stats, image, anneal_t, *, train: bool):
  """Logits ``[T, B, K]``, firing rates ``[L]`` and the updated norm statistics."""
  logits, col = model.apply({'params': params, 'batch_stats': batch_stats}, image, train=train,
                            anneal_t=anneal_t, mutable=['batch_stats', 'intermediates'])
  rates = jnp.stack([r for _, r in layers.firing_rates(col['intermediates'])])
  return logits, rates, col['batch_stats']


def train_step(state: TrainState, batch: dict[str, jax.Array], anneal_t: jax.Array, *,
               model: nn.Module, tx: optax.GradientTransformation,
               loss_cfg: ml_collections.ConfigDict, skip_nonfinite: bool):
  """One optimizer step. Pure: ``(state, batch, anneal_t) -> (state, metrics)``.

  Args:
    batch: ``image [B, ...]``, ``label [B]``, ``mask [B]`` (global batch, sharded).
    anneal_t: float32 scalar, sharpness of the annealed 1-bit estimator.
    skip_nonfinite: if the loss, a gradient or the new state is not finite, keep the old
      state (the step counter still advances, so the data order is unchanged).

  Returns:
    new state; metrics ``loss``, ``ce``, ``fr_loss``, ``accuracy``, ``rates [L]``, ``finite``.
  """

  def loss_fn(params):
    logits, rates, new_stats = _forward(model, params, state.batch_stats, batch['image'],
                                        anneal_t, train=True)
    ce = losses.classification_loss(loss_cfg.name, logits, batch['label'], batch['mask'],
                                    tet_lambda=loss_cfg.tet_lambda)
    fr = losses.firing_rate_penalty(rates, target=loss_cfg.fr_target)
    return ce + loss_cfg.fr_lambda * fr, (ce, fr, rates, logits, new_stats)

  (loss, (ce, fr, rates, logits, new_stats)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new = TrainState(step=state.step + 1, params=params, batch_stats=new_stats, opt_state=opt_state)
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
              loss_cfg: ml_collections.ConfigDict):
  """Sums over a (padded) eval batch: ``correct``, ``loss``, ``count``, rates ``[L]``."""
  logits, rates, _ = _forward(model, state.params, state.batch_stats, batch['image'],
                              jnp.float32(1.0), train=False)
  mask = batch['mask']
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.mean(axis=0), batch['label'])
  correct = (losses.predictions(logits) == batch['label']) * mask
  return {'correct': correct.sum(), 'loss': (ce * mask).sum(), 'count': mask.sum(),
          'rates': rates}


# --- The run -------------------------------------------------------------------------------


def create_mesh() -> jax.sharding.Mesh:
  """1-D ``('data',)`` mesh over every global device, with Auto axes (see STACK.md: the
  default Explicit axes reject a linen step on a ``P('data')`` batch)."""
  return jax.make_mesh((jax.device_count(),), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))


def global_batch(local: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """This process's rows -> one global array per field, split along ``'data'``."""
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}


def model_fingerprint(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What must match for a checkpoint to be resumed: the model and the data it sees."""
  return {'model': json.loads(config.model.to_json()), 'data': config.data.name}


class RunResult(NamedTuple):
  """What :func:`train_and_evaluate` returns."""
  state: TrainState       # the final (replicated) state
  metrics: dict[str, Any]  # last test metrics + step, best_accuracy, wall_s


Preempted = resilience.Preempted
NonFiniteError = resilience.NonFiniteError
all_finite = resilience.all_finite


def _host(tree):
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
  s = _host(sums)
  n = max(float(s['count']), 1.0)
  num_batches = data_lib.num_batches(-(-len(dataset.test) // pc), batch_size // pc,
                                     drop_remainder=False)
  return {'accuracy': float(s['correct']) / n, 'loss': float(s['loss']) / n,
          'count': int(s['count']), 'rates': (s['rates'] / max(num_batches, 1)).tolist()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> RunResult:
  """Trains ``config`` in ``workdir`` (resuming if it holds a checkpoint) and evaluates.

  Returns:
    the final state, and the last evaluation's metrics plus ``step``, ``best_accuracy`` and
    ``wall_s``.

  Raises:
    config_lib.ConfigError: a bad config (before anything is written or compiled).
    ckpt_lib.CheckpointError: ``workdir`` holds a checkpoint of another model, or a damaged one.
    data_lib.DataNotFoundError: the data set is missing.
    NonFiniteError: non-finite loss/gradient with ``nan_policy = 'stop'`` (nothing non-finite
      is ever saved).
    Preempted: SIGTERM/SIGINT arrived; the run saved a checkpoint first.
  """
  config_lib.validate(config)
  mesh = create_mesh()
  config_lib.check_devices(config, jax.device_count(), jax.process_count())
  ckpts = ckpt_lib.RunCheckpoints(workdir, keep=config.keep_checkpoints, cleanup_tmp=True)
  try:
    return _train(config, workdir, mesh, ckpts)
  finally:
    ckpts.close()  # Every exit waits for the saves in flight: no half-written last checkpoint.


class _Setup(NamedTuple):
  dataset: data_lib.Dataset
  model: nn.Module
  lr_fn: optax.Schedule
  tx: optax.GradientTransformation
  init: Callable[[jax.Array], TrainState]  # key -> replicated initial state (jitted)
  steps_per_epoch: int
  total_steps: int


def _setup(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> _Setup:
  """The data set, model, optimizer and state initializer that ``config`` describes."""
  T = config.model.T
  dataset = data_lib.create_dataset(config.data, T=T)
  if dataset.is_sequence and dataset.input_shape[0] != T:
    raise config_lib.ConfigError(f'data {dataset.name} has T = {dataset.input_shape[0]} '
                                 f'frames, config.model.T = {T}')
  steps_per_epoch = len(dataset.train) // config.data.batch_size
  if steps_per_epoch < 1:
    raise config_lib.ConfigError(f'config.data.batch_size = {config.data.batch_size} exceeds '
                                 f'the {len(dataset.train)} training examples')
  total_steps = steps_per_epoch * config.num_epochs
  model = models.create_model(config.model, num_classes=dataset.num_classes)
  lr_fn = create_learning_rate_fn(config.optim, steps_per_epoch, total_steps)
  tx = create_optimizer(config.optim, lr_fn)
  init = jax.jit(functools.partial(create_train_state, model, tx, dataset.input_shape),
                 out_shardings=NamedSharding(mesh, P()))
  return _Setup(dataset, model, lr_fn, tx, init, steps_per_epoch, total_steps)


def _check_fingerprint(meta: dict[str, Any], config: ml_collections.ConfigDict,
                       workdir: str) -> None:
  if meta.get('fingerprint') != model_fingerprint(config):
    raise ckpt_lib.CheckpointError(
        f'{workdir} holds a checkpoint of a different model '
        f'({meta.get("fingerprint")}); use a new --workdir, or the config that made it')


def load_checkpoint(config: ml_collections.ConfigDict, workdir: str, *, best: bool = False,
                    step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
  """Restores a run's state, replicated over every device, without training (eval, export).

  Args:
    best: the best checkpoint instead of the latest.
    step: a particular step (default: the newest).

  Returns:
    ``(state, meta)``; ``meta`` holds ``epoch``, ``best_accuracy`` and, after an epoch, ``test``.

  Raises:
    config_lib.ConfigError, data_lib.DataNotFoundError: as for training.
    ckpt_lib.CheckpointError: no checkpoint, another model's, or a damaged one.
  """
  config_lib.validate(config)
  setup = _setup(config, create_mesh())
  ckpts = ckpt_lib.RunCheckpoints(workdir, keep=config.keep_checkpoints)
  try:
    meta = ckpts.read_meta(step, best=best)
    if meta is None:
      raise ckpt_lib.CheckpointError(f'no checkpoint in {workdir}')
    _check_fingerprint(meta, config, workdir)
    abstract = jax.eval_shape(setup.init, jax.random.key(config.seed))
    return ckpts.restore(abstract, step, best=best)
  finally:
    ckpts.close()


def _train(config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh,
           ckpts: ckpt_lib.RunCheckpoints) -> RunResult:
  meta = ckpts.read_meta()
  if meta is not None:
    _check_fingerprint(meta, config, workdir)
  dataset, model, lr_fn, tx, init, steps_per_epoch, total_steps = _setup(config, mesh)
  repl = NamedSharding(mesh, P())
  data_sh = NamedSharding(mesh, P('data'))
  if meta is None:
    state = init(jax.random.key(config.seed))
  else:
    # Shapes, dtypes and shardings only: no need to compute an initial state we replace.
    state, meta = ckpts.restore(jax.eval_shape(init, jax.random.key(config.seed)))
  start_step = int(jax.device_get(state.step))
  # Saves beyond the resume point belong to the abandoned run (e.g. a best checkpoint whose
  # epoch-end latest save was killed); the redone steps save again.
  ckpts.discard_after(start_step)
  best_acc = (meta or {}).get('best_accuracy', -1.0)
  pi = jax.process_index()

  p_train = jax.jit(
      functools.partial(train_step, model=model, tx=tx, loss_cfg=config.loss,
                        skip_nonfinite=config.nan_policy == 'skip'),
      out_shardings=(repl, repl), donate_argnums=0)
  p_eval = jax.jit(functools.partial(eval_step, model=model, loss_cfg=config.loss),
                   out_shardings=repl)
  # Lines a killed run logged after its last checkpoint are dropped: they are redone.
  log = run_log.RunLog(workdir, enabled=pi == 0, start_step=start_step)
  try:
    return _loop(config, ckpts, log, dataset, model, lr_fn, p_train, p_eval, state,
                 data_sh=data_sh, start_step=start_step, best_acc=best_acc,
                 steps_per_epoch=steps_per_epoch, total_steps=total_steps, meta=meta)
  finally:
    log.close()


def _loop(config, ckpts, log, dataset, model, lr_fn, p_train, p_eval, state, *, data_sh,
          start_step, best_acc, steps_per_epoch, total_steps, meta) -> RunResult:
  """The epoch loop: steps, periodic/preemption checkpoints, evaluation, the best checkpoint."""
  pc, pi = jax.process_count(), jax.process_index()
  local_bs = config.data.batch_size // pc
  rate_names = models.spiking_layer_names(model, dataset.input_shape)
  where = (f'resuming from {ckpts.path(start_step)}' if meta is not None
           else 'starting from scratch')
  log.info(f'{config.model.name} on {dataset.name}: {jax.device_count()} devices '
           f'({jax.default_backend()}), {pc} processes, global batch {config.data.batch_size}, '
           f'{steps_per_epoch} steps/epoch, {total_steps} steps, {where} (step {start_step})')

  def save(step, extra, *, best=False):
    # Defence in depth: flush() has already refused non-finite steps under 'stop', and
    # 'skip' keeps the old state, but nothing non-finite may ever reach the disk.
    if not bool(all_finite(state)):
      raise NonFiniteError(f'the training state is not finite at step {step}; not saving it. '
                           f'{_last_good(ckpts)}')
    ckpts.save(step, state, {'fingerprint': model_fingerprint(config), 'best_accuracy': best_acc,
                             **extra}, best=best)

  stop_at = config.stop_at_step if config.stop_at_step > 0 else total_steps
  step = start_step
  last_eval: dict[str, Any] = {}
  pending: list[tuple[int, Any]] = []
  t0 = time.time()

  def flush():
    """Fetches the pending step metrics, checks they are finite, logs their mean."""
    if not pending:
      return
    host = [(s, _host(m)) for s, m in pending]
    pending.clear()
    bad = [s for s, m in host if not bool(m['finite'])]
    if bad and config.nan_policy == 'stop':
      raise NonFiniteError(
          f'non-finite loss, gradient or weights at step {bad[0]}; training stopped without '
          f'saving them. {_last_good(ckpts)}. To get past it: lower config.optim.learning_rate, '
          f'set config.optim.grad_clip, or set config.nan_policy=skip')
    if bad:
      log.info(f'warning: skipped {len(bad)} step(s) with a non-finite loss, gradient or weights: '
               f'{bad[:10]}')
    good = [m for s, m in host if bool(m['finite'])]
    mean: dict[str, Any] = {
        k: float(np.mean([m[k] for m in good])) if good else None
        for k in ('loss', 'ce', 'fr_loss', 'accuracy')}
    mean['skipped'] = len(bad)
    if good:
      mean['rates'] = dict(zip(rate_names, map(float, np.mean([m['rates'] for m in good], 0))))
    mean['lr'] = float(lr_fn(host[-1][0]))
    log.write(host[-1][0], 'train', mean)
    if good:
      log.progress_postfix(loss=f'{mean["loss"]:.3f}', acc=f'{mean["accuracy"]:.3f}')

  # A rerun of a run that already reached stop_at (or the end) trains no further.
  first_epoch = start_step // steps_per_epoch if step < stop_at else config.num_epochs
  with resilience.StopRequest() as stop:
    for epoch in range(first_epoch, config.num_epochs):
      first = step - epoch * steps_per_epoch
      batches = data_lib.iterate_batches(dataset, 'train', batch_size=local_bs,
                                         seed=config.seed, epoch=epoch, process_index=pi,
                                         process_count=pc, start_batch=first)
      log.progress_start(total=steps_per_epoch, initial=first, desc=f'epoch {epoch + 1}/'
                         f'{config.num_epochs}', enabled=config.progress and pi == 0)
      preempt = False
      for local in batches:
        t = quant.anneal_schedule(step, total_steps, t_min=config.model.anneal_t_min,
                                  t_max=config.model.anneal_t_max)
        state, metrics = p_train(state, global_batch(local, data_sh), t)
        step += 1
        pending.append((step, metrics))
        log.progress_update()
        if step % config.log_every_steps == 0:
          flush()
        preempt = stop.reached(step)  # Multi-host: every process must ask at every step.
        periodic = config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0
        # The end of an epoch is saved below, after its evaluation.
        if step % steps_per_epoch and (preempt or step == stop_at or periodic):
          flush()
          save(step, {'epoch': epoch, 'elapsed_s': time.time() - t0})
        if preempt or step >= stop_at:
          break
      log.progress_close()
      flush()
      if step == (epoch + 1) * steps_per_epoch:
        if (epoch + 1) % config.eval_every_epochs == 0 or epoch + 1 == config.num_epochs:
          last_eval = evaluate(state, dataset, p_eval, batch_size=config.data.eval_batch_size,
                               sharding=data_sh)
          log.write(step, 'test', {'accuracy': last_eval['accuracy'], 'loss': last_eval['loss'],
                                   'rates': dict(zip(rate_names, last_eval['rates']))})
          log.info(f'epoch {epoch + 1}: test accuracy {last_eval["accuracy"]:.4f} '
                   f'({time.time() - t0:.1f} s)')
          if last_eval['accuracy'] > best_acc:
            best_acc = last_eval['accuracy']
            save(step, {'epoch': epoch + 1, 'test': last_eval}, best=True)
        save(step, {'epoch': epoch + 1, 'test': last_eval})
      if preempt and step < stop_at:
        ckpts.wait()
        name = signal.Signals(stop.signum).name if stop.signum else 'preemption notice'
        raise Preempted(f'{name}: saved a checkpoint at step {step} in {ckpts.path(step)}; '
                        f'rerun the same command to resume')
      if step >= stop_at:
        break
  if not last_eval:  # stopped mid-epoch, or resumed a finished run: evaluate what we have
    last_eval = evaluate(state, dataset, p_eval, batch_size=config.data.eval_batch_size,
                         sharding=data_sh)
  return RunResult(state, {**last_eval, 'step': step, 'best_accuracy': best_acc,
                          'wall_s': time.time() - t0})


def _last_good(ckpts: ckpt_lib.RunCheckpoints) -> str:
  """Names the newest complete checkpoint (waiting for a save in flight to land first)."""
  ckpts.wait()
  good = ckpts.latest_step()
  if good is None:
    return 'There is no checkpoint yet (a rerun starts from scratch)'
  return f'Last good checkpoint: step {good} in {ckpts.path(good)} (a rerun resumes there)'
