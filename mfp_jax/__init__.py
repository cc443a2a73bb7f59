"""mfp_jax: memory-free and parallel quantized spiking neural networks in JAX/Flax."""

from mfp_jax import neurons, quant, surrogate
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
from mfp_jax.surrogate import get_surrogate

__version__ = '0.1.0'
