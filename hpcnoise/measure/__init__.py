"""Measurements on trained or frozen networks: sharpness (Fig. 3d), Fisher norms (3a), gradient variance (3b).

- ``invariance``: batch-norm folding and the fitted softmax temperature that make sharpness comparable;
- ``sharpness``: Hessian-vector products, Lanczos / power iteration, the paper's sharpness protocol;
- ``fisher``: ||F||_F and ||diag F||_F from per-sample gradients;
- ``variance``: the gradient variance a regime's step would see at a frozen network (computed with the
  step's own functions) and the diagnostics row that training logs.
The ``hpcnoise sharpness RUN_DIR`` command is hpcnoise.cli.sharpness.
"""

from hpcnoise.measure.fisher import fisher_norms, per_sample_gradients
from hpcnoise.measure.invariance import ChannelSign, fit_softmax_temperature, fold_batchnorm, logits_of
from hpcnoise.measure.sharpness import (
    METHODS,
    HessianOperator,
    fixed_subset,
    max_eigenvalue,
    sharpness_of,
    start_vector,
    top_eigenvalue,
)
from hpcnoise.measure.variance import diagnostics_row, gradient_variance, measured_temperature
from hpcnoise.workload import load_run

__all__ = [
    "METHODS",
    "ChannelSign",
    "HessianOperator",
    "diagnostics_row",
    "fisher_norms",
    "fit_softmax_temperature",
    "fixed_subset",
    "fold_batchnorm",
    "gradient_variance",
    "load_run",
    "logits_of",
    "max_eigenvalue",
    "measured_temperature",
    "per_sample_gradients",
    "sharpness_of",
    "start_vector",
    "top_eigenvalue",
]
