"""The networks: a small classifier and a small segmenter in plain torch.

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: uint8 or float chips in 0..255, N×3×S×S → class logits."""
        x = (x.float() / 255.0 - self.mean) / self.std
        x = self.features(x)
        return self.head(x.mean(dim=(2, 3)))


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


ARCHITECTURES: dict[str, type[nn.Module]] = {"RoofNet": RoofNet, "PanelNet": PanelNet}
TASK_OF_ARCHITECTURE = {"RoofNet": "classification", "PanelNet": "segmentation"}
