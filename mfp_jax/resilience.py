"""What keeps a long run safe: stop requests (preemption, Ctrl-C) and non-finite numbers.

A stop request never interrupts a step or a save: the signal only sets a flag, and the
training loop asks :meth:`StopRequest.reached` after every step; when it says yes, the loop
saves a checkpoint and raises :class:`Preempted`.

Multi-host runs must all stop at the *same* step (the save is collective), so there the flag is
JAX's preemption service (started by ``jax.distributed.initialize``): a SIGTERM to any process
is shared with the others, and ``reached_preemption_sync_point(step)`` becomes True on every
process at one agreed step. SIGINT is turned into a SIGTERM to the same process so Ctrl-C takes
that path too.

Before the loop, ``train.py`` has its own first-line handler (exit 3 at once: nothing is saved
yet); it marks it with ``before_training = True``. When the loop ends, :class:`StopRequest`
does not put that one back (the loop has saved by then) but :func:`stop_after_loop`, which
raises :class:`Preempted`: the ``finally`` blocks on the way out wait for the saves in flight,
and the run exits 3.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import jax
import jax.numpy as jnp


# Test-only hook, like checkpoints.PAUSE_ENV. MFP_TEST_PAUSE_UNTIL_STOP=step:<n> (after training
# step n, before the loop asks whether to stop) or eval:<n> (as an evaluation of the state at
# step n begins) makes the training loop print one line and wait there until a stop request
# (SIGTERM/SIGINT) arrives, then go on as if it had come at that moment. Tests use it to
# signal a run at an exact point. Unset (always, outside tests) it changes nothing.
PAUSE_ENV = 'MFP_TEST_PAUSE_UNTIL_STOP'


class Preempted(Exception):
  """SIGTERM/SIGINT arrived; a checkpoint was saved. The message says where."""


class NonFiniteError(FloatingPointError):
  """The loss, a gradient or the parameters stopped being finite (``nan_policy = 'stop'``)."""


def stop_after_loop(signum: int, frame: Any) -> None:
  """Signal handler for after the training loop: raises :class:`Preempted`."""
  del frame
  raise Preempted(f'{signal.Signals(signum).name} after the training loop; the checkpoints '
                  f'it saved are kept; rerun the same command to finish')


@jax.jit
def all_finite(tree: Any) -> jax.Array:
  """True iff every leaf of ``tree`` is finite (a scalar bool array)."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


class StopRequest:
  """Context manager: while active, SIGTERM/SIGINT ask the training loop to stop cleanly.

  A second SIGINT in a single-process run raises ``KeyboardInterrupt`` at once (an impatient
  Ctrl-C still works). Signal handlers can only be set from the main thread; elsewhere (e.g. a
  test calling the loop from a worker thread) this never asks to stop.
  """

  def __init__(self):
    self.signum: int | None = None
    self._old: dict[int, Any] = {}
    self._multi = jax.process_count() > 1

  def __enter__(self) -> StopRequest:
    if threading.current_thread() is not threading.main_thread():
      return self
    # Multi-host: leave SIGTERM to JAX's preemption notifier (a Python handler would replace it).
    for s in (signal.SIGINT,) if self._multi else (signal.SIGTERM, signal.SIGINT):
      self._old[s] = signal.signal(s, self._handle)
    return self

  def _handle(self, signum, frame):
    del frame
    if self._multi:
      self.signum = signum
      os.kill(os.getpid(), signal.SIGTERM)  # JAX's notifier shares it with every process
      return
    if self.signum is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt
    self.signum = signum

  def pause_for_test(self, point: str) -> None:
    """The :data:`PAUSE_ENV` hook (test-only): waits at ``point`` for a stop request."""
    if os.environ.get(PAUSE_ENV) != point or not self._old:
      return  # Not asked, or no handler here (a worker thread): nothing could end the wait.
    print(f'{PAUSE_ENV}: holding at {point}', flush=True)
    while self.signum is None:
      time.sleep(0.01)

  def reached(self, step: int) -> bool:
    """True when the loop should save and stop after ``step`` (the same step on every host)."""
    self.pause_for_test(f'step:{step}')
    if not self._multi:
      return self.signum is not None
    from jax.experimental import multihost_utils
    if multihost_utils.reached_preemption_sync_point(step):
      self.signum = self.signum or signal.SIGTERM
      return True
    return False

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, stop_after_loop if getattr(h, 'before_training', False) else h)
    self._old.clear()
