"""PyTorch references of jaxsam's ResNet18 and VGG16, for scripts/bench.py only.

The same architectures as `jaxsam.models` (the kuangliu/pytorch-cifar layout:
3x3 convolutions with padding 1, BatchNorm, BasicBlocks [2, 2, 2, 2] with
projection shortcuts; VGG16 with BatchNorm and one dense layer), at the same
width multiplier, so a train step does the same arithmetic. Written here from
the architecture description; parameter counts are checked against jaxsam's.

Needs PyTorch (CPU build): `pip install torch==2.13.0` (or
`pip install torch --index-url https://download.pytorch.org/whl/cpu`).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


def _scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        c = _scaled(64, width)
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, 1, 1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        blocks, cin = [], c
        for stage in range(4):
            cout = _scaled(64 * 2**stage, width)
            for block in range(2):
                blocks.append(BasicBlock(cin, cout, 2 if stage > 0 and block == 0 else 1))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.linear(x.mean(dim=(2, 3)))


class VGG16(nn.Module):
    def __init__(self, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        layers, cin = [], 3
        for item in VGG16_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                cout = _scaled(item, width)
                layers += [nn.Conv2d(cin, cout, 3, 1, 1), nn.BatchNorm2d(cout), nn.ReLU()]
                cin = cout
        self.features = nn.Sequential(*layers)
        self.linear = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.linear(torch.flatten(self.features(x), 1))


MODELS = {"resnet18": ResNet18, "vgg16": VGG16}


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
