"""What ``train.py`` and ``eval.py`` share: multi-host start-up and one-line user errors."""

from __future__ import annotations

import os
import sys
from typing import Callable

from absl import flags
from absl import logging

from mfp_jax import checkpoints
from mfp_jax import config_lib
from mfp_jax import data

USER_ERRORS = (config_lib.ConfigError, checkpoints.CheckpointError, data.DataNotFoundError)

flags.DEFINE_string('coordinator_address', os.environ.get('MFP_COORDINATOR_ADDRESS'),
                    'host:port of process 0 for a multi-host run (env MFP_COORDINATOR_ADDRESS)')
flags.DEFINE_integer('num_processes', int(os.environ.get('MFP_NUM_PROCESSES', '1')),
                     'processes in a multi-host run (env MFP_NUM_PROCESSES)')
flags.DEFINE_integer('process_id', int(os.environ.get('MFP_PROCESS_ID', '0')),
                     'this process in a multi-host run (env MFP_PROCESS_ID)')
flags.DEFINE_bool('distributed', False,
                  'call jax.distributed.initialize() with no arguments: TPU VMs, SLURM and '
                  'Open MPI jobs are auto-detected')
flags.DEFINE_integer('heartbeat_timeout_s', 100,
                     'multi-host: seconds before a process gives up on a dead peer')


def maybe_initialize_distributed() -> None:
  """Joins a multi-host run if asked to; a single process needs nothing. Call before any
  other JAX call."""
  f = flags.FLAGS
  if not (f.distributed or f.coordinator_address):
    return
  import jax
  if f.coordinator_address:
    # CPU processes need an explicit collectives backend to talk to each other.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
    jax.distributed.initialize(coordinator_address=f.coordinator_address,
                               num_processes=f.num_processes, process_id=f.process_id,
                               heartbeat_timeout_seconds=f.heartbeat_timeout_s)
  else:
    jax.distributed.initialize()


def run_or_exit(fn: Callable[[], object]) -> object:
  """Runs ``fn``; a user error (bad config, missing data, foreign checkpoint) becomes one
  line on stderr and exit status 2, not a traceback."""
  # Orbax logs every save step at INFO; keep the console to our own lines unless asked.
  if not flags.FLAGS['verbosity'].present:
    logging.set_verbosity(logging.WARNING)
  try:
    return fn()
  except USER_ERRORS as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
