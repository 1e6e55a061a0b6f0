"""Image classifiers (for class-faithfulness evaluation), with the factory signature medsynth uses."""

from __future__ import annotations

from typing import Literal

from monai.networks.blocks import Convolution
from torch import Tensor, nn


class SmallClassifier(nn.Module):
    """A small convolutional classifier: per level a 3x3 convolution and a stride-2 3x3 convolution (each with
    GroupNorm and ReLU), then global average (or max) pooling and a linear layer.

    Small on purpose: it judges whether samples show their class, on images as small as 16 pixels, and trains in
    minutes on a CPU. 2D and 3D through ``spatial_dims``.

    Args:
        in_channels: image channels; set by the module.
        num_classes: classes; set by the module.
        spatial_dims: 2 or 3.
        channels: feature channels per level; each level halves every spatial side.
        dropout: dropout probability before the linear layer.
        pooling: how the last features are pooled over space: ``mean`` (the whole image's appearance) or ``max``
            (the strongest response anywhere: a small structure, such as a lesion, that a mean over the whole
            volume dilutes).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        spatial_dims: int = 2,
        channels: tuple[int, ...] = (16, 32, 64),
        dropout: float = 0.0,
        pooling: Literal["mean", "max"] = "mean",
    ) -> None:
        super().__init__()
        if not channels:
            raise ValueError("channels must name at least one level")
        if pooling not in ("mean", "max"):
            raise ValueError(f"pooling={pooling!r}: expected 'mean' or 'max'")
        self.pooling = pooling

        def conv(cin: int, cout: int, stride: int) -> Convolution:
            return Convolution(spatial_dims, cin, cout, strides=stride, kernel_size=3, act="RELU",
                               norm=("GROUP", {"num_groups": _groups(cout)}))

        layers, cin = [], in_channels
        for cout in channels:
            layers += [conv(cin, cout, 1), conv(cout, cout, 2)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(cin, num_classes))

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``(B, num_classes)`` for images ``(B, in_channels, *spatial)``."""
        h = self.features(x)  # (B, channels[-1], *spatial / 2**levels)
        h = h.flatten(2)  # (B, channels[-1], positions)
        return self.head(h.amax(dim=2) if self.pooling == "max" else h.mean(dim=2))


def _groups(channels: int) -> int:
    """The largest of 8, 4, 2, 1 groups that divides ``channels``."""
    return next(g for g in (8, 4, 2, 1) if channels % g == 0)
