"""Trains an MFP-QSNN.

  python train.py --config configs/digits.py --workdir runs/digits
  python train.py --config configs/cifar10.py --config.num_epochs=5 --workdir runs/c10

A rerun with the same --workdir resumes from its last checkpoint.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from mfp_jax import cli

config_flags.DEFINE_config_file('config', None, 'experiment config file', lock_config=True)
flags.DEFINE_string('workdir', None, 'directory for checkpoints and logs')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  cli.maybe_initialize_distributed()
  from mfp_jax import train_lib  # Imported after distributed start-up, which must come first.

  result = cli.run_or_exit(
      lambda: train_lib.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)).metrics
  import jax
  if jax.process_index() == 0:
    print(f'final test accuracy: {result["accuracy"]:.4f} (best {result["best_accuracy"]:.4f}, '
          f'step {result["step"]}, {result["wall_s"]:.1f} s)', flush=True)


if __name__ == '__main__':
  app.run(main)
