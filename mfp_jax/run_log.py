"""Where a run reports: stdout lines, ``<workdir>/metrics.jsonl``, TensorBoard, a progress bar.

Only process 0 writes (``enabled=False`` elsewhere), so a multi-host run logs once.

A resumed run redoes the steps after its last checkpoint, so on start-up the lines a killed
run wrote after that step are dropped from ``metrics.jsonl`` (and TensorBoard is told to purge
them): the log of a resumed run reads like the log of an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import tqdm


class RunLog:
  """Appends JSON lines and TensorBoard scalars; owns the tqdm bar of the current epoch."""

  def __init__(self, workdir: str, *, enabled: bool = True, start_step: int = 0):
    """Opens the logs of ``workdir``; the run (re)starts after ``start_step``."""
    self.enabled = enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._bar = None
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      self._drop_after(start_step)
      from tensorboardX import SummaryWriter  # Writes event files without TensorFlow.
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'), purge_step=start_step + 1)

  def _drop_after(self, step: int) -> None:
    """Keeps the lines up to ``step`` (and drops a line cut short by a kill)."""
    if not os.path.exists(self.path):
      return
    keep = []
    with open(self.path) as f:
      for line in f:
        try:
          if json.loads(line)['step'] <= step:
            keep.append(line if line.endswith('\n') else line + '\n')
        except (ValueError, KeyError, TypeError):
          continue
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      f.writelines(keep)
    os.replace(tmp, self.path)  # Atomic: a kill here leaves the old or the new file.

  def info(self, msg: str) -> None:
    if self.enabled:
      (self._bar.write if self._bar is not None else print)(msg)
      sys.stdout.flush()

  def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
    """One JSON line ``{"step", "split", "time", **metrics}`` and the scalar leaves to TB."""
    if not self.enabled:
      return
    with open(self.path, 'a') as f:
      f.write(json.dumps({'step': int(step), 'split': split, 'time': time.time(), **metrics})
              + '\n')
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

  def close(self) -> None:
    self.progress_close()
    if self._tb is not None:
      self._tb.close()
