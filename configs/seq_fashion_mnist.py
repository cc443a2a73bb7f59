"""Row-sequential Fashion-MNIST: one 28-pixel row per time step (T = 28), a dense 1-bit net.

The temporal task of the README's "Results on real data": the network must keep what it saw
in earlier rows, which is what a low-bit LIF membrane loses (paper Fig. 1). Data: the
registered data set `seq_fashion_mnist`, read from the original IDX files (`apt-get install -y dataset-fashion-mnist` puts them in
/usr/share/datasets/fashion-mnist, the default data_dir).

  python train.py --config configs/seq_fashion_mnist.py --workdir runs/seq_fm

Model: 28 -> 256 -> 256 -> 10, MFP neurons, 1-bit hidden weights (the first layer and the
readout full precision), BatchNorm over T*B; the loss is the cross-entropy of the time-mean
logits (an early row cannot tell the class, so no loss is put on single steps). AdamW 2e-2
with cosine decay: the best MFP rate of a sweep from 2e-3 to 1e-1 (README). The Fig. 1
experiment (`python -m benchmarks.membrane_bits`) swaps the neuron, its learning rate and the
weight width.
"""

from mfp_jax import config_lib


def get_config():
  c = config_lib.base_config()
  c.num_epochs = 5
  c.log_every_steps = 50
  c.model = config_lib.model_config('seq_mlp', T=28, hidden=(256, 256))
  c.data = config_lib.data_config('seq_fashion_mnist', batch_size=128, eval_batch_size=1000)
  c.optim = config_lib.optim_config('adamw', learning_rate=2e-2, weight_decay=1e-4)
  c.loss = config_lib.loss_config('mean_ce')
  return c
