"""Per-sample curvature quantities from one forward and backward pass, with module hooks.

``SumGradSquared`` gives, for every parameter, S = sum_i g_i * g_i over the samples of a batch, where g_i is
the gradient of the individual loss l_i. The training step backpropagates the MEAN loss, so the output
gradient autograd delivers is (1/m) dl_i/dy_i; the hooks square it as it comes and multiply the sums by
m^2 once, when the recording ends. diag F of the global batch is then (sum over workers of S) / M_L.

Layer types are served by handlers in ``HANDLERS`` (one per type, as in BackPACK). A handler says what
its layer keeps from the forward pass and turns that, with the output gradient delta, into curvature
sums. Each quantity is one method of the handler, so later ones (Rademacher-signed sums sum_i sigma_i g_i
for full-Fisher noise, K-FAC factors A = a^T a and G = delta^T delta) are added as further methods beside
``sum_grad_squared`` and reuse the hook machinery unchanged.

Batch norm couples the samples of a (ghost) batch through its statistics, so in training mode the
gradient of l_i is not a per-sample quantity. Under batch norm in training mode the suite DEFINES g_i as
sample i's contribution to the batch gradient: the batch gradient is sum_i g_i, and each g_i is built from
sample i's layer input and its backpropagated output gradient delta_i (which carries the coupling). This
is what the hooks see, and in eval mode, or without batch norm, it is the true per-sample gradient.
"""

from hpcnoise.curvature.handlers import (
    HANDLERS,
    ConvHandler,
    ConvMode,
    GhostBatchNormHandler,
    HookOptions,
    LayerHandler,
    LinearHandler,
)
from hpcnoise.curvature.hooks import CurvatureHooks, SumGradSquared
from hpcnoise.curvature.quantities import QUANTITIES, KFactors, LayerFactors, PerParameter

__all__ = [
    "HANDLERS",
    "QUANTITIES",
    "ConvHandler",
    "ConvMode",
    "CurvatureHooks",
    "GhostBatchNormHandler",
    "HookOptions",
    "KFactors",
    "LayerFactors",
    "LayerHandler",
    "LinearHandler",
    "PerParameter",
    "SumGradSquared",
]
