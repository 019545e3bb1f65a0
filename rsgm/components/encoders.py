"""Image encoders for B4B: the small testbed CNN and a ResNet-50 that loads SimSiam weights.

No torchvision: the ResNet-50 is written out here with torchvision's parameter names, so the
public SimSiam checkpoint (keys ``module.encoder.<resnet key>``) loads after stripping the prefix.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


class SmallConvEncoder(nn.Module):
    """conv(3x3)-BN-ReLU x4 with two 2x poolings, then a linear map to ``rep_dim``.

    The representation is the output of the last linear layer (signed, no activation), so
    hyperplanes through the origin split it evenly, which the LSH coverage relies on.
    """

    def __init__(self, in_channels: int = 1, width: int = 32, rep_dim: int = 64, image_size: int = 16):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"SmallConvEncoder needs an image size divisible by 4, got {image_size}")
        w = width

        def block(cin, cout):
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(*block(in_channels, w), *block(w, w), nn.MaxPool2d(2),
                                      *block(w, 2 * w), *block(2 * w, 2 * w), nn.MaxPool2d(2), nn.Flatten())
        self.project = nn.Sequential(nn.Linear(2 * w * (image_size // 4) ** 2, 4 * w), nn.ReLU(inplace=True),
                                     nn.Linear(4 * w, rep_dim))
        self.rep_dim = rep_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.features(x))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1):
        super().__init__()
        cout = planes * self.expansion
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet50(nn.Module):
    """ResNet-50 (torchvision layout and parameter names) returning the 2048-d pooled features.

    SimSiam's public checkpoint puts its projector in ``fc``; it is not loaded, because the B4B
    thesis serves the 2048-d backbone representation.  ``out_dim`` adds a fresh linear head
    ``head`` (used when the ResNet-50 is a stolen-encoder surrogate).
    """

    def __init__(self, in_channels: int = 3, out_dim: int | None = None):
        super().__init__()
        self.rep_dim = 2048 if out_dim is None else out_dim
        self.conv1 = nn.Conv2d(in_channels, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin, layers = 64, []
        for planes, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            stage = []
            for i in range(blocks):
                stage.append(Bottleneck(cin, planes, stride if i == 0 else 1))
                cin = planes * Bottleneck.expansion
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.head = None if out_dim is None else nn.Linear(2048, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(torch.mean(x, dim=(2, 3)), 1)
        return x if self.head is None else self.head(x)


def load_encoder_weights(encoder: nn.Module, path: str | Path, prefix: str = "") -> None:
    """Load a local state dict into ``encoder``.

    Accepts a plain state dict, a Lightning checkpoint (``state_dict``) or a SimSiam/MoCo
    checkpoint (``state_dict`` with keys ``module.encoder.*``).  Keys starting with ``prefix``
    are kept with the prefix removed; with ``prefix=""`` the common wrappers
    (``module.encoder.``, ``encoder.``, ``module.``) are detected.  Keys the encoder does not have
    (a projector ``fc.*``) are ignored; an encoder key missing from the file is an error.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights {path} not found; put the state dict there or fix encoder_weights in the config")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else obj
    if not isinstance(sd, dict):
        raise ValueError(f"{path} does not hold a state dict")
    own = encoder.state_dict()
    prefixes = [prefix] if prefix else ["module.encoder.", "encoder.", "module.", ""]
    for p in prefixes:
        stripped = {k[len(p):]: v for k, v in sd.items() if k.startswith(p)}
        if stripped and all(k in stripped for k in own):
            encoder.load_state_dict({k: stripped[k] for k in own})
            return
    missing = sorted(k for k in own if not any(p + k in sd for p in prefixes))[:5]
    raise ValueError(f"{path} does not match {type(encoder).__name__}: missing keys such as {missing}")
