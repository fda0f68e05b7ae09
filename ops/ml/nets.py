"""The networks: a small classifier, its one-value twin for regressions, and a small segmenter in plain torch.

Plain torch (no torchvision) so it runs wherever torch does. A network takes
the chips exactly as stored (uint8, N×3×S×S) and normalises inside
``forward``: the normalisation travels with the weights and cannot drift from
what training used.
"""

from __future__ import annotations

import torch
from torch import nn


class RoofNet(nn.Module):
    """Four conv blocks (conv-BN-ReLU, pooled), global average pooling, a linear head."""

    def __init__(self, n_classes: int, mean: list[float], std: list[float], widths: list[int] | None = None) -> None:
        super().__init__()
        widths = widths or [24, 48, 96, 128]
        layers: list[nn.Module] = []
        c_in = 3
        for w in widths:
            layers += [
                nn.Conv2d(c_in, w, 3, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in = w
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(c_in, n_classes))
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        # calibration (ops.ml.calibration): logits are divided by it, so it travels in the weights and their hash
        self.register_buffer("temperature", torch.ones(()))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: uint8 or float chips in 0..255, N×3×S×S → pooled features, N×widths[-1]."""
        x = (x.float() / 255.0 - self.mean) / self.std
        return self.features(x).mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: uint8 or float chips in 0..255, N×3×S×S → class logits (temperature-scaled)."""
        return self.head(self.embed(x)) / self.temperature


class ValueNet(RoofNet):
    """RoofNet's features with one output: a regression's value, in the unit of its declaration.

    The targets' training mean and spread are buffers: the network learns a
    standardised value and ``forward`` gives it back in the unit, so what is
    saved is what is served.
    """

    def __init__(self, n_classes: int, mean: list[float], std: list[float], widths: list[int] | None = None) -> None:
        super().__init__(1, mean, std, widths)
        self.register_buffer("target_mean", torch.zeros(()))
        self.register_buffer("target_std", torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """N×3×S×S chips → N×1 values in the declared unit."""
        return self.head(self.embed(x)) * self.target_std + self.target_mean


def _conv(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class PanelNet(nn.Module):
    """A small U-Net: per-pixel class logits at the chip's own resolution.

    Three encoder levels (one conv each, pooled), a bottleneck, and a decoder
    that upsamples and concatenates the encoder's features: small objects
    (a 2 m panel array is 6-10 chip pixels) need the full-resolution skip.
    """

    def __init__(self, n_classes: int, mean: list[float], std: list[float], widths: list[int] | None = None) -> None:
        super().__init__()
        w = widths or [16, 32, 64]
        self.down = nn.ModuleList()
        c_in = 3
        for c in w:
            self.down.append(_conv(c_in, c))
            c_in = c
        self.bottleneck = _conv(w[-1], w[-1])
        self.up = nn.ModuleList(
            _conv(w[i] + (w[i + 1] if i + 1 < len(w) else w[-1]), w[i]) for i in reversed(range(len(w)))
        )
        self.head = nn.Conv2d(w[0], n_classes, 1)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: uint8 or float chips in 0..255, N×3×S×S (S divisible by 2**levels) → N×classes×S×S logits."""
        x = (x.float() / 255.0 - self.mean) / self.std
        skips = []
        for conv in self.down:
            x = conv(x)
            skips.append(x)
            x = nn.functional.max_pool2d(x, 2)
        x = self.bottleneck(x)
        for conv, skip in zip(self.up, reversed(skips), strict=True):
            x = nn.functional.interpolate(x, scale_factor=2, mode="nearest")
            x = conv(torch.cat([x, skip], dim=1))
        return self.head(x)


ARCHITECTURES: dict[str, type[nn.Module]] = {"RoofNet": RoofNet, "PanelNet": PanelNet, "ValueNet": ValueNet}
TASK_OF_ARCHITECTURE = {"RoofNet": "classification", "PanelNet": "segmentation", "ValueNet": "regression"}
#: Buffers added after models were shipped, with the value that means "as before" (a checkpoint without them loads).
LATER_BUFFERS = {"temperature": 1.0}
