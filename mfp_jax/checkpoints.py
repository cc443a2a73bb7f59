"""Orbax checkpoints of a run: the latest ones (for resume) and the best one, kept apart.

Layout under ``<workdir>``: ``checkpoints/<step>/`` (the last ``keep`` saves) and
``best/<step>/`` (the single best by test accuracy). Orbax's ``max_to_keep`` with a
``best_fn`` keeps the N *best* and may delete the latest, so resume and best live in separate
managers. Each step holds ``state`` (arrays, ``StandardSave``: no pickling) and ``meta``
(JSON: epoch, metrics, the model config). Orbax writes into a temporary directory and renames
it when complete, and lists only complete steps, so a save killed half-way is never restored.
"""

from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint cannot be used; the message says which and why."""


def _manager(directory: str, keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      os.path.abspath(directory),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True),
      item_names=('state', 'meta'))


class RunCheckpoints:
  """Latest-``keep`` and best checkpoints of one run directory."""

  def __init__(self, workdir: str, *, keep: int = 2):
    self.workdir = workdir
    self.latest = _manager(os.path.join(workdir, 'checkpoints'), keep)
    self.best = _manager(os.path.join(workdir, 'best'), 1)

  def latest_step(self) -> int | None:
    """Step of the newest complete checkpoint, or None."""
    return self.latest.latest_step()

  def read_meta(self, step: int | None = None, *, best: bool = False) -> dict[str, Any] | None:
    """The JSON ``meta`` of a checkpoint without touching its arrays (None if there is none)."""
    mngr = self.best if best else self.latest
    step = mngr.latest_step() if step is None else step
    if step is None:
      return None
    try:
      out = mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:  # Orbax raises many types for a damaged file; name the place.
      raise CheckpointError(f'cannot read checkpoint metadata at {mngr.directory}/{step}: '
                            f'{type(e).__name__}: {e}') from e
    return dict(out['meta'])

  def save(self, step: int, state: Any, meta: dict[str, Any], *, best: bool = False) -> None:
    """Saves ``state`` (a pytree of arrays) and ``meta`` at ``step`` (asynchronously)."""
    mngr = self.best if best else self.latest
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                            meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, abstract_state: Any, step: int | None = None, *,
              best: bool = False) -> tuple[Any, dict[str, Any]]:
    """Restores ``(state, meta)``; ``abstract_state`` gives structure, dtypes and shardings.

    Raises:
      CheckpointError: none there, or it does not match ``abstract_state`` or is damaged.
    """
    mngr = self.best if best else self.latest
    step = mngr.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f'no checkpoint in {mngr.directory}')
    try:
      out = mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
    except Exception as e:  # Truncated or tampered files surface as assorted library errors.
      raise CheckpointError(f'cannot restore checkpoint {mngr.directory}/{step}: '
                            f'{type(e).__name__}: {str(e)[:300]}') from e
    return out['state'], dict(out['meta'])

  def wait(self) -> None:
    """Blocks until every asynchronous save has been written."""
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self) -> None:
    self.wait()
    self.latest.close()
    self.best.close()
