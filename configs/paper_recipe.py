"""The training recipe of the MFP-QSNN paper's lineage, shared by the paper configs.

Sources: the MFP-QSNN paper (Table I: 1-bit weights "through Wei et al. [21]", T per data set)
and the Q-SNN reference code (Wenjie-Wei/Q-SNN, `main_training_parallel.py`,
`models/quant_function.py`), whose defaults are used for every data set there.
"""

from mfp_jax import config_lib


def recipe_config():
  c = config_lib.base_config()
  c.seed = 3407                     # Q-SNN main_training_parallel.py --seed default
  c.num_epochs = 300                # Q-SNN --epochs default
  c.log_every_steps = 50
  c.checkpoint_every_steps = 1000   # a preempted run loses at most this many steps
  # Weights: hidden convs (incl. 1x1 shortcuts) 1-bit, standardized, power-of-two scale,
  # annealed tanh estimator with t log-uniform 0.1 -> 10 (Q-SNN quant_function.py, Log_UP).
  # Q-SNN steps t once per epoch; here it moves every step along the same curve.
  c.model.weight_bits = 1
  c.model.binary_scale = 'pow2'
  c.model.estimator = 'annealed'
  c.model.anneal_t_min = 0.1
  c.model.anneal_t_max = 10.0
  c.model.first_last_bits = 8       # Table I's "1/-": first conv and classifier at 8 bits
  c.model.neuron.kind = 'mfp'
  c.model.neuron.vth = 1.0          # Q-SNN LIF threshold, the unit MFP replaces
  c.model.neuron.tau = 0.5          # Q-SNN LIF decay; here only M's initial decay
  c.model.neuron.surrogate = 'triangle'  # Q-SNN's surrogate, width 1
  c.model.neuron.surrogate_alpha = 1.0
  # SGD, lr 0.1, momentum 0.9, weight decay 1e-4 on conv/linear weights only (split_weights),
  # cosine to 0 over all epochs, batch 64 (Q-SNN main_training_parallel.py).
  c.optim.name = 'sgd'
  c.optim.learning_rate = 0.1
  c.optim.momentum = 0.9
  c.optim.weight_decay = 1e-4
  c.optim.schedule = 'cosine'
  c.optim.warmup_epochs = 0.0
  c.data.batch_size = 64
  c.data.eval_batch_size = 256
  # Loss: CE at every step averaged over T + 5e-3 * WS-DR firing-rate term (Q-SNN
  # proposedLoss, --lamb_f default 5e-3).
  c.loss.name = 'per_step_ce'
  c.loss.fr_lambda = 5e-3
  c.loss.fr_target = 0.5
  return c
