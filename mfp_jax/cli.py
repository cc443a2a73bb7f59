"""What ``train.py`` and ``eval.py`` share: flag parsing, multi-host start-up, exit codes.

  app.run(main, flags_parser=cli.parse_flags)   # bad flags -> one line, exit 2
  def main(argv):
    cli.maybe_initialize_distributed()          # first: before any other JAX call
    cli.run_or_exit(lambda: ...)                # known failures -> one line + exit code

Exit codes:
  0  done.
  1  an unexpected error (a Python traceback: a bug, please report it).
  2  bad input: flags, a config file or field, missing data, an unusable checkpoint, a workdir
     that another process holds or that cannot be written (disk full, read-only).
  3  stopped by SIGTERM/SIGINT (preemption, Ctrl-C). In the training loop: after saving a
     checkpoint; rerun the same command to resume. Before it (imports, set-up) and in
     eval.py: at once, with nothing to save. After it: once the saves in flight are written.
  4  non-finite loss, gradient or weights with ``config.nan_policy = 'stop'``; nothing
     non-finite was saved; the message names the step and the last good checkpoint.
  5  multi-host failure: could not join the run, or a collective failed (usually another
     process died; see its log).
"""

from __future__ import annotations

import difflib
import os
import re
import socket
import sys
import time
import traceback
import types
from typing import Callable, NoReturn, Sequence

from absl import flags
from absl import logging
import ml_collections
from ml_collections import config_flags

from mfp_jax import checkpoints
from mfp_jax import config_lib
from mfp_jax import data
from mfp_jax import resilience
from mfp_jax import workdir

EXIT_OK, EXIT_CRASH, EXIT_USAGE, EXIT_PREEMPTED, EXIT_NONFINITE, EXIT_DISTRIBUTED = range(6)


class ConfigFileError(ValueError):
  """A ``--config`` file cannot be loaded; one line naming the file and why."""


USER_ERRORS = (config_lib.ConfigError, checkpoints.CheckpointError, data.DataNotFoundError,
               workdir.WorkdirBusyError, workdir.WorkdirWriteError, ConfigFileError)

flags.DEFINE_string('coordinator_address', os.environ.get('MFP_COORDINATOR_ADDRESS'),
                    'host:port of process 0 for a multi-host run (env MFP_COORDINATOR_ADDRESS)')
flags.DEFINE_integer('num_processes', int(os.environ.get('MFP_NUM_PROCESSES', '1')),
                     'processes in a multi-host run (env MFP_NUM_PROCESSES)')
flags.DEFINE_integer('process_id', int(os.environ.get('MFP_PROCESS_ID', '0')),
                     'this process in a multi-host run, 0..num_processes-1 (env MFP_PROCESS_ID)')
flags.DEFINE_bool('distributed', False,
                  'call jax.distributed.initialize() with no arguments: TPU VMs, SLURM and '
                  'Open MPI jobs are auto-detected')
flags.DEFINE_integer('heartbeat_timeout_s', 100,
                     'multi-host: seconds before the others give up on a silent (dead) process')
flags.DEFINE_integer('distributed_init_timeout_s', 300,
                     'multi-host: seconds to wait for every process to join at start-up')


def fail(msg: str, code: int = EXIT_USAGE) -> NoReturn:
  """Prints ``msg`` (one line, starting ``error:``) on stderr and exits with ``code``."""
  print(msg, file=sys.stderr, flush=True)
  sys.exit(code)


def _quiet_library_logs() -> None:
  # Orbax logs every save and jax.distributed every connection at INFO; keep the console to
  # our own lines unless --verbosity asks for more.
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)


# --- Flags ---------------------------------------------------------------------------------


def _unknown_field(err: Exception, argv: Sequence[str],
                   configs: dict[str, ml_collections.ConfigDict]) -> str | None:
  """``--config.model.widht=3`` -> a line naming the field and the allowed ones, or None.

  ``configs``: flag name -> the config its file gave (the fields listed are that config's).
  """
  # ml_collections wraps a KeyError (whose str() adds quotes) in an AttributeError: unwrap
  # to the plain message, "'widht'" or "'widht'\nDid you mean ...".
  while err.args and isinstance(err.args[0], Exception):
    err = err.args[0]
  m = re.search(r"'([A-Za-z0-9_]+)'", str(err.args[0]) if err.args else str(err))
  if not m:
    return None
  key = m.group(1)
  for arg in argv[1:]:
    name = arg.lstrip('-').split('=', 1)[0]
    root, *path = name.split('.')
    if not arg.startswith('-') or not path or key not in path:
      continue
    parent = path[:path.index(key)]
    node = configs.get(root) or config_lib.base_config()
    for p in parent:
      node = node.get(p) if isinstance(node, ml_collections.ConfigDict) else None
    if not isinstance(node, ml_collections.ConfigDict):
      return f'--{name}: no such config field'
    fields = sorted(node.keys())
    close = difflib.get_close_matches(key, fields, n=1)
    hint = f' (did you mean {close[0]!r}?)' if close else ''
    where = '.'.join([root] + parent)
    return (f'--{name}: {where} has no field {key!r}{hint}; its fields are: '
            f'{", ".join(fields)}')
  return None


