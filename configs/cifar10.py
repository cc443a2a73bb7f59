"""CIFAR10, ResNet19, 1-bit hidden weights, MFP neurons, T = 4 (paper Table I: 95.9%).

Data: tensorflow-datasets' prepared `cifar10` (array_record) under `data_dir`
(default ~/tensorflow_datasets). Prepare once (needs TensorFlow, ~170 MB download):

  pip install -e ".[prepare]"
  python -m mfp_jax.data_sources prepare cifar10 --data_dir ~/tensorflow_datasets

Train (300 epochs of 781 steps; a GPU/TPU job, not a CPU one):

  python train.py --config configs/cifar10.py --workdir runs/cifar10
"""

from configs import paper_recipe


def get_config():
  return paper_recipe.recipe_config(
      'resnet19', 4, 'cifar10',
      data_dir='~/tensorflow_datasets',
      # Cutout (Q-SNN build_cifar(cutout=True)); 16 px is DeVries & Taylor's CIFAR10 size.
      cutout=16)
