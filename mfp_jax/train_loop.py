"""The epoch loop of :func:`mfp_jax.train_lib.train_and_evaluate`, in named pieces.

* :class:`MetricsBuffer` -- step metrics since the last log line; one averaged line per
  ``log_every_steps``. What is pending at a checkpoint is saved with it, so a resumed run
  (after a kill or a preemption) logs exactly what an uninterrupted one logs.
* :class:`Run` -- one run's state and its checkpoint policy: periodic saves, the end of an
  epoch (evaluation, the best checkpoint, the latest), stop requests.
* :func:`run` -- opens the checkpoints, resumes or starts, loops over epochs.

A stop request (SIGTERM/SIGINT) never interrupts a step, an evaluation or a save: the loop
finishes what it is doing, saves, and raises :class:`~mfp_jax.resilience.Preempted`.
"""

from __future__ import annotations

import signal
import time
from typing import Any, Callable

import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mfp_jax import checkpoints as ckpt_lib
from mfp_jax import models
from mfp_jax import pipeline
from mfp_jax import quant
from mfp_jax import resilience
from mfp_jax import run_log
from mfp_jax import train_lib
from mfp_jax import workdir as workdir_lib

_MEAN_KEYS = ('loss', 'ce', 'fr_loss', 'accuracy')


def _host_metrics(m: dict[str, Any]) -> dict[str, Any]:
  """One step's metrics as JSON-able Python numbers (the same in a live and a resumed run)."""
  h = train_lib.host(m)
  out = {k: float(h[k]) for k in _MEAN_KEYS}
  out['rates'] = [float(r) for r in np.atleast_1d(h['rates'])]
  out['finite'] = bool(h['finite'])
  return out


class MetricsBuffer:
  """Step metrics not yet logged: averaged into one ``metrics.jsonl`` line when flushed.

  Device metrics are fetched lazily (at a flush, a finiteness check or a save), so the loop
  never waits on a step just to log it.
  """

  def __init__(self, log: run_log.RunLog, lr_fn: Callable, rate_names: list[str],
               nan_policy: str, last_good: Callable[[], str]):
    self.log, self.lr_fn, self.rate_names = log, lr_fn, rate_names
    self.nan_policy, self.last_good = nan_policy, last_good
    self.pending: list[tuple[int, Any]] = []

  def add(self, step: int, metrics: Any) -> None:
    self.pending.append((step, metrics))

  def _fetch(self) -> list[tuple[int, dict[str, Any]]]:
    """The pending metrics on the host (fetched once; restored ones already are)."""
    on_host = lambda m: isinstance(m['finite'], bool)
    self.pending = [(s, m if on_host(m) else _host_metrics(m)) for s, m in self.pending]
    return self.pending

  def check_finite(self) -> None:
    """Raises ``NonFiniteError`` (``nan_policy = 'stop'``) naming the first bad step."""
    bad = [s for s, m in self._fetch() if not m['finite']]
    if bad and self.nan_policy == 'stop':
      raise resilience.NonFiniteError(
          f'non-finite loss, gradient or weights at step {bad[0]}; training stopped without '
          f'saving them. {self.last_good()}. To get past it: lower config.optim.learning_rate, '
          f'set config.optim.grad_clip, or set config.nan_policy=skip')

  def flush(self) -> None:
    """Writes the mean of the pending steps as one line at the last pending step."""
    if not self.pending:
      return
    self.check_finite()
    host = self._fetch()
    self.pending = []
    bad = [s for s, m in host if not m['finite']]
    if bad:
      self.log.info(f'warning: skipped {len(bad)} step(s) with a non-finite loss, gradient or '
                    f'weights: {bad[:10]}')
    good = [m for _, m in host if m['finite']]
    mean: dict[str, Any] = {k: float(np.mean([m[k] for m in good])) if good else None
                            for k in _MEAN_KEYS}
    mean['skipped'] = len(bad)
    if good:
      rates = np.mean([m['rates'] for m in good], axis=0)
      mean['rates'] = dict(zip(self.rate_names, map(float, rates)))
    mean['lr'] = float(self.lr_fn(host[-1][0]))
    self.log.write(host[-1][0], 'train', mean)
    if good:
      self.log.progress_postfix(loss=f'{mean["loss"]:.3f}', acc=f'{mean["accuracy"]:.3f}')

  def to_meta(self) -> list[list[Any]]:
    """The pending steps as JSON, for the checkpoint that is about to be saved."""
    return [[s, m] for s, m in self._fetch()]

  def restore(self, saved: list[list[Any]] | None) -> None:
    self.pending = [(int(s), dict(m)) for s, m in (saved or [])]


