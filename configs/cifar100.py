"""CIFAR100, ResNet19, 1-bit hidden weights, MFP neurons, T = 4 (paper Table I: 79.1%).

Data: tensorflow-datasets' prepared `cifar100` under `data_dir` (default ~/tensorflow_datasets).
Prepare once (needs TensorFlow):

  pip install -e ".[prepare]"
  python -m mfp_jax.data_sources prepare cifar100 --data_dir ~/tensorflow_datasets

Train:

  python train.py --config configs/cifar100.py --workdir runs/cifar100
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import paper_recipe  # noqa: E402


def get_config():
  c = paper_recipe.recipe_config()
  c.model.name = 'resnet19'
  c.model.T = 4
  c.data.name = 'cifar100'
  c.data.data_dir = '~/tensorflow_datasets'
  c.data.cutout = 8  # DeVries & Taylor's CIFAR100 hole size
  return c
