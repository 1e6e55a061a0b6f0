"""Segmentation nets (for mask-faithfulness evaluation): MONAI's UNet with the factory signature medsynth uses."""

from __future__ import annotations

from monai.networks.nets import UNet
from torch import Tensor, nn


class SegUNet(nn.Module):
    """MONAI ``UNet`` (residual units; Kerfoot et al., 2018) taking ``(in_channels, out_channels)`` first.

    Args:
        in_channels: image channels; set by the module.
        out_channels: classes counting background; set by the module.
        spatial_dims: 2 or 3.
        channels: feature channels per level.
        strides: downsampling per level transition (``len(channels) - 1`` entries).
        num_res_units: residual units per block.
        dropout: dropout probability.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        spatial_dims: int = 2,
        channels: tuple[int, ...] = (16, 32, 64, 128),
        strides: tuple[int, ...] = (2, 2, 2),
        num_res_units: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.unet = UNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
                         channels=tuple(channels), strides=tuple(strides), num_res_units=num_res_units, dropout=dropout)

    def forward(self, x: Tensor) -> Tensor:
        """Class logits ``(B, out_channels, *spatial)`` for images ``(B, in_channels, *spatial)``."""
        return self.unet(x)
