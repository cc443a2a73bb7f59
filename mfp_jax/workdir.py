"""The run directory: one training process at a time, and one line when it cannot be written.

  with workdir.lock(path, enabled=jax.process_index() == 0):
    ...  # open the checkpoint managers, train

Orbax has no lock of its own: two runs on one ``--workdir`` delete each other's saves in
flight. :func:`lock` takes an exclusive ``flock`` on ``<workdir>/.lock`` and writes the holder
(PID, host, start time, command) into it, so the second run stops at once with a line that
names the first. ``flock`` belongs to the open file, so the kernel drops it when the holder
dies, even by SIGKILL: a ``.lock`` left behind by a dead process is not a lock.

Multi-host: only process 0 takes it (``enabled=jax.process_index() == 0``); the other
processes of the same run write nothing that could collide, and on a shared file system
they would otherwise lock each other out.

This module uses the standard library only (no JAX), so it can be loaded on its own.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shlex
import shutil
import socket
import sys
import time
from typing import Callable, Iterator

LOCK_NAME = '.lock'

# Releases of the locks this process holds now, for release_all().
_HELD: list[Callable[[], None]] = []

# errno values that mean "this file system will not take the write": full, over quota,
# read-only; and, for a write we know is one, not ours.
WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)
DENIED_ERRNOS = (errno.EACCES, errno.EPERM)
# TensorStore (Orbax's array writer) reports the errno in its message text only.
_TS_ERRNO = re.compile(r"os_error_code='(\d+)'")
_TS_PATH = re.compile(r'"(/[^"]+)"')


class WorkdirBusyError(RuntimeError):
  """Another live process holds the run directory; the message names it."""


class WorkdirWriteError(RuntimeError):
  """The run directory cannot be written (disk full, over quota, read-only); one line."""


# --- Write failures ------------------------------------------------------------------------


def _size(n: float) -> str:
  for unit in ('B', 'KiB', 'MiB', 'GiB', 'TiB'):
    if n < 1024 or unit == 'TiB':
      return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
    n /= 1024
  raise AssertionError('unreachable')


def _free_space(path: str) -> str:
  """``'224 KiB free of 3.0 MiB'`` for the file system holding ``path`` (or its parent)."""
  p = os.path.abspath(path)
  while not os.path.exists(p) and os.path.dirname(p) != p:
    p = os.path.dirname(p)
  try:
    u = shutil.disk_usage(p)
  except OSError:
    return 'free space unknown'
  return f'{_size(u.free)} free of {_size(u.total)}'


def write_error(path: str, code: int) -> WorkdirWriteError:
  """The one-line error for a write to ``path`` that failed with errno ``code``."""
  path = os.path.abspath(path)
  if code in (errno.ENOSPC, errno.EDQUOT):
    what = 'no space left on device' if code == errno.ENOSPC else 'disk quota exceeded'
    return WorkdirWriteError(
        f'{what} writing {path} ({_free_space(path)}); everything written before it is '
        f'intact: free some space (or use another --workdir) and rerun the same command, '
        f'which resumes from the last complete checkpoint')
  reason = os.strerror(code).lower()
  return WorkdirWriteError(
      f'cannot write {path}: {reason}; nothing was changed: make the run directory '
      f'writable (or copy it elsewhere and pass that as --workdir) and rerun the same command')


def as_write_error(exc: BaseException, path: str | None = None) -> WorkdirWriteError | None:
  """``exc`` as a :class:`WorkdirWriteError` if it (or its cause) is a refused write.

  Recognizes ``OSError`` with an errno in :data:`WRITE_ERRNOS` and TensorStore's errors,
  which carry the errno only as ``[os_error_code='28']`` in their text. With ``path`` (the
  caller was writing) also :data:`DENIED_ERRNOS`: without it, a denied read would read as a
  denied write.

  Args:
    exc: any exception.
    path: the file or directory being written, if the caller knows it better than the error.

  Returns:
    the error to raise instead, or None when ``exc`` is something else.
  """
  codes = WRITE_ERRNOS + (DENIED_ERRNOS if path else ())
  seen = set()
  e: BaseException | None = exc
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, WorkdirWriteError):
      return e
    if isinstance(e, OSError) and e.errno in codes:
      return write_error(path or e.filename or os.getcwd(), e.errno)
    text = str(e)
    m = _TS_ERRNO.search(text)
    if m and int(m.group(1)) in codes:
      where = path or (_TS_PATH.search(text) or [None, os.getcwd()])[1]
      return write_error(where, int(m.group(1)))
    e = e.__cause__ or e.__context__
  return None


# --- The lock ------------------------------------------------------------------------------


def _make_dirs(path: str) -> str | None:
  """Creates ``path`` and missing parents; returns the topmost one created (or None)."""
  path = os.path.abspath(path)
  top, p = None, path
  while not os.path.isdir(p):
    top, p = p, os.path.dirname(p)
  try:
    os.makedirs(path, exist_ok=True)
  except (FileExistsError, NotADirectoryError):
    raise WorkdirWriteError(f'{path} (or a parent) is a file, not a directory; pass a '
                            f'directory as --workdir') from None
  except OSError as e:
    raise as_write_error(e, path) or e
  return top


def _describe_holder(workdir: str, text: str) -> str:
  try:
    h = json.loads(text)
    pid, host, cmd, started = h['pid'], h['host'], h['command'], h['started']
  except (ValueError, KeyError, TypeError):
    # The holder has opened the file but not written it yet (a moment at start-up).
    return f'{workdir} is in use by another process that is just starting'
  where = '' if host == socket.gethostname() else f' on {host}'
  cmd = ' '.join(str(cmd).split())  # one line, whatever the holder's argv held
  # Long paths would push the flags, the part that tells two runs apart, out of a cut at the end.
  cmd = cmd if len(cmd) <= 200 else cmd[:80] + ' ... ' + cmd[-115:]
  return f'{workdir} is in use by PID {pid}{where} ({cmd}), started {started}'


def _holder_text(fd: int, wait_s: float = 1.0) -> str:
  """The holder's line in the lock file; a holder that has just taken the lock writes it a
  moment later, so wait up to ``wait_s`` for a complete line."""
  deadline = time.monotonic() + wait_s
  while True:
    text = os.pread(fd, 4096, 0).decode('utf-8', 'replace')
    if text.endswith('\n') or time.monotonic() > deadline:
      return text
    time.sleep(0.02)


def _open_locked(path: str) -> int:
  """Opens ``path`` and takes its exclusive lock; raises WorkdirBusyError if held."""
  for _ in range(10):
    try:
      fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
      raise as_write_error(e, path) or e
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      text = _holder_text(fd)
      os.close(fd)
      raise WorkdirBusyError(
          f'{_describe_holder(os.path.dirname(path), text)}; wait for it to finish or use '
          f'another --workdir') from None
    # A holder that was releasing may have unlinked the file we opened: our lock would then
    # be on a name nobody else sees. Only a lock on the file at ``path`` counts.
    try:
      if os.stat(path).st_ino == os.fstat(fd).st_ino:
        return fd
    except FileNotFoundError:
      pass
    os.close(fd)
  raise WorkdirBusyError(f'{os.path.dirname(path)}: cannot take {LOCK_NAME}: other processes '
                         f'keep replacing it; use another --workdir')


def _prune_empty(workdir: str, top: str) -> None:
  """Removes the empty directories inside ``workdir``, then ``workdir`` and its parents up
  to ``top`` while they are empty. Never a file, and nothing outside the path to ``top``."""
  workdir = os.path.abspath(workdir)
  for root, _, files in os.walk(workdir, topdown=False):
    if not files:
      with contextlib.suppress(OSError):
        os.rmdir(root)  # fails, harmlessly, while a subdirectory is still there
  p = os.path.dirname(workdir)
  while len(p) >= len(top) and p.startswith(top):
    with contextlib.suppress(OSError):
      os.rmdir(p)
    p = os.path.dirname(p)


@contextlib.contextmanager
def lock(workdir: str, *, enabled: bool = True) -> Iterator[None]:
  """Holds ``workdir`` for this process (creating it if needed) until the block ends.

  Args:
    workdir: the run directory.
    enabled: False takes nothing (and creates nothing): the other processes of a multi-host
      run pass ``jax.process_index() == 0``.

  Raises:
    WorkdirBusyError: another live process holds it; the message names its PID, command
      and start time.
    WorkdirWriteError: the directory or its lock file cannot be created (read-only, full).
  """
  if not enabled:
    yield
    return
  created = _make_dirs(workdir)
  path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
  try:
    fd = _open_locked(path)
  except WorkdirBusyError:
    raise  # The holder's run lives here (maybe in directories it just made): leave them.
  except BaseException:
    if created:
      _prune_empty(workdir, created)
    raise
  done = []

  def release():
    if done:  # Once: from the block's end, or from release_all() in a signal handler.
      return
    done.append(True)
    with contextlib.suppress(OSError):
      os.unlink(path)  # Still holding the lock: nobody can take it from under us.
    with contextlib.suppress(OSError):
      os.close(fd)
    if created:  # A run stopped before it wrote anything leaves no empty directories.
      _prune_empty(workdir, created)

  _HELD.append(release)
  try:
    holder = {'pid': os.getpid(), 'host': socket.gethostname(),
              'started': time.strftime('%Y-%m-%d %H:%M:%S'),
              'command': shlex.join(getattr(sys, 'orig_argv', sys.argv))}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(holder) + '\n').encode(), 0)
    yield
  finally:
    with contextlib.suppress(ValueError):
      _HELD.remove(release)
    release()


def release_all() -> None:
  """Releases every lock this process holds, as their blocks' ends would.

  For a process about to ``os._exit`` (train.py's first-line signal handler), which skips
  the ``finally`` blocks: the kernel would drop the locks anyway, but the lock files and the
  empty directories would stay.
  """
  while _HELD:
    _HELD.pop()()


def holder(workdir: str) -> str | None:
  """Who holds ``workdir`` now (the busy message), or None if nobody does. Writes nothing."""
  path = os.path.join(os.path.abspath(workdir), LOCK_NAME)
  try:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
  except OSError:
    return None
  try:
    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
  except BlockingIOError:
    return _describe_holder(os.path.abspath(workdir), os.pread(fd, 4096, 0).decode(
        'utf-8', 'replace'))
  else:
    return None
  finally:
    os.close(fd)
