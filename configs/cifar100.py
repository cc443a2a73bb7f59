"""CIFAR100, ResNet19, 1-bit hidden weights, MFP neurons, T = 4 (paper Table I: 79.1%).

Data: tensorflow-datasets' prepared `cifar100` under `data_dir` (default ~/tensorflow_datasets).
Prepare once (needs TensorFlow):

  pip install -e ".[prepare]"
  python -m mfp_jax.data_sources prepare cifar100 --data_dir ~/tensorflow_datasets

Train:

  python train.py --config configs/cifar100.py --workdir runs/cifar100
"""

from configs import paper_recipe


def get_config():
  return paper_recipe.recipe_config(
      'resnet19', 4, 'cifar100', data_dir='~/tensorflow_datasets',
      cutout=8)  # DeVries & Taylor's CIFAR100 hole size
