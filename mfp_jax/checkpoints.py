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
    (``cleanup_tmp=True``) deletes such leftovers, before it opens the directory.
  * ``meta['checksum']`` (SHA-256 of every array) is checked on restore, so a tampered array
    file that still decodes is refused too, and so is a step directory whose state belongs
    to another step (``cp -a checkpoints/21 checkpoints/99``). Any failure is a
    :class:`CheckpointError` naming the step directory, the one to delete to fall back to
    the step before, and what that costs.
  * A save the file system refuses (full, read-only) is a one-line
    :class:`~mfp_jax.workdir.WorkdirWriteError`, raised by :meth:`RunCheckpoints.save`,
    :meth:`~RunCheckpoints.wait` or :meth:`~RunCheckpoints.close`: Orbax saves in the
    background, so a failed write surfaces at the next wait or save.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging as py_logging
import os
import re
import shutil
import time
from typing import Any, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp

from mfp_jax import workdir as workdir_lib


class CheckpointError(RuntimeError):
  """A checkpoint cannot be used; the message says which, why, and what to delete."""


# Test-only hook. MFP_TEST_PAUSE_BEFORE_COMMIT=<step> makes the save of that step write every
# file and then wait, before the atomic rename that commits it, until the process dies. Tests
# use it to SIGKILL a run in the middle of a save deterministically. Unset (always, outside
# tests) it changes nothing: the default temporary-path class is used.
PAUSE_ENV = 'MFP_TEST_PAUSE_BEFORE_COMMIT'
TMP_SUFFIX = getattr(ocp.path.atomicity, 'TMP_DIR_SUFFIX', '.orbax-checkpoint-tmp')


class _PauseBeforeCommit(ocp.path.atomicity.AtomicRenameTemporaryPath):

  async def finalize(self):
    if self.get_final().name == os.environ.get(PAUSE_ENV):
      print(f'{PAUSE_ENV}: holding {self.get()} uncommitted', flush=True)
      while True:
        await asyncio.sleep(3600)
    await super().finalize()


# --- Orbax's background work, kept inside the process's lifetime ---------------------------

_DRAIN_TIMEOUT_S = 60.0


class _DrainingEventLoop(asyncio.SelectorEventLoop):
  """An event loop that lets its pending tasks finish before it closes.

  Orbax runs each restore and save in a fresh loop and closes it as soon as the first
  TensorStore read or write fails; the others are still in flight, and each one that
  completes later calls back into the closed loop and prints an "Event loop is closed"
  traceback (0-23 after a damaged restore, dozens after a full disk). Waiting for them here
  costs nothing when all went well (nothing is pending then).
  """

  def close(self) -> None:
    deadline = time.monotonic() + _DRAIN_TIMEOUT_S
    while not self.is_running() and not self.is_closed():
      pending = [t for t in asyncio.all_tasks(self) if not t.done()]
      left = deadline - time.monotonic()
      if not pending or left <= 0:
        break
      done, _ = self.run_until_complete(asyncio.wait(pending, timeout=left))
      for t in done:  # Their errors are the one already raised: mark them as seen.
        if not t.cancelled():
          t.exception()
    super().close()


class _DrainingPolicy(asyncio.DefaultEventLoopPolicy):

  def new_event_loop(self) -> asyncio.AbstractEventLoop:
    return _DrainingEventLoop()


class _QuietRefusedWrites(py_logging.Filter):
  """Drops Orbax's ERROR logs (with tracebacks, one per array) of a write that the file
  system refused: :class:`RunCheckpoints` raises that failure as one line instead."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno < py_logging.ERROR or f'{os.sep}orbax{os.sep}' not in record.pathname:
      return True
    exc = record.exc_info[1] if record.exc_info else None
    if exc is not None and workdir_lib.as_write_error(exc) is not None:
      return False
    try:
      text = record.getMessage()
    except Exception:  # pylint: disable=broad-except  # a bad format string: let it through
      return True
    return workdir_lib.as_write_error(RuntimeError(text)) is None


_QUIET = _QuietRefusedWrites()


def _contain_orbax_background_work() -> None:
  """Installs the draining loops and the log filter (once per process)."""
  if type(asyncio.get_event_loop_policy()) is asyncio.DefaultEventLoopPolicy:
    asyncio.set_event_loop_policy(_DrainingPolicy())  # Not over someone's own (uvloop) policy.
  absl_logger = py_logging.getLogger('absl')  # Orbax logs through absl.logging.
  if _QUIET not in absl_logger.filters:
    absl_logger.addFilter(_QUIET)


def _remove_unfinished_saves(directory: str) -> None:
  """Deletes ``<step>.orbax-checkpoint-tmp*`` left by a killed save, before Orbax opens
  ``directory``. Orbax's own clean-up (``cleanup_tmp_directories``) runs in a background
  thread that ``close()`` does not wait for: a process that stops soon after opening (a data
  error) then prints "cannot schedule new futures after interpreter shutdown"."""
  if jax.process_index() != 0 or not os.path.isdir(directory):
    return  # Multi-host: the primary process cleans the shared directory, as Orbax does.
  for name in os.listdir(directory):
    if TMP_SUFFIX in name:
      path = os.path.join(directory, name)
      try:
        shutil.rmtree(path)
      except OSError as e:
        raise workdir_lib.as_write_error(e, path) or e


def _manager(directory: str, keep: int, *, name: str) -> ocp.CheckpointManager:
  hook = _PauseBeforeCommit if os.environ.get(PAUSE_ENV) else None
  return ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(
          max_to_keep=keep, create=True, cleanup_tmp_directories=False,
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


# Some library messages embed an object's repr: Orbax formats TensorStore's ``t.spec``, a
# method, into its read errors ("See full TensorStore details: <bound method ...>").
_OBJECT_REPR = re.compile(r'<(bound method|built-in method|function|method) ')


def _first_line(e: BaseException) -> str:
  lines = str(e).strip().splitlines()
  return lines[0][:200] if lines else ''


def _describe(e: BaseException) -> str:
  """``'Type: first line'`` of a library error (they can be pages long), without object
  reprs; where one had to be cut, the cause's first line says what the repr hid."""
  text = _first_line(e)
  m = _OBJECT_REPR.search(text)
  if m:  # Drop the repr and the clause that introduces it ("See full ... details:").
    text = re.sub(r'[^.;]*:\s*$', '', text[:m.start()]).rstrip()
  out = f'{type(e).__name__}: {text}' if text else type(e).__name__
  cause = e.__cause__ or e.__context__
  if (m or not text) and cause is not None:
    out += f' ({_describe(cause)})'
  return out


