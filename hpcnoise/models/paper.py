"""The paper's networks (Table 1): MNIST MLP, LeNet-5, AlexNet, VGG16 and the CIFAR ResNets.

The paper names its networks (MLP, LeNet, AlexNet, VGG16, ResNet44, ResNet44x2) but gives no widths.
Its large-batch baseline is Hoffer et al.'s (2017) ghost batch norm, so where the paper is silent we
follow the networks of Hoffer et al.'s code and of Keskar et al. (2016), which both papers cite.
No network has dropout: its masks would come from torch's global generator, outside the suite's
per-stream seeding, and would differ between 1 x M and W x M/W runs of the same global batch.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hpcnoise.models.nets import dense_layers
from hpcnoise.models.registry import NormFactory, register


def _image(in_shape: tuple[int, ...], name: str, min_size: int = 1) -> tuple[int, int, int]:
    """(channels, height, width) of an image input shape, or a clear error."""
    if len(in_shape) != 3 or min(in_shape[1:]) < min_size:
        raise ValueError(f"{name} needs (channels, height, width) images of at least {min_size} pixels, got {in_shape}")
    return in_shape[0], in_shape[1], in_shape[2]


def _he_init_convs(model: nn.Module) -> nn.Module:
    """He et al. (2015) initialisation of every convolution: N(0, 2 / (k * k * out_channels)), zero bias.

    The fan-out form of the ResNet authors' code (fb.resnet.torch) and of Zagoruyko's CIFAR VGG; linear
    layers keep PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


@register("mnist_mlp", "MLP for MNIST (Keskar et al.'s F1): 5 hidden layers of 512, batch norm, ReLU")
def mnist_mlp(in_shape: tuple[int, ...], num_classes: int, norm: NormFactory, width: int = 512) -> nn.Module:
    """Keskar et al.'s (2016) F1 as in Hoffer et al.'s code: 784-512-512-512-512-512-10.

    Each hidden layer is linear -> batch norm -> ReLU; PyTorch's default initialisation, as in that code.
    """
    return nn.Sequential(nn.Flatten(), *dense_layers(math.prod(in_shape), (width,) * 5, num_classes, norm))


