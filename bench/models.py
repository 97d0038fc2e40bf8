"""Model zoo: the networks the attacks and the accuracy-cost runs use.

Every model is built by :func:`build_model` from a registered :class:`ModelSpec`.
Initialisation is drawn from an explicit ``torch.Generator`` so a seeded build is
deterministic and never touches (or depends on) PyTorch's global RNG:

* ``lenet-dlg`` draws every weight and bias directly from the generator;
* ``convnet`` and ``resnet20`` use their usual initialisers, run inside
  ``torch.random.fork_rng()`` with the global CPU RNG seeded from a value drawn
  from the generator; the caller's global RNG state is restored afterwards.

With ``generator=None`` the build uses (and advances) the global RNG, like plain
PyTorch. Models are built on the CPU; move them with ``.to(device)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bench.errors import UserError
from bench.registry import Registry

__all__ = [
    "MODELS",
    "ConvNet",
    "LeNetDLG",
    "ModelSpec",
    "ResNet20",
    "build_model",
    "count_parameters",
    "init_uniform_dlg",
]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    # build(*, num_classes, channels, size, generator) -> nn.Module
    build: Callable[..., nn.Module]
    description: str
    trainable: bool


MODELS: Registry[ModelSpec] = Registry("model")


def _conv_out(size: int, kernel: int, stride: int, padding: int) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def _fork_seed(generator: torch.Generator) -> int:
    """Draw a 63-bit seed from ``generator`` (any device)."""
    return int(torch.randint(0, 2**63 - 1, (1,), generator=generator, device=generator.device).item())


def _build_forked(generator: torch.Generator | None, make: Callable[[], nn.Module]) -> nn.Module:
    """Run ``make()`` with the global CPU RNG seeded from ``generator``, then restore it."""
    if generator is None:
        return make()
    seed = _fork_seed(generator)
    # devices=[]: modules are built on the CPU, so CUDA RNG state is not involved.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return make()


# --------------------------------------------------------------------------- lenet-dlg


class LeNetDLG(nn.Module):
    """The LeNet of the DLG reference code (``models/vision.py``, Zhu et al. 2019).

    body: Conv(C,12,5,s2,p2)-Sigmoid-Conv(12,12,5,s2,p2)-Sigmoid-Conv(12,12,5,s1,p2)-Sigmoid,
    then flatten and one Linear (768 -> classes for 32x32 inputs). Module names
    (``body.0``, ``body.2``, ``body.4``, ``fc.0``) match the reference, so its
    state dicts load as is. The forward pass is free of in-place ops and views of
    non-contiguous tensors, so it works under ``torch.func.functional_call`` with
    ``vmap`` and ``grad`` of ``grad`` (the DLG attack differentiates through the
    gradient, which is why the activation is the smooth sigmoid).
    """

    def __init__(self, num_classes: int, channels: int = 3, size: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, 12, kernel_size=5, padding=5 // 2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, kernel_size=5, padding=5 // 2, stride=2),
            nn.Sigmoid(),
            nn.Conv2d(12, 12, kernel_size=5, padding=5 // 2, stride=1),
            nn.Sigmoid(),
        )
        s = _conv_out(_conv_out(_conv_out(size, 5, 2, 2), 5, 2, 2), 5, 1, 2)
        self.feature_dim = 12 * s * s
        self.fc = nn.Sequential(nn.Linear(self.feature_dim, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).flatten(1))


def init_uniform_dlg(model: nn.Module, generator: torch.Generator | None) -> None:
    """The DLG reference ``weights_init``: every weight and bias ~ U(-0.5, 0.5).

    Parameters are filled in ``model.parameters()`` order from ``generator``.
    """
    with torch.no_grad():
        for p in model.parameters():
            if generator is None or generator.device == p.device:
                p.uniform_(-0.5, 0.5, generator=generator)
            else:
                u = torch.rand(p.shape, generator=generator, device=generator.device, dtype=p.dtype)
                p.copy_(u.to(p.device) - 0.5)


def _build_lenet_dlg(*, num_classes: int, channels: int, size: int, generator: torch.Generator | None) -> nn.Module:
    if generator is None:
        model = LeNetDLG(num_classes, channels, size)
    else:
        # The default init is overwritten below; fork so it does not advance the global RNG.
        with torch.random.fork_rng(devices=[]):
            model = LeNetDLG(num_classes, channels, size)
    init_uniform_dlg(model, generator)
    return model


# --------------------------------------------------------------------------- convnet


class ConvNet(nn.Module):
    """Small trainable CNN: conv32-relu-pool, conv64-relu-pool, fc128-relu, fc classes.

    3x3 convolutions with padding 1, 2x2 max-pooling; default PyTorch init.
    """

    def __init__(self, num_classes: int, channels: int = 3, size: int = 32):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(channels, 32, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        s = size // 2 // 2
        self.classifier = nn.Sequential(
            nn.Linear(64 * s * s, 128),
            nn.ReLU(),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))


def _build_convnet(*, num_classes: int, channels: int, size: int, generator: torch.Generator | None) -> nn.Module:
    return _build_forked(generator, lambda: ConvNet(num_classes, channels, size))


# --------------------------------------------------------------------------- resnet20


class _BasicBlock(nn.Module):
    """3x3-BN-ReLU-3x3-BN + shortcut, ReLU.

    Shortcut is He et al.'s option A: identity, and where the shape changes,
    stride-2 subsampling with zero-padded extra channels (parameter-free).
    """

    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.pad = planes - in_planes

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            lo = self.pad // 2
            x = F.pad(x, (0, 0, 0, 0, lo, self.pad - lo))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(nn.Module):
    """CIFAR ResNet-20 (He et al. 2016, sec. 4.2): 3x3 conv16-BN-ReLU, 3 stages of
    3 BasicBlocks (16/32/64 channels, stride 1/2/2), global average pool, linear.

    Option-A (parameter-free, zero-padding) shortcuts; Kaiming-normal init of the
    convolutions and the linear layer. About 0.27M parameters for 10 classes.
    Uses BatchNorm, so it is not meant for per-sample ``vmap`` attacks in train mode.
    """

    def __init__(self, num_classes: int, channels: int = 3, blocks_per_stage: int = 3):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        layers: list[nn.Module] = []
        in_planes = 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(blocks_per_stage):
                layers.append(_BasicBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


def _build_resnet20(*, num_classes: int, channels: int, size: int, generator: torch.Generator | None) -> nn.Module:
    return _build_forked(generator, lambda: ResNet20(num_classes, channels))


# --------------------------------------------------------------------------- registry

MODELS.register(
    "lenet-dlg",
    ModelSpec(
        name="lenet-dlg",
        build=_build_lenet_dlg,
        description=(
            "DLG paper's LeNet (3 stride-2/2/1 5x5 convs of 12 channels, sigmoid, one linear); "
            "all weights and biases U(-0.5, 0.5). Trainable, but with sigmoid and this init it trains slowly."
        ),
        trainable=True,
    ),
)
MODELS.register(
    "convnet",
    ModelSpec(
        name="convnet",
        build=_build_convnet,
        description="Small CNN: conv32-relu-pool, conv64-relu-pool, fc128-relu, fc; default PyTorch init.",
        trainable=True,
    ),
)
MODELS.register(
    "resnet20",
    ModelSpec(
        name="resnet20",
        build=_build_resnet20,
        description="CIFAR ResNet-20 (He et al. 2016), BatchNorm, option-A zero-padding shortcuts, ~0.27M params.",
        trainable=True,
    ),
)

_MIN_SIZE = {"lenet-dlg": 1, "convnet": 4, "resnet20": 4}


def build_model(
    name: str,
    *,
    num_classes: int,
    channels: int = 3,
    size: int = 32,
    generator: torch.Generator | None = None,
) -> nn.Module:
    """Build registered model ``name`` on the CPU for ``channels`` x ``size`` x ``size`` inputs.

    The same ``generator`` state gives identical weights; see the module docstring.
    Raises :class:`UserError` for an unknown name or a bad shape argument.
    """
    spec = MODELS.get(name, key="model")
    limits = (("num_classes", num_classes, 1), ("channels", channels, 1), ("size", size, _MIN_SIZE.get(name, 1)))
    for key, value, low in limits:
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UserError(f"model {name!r}: {key} must be an integer >= {low}, got {value!r}")
    return spec.build(num_classes=num_classes, channels=channels, size=size, generator=generator)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())

