"""Evaluates a trained MFP-QSNN three ways and reports what it costs.

  python eval.py --config configs/digits.py --workdir runs/digits             # best checkpoint
  python eval.py --config configs/digits.py --workdir runs/digits --checkpoint=latest --plots
  python eval.py --config configs/cifar10.py --workdir runs/c10 --report_only  # no data needed

Prints the test accuracy of the parallel (training) form, the exact serial form on integer
spike counts with folded thresholds, and the paper's Eq. 9 thresholds, with how often their
predictions and spikes agree with the parallel form; then the cost table (parameters, MACs,
bits, deployable bytes, S-ACE / NS-ACE). Writes <workdir>/eval.json and <workdir>/report.json,
and with --plots PNGs into <workdir>.
"""

from absl import app
from absl import flags
from ml_collections import config_flags

from mfp_jax import cli

config_flags.DEFINE_config_file('config', None, 'experiment config file', lock_config=True)
flags.DEFINE_string('workdir', None, 'run directory (checkpoints, metrics.jsonl; outputs)')
flags.DEFINE_enum('checkpoint', 'best', ['best', 'latest'], 'which checkpoint to evaluate')
flags.DEFINE_bool('report_only', False,
                  'only the cost report, from the config alone (no checkpoint, no data)')
flags.DEFINE_bool('plots', False, 'also write PNG plots into --workdir')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  cli.maybe_initialize_distributed()
  from mfp_jax import eval_lib  # Imported after distributed start-up, which must come first.

  f = flags.FLAGS
  if f.report_only:
    cli.run_or_exit(lambda: eval_lib.report_only(f.config, f.workdir))
  else:
    cli.run_or_exit(lambda: eval_lib.evaluate_run(f.config, f.workdir, checkpoint=f.checkpoint,
                                                  write_plots=f.plots))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
