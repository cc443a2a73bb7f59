"""Where a run reports: stdout lines, ``<workdir>/metrics.jsonl``, TensorBoard, a progress bar.

Only process 0 writes (``enabled=False`` elsewhere), so a multi-host run logs once.

A resumed run redoes the steps after its last checkpoint, so on start-up the lines a killed
run wrote after that step are dropped from ``metrics.jsonl`` (and TensorBoard is told to purge
them): the log of a resumed run reads like the log of an uninterrupted one. The same pass
drops what is not a log record -- a line cut short by a kill, bytes that are not UTF-8, a
line pasted in by hand -- and keeps every record before and after it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from typing import Any, Iterator

import tqdm

from mfp_jax import workdir as workdir_lib

# How ``RunLog.write`` starts every line: where a cut line had the next one appended onto it,
# the record after the cut starts here.
_RECORD_START = b'{"step": '


def parse_record(line: bytes) -> dict[str, Any] | None:
  """The log record on one line (a JSON object with an int ``step`` and a str ``split``), or
  None if the line is anything else."""
  try:
    obj = json.loads(line.decode('utf-8'))
  except (UnicodeDecodeError, ValueError, RecursionError):
    return None
  if (isinstance(obj, dict) and type(obj.get('step')) is int
      and isinstance(obj.get('split'), str)):
    return obj
  return None


def _records(data: bytes) -> Iterator[tuple[bytes, dict[str, Any] | None]]:
  """``(line, record or None)`` for each non-empty line; a damaged line with a whole record
  appended onto it gives the damaged part (None) and then that record."""
  for line in data.split(b'\n'):
    if not line.strip():
      continue
    r = parse_record(line)
    if r is None:
      at = line.find(_RECORD_START, 1)
      while at > 0 and (r := parse_record(line[at:])) is None:
        at = line.find(_RECORD_START, at + 1)
      if r is not None:
        yield line[:at], None
        line = line[at:]
    yield line, r


class Records(list):
  """The records of a ``metrics.jsonl``; ``skipped`` counts the lines that were not."""

  skipped: int = 0


def read_records(path: str) -> Records:
  """Every log record in ``path``, in order; anything else is skipped and counted."""
  with open(path, 'rb') as f:
    data = f.read()
  out = Records()
  for _, r in _records(data):
    if r is None:
      out.skipped += 1
    else:
      out.append(r)
  return out


def _write_error(e: OSError, path: str) -> Exception:
  return workdir_lib.as_write_error(e, path) or e


# --- TensorBoard on a file system that refuses writes ---------------------------------------
# tensorboardX writes from a thread of its own. When the disk refuses a write, that thread dies
# with a traceback, every close() retries the flush with another, and an atexit hook retries
# once more. Instead: the thread's error is kept for the main thread to raise as one line, and
# the writers are stopped without the flush that cannot succeed.

_TB_FAILURES: list[BaseException] = []
_hook_lock = threading.Lock()


def _keep_tensorboard_write_errors() -> None:
  """Installs (once) a threading.excepthook that keeps tensorboardX's refused writes."""
  with _hook_lock:
    previous = threading.excepthook
    if getattr(previous, 'mfp_keeps_tb_errors', False):
      return

    def hook(args):
      if (type(args.thread).__module__.startswith('tensorboardX')
          and workdir_lib.as_write_error(args.exc_value) is not None):
        _TB_FAILURES.append(args.exc_value)
        return
      previous(args)

    hook.mfp_keeps_tb_errors = True
    threading.excepthook = hook


def _stop_tensorboard(tb: Any) -> None:
  """Stops tensorboardX's writers and closes their files, dropping the events the disk
  refused. It has no public call for this; where its internals differ this does nothing and
  its own close-time tracebacks come back."""
  for fw in list((getattr(tb, 'all_writers', None) or {}).values()):
    ew = getattr(fw, 'event_writer', None)
    if ew is None or getattr(ew, '_closed', True):
      continue
    # pylint: disable=protected-access
    ew._closed = True  # Its close(), also the one in its atexit hook, is now a no-op.
    with contextlib.suppress(Exception):
      ew._worker.stop()  # Ends its thread (already over if a write of its own failed).
    with contextlib.suppress(Exception):
      ew._ev_writer.close()  # Closes the file; the events it could not flush are dropped.
    with contextlib.suppress(Exception):
      ew._event_queue.close()


