"""Embedded default: scikit-learn's 8x8 digits, a small 1-bit conv MFP-QSNN, T = 4, CPU.

  python train.py --config configs/digits.py --workdir runs/digits

No download: the data ship inside scikit-learn. About 60 s on 2 CPU cores; ~99.3% test
accuracy (mean of 3 seeds, README "Results").
"""

from mfp_jax import config_lib


def get_config():
  c = config_lib.base_config()
  c.num_epochs = 30
  c.log_every_steps = 10
  # 1-bit hidden weights (QuantSpec's default), full-precision first conv and classifier.
  c.model = config_lib.model_config('digits_cnn', T=4, channels=(32, 64, 128))
  c.data = config_lib.data_config('digits', batch_size=64)
  c.optim = config_lib.optim_config('adamw', learning_rate=3e-3, weight_decay=1e-4,
                                    warmup_epochs=1.0)
  return c
