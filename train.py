"""Trains an MFP-QSNN.

  python train.py --config configs/digits.py --workdir runs/digits
  python train.py --config configs/cifar10.py --config.num_epochs=5 --workdir runs/c10

A rerun with the same --workdir resumes from its last complete checkpoint. SIGTERM/SIGINT save
a checkpoint and exit with status 3. Multi-host: add --coordinator_address/--num_processes/
--process_id, or --distributed on a TPU VM or SLURM. Exit codes: see mfp_jax/cli.py.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from mfp_jax import cli

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
