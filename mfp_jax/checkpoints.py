"""Orbax checkpoints of a run: the latest ones (for resume) and the best one, kept apart.

Layout under ``<workdir>``: ``checkpoints/<step>/`` (the last ``keep`` saves) and
``best/<step>/`` (the single best by test accuracy). Orbax's ``max_to_keep`` with a
``best_fn`` keeps the N *best* and may delete the latest, so resume and best live in separate
managers. Each step holds ``state`` (arrays, ``StandardSave``) and ``meta`` (JSON: epoch,
metrics, the model fingerprint, a checksum of the arrays).

Safety:
  * Nothing is unpickled: arrays are read with ``StandardRestore`` (tensorstore + JSON
    metadata), ``meta`` with ``JsonRestore``.
  * Orbax writes into ``<step>.orbax-checkpoint-tmp-*`` and renames it when complete, and
    lists only complete steps, so a save killed half-way is never restored; a writer
    (``cleanup_tmp=True``) deletes such leftovers when it opens the directory.
  * ``meta['checksum']`` (SHA-256 of every array) is checked on restore, so a tampered array
    file that still decodes is refused too. Any failure is a :class:`CheckpointError` naming
    the step directory.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint cannot be used; the message says which and why."""


# Test-only hook. MFP_TEST_PAUSE_BEFORE_COMMIT=<step> makes the save of that step write every
# file and then wait, before the atomic rename that commits it, until the process dies. Tests
# use it to SIGKILL a run in the middle of a save deterministically. Unset (always, outside
# tests) it changes nothing: the default temporary-path class is used.
PAUSE_ENV = 'MFP_TEST_PAUSE_BEFORE_COMMIT'


class _PauseBeforeCommit(ocp.path.atomicity.AtomicRenameTemporaryPath):

  async def finalize(self):
    if self.get_final().name == os.environ.get(PAUSE_ENV):
      print(f'{PAUSE_ENV}: holding {self.get()} uncommitted', flush=True)
      while True:
        await asyncio.sleep(3600)
    await super().finalize()


def _manager(directory: str, keep: int, *, cleanup_tmp: bool,
             name: str) -> ocp.CheckpointManager:
  hook = _PauseBeforeCommit if os.environ.get(PAUSE_ENV) else None
  return ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=keep, create=True, cleanup_tmp_directories=cleanup_tmp,
          temporary_path_class=hook,
          # Multi-host: Orbax names its cross-process barriers after the step, and the latest
          # and best managers save the same step at an epoch's end; without distinct prefixes
          # their barriers collide ("Barrier ... is already ongoing").
          multiprocessing_options=ocp.options.MultiprocessingOptions(
              barrier_sync_key_prefix=name)),
      item_names=('state', 'meta'))


def _host_leaf(x: Any) -> np.ndarray:
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    # Multi-host: the state is replicated, so this process's copy is the whole array.
    return np.asarray(x.addressable_data(0))
  return np.asarray(x)


def state_checksum(tree: Any) -> str:
  """SHA-256 over every leaf's path, dtype, shape and bytes (hex string)."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    a = np.ascontiguousarray(_host_leaf(leaf))
    h.update(f'{jax.tree_util.keystr(path)}|{a.dtype}|{a.shape}|'.encode())
    h.update(a.tobytes())
  return h.hexdigest()


def _describe(e: Exception) -> str:
  # Library errors can be pages long; the first line names the problem.
  lines = str(e).strip().splitlines()
  return f'{type(e).__name__}: {lines[0][:200] if lines else ""}'


class RunCheckpoints:
  """Latest-``keep`` and best checkpoints of one run directory.

  Args:
    workdir: the run directory.
    keep: how many of the latest checkpoints to keep.
    cleanup_tmp: delete unfinished saves left by a killed run. Only the training run may do
      this: a reader (e.g. an evaluation next to a live run) would delete its save in flight.
  """

  def __init__(self, workdir: str, *, keep: int = 2, cleanup_tmp: bool = False):
    self.workdir = workdir
    try:
      self.latest = _manager(os.path.join(workdir, 'checkpoints'), keep,
                             cleanup_tmp=cleanup_tmp, name='mfp_latest')
      self.best = _manager(os.path.join(workdir, 'best'), 1, cleanup_tmp=cleanup_tmp,
                           name='mfp_best')
    except Exception as e:  # A damaged step's metadata is read when the manager opens.
      raise CheckpointError(f'cannot open the checkpoints in {workdir}: {_describe(e)}') from e

  def _mngr(self, best: bool) -> ocp.CheckpointManager:
    return self.best if best else self.latest

  def path(self, step: int, *, best: bool = False) -> str:
    """The directory of one step."""
    return os.path.join(str(self._mngr(best).directory), str(step))

  def latest_step(self, *, best: bool = False) -> int | None:
    """Step of the newest complete checkpoint, or None."""
    return self._mngr(best).latest_step()

  def read_meta(self, step: int | None = None, *, best: bool = False) -> dict[str, Any] | None:
    """The JSON ``meta`` of a checkpoint without touching its arrays (None if there is none)."""
    mngr = self._mngr(best)
    step = mngr.latest_step() if step is None else step
    if step is None:
      return None
    try:
      out = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      meta = out['meta']
    except Exception as e:  # Orbax raises many types for a damaged file; name the place.
      raise CheckpointError(f'cannot read checkpoint metadata in {self.path(step, best=best)}: '
                            f'{_describe(e)}') from e
    if not isinstance(meta, dict):
      raise CheckpointError(f'checkpoint metadata in {self.path(step, best=best)} is not a '
                            f'JSON object (got {type(meta).__name__})')
    return dict(meta)

  def save(self, step: int, state: Any, meta: dict[str, Any], *, best: bool = False) -> None:
    """Saves ``state`` (a pytree of arrays) and ``meta`` at ``step`` (asynchronously)."""
    meta = {**meta, 'checksum': state_checksum(state)}
    self._mngr(best).save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, abstract_state: Any, step: int | None = None, *,
              best: bool = False) -> tuple[Any, dict[str, Any]]:
    """Restores ``(state, meta)``; ``abstract_state`` gives structure, dtypes and shardings.

    Raises:
      CheckpointError: none there, or it does not match ``abstract_state``, is truncated or
        was altered (checksum mismatch).
    """
    mngr = self._mngr(best)
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'no checkpoint in {mngr.directory}')
    where = self.path(step, best=best)
    meta = self.read_meta(step, best=best)
    try:
      out = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state)))
      state = out['state']
      jax.block_until_ready(state)
    except Exception as e:  # Truncated or tampered files surface as assorted library errors.
      raise CheckpointError(f'cannot restore checkpoint {where} (damaged, truncated or not '
                            f'this model\'s): {_describe(e)}') from e
    expected = meta.get('checksum')
    if expected is None:
      raise CheckpointError(f'checkpoint {where} has no checksum in its metadata; it was not '
                            f'written by this version of mfp_jax or was altered')
    if state_checksum(state) != expected:
      raise CheckpointError(f'checkpoint {where} is damaged: its arrays do not match the '
                            f'checksum saved with them')
    return state, meta

  def discard_after(self, step: int) -> None:
    """Deletes the saved steps after ``step``: they belong to a run abandoned at ``step``."""
    for mngr in (self.latest, self.best):
      for s in mngr.all_steps():
        if s > step:
          mngr.delete(s)

  def wait(self) -> None:
    """Blocks until every asynchronous save has been written."""
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.wait()
    self.latest.close()
    self.best.close()
