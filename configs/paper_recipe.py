"""The training recipe of the MFP-QSNN paper's lineage, shared by the paper configs.

Sources: the MFP-QSNN paper (Table I: 1-bit weights "through Wei et al. [21]", T per data set)
and the Q-SNN reference code (Wenjie-Wei/Q-SNN, `main_training_parallel.py`,
`models/quant_function.py`), whose defaults are used for every data set there. Settings equal
to mfp_jax's defaults are not repeated: SGD with lr 0.1, momentum 0.9 and weight decay 1e-4 on
conv/linear weights only (`split_weights`), cosine to 0 over all epochs, no warmup; batch 64;
per-step cross-entropy (the TET form without its MSE term); the annealed estimator's
sharpness t log-uniform from 0.1 to 10 (`Log_UP`; Q-SNN steps t once per epoch, here it moves
every step along the same curve); eval batch 256.
"""

from mfp_jax import config_lib
from mfp_jax.layers import NeuronSpec, QuantSpec


def recipe_config(model: str, T: int, data: str, **data_fields):
  """The recipe for ``model`` at ``T`` steps on ``data`` (with the loader's ``data_fields``)."""
  c = config_lib.base_config()
  c.seed = 3407                     # Q-SNN main_training_parallel.py --seed default
  c.num_epochs = 300                # Q-SNN --epochs default
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000   # a preempted run loses at most this many steps
  c.model = config_lib.model_config(
      model, T=T,
      # Hidden convs (incl. 1x1 shortcuts): 1-bit, standardized, power-of-two scale, the
      # annealed tanh estimator (Q-SNN quant_function.py).
      quant=QuantSpec(bits=1, scale='pow2', estimator='annealed'),
      edge_quant=QuantSpec(bits=8),  # Table I's "1/-": first conv and classifier at 8 bits
      # vth 1 and tau 0.5: the Q-SNN LIF that MFP replaces (tau only sets M's initial decay);
      # Q-SNN's surrogate: a triangle of width 1.
      neuron=NeuronSpec(kind='mfp', vth=1.0, tau=0.5, surrogate='triangle', alpha=1.0))
  c.data = config_lib.data_config(data, **data_fields)
  # + 5e-3 * the WS-DR firing-rate term (Q-SNN proposedLoss, --lamb_f default 5e-3).
  c.loss = config_lib.loss_config('per_step_ce', fr_lambda=5e-3)
  return c
