"""Where a run reports: stdout lines, ``<workdir>/metrics.jsonl``, TensorBoard, a progress bar.

Only process 0 writes (``enabled=False`` elsewhere), so a multi-host run logs once.
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

  def __init__(self, workdir: str, *, enabled: bool = True):
    self.enabled = enabled
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._bar = None
    self._tb = None
    if enabled:
      os.makedirs(workdir, exist_ok=True)
      from tensorboardX import SummaryWriter  # Writes event files without TensorFlow.
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))

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
