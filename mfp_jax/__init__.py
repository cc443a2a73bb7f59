"""mfp_jax: memory-free and parallel quantized spiking neural networks in JAX/Flax.

The extension points are re-exported here: ``register_dataset``, ``register_model``,
``register_neuron``, ``register_loss``, ``register_optimizer`` and ``register_surrogate``.
"""

from mfp_jax import neurons, quant, surrogate
# Registration order is the order every "allowed: [...]" message lists: the built-in data
# sets, then everything a user registers.
from mfp_jax import data, data_sources, fashion_mnist  # noqa: F401  (they register data sets)
from mfp_jax import losses, models, neuron_kinds, optim
from mfp_jax.data import ArraySource, Dataset, DataSpec, register_dataset
from mfp_jax.losses import register_loss
from mfp_jax.models import register_model
from mfp_jax.neuron_kinds import LinearNeuron, NeuronKind, register_neuron
from mfp_jax.neurons import (
    column_matrix,
    eq9_thresholds,
    fold_thresholds,
    folded_serial,
    lif_bptt,
    lif_serial,
    mfp_column_parallel,
    mfp_column_serial,
    mfp_membrane,
    mfp_parallel,
    mfp_parallel_reference,
    mfp_serial,
    mfp_serial_eq9,
)
from mfp_jax.optim import register_optimizer
from mfp_jax.surrogate import get_surrogate, register_surrogate

__version__ = '0.2.0'

__all__ = [
    'ArraySource', 'DataSpec', 'Dataset', 'LinearNeuron', 'NeuronKind', 'column_matrix',
    'data', 'data_sources', 'eq9_thresholds', 'fashion_mnist', 'fold_thresholds',
    'folded_serial', 'get_surrogate', 'lif_bptt', 'lif_serial', 'losses', 'mfp_column_parallel',
    'mfp_column_serial', 'mfp_membrane', 'mfp_parallel', 'mfp_parallel_reference',
    'mfp_serial', 'mfp_serial_eq9', 'models', 'neuron_kinds', 'neurons', 'optim', 'quant',
    'register_dataset', 'register_loss', 'register_model', 'register_neuron',
    'register_optimizer', 'register_surrogate', 'surrogate',
]