def _redone(n: int) -> str:
  return f'{n} step is redone' if n == 1 else f'{n} steps are redone'


def _step_dirs(directory: str) -> list[int]:
  """Committed step numbers under ``directory``, from the names alone."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def _damaged_step(directory: str) -> int | None:
  """The newest step whose ``_CHECKPOINT_METADATA`` is not a JSON object (what Orbax reads
  when it opens a directory), or None."""
  for step in reversed(_step_dirs(directory)):
    path = os.path.join(directory, str(step), '_CHECKPOINT_METADATA')
    try:
      with open(path, 'rb') as f:
        ok = isinstance(json.loads(f.read()), dict)
    except FileNotFoundError:
      continue
    except (OSError, ValueError):
      ok = False
    if not ok:
      return step
  return None


class RunCheckpoints:
  """Latest-``keep`` and best checkpoints of one run directory.

  Args:
    workdir: the run directory.
    keep: how many of the latest checkpoints to keep.
    cleanup_tmp: delete unfinished saves left by a killed run. Only the training run may do
      this: a reader (e.g. an evaluation next to a live run) would delete its save in flight.

  Raises:
    CheckpointError: a step's metadata is damaged (Orbax reads it when it opens).
    workdir.WorkdirWriteError: ``cleanup_tmp`` and the directory is read-only.
  """

  def __init__(self, workdir: str, *, keep: int = 2, cleanup_tmp: bool = False):
    self.workdir = workdir
    self._last_saved: dict[bool, int] = {}
    _contain_orbax_background_work()
    if cleanup_tmp:
      for best in (False, True):
        _remove_unfinished_saves(self._dir(best))
    self.latest = self._open(False, keep)
    try:
      self.best = self._open(True, 1)
    except BaseException:
      self.latest.close()
      raise

  def _open(self, best: bool, keep: int) -> ocp.CheckpointManager:
    try:
      return _manager(self._dir(best), keep, name='mfp_best' if best else 'mfp_latest')
    except Exception as e:  # A damaged step's metadata is read when the manager opens.
      raise self._open_error(self._dir(best), best, e) from e

  def _open_error(self, directory: str, best: bool, e: Exception) -> Exception:
    write = workdir_lib.as_write_error(e, directory)
    if write is not None:
      return write
    step = _damaged_step(directory)
    if step is None:
      return CheckpointError(
          f'cannot open the checkpoints in {directory}: {_describe(e)}; delete the damaged '
          f'step directory in it (the newest first), or use a new --workdir')
    return CheckpointError(f'cannot open the checkpoints in {self.workdir}: '
                           f'{os.path.join(directory, str(step))} has damaged metadata '
                           f'({_describe(e)}); {self._fallback(step, best=best)}')

  def _mngr(self, best: bool) -> ocp.CheckpointManager:
    return self.best if best else self.latest

  def _dir(self, best: bool) -> str:
    return os.path.join(os.path.abspath(self.workdir), 'best' if best else 'checkpoints')

  def path(self, step: int, *, best: bool = False) -> str:
    """The directory of one step."""
    return os.path.join(self._dir(best), str(step))

  def _fallback(self, step: int, *, best: bool = False) -> str:
    """What deleting a damaged step directory falls back to, and what it costs."""
    where = self.path(step, best=best)
    if best:
      return (f'delete {where} to fall back to the latest checkpoint, or use a new --workdir '
              f'(nothing is redone; only the copy of the best epoch is lost)')
    earlier = [s for s in _step_dirs(self._dir(False)) if s < step]
    if earlier:
      return (f'delete {where} to fall back to step {earlier[-1]} '
              f'({_redone(step - earlier[-1])}), or use a new --workdir')
    return (f'delete {where} and the run restarts from step 0 ({_redone(step)}), or use a '
            f'new --workdir')

  def _error(self, msg: str, step: int, best: bool) -> CheckpointError:
    return CheckpointError(f'{msg}; {self._fallback(step, best=best)}')

  def latest_step(self, *, best: bool = False) -> int | None:
    """Step of the newest complete checkpoint, or None."""
    return self._mngr(best).latest_step()

  def read_meta(self, step: int | None = None, *, best: bool = False) -> dict[str, Any] | None:
    """The JSON ``meta`` of a checkpoint without touching its arrays (None if there is none)."""
    mngr = self._mngr(best)
    step = mngr.latest_step() if step is None else step
    if step is None:
      return None
    where = self.path(step, best=best)
    try:
      out = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      meta = out['meta']
    except Exception as e:  # Orbax raises many types for a damaged file; name the place.
      raise self._error(f'cannot read checkpoint metadata in {where}: {_describe(e)}', step,
                        best) from e
    if not isinstance(meta, dict):
      raise self._error(f'checkpoint metadata in {where} is not a JSON object (got '
                        f'{type(meta).__name__})', step, best)
    if meta.get('step', step) != step:  # Written since the step was saved in meta, too.
      raise self._error(f'{where} holds step {meta["step"]}, not {step} (copied or renamed?)',
                        step, best)
    return dict(meta)

  @contextlib.contextmanager
  def _writing(self, best: bool, step: int | None) -> Iterator[None]:
    """Turns a write the file system refuses into one WorkdirWriteError naming the step."""
    try:
      yield
    except Exception as e:  # Orbax re-raises TensorStore's errors as assorted types.
      err = workdir_lib.as_write_error(
          e, self.path(step, best=best) if step is not None else self._dir(best))
      if err is None:
        raise
      raise err from e

  def save(self, step: int, state: Any, meta: dict[str, Any], *, best: bool = False) -> None:
    """Saves ``state`` (a pytree of arrays) and ``meta`` at ``step`` (asynchronously).

    Raises:
      workdir.WorkdirWriteError: this save or the one before it could not be written.
    """
    meta = {**meta, 'step': int(step), 'checksum': state_checksum(state)}
    mngr = self._mngr(best)
    with self._writing(best, self._last_saved.get(best)):
      mngr.wait_until_finished()  # The previous save's failure names the previous step.
    self._last_saved[best] = int(step)
    with self._writing(best, step):
      mngr.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, abstract_state: Any, step: int | None = None, *,
              best: bool = False) -> tuple[Any, dict[str, Any]]:
    """Restores ``(state, meta)``; ``abstract_state`` gives structure, dtypes and shardings.

    Raises:
      CheckpointError: none there, or it does not match ``abstract_state``, is truncated,
        was altered (checksum mismatch), or holds another step than its directory's name.
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
      raise self._error(f'cannot restore checkpoint {where} (damaged, truncated or not this '
                        f'model\'s): {_describe(e)}', step, best) from e
    expected = meta.get('checksum')
    if expected is None:
      raise self._error(f'checkpoint {where} has no checksum in its metadata; it was not '
                        f'written by this version of mfp_jax or was altered', step, best)
    if state_checksum(state) != expected:
      raise self._error(f'checkpoint {where} is damaged: its arrays do not match the checksum '
                        f'saved with them', step, best)
    held = getattr(state, 'step', None)
    if held is not None and int(_host_leaf(held)) != step:
      raise self._error(f'{where} holds step {int(_host_leaf(held))}, not {step} (copied or '
                        f'renamed?)', step, best)
    return state, meta

  def discard_after(self, step: int) -> None:
    """Deletes the saved steps after ``step``: they belong to a run abandoned at ``step``.

    Raises:
      CheckpointError: ``step`` is older than the newest latest checkpoint. A resume starts
        from the newest, so anything else means the restored state was not what its
        directory claims; nothing is deleted then.
    """
    newest = self.latest.latest_step()
    if newest is not None and step < newest:
      raise self._error(f'will not delete the checkpoints after step {step}: step {step} is '
                        f'not the newest in {self._dir(False)} ({newest} is)', newest, False)
    for mngr in (self.latest, self.best):
      for s in mngr.all_steps():
        if s > step:
          mngr.delete(s)

  def wait(self) -> None:
    """Blocks until every asynchronous save has been written.

    Raises:
      workdir.WorkdirWriteError: a save could not be written (disk full, read-only).
    """
    for best in (False, True):
      with self._writing(best, self._last_saved.get(best)):
        self._mngr(best).wait_until_finished()

  def close(self) -> None:
    """Waits for the saves in flight, then closes both managers (even if a save failed)."""
    try:
      self.wait()
    except BaseException:
      for mngr in (self.latest, self.best):
        with contextlib.suppress(Exception):  # Orbax's close() re-raises the failed save.
          mngr.close()
      raise
    self.latest.close()
    self.best.close()
