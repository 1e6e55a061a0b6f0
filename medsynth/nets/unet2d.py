"""The 2D denoising UNet: diffusers' ``UNet2DModel`` as a plain tensor-to-tensor module."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from diffusers import UNet2DModel
from torch import Tensor, nn

from medsynth.errors import MedsynthError


class UNet2D(nn.Module):
    """A 2D UNet for diffusion (diffusers ``UNet2DModel``; Ho et al., 2020), returning a tensor.

    The defaults are small enough to train on a CPU; ``configs/experiments/seg2d_reference.yaml`` holds the
    segmentation-guided diffusion paper's net (channels 128,128,256,256,512,512, attention at the 5th level).

    Args:
        in_channels: input channels (image channels plus conditioning channels); set by the module.
        out_channels: output channels (image channels); set by the module.
        block_out_channels: channels of each resolution level; each level after the first halves the size.
        attention_levels: per level, whether its blocks use self-attention (same length as
            ``block_out_channels``).
        layers_per_block: ResNet layers per level.
        attention_head_dim: channels per attention head.
        norm_num_groups: GroupNorm groups (must divide every entry of ``block_out_channels``).
        dropout: dropout inside the ResNet blocks.
        num_class_embeds: number of class labels for class conditioning through the time embedding, or ``None``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        block_out_channels: tuple[int, ...] = (32, 64, 64, 128),
        attention_levels: tuple[bool, ...] = (False, False, False, True),
        layers_per_block: int = 1,
        attention_head_dim: int = 8,
        norm_num_groups: int = 32,
        dropout: float = 0.0,
        num_class_embeds: Optional[int] = None,
    ) -> None:
        super().__init__()
        if len(attention_levels) != len(block_out_channels):
            raise MedsynthError(
                f"net.attention_levels has {len(attention_levels)} entries but net.block_out_channels has "
                f"{len(block_out_channels)}"
            )
        bad = [c for c in block_out_channels if c % norm_num_groups]
        if bad:
            raise MedsynthError(f"net.norm_num_groups={norm_num_groups} does not divide block channels {bad}")
        down = tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention_levels)
        up = tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attention_levels))
        self.unet = UNet2DModel(
            in_channels=in_channels,
            out_channels=out_channels,
            block_out_channels=tuple(block_out_channels),
            down_block_types=down,
            up_block_types=up,
            layers_per_block=layers_per_block,
            attention_head_dim=attention_head_dim,
            norm_num_groups=norm_num_groups,
            dropout=dropout,
            num_class_embeds=num_class_embeds,
        )

    def forward(self, x: Tensor, t: Tensor, class_labels: Optional[Tensor] = None) -> Tensor:
        """Predict from ``x`` ``(B, in_channels, H, W)`` at timesteps ``t`` ``(B,)``; returns ``(B, out_channels, H, W)``.

        ``H`` and ``W`` must be divisible by ``2 ** (levels - 1)``.
        """
        return self.unet(x, t, class_labels=class_labels).sample

    def save_pretrained(self, folder: str | Path, sample_size: Optional[int] = None) -> Path:
        """Write the UNet in diffusers format (``config.json`` + ``diffusion_pytorch_model.safetensors``).

        ``UNet2DModel.from_pretrained(folder)`` loads it offline, as the reference pipeline does.
        """
        if sample_size is not None:
            self.unet.register_to_config(sample_size=sample_size)
        self.unet.save_pretrained(str(folder), safe_serialization=True)
        return Path(folder)