class Run:
  """One training run in progress: its state, its logs and its checkpoint policy."""

  def __init__(self, config: ml_collections.ConfigDict, s: train_lib.Setup,
               ckpts: ckpt_lib.RunCheckpoints, log: run_log.RunLog, mesh, state, meta):
    self.config, self.s, self.ckpts, self.log = config, s, ckpts, log
    self.state = state
    self.step = int(jax.device_get(state.step))
    self.best_acc = (meta or {}).get('best_accuracy', -1.0)
    self.last_eval: dict[str, Any] = {}
    self.stop: resilience.StopRequest | None = None  # while train() runs
    self.t0 = time.time()
    self.data_sh = NamedSharding(mesh, P('data'))
    repl = NamedSharding(mesh, P())
    self.p_train = jax.jit(
        lambda st, b, t: train_lib.train_step(st, b, t, model=s.model, tx=s.tx,
                                              loss_cfg=config.loss,
                                              skip_nonfinite=config.nan_policy == 'skip',
                                              ema_decay=config.optim.ema_decay),
        out_shardings=(repl, repl), donate_argnums=0)
    # With a moving average, the test metrics are the average's; the trained weights' own
    # accuracy is logged beside them ('raw_accuracy'), so the average's worth is measured.
    self.p_eval, self.p_eval_raw = (
        jax.jit(lambda st, b, ema=ema: train_lib.eval_step(st, b, model=s.model, ema=ema),
                out_shardings=repl) for ema in (True, False))
    self.rate_names = models.spiking_layer_names(s.model, s.dataset.input_shape)
    self.buffer = MetricsBuffer(log, s.lr_fn, self.rate_names, config.nan_policy,
                                self.last_good)
    self.buffer.restore((meta or {}).get('pending'))

  def last_good(self) -> str:
    """Names the newest complete checkpoint (waiting for a save in flight to land first)."""
    self.ckpts.wait()
    good = self.ckpts.latest_step()
    if good is None:
      return 'There is no checkpoint yet (a rerun starts from scratch)'
    return f'Last good checkpoint: step {good} in {self.ckpts.path(good)} (a rerun resumes there)'

  def save(self, extra: dict[str, Any], *, best: bool = False) -> None:
    """Saves the state at this step with what is pending in the log; never a non-finite one."""
    self.buffer.check_finite()
    # Defence in depth: 'skip' keeps the old state, but nothing non-finite may reach the disk.
    if not bool(resilience.all_finite(self.state)):
      raise resilience.NonFiniteError(f'the training state is not finite at step {self.step}; '
                                      f'not saving it. {self.last_good()}')
    meta = {'fingerprint': self.s.fingerprint, 'best_accuracy': self.best_acc,
            'pending': self.buffer.to_meta(), **extra}
    self.ckpts.save(self.step, self.state, meta, best=best)

  def evaluate(self, *, log: bool = True) -> None:
    """Evaluates the state; ``log``: also a ``test`` line in ``metrics.jsonl`` (the epochs'
    evaluations, not the one a stopped or finished run repeats on every rerun)."""
    c = self.config
    if self.stop is not None:
      self.stop.pause_for_test(f'eval:{self.step}')
    run_eval = lambda fn: train_lib.evaluate(self.state, self.s.dataset, fn,
                                             batch_size=c.data.eval_batch_size,
                                             sharding=self.data_sh)
    ev = run_eval(self.p_eval)
    raw = {} if self.state.ema is None else {
        'raw_accuracy': run_eval(self.p_eval_raw)['accuracy']}
    self.last_eval = {**ev, **raw, 'step': self.step}
    if log:
      self.log.write(self.step, 'test', {'accuracy': ev['accuracy'], 'loss': ev['loss'], **raw,
                                         'rates': dict(zip(self.rate_names, ev['rates']))})

  def train_epoch(self, epoch: int, stop: resilience.StopRequest, stop_at: int) -> bool:
    """Trains to the end of ``epoch`` or to ``stop_at``; True if a stop was requested."""
    c, spe = self.config, self.s.steps_per_epoch
    pc, pi = jax.process_count(), jax.process_index()
    first = self.step - epoch * spe
    # Built ahead in threads / worker processes; the order is iterate_batches's. Closed when
    # this returns (the last reference goes), also on a stop mid-epoch.
    batches = pipeline.load_batches(self.s.dataset, 'train', batch_size=c.data.batch_size // pc,
                                    seed=c.seed, epoch=epoch, process_index=pi,
                                    process_count=pc, start_batch=first,
                                    num_workers=c.data.num_workers,
                                    num_threads=c.data.num_threads, prefetch=c.data.prefetch)
    self.log.progress_start(total=spe, initial=first, desc=f'epoch {epoch + 1}/{c.num_epochs}',
                            enabled=c.progress and pi == 0)
    try:
      for local in batches:
        t = quant.anneal_schedule(self.step, self.s.total_steps, t_min=c.anneal.t_min,
                                  t_max=c.anneal.t_max)
        self.state, metrics = self.p_train(self.state, train_lib.global_batch(
            local, self.data_sh), t)
        self.step += 1
        self.buffer.add(self.step, metrics)
        self.log.progress_update()
        if self.step % c.log_every_steps == 0:
          self.buffer.flush()
        preempt = stop.reached(self.step)  # Multi-host: every process asks at every step.
        periodic = c.checkpoint_every_steps and self.step % c.checkpoint_every_steps == 0
        # The end of an epoch is saved by end_of_epoch, after its evaluation.
        if self.step % spe and (preempt or self.step == stop_at or periodic):
          self.save({'epoch': epoch, 'elapsed_s': time.time() - self.t0})
        if preempt or self.step >= stop_at:
          return preempt
      return False
    finally:
      self.log.progress_close()

  def end_of_epoch(self, epoch: int) -> None:
    """Logs the epoch's last steps, evaluates (every ``eval_every_epochs``), saves the best
    and the latest checkpoint."""
    c = self.config
    self.buffer.flush()
    if (epoch + 1) % c.eval_every_epochs == 0 or epoch + 1 == c.num_epochs:
      self.evaluate()
      raw = self.last_eval.get('raw_accuracy')
      raw = '' if raw is None else f' (moving average; the trained weights: {raw:.4f})'
      self.log.info(f'epoch {epoch + 1}: test accuracy {self.last_eval["accuracy"]:.4f}{raw} '
                    f'({time.time() - self.t0:.1f} s)')
      if self.last_eval['accuracy'] > self.best_acc:
        self.best_acc = self.last_eval['accuracy']
        self.save({'epoch': epoch + 1, 'test': self.last_eval}, best=True)
    self.save({'epoch': epoch + 1, 'test': self.last_eval})

  def preempted(self, stop: resilience.StopRequest, *, saved: bool = True,
                finished: bool = False) -> resilience.Preempted:
    """The exception that ends a stopped run (after its saves have landed): whether it saved
    now, and whether training had already reached its last step."""
    self.ckpts.wait()
    name = signal.Signals(stop.signum).name if stop.signum else 'preemption notice'
    where = f'step {self.step} in {self.ckpts.path(self.step)}'
    if not saved:
      return resilience.Preempted(f'{name}: the run had finished; its checkpoint is at {where}; '
                                  f'a rerun only re-evaluates')
    then = ('training had finished: a rerun only re-evaluates' if finished
            else 'rerun the same command to resume')
    return resilience.Preempted(f'{name}: saved a checkpoint at {where}; {then}')

  def train(self) -> train_lib.RunResult:
    """The epoch loop, then the final evaluation; raises ``Preempted`` on a stop request."""
    c, spe = self.config, self.s.steps_per_epoch
    stop_at = c.stop_at_step or self.s.total_steps
    # A rerun of a run that already reached stop_at (or the end) trains no further.
    first_epoch = self.step // spe if self.step < stop_at else c.num_epochs
    single = jax.process_count() == 1
    with resilience.StopRequest() as stop:
      self.stop = stop
      for epoch in range(first_epoch, c.num_epochs):
        preempt = self.train_epoch(epoch, stop, stop_at)
        if self.step == (epoch + 1) * spe:
          self.end_of_epoch(epoch)
          # A request that came during the evaluation stops here, before another step.
          preempt = preempt or (single and stop.signum is not None)
        if preempt:
          raise self.preempted(stop, finished=self.step >= stop_at)
        if self.step >= stop_at:
          break
      if self.last_eval.get('step') != self.step:  # stopped mid-epoch, or a finished run
        self.evaluate(log=False)
      if single and stop.signum is not None:
        raise self.preempted(stop, saved=False)
    return train_lib.RunResult(self.state, {**self.last_eval, 'best_accuracy': self.best_acc,
                                            'wall_s': time.time() - self.t0})


