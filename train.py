"""Trains an MFP-QSNN.

  python train.py --config configs/digits.py --workdir runs/digits
  python train.py --config configs/cifar10.py --config.num_epochs=5 --workdir runs/c10

A rerun with the same --workdir resumes from its last complete checkpoint. SIGTERM/SIGINT save
a checkpoint and exit with status 3. Multi-host: add --coordinator_address/--num_processes/
--process_id, or --distributed on a TPU VM or SLURM. Exit codes: see mfp_jax/cli.py.
"""

import os
import signal
import sys


def _stop_at_once(signum, frame):
  """SIGTERM/SIGINT before training started: nothing is saved yet, so exit 3 now."""
  del frame
  name = signal.Signals(signum).name
  print(f'stopped: {name} before training started; nothing to save', flush=True)
  sys.stderr.flush()
  workdir = sys.modules.get('mfp_jax.workdir')
  if workdir is not None:  # Set-up had locked the workdir: leave no lock or empty dirs.
    workdir.release_all()
  os._exit(3)  # cli.EXIT_PREEMPTED, without importing it (that takes seconds).


_stop_at_once.before_training = True  # resilience.StopRequest hands over after its loop.

if __name__ == '__main__':  # First, before the imports that take seconds (JAX, Orbax).
  signal.signal(signal.SIGTERM, _stop_at_once)
  signal.signal(signal.SIGINT, _stop_at_once)

from mfp_jax import runtime  # noqa: E402  (imports JAX, computes nothing)

RUNTIME = runtime.configure()  # malloc and XLA:CPU flags, before JAX's backend starts

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mfp_jax import cli  # noqa: E402

config_flags.DEFINE_config_file('config', None, 'experiment config file', lock_config=True)
flags.DEFINE_string('workdir', None, 'directory for checkpoints and logs')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    cli.fail(f'error: unexpected arguments: {" ".join(argv[1:])} (flags are --name=value)')
  cli.maybe_initialize_distributed()  # Before anything touches a JAX backend.
  from mfp_jax import train_lib

  result = cli.run_or_exit(
      lambda: train_lib.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)).metrics
  import jax
  if jax.process_index() == 0:  # Global numbers: every process evaluated its shard.
    best = result['best_accuracy']
    best = f'best {best:.4f}' if best >= 0 else 'no epoch finished yet'
    print(f'final test accuracy: {result["accuracy"]:.4f} on {result["count"]} examples '
          f'({best}, step {result["step"]}, {result["wall_s"]:.1f} s)', flush=True)


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