class RunLog:
  """Appends JSON lines and TensorBoard scalars; owns the tqdm bar of the current epoch."""

  def __init__(self, workdir: str, *, enabled: bool = True, start_step: int = 0):
    """Opens the logs of ``workdir``; the run (re)starts after ``start_step``.

    Raises:
      workdir.WorkdirWriteError: the directory cannot be written (read-only, full).
    """
    self.enabled = enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._bar = None
    self._tb = None
    if enabled:
      try:
        os.makedirs(workdir, exist_ok=True)
        self._drop_after(start_step)
        from tensorboardX import SummaryWriter  # Writes event files without TensorFlow.
        _keep_tensorboard_write_errors()
        self._tb_dir = os.path.join(workdir, 'tensorboard')
        self._tb = SummaryWriter(self._tb_dir, purge_step=start_step + 1)
      except OSError as e:
        raise _write_error(e, getattr(e, 'filename', None) or workdir) from e

  def _drop_after(self, step: int) -> tuple[int, int]:
    """Keeps the records up to ``step``; drops the later ones and every line that is not a
    record. Returns ``(dropped after step, dropped as damaged)``."""
    if not os.path.exists(self.path):
      return 0, 0
    with open(self.path, 'rb') as f:
      data = f.read()
    keep, after, damaged = [], 0, 0
    for line, r in _records(data):
      if r is None:
        damaged += 1
      elif r['step'] > step:
        after += 1
      else:
        keep.append(line + b'\n')
    new = b''.join(keep)
    if new == data:
      return 0, 0
    tmp = self.path + '.tmp'
    with open(tmp, 'wb') as f:
      f.write(new)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, self.path)  # Atomic: a kill here leaves the old or the new file.
    parts = ([f'{after} after step {step} (they are redone)'] if after else []) + (
        [f'{damaged} that were damaged or not log records'] if damaged else [])
    if parts:
      self.info(f'metrics.jsonl: dropped {after + damaged} lines: {" and ".join(parts)}')
    return after, damaged

  def info(self, msg: str) -> None:
    if self.enabled:
      (self._bar.write if self._bar is not None else print)(msg)
      sys.stdout.flush()

  def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
    """One JSON line ``{"step", "split", "time", **metrics}`` and the scalar leaves to TB."""
    if not self.enabled:
      return
    line = json.dumps({'step': int(step), 'split': split, 'time': time.time(), **metrics})
    try:
      with open(self.path, 'a') as f:
        f.write(line + '\n')
    except OSError as e:
      raise _write_error(e, self.path) from e
    self._raise_tensorboard_failure()
    for k, v in metrics.items():
      if isinstance(v, dict):
        for name, x in v.items():
          self._tb.add_scalar(f'{split}/{k}/{name}', x, step)
      elif isinstance(v, (int, float)):
        self._tb.add_scalar(f'{split}/{k}', v, step)

  def progress_start(self, *, total: int, initial: int, desc: str, enabled: bool) -> None:
    # disable=None: no bar when stderr is not a terminal (CI logs, pipes).
    self._bar = tqdm.tqdm(total=total, initial=initial, desc=desc,
                          disable=None if enabled else True,
                          leave=False, dynamic_ncols=True)

  def progress_update(self) -> None:
    if self._bar is not None:
      self._bar.update(1)

  def progress_postfix(self, **kw) -> None:
    if self._bar is not None:
      self._bar.set_postfix(kw, refresh=False)

  def progress_close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def _raise_tensorboard_failure(self) -> None:
    if _TB_FAILURES:
      e = _TB_FAILURES.pop()
      _TB_FAILURES.clear()
      tb, self._tb = self._tb, None
      _stop_tensorboard(tb)
      raise _write_error(e, self._tb_dir) from e

  def close(self) -> None:
    """Closes the bar and TensorBoard.

    Raises:
      workdir.WorkdirWriteError: TensorBoard's events could not be written (disk full).
    """
    self.progress_close()
    if self._tb is None:
      return
    self._raise_tensorboard_failure()
    tb, self._tb = self._tb, None
    try:
      tb.close()
    except OSError as e:
      _stop_tensorboard(tb)
      raise _write_error(e, self._tb_dir) from e