@register("lenet5", "LeNet-5 (LeCun et al. 1998) with batch norm; 28x28 inputs padded to its 32x32 retina")
def lenet5(in_shape: tuple[int, ...], num_classes: int, norm: NormFactory) -> nn.Module:
    """LeNet-5 with a fully connected C3: conv 5x5 x6, pool, conv 5x5 x16, pool, dense 120, 84, classes.

    Its convolutions and dense layers hold the usual 61,706 parameters (1 input channel, 10 classes).
    Inputs smaller than 32 x 32 are zero-padded by the first convolution (2 pixels for 28 x 28). Modern
    choices where the 1998 net differs: ReLU and 2x2 max pooling instead of scaled tanh and trainable
    subsampling, and batch norm after each hidden layer, since the paper trains LeNet with ghost batch
    norm. PyTorch's default initialisation (uniform, scale 1/sqrt(fan_in)).
    """
    channels, h, w = _image(in_shape, "lenet5", min_size=28)
    pad = max(0, (32 - min(h, w)) // 2)

    def features(size: int) -> int:  # conv 5x5, pool 2, conv 5x5, pool 2
        return ((size + 2 * pad - 4) // 2 - 4) // 2

    return nn.Sequential(
        nn.Conv2d(channels, 6, 5, padding=pad, bias=False),
        norm(6),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5, bias=False),
        norm(16),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        *dense_layers(16 * features(h) * features(w), (120, 84), num_classes, norm),
    )


@register("alexnet", "CIFAR AlexNet (Keskar et al.'s C1/C3): conv 5x5 x64 twice, dense 384, 192, batch norm")
def alexnet(in_shape: tuple[int, ...], num_classes: int, norm: NormFactory) -> nn.Module:
    """The paper's "shallow convolutional" AlexNet, read as Keskar et al.'s (2016) C1/C3.

    Keskar et al. describe C1 (CIFAR-10) and C3 (CIFAR-100) as a modified AlexNet; this is the PyTorch
    form in Hoffer et al.'s code: two blocks of conv 5x5 (64 channels, no bias) -> max pool 3 stride 2 ->
    batch norm -> ReLU, dense 384 and 192 (no bias) -> batch norm -> ReLU, and the classifier. PyTorch's
    default initialisation, as in that code.
    """
    channels, h, w = _image(in_shape, "alexnet", min_size=7)

    def features(size: int) -> int:  # two max pools of 3, stride 2, no padding
        for _ in range(2):
            size = (size - 3) // 2 + 1
        return size

    return nn.Sequential(
        nn.Conv2d(channels, 64, 5, padding=2, bias=False),
        nn.MaxPool2d(3, stride=2),
        norm(64),
        nn.ReLU(),
        nn.Conv2d(64, 64, 5, padding=2, bias=False),
        nn.MaxPool2d(3, stride=2),
        norm(64),
        nn.ReLU(),
        nn.Flatten(),
        *dense_layers(64 * features(h) * features(w), (384, 192), num_classes, norm),
    )


VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


@register("vgg16_bn", "VGG16 with batch norm for CIFAR: 13 conv 3x3 layers, a 512-unit hidden layer")
def vgg16_bn(in_shape: tuple[int, ...], num_classes: int, norm: NormFactory) -> nn.Module:
    """VGG16 (Simonyan & Zisserman 2014, configuration D) in its CIFAR form with batch norm.

    As in Zagoruyko's cifar.torch and Keskar et al.'s C2/C4: 13 conv 3x3 -> batch norm -> ReLU layers
    with five 2x2 max pools, then dense 512 -> batch norm -> ReLU and the classifier. He initialisation.
    """
    channels, h, w = _image(in_shape, "vgg16_bn", min_size=32)
    layers: list[nn.Module] = []
    for v in VGG16:
        if v == "M":
            layers.append(nn.MaxPool2d(2))
            h, w = h // 2, w // 2
        else:
            assert isinstance(v, int)
            layers += [nn.Conv2d(channels, v, 3, padding=1, bias=False), norm(v), nn.ReLU()]
            channels = v
    head = dense_layers(channels * h * w, (512,), num_classes, norm)
    return _he_init_convs(nn.Sequential(*layers, nn.Flatten(), *head))


class ZeroPadShortcut(nn.Module):
    """He et al.'s (2016) option-A shortcut: subsample by ``stride``, zero-pad the new channels.

    Parameter-free, so the curvature hooks have nothing to do for it.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.pad_lo = (out_channels - in_channels) // 2  # new channels, split between both ends
        self.pad_hi = out_channels - in_channels - self.pad_lo

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return nn.functional.pad(x, (0, 0, 0, 0, self.pad_lo, self.pad_hi))


class BasicBlock(nn.Module):
    """Residual block: conv 3x3 -> batch norm -> ReLU -> conv 3x3 -> batch norm, plus shortcut, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, norm: NormFactory):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = norm(out_channels)
        self.shortcut: nn.Module = (
            nn.Identity()
            if stride == 1 and in_channels == out_channels
            else ZeroPadShortcut(in_channels, out_channels, stride)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


def cifar_resnet(in_shape: tuple[int, ...], num_classes: int, norm: NormFactory, n: int, width: int) -> nn.Module:
    """He et al.'s (2016) CIFAR ResNet of 6n + 2 layers.

    Conv 3x3 -> batch norm -> ReLU, three stages of n basic blocks with width, 2 x width and 4 x width
    channels (stride 2 and option-A shortcuts where a stage starts), global average pooling, classifier.
    Convolutions have no bias (batch norm follows); He initialisation.
    """
    channels = _image(in_shape, f"resnet{6 * n + 2}")[0]
    layers: list[nn.Module] = [nn.Conv2d(channels, width, 3, padding=1, bias=False), norm(width), nn.ReLU()]
    c = width
    for stage in range(3):
        out = width * 2**stage
        for block in range(n):
            layers.append(BasicBlock(c, out, 2 if stage > 0 and block == 0 else 1, norm))
            c = out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes)]
    return _he_init_convs(nn.Sequential(*layers))


@register("resnet44", "ResNet-44 for CIFAR (He et al. 2016): 3 x 7 blocks, widths 16/32/64, option-A")
def resnet44(in_shape: tuple[int, ...], num_classes: int, norm: NormFactory) -> nn.Module:
    return cifar_resnet(in_shape, num_classes, norm, n=7, width=16)


@register("resnet44x2", "ResNet-44 twice as wide (the paper's CIFAR-100 net): widths 32/64/128")
def resnet44x2(in_shape: tuple[int, ...], num_classes: int, norm: NormFactory) -> nn.Module:
    return cifar_resnet(in_shape, num_classes, norm, n=7, width=32)
