"""CIFAR10-DVS, VGGSNN at 48x48, 1-bit hidden weights, MFP neurons, T = 10 (Table I: 81.1%).

Data: the recordings as tonic stores them, `<data_dir>/CIFAR10DVS/<class>/*.aedat4` (default
data_dir ~/data). Get them once (about 7 GB) with tonic:

  python -c "import tonic; tonic.datasets.CIFAR10DVS(save_to='$HOME/data')"

The first run bins every recording into T frames and caches them next to the data
(`cache_T10_s48/`); later runs read the cache. A seeded 9:1 split per class (data.split_seed).

Train:

  python train.py --config configs/cifar10dvs.py --workdir runs/cifar10dvs
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import paper_recipe  # noqa: E402


def get_config():
  c = paper_recipe.recipe_config()
  c.model.name = 'vggsnn'
  c.model.T = 10
  c.data.name = 'cifar10dvs'
  c.data.data_dir = '~/data'
  c.data.size = 48
  c.data.split_seed = 0
  return c
