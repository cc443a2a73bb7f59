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

import os
import signal
import sys


def _stop_at_once(signum, frame):
  """SIGTERM/SIGINT: eval.py writes its files only at the end, so exit 3 now."""
  del frame
  name = signal.Signals(signum).name
  print(f'stopped: {name} before the evaluation ended; nothing to save', flush=True)
  sys.stderr.flush()
  workdir = sys.modules.get('mfp_jax.workdir')
  if workdir is not None:  # Set-up had locked the workdir: leave no lock or empty dirs.
    workdir.release_all()
  os._exit(3)  # cli.EXIT_PREEMPTED, without importing it (that takes seconds).


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
flags.DEFINE_string('workdir', None, 'run directory (checkpoints, metrics.jsonl; outputs)')
flags.DEFINE_enum('checkpoint', 'best', ['best', 'latest'], 'which checkpoint to evaluate')
flags.DEFINE_bool('report_only', False,
                  'only the cost report, from the config alone (no checkpoint, no data)')
flags.DEFINE_bool('plots', False, 'also write PNG plots into --workdir')
flags.DEFINE_string('out_dir', None, 'where eval.json, report.json and the plots go (default: '
                    '--workdir); give another directory to evaluate next to a live run')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  cli.maybe_initialize_distributed()
  from mfp_jax import eval_lib  # Imported after distributed start-up, which must come first.

  f = flags.FLAGS
  if f.report_only:
    cli.run_or_exit(lambda: eval_lib.report_only(f.config, f.out_dir or f.workdir))
  else:
    cli.run_or_exit(lambda: eval_lib.evaluate_run(f.config, f.workdir, checkpoint=f.checkpoint,
                                                  write_plots=f.plots, out_dir=f.out_dir))


if __name__ == '__main__':
  app.run(main, flags_parser=cli.parse_flags)
