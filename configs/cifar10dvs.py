"""CIFAR10-DVS, VGGSNN at 48x48, 1-bit hidden weights, MFP neurons, T = 10 (Table I: 81.1%).

Data: the recordings as tonic stores them, `<data_dir>/CIFAR10DVS/<class>/*.aedat4` (default
data_dir ~/data). Get them once (about 7 GB) with tonic:

  python -c "import tonic; tonic.datasets.CIFAR10DVS(save_to='$HOME/data')"

The first run bins every recording into T frames and caches them next to the data
(`cache_T10_s48/`); later runs read the cache. A seeded 9:1 split per class (data.split_seed).

Train:

  python train.py --config configs/cifar10dvs.py --workdir runs/cifar10dvs
"""

from configs import paper_recipe


def get_config():
  return paper_recipe.recipe_config(
      'vggsnn', 10, 'cifar10dvs',
      data_dir='~/data', size=48, split_seed=0)
