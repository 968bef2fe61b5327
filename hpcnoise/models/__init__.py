"""Networks, and the (ghost) batch norm they all use.

A Linear or Conv layer followed by batch norm has no bias: batch norm removes it, so its batch gradient
is zero, yet its per-sample gradients are not, and Fisher noise would make it random-walk while the
running mean follows it with a lag (a train/eval mismatch). Parameter counts are the published
architectures' minus those redundant biases.

Every network is built by a function registered in ``MODELS`` under its CLI name (``registry``);
importing this package registers them all, the default workload's (``nets``) before the paper's
(``paper``). Builders receive the input shape (without the batch dimension), the number of classes and
a ``norm`` factory; every batch norm in every network comes from that factory (``batchnorm``), so ghost
batch norm is a config switch, not a variant.
"""

from hpcnoise.models.batchnorm import GhostBatchNorm, SumOverWorkers, ghost_norms, synchronized, update_running_stats
from hpcnoise.models.nets import cnn1d, dense_layers, mlp
from hpcnoise.models.paper import (
    VGG16,
    BasicBlock,
    ZeroPadShortcut,
    alexnet,
    cifar_resnet,
    lenet5,
    mnist_mlp,
    resnet44,
    resnet44x2,
    vgg16_bn,
)
from hpcnoise.models.registry import MODELS, ModelSpec, NormFactory, build_model, register

__all__ = [
    "MODELS",
    "VGG16",
    "BasicBlock",
    "GhostBatchNorm",
    "ModelSpec",
    "NormFactory",
    "SumOverWorkers",
    "ZeroPadShortcut",
    "alexnet",
    "build_model",
    "cifar_resnet",
    "cnn1d",
    "dense_layers",
    "ghost_norms",
    "lenet5",
    "mlp",
    "mnist_mlp",
    "register",
    "resnet44",
    "resnet44x2",
    "synchronized",
    "update_running_stats",
    "vgg16_bn",
]