def _where(e: BaseException, path: str) -> str:
  """`` (line N)`` of the innermost frame of ``e``'s traceback in the file ``path``."""
  lines = [f.lineno for f in traceback.extract_tb(e.__traceback__)
           if os.path.abspath(f.filename) == os.path.abspath(path)]
  return f' (line {lines[-1]})' if lines else ''


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Runs ``get_config()`` of a config file, as ``--config=<path>[:<arg>]`` would.

  Raises:
    ConfigFileError: ``cannot load the config file <path>: <reason>``: the file is missing
      or unreadable, does not compile, raises, has no ``get_config``, or that returns
      something other than a ConfigDict.
  """
  path, *arg = spec.split(':', 1)
  error = lambda reason: ConfigFileError(f'cannot load the config file {path}: {reason}')
  try:
    with open(path, 'rb') as f:
      code = compile(f.read(), path, 'exec')
  except OSError as e:
    raise error(e.strerror or str(e)) from None
  except SyntaxError as e:
    raise error(f'SyntaxError: {e.msg} (line {e.lineno})') from None
  # Registered while it runs, as an import would be (dataclasses look their module up there).
  name = f'_mfp_config_{os.path.splitext(os.path.basename(path))[0]}'
  module = sys.modules[name] = types.ModuleType(name)
  module.__file__ = path
  try:
    exec(code, module.__dict__)  # pylint: disable=exec-used
    get_config = module.__dict__.get('get_config')
    if not callable(get_config):
      raise error('it defines no get_config() function')
    config = get_config(*arg)
  except ConfigFileError:
    raise
  except Exception as e:  # pylint: disable=broad-except  # the user's code: anything
    first = (str(e).strip().splitlines() or [''])[0][:200]
    raise error(f'{type(e).__name__}: {first}{_where(e, path)}') from None
  finally:
    sys.modules.pop(name, None)
  if not isinstance(config, ml_collections.ConfigDict):
    raise error(f'get_config() returned {type(config).__name__}, not an '
                f'ml_collections.ConfigDict')
  return config


def _is_config_flag(flag: flags.Flag) -> bool:
  try:
    config_flags.get_config_filename(flag)
  except TypeError:  # not a config flag
    return False
  except flags.Error:  # a config flag, not parsed yet
    pass
  return True


def _config_file_specs(argv: Sequence[str]) -> dict[str, str]:
  """Flag name -> value of every config-file flag in ``argv`` (``--config=x``, ``--config x``)."""
  names = [n for n in flags.FLAGS if _is_config_flag(flags.FLAGS[n])]
  specs = {}
  for i, arg in enumerate(argv[1:], 1):
    m = re.fullmatch(r'--?([A-Za-z0-9_]+)(?:=(.*))?', arg, re.S)
    if m and m.group(1) in names:
      value = m.group(2) if m.group(2) is not None else (argv[i + 1] if i + 1 < len(argv)
                                                          else None)
      if value is not None:
        specs[m.group(1)] = value  # The last one wins, as for any absl flag.
  return specs


def parse_flags(argv: list[str]) -> list[str]:
  """absl flags parser (``app.run(main, flags_parser=parse_flags)``).

  Bad flags, a misspelt ``--config.x.y`` override and a config file that cannot be loaded
  each become one ``error:`` line and exit status 2, instead of absl's ``FATAL`` text or a
  traceback. The config file is loaded and checked here first (``config_flags`` would defer
  or wrap its errors), then parsed by ``config_flags`` with its overrides.
  """
  configs: dict[str, ml_collections.ConfigDict] = {}
  try:
    argv = flags.FLAGS.read_flags_from_files(argv, force_gnu=False)
    for name, spec in _config_file_specs(argv).items():
      configs[name] = load_config_file(spec)
    rest = flags.FLAGS(argv)
    _quiet_library_logs()
    for name in flags.FLAGS:
      flag = flags.FLAGS[name]
      # config_flags keeps a load error until the config is used; the check above makes one
      # unlikely (the file would have to change in between), this makes it impossible.
      if _is_config_flag(flag) and flag.value is not None and not isinstance(
          flag.value, ml_collections.ConfigDict):
        raise ConfigFileError(f'cannot load the config file '
                              f'{config_flags.get_config_filename(flag)}: it changed while '
                              f'being read')
    return rest
  except ConfigFileError as e:
    fail(f'error: {e}', EXIT_USAGE)
  except flags.Error as e:
    msg = str(e).strip().splitlines()[0]
  except (AttributeError, KeyError) as e:  # ml_collections: an override names no field
    msg = _unknown_field(e, argv, configs)
    if msg is None:
      raise
  except OSError as e:  # config_flags: the config file vanished after the check
    msg = f'cannot load the config file: {str(e).strip().splitlines()[-1].strip()}'
  fail(f'error: {msg} (see --helpshort)', EXIT_USAGE)


# --- Multi-host ----------------------------------------------------------------------------


def _wait_for_coordinator(address: str, timeout_s: float) -> None:
  """Waits until ``host:port`` accepts TCP connections; exits with status 5 if it never does."""
  host, _, port = address.rpartition(':')
  host = host.strip('[]')
  if not host or not port.isdigit():
    fail(f'error: --coordinator_address must be host:port, got {address!r}', EXIT_USAGE)
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      socket.create_connection((host, int(port)), timeout=2).close()
      return
    except OSError as e:
      if time.monotonic() > deadline:
        fail(f'error: cannot reach the coordinator (process 0) at {address} within '
              f'{timeout_s} s ({e}); is it running, and is the address right?', EXIT_DISTRIBUTED)
      time.sleep(0.5)


def maybe_initialize_distributed() -> None:
  """Joins a multi-host run if asked to; a single process needs nothing.

  Call it before any other JAX call (JAX refuses to start the distributed runtime once a
  backend exists). ``--coordinator_address`` (+ ``--num_processes``, ``--process_id``) names
  the run explicitly; ``--distributed`` lets JAX detect it (TPU VM metadata, SLURM, Open MPI).
  """
  f = flags.FLAGS
  if not (f.distributed or f.coordinator_address):
    if f.num_processes != 1 or f.process_id != 0:
      fail('error: --num_processes/--process_id need --coordinator_address (or '
            '--distributed)', EXIT_USAGE)
    return
  kw = {}
  if f.coordinator_address:
    if f.num_processes < 1 or not 0 <= f.process_id < f.num_processes:
      fail(f'error: --process_id must be in [0, --num_processes) and --num_processes >= 1; '
            f'got process_id {f.process_id}, num_processes {f.num_processes}', EXIT_USAGE)
    kw = dict(coordinator_address=f.coordinator_address, num_processes=f.num_processes,
              process_id=f.process_id)
    if f.process_id != 0:
      # JAX aborts the process (a native stack trace) when it cannot reach the coordinator;
      # check first, so a wrong address or a coordinator that never started is one line.
      _wait_for_coordinator(f.coordinator_address, f.distributed_init_timeout_s)
  import jax
  # CPU processes need an explicit collectives backend to talk to each other; GPU/TPU
  # backends ignore this setting.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  try:
    jax.distributed.initialize(**kw, heartbeat_timeout_seconds=f.heartbeat_timeout_s,
                               shutdown_timeout_seconds=f.heartbeat_timeout_s,
                               initialization_timeout=f.distributed_init_timeout_s)
  except (ValueError, RuntimeError) as e:
    where = (f'at {f.coordinator_address} as process {f.process_id} of {f.num_processes}'
             if kw else 'with --distributed (auto-detected cluster)')
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    hint = ('' if kw else '; outside a TPU VM/SLURM/Open MPI job give --coordinator_address, '
            '--num_processes and --process_id')
    fail(f'error: cannot join the multi-host run {where}: {first[:300]}{hint}',
          EXIT_DISTRIBUTED)


# --- Running -------------------------------------------------------------------------------


def run_or_exit(fn: Callable[[], object]) -> object:
  """Runs ``fn``; known failures become one line on stderr and an exit code (module doc).

  In a multi-host run an unexpected error (typically a collective failing because another
  process died) prints its traceback, then one line, and leaves at once with status 5:
  the normal exit would wait at JAX's shutdown barrier for the dead process.
  """
  _quiet_library_logs()
  import jax
  try:
    return fn()
  except USER_ERRORS as e:
    fail(f'error: {e}', EXIT_USAGE)
  except resilience.NonFiniteError as e:
    fail(f'error: {e}', EXIT_NONFINITE)
  except resilience.Preempted as e:
    if jax.process_index() == 0:
      print(f'stopped: {e}', flush=True)
    sys.exit(EXIT_PREEMPTED)
  except Exception as e:  # pylint: disable=broad-except
    # A write the file system refuses anywhere (eval.json, a plot): one line, not a traceback.
    if (write := workdir.as_write_error(e)) is not None:
      fail(f'error: {write}', EXIT_USAGE)
    if jax.process_count() == 1:
      raise
    if not isinstance(e, jax.errors.JaxRuntimeError):  # Ours, not the runtime's: show where.
      traceback.print_exc()
    first = (str(e).strip().splitlines() or [''])[0][:300]
    print(f'error: process {jax.process_index()} of {jax.process_count()} failed: '
          f'{type(e).__name__}: {first} (if another process died, see its log)',
          file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(EXIT_DISTRIBUTED)
