"""Embedded default: scikit-learn's 8x8 digits, a small 1-bit conv MFP-QSNN, T = 4, CPU.

  python train.py --config configs/digits.py --workdir runs/digits

No download: the data ship inside scikit-learn.
"""

from mfp_jax import config_lib


def get_config():
  c = config_lib.base_config()
  c.seed = 0
  c.num_epochs = 30
  c.log_every_steps = 10
  c.model.name = 'digits_cnn'
  c.model.T = 4
  c.model.channels = (32, 64, 128)
  c.model.weight_bits = 1
  c.model.first_last_bits = 32
  c.data.name = 'digits'
  c.data.batch_size = 64
  c.optim.name = 'adamw'
  c.optim.learning_rate = 3e-3
  c.optim.weight_decay = 1e-4
  c.optim.warmup_epochs = 1.0
  c.loss.name = 'per_step_ce'
  return c