def run(config: ml_collections.ConfigDict, workdir: str, mesh, s: train_lib.Setup
        ) -> train_lib.RunResult:
  """Locks ``workdir``, opens its checkpoints, resumes (refusing another run's) or starts,
  and trains. Multi-host: only process 0 takes the lock."""
  with workdir_lib.lock(workdir, enabled=jax.process_index() == 0):
    ckpts = ckpt_lib.RunCheckpoints(workdir, keep=config.keep_checkpoints, cleanup_tmp=True)
    try:
      return _resume_and_train(config, workdir, mesh, s, ckpts)
    finally:
      ckpts.close()  # Every exit waits for the saves in flight: no half-written checkpoint.


def _resume_and_train(config, workdir, mesh, s, ckpts) -> train_lib.RunResult:
  meta = ckpts.read_meta()
  changes = []
  if meta is None:
    state = s.init(jax.random.key(config.seed))
  else:
    changes = train_lib.check_resume(meta, s.fingerprint, config, workdir)
    state, meta = train_lib.restore_state(ckpts, s.abstract, changes)
  start = int(jax.device_get(state.step))
  # Saves beyond the resume point belong to the abandoned run (e.g. a best checkpoint whose
  # epoch-end latest save was killed); the redone steps save again.
  ckpts.discard_after(start)
  # Lines a killed run logged after its last checkpoint are dropped: they are redone.
  log = run_log.RunLog(workdir, enabled=jax.process_index() == 0, start_step=start)
  try:
    r = Run(config, s, ckpts, log, mesh, state, meta)
    name = type(s.model).__name__ if 'object' in s.fingerprint['model'] else config.model.name
    where = f'resuming from {ckpts.path(start)}' if meta is not None else 'starting from scratch'
    log.info(f'{name} on {s.dataset.name}: {jax.device_count()} devices '
             f'({jax.default_backend()}), {jax.process_count()} processes, global batch '
             f'{config.data.batch_size}, {s.steps_per_epoch} steps/epoch, {s.total_steps} '
             f'steps, {where} (step {start})')
    if changes:
      log.info(f'warning: resuming with changed fields (resume_policy=allow_changes): '
               f'{"; ".join(changes)}')
    return r.train()
  finally:
    log.close()
