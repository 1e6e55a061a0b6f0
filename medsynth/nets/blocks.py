"""Building blocks the nets share, written once for 2D and 3D (``spatial_dims``)."""

from __future__ import annotations

from typing import Optional

import torch.nn.functional as F
from monai.networks.layers import Conv
from torch import Tensor, nn


class ResBlock(nn.Module):
    """A pre-activation residual block: (GroupNorm, SiLU, conv 3x3) twice plus a (1x1-projected) skip.

    With ``emb_dim``, an embedding (time, class, resolution) scales and shifts the second normalisation (the
    "scale-shift norm" of Dhariwal & Nichol, 2021), as in diffusion UNets; without, it is the autoencoders' block.

    Args:
        spatial_dims: 2 or 3.
        in_channels: input channels.
        out_channels: output channels.
        norm_num_groups: GroupNorm groups (at most the channel count).
        eps: GroupNorm epsilon.
        emb_dim: features of the conditioning embedding ``(B, emb_dim)``; ``None``: unconditioned.
    """

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, norm_num_groups: int,
                 eps: float = 1e-5, emb_dim: Optional[int] = None) -> None:
        super().__init__()
        conv = Conv[Conv.CONV, spatial_dims]
        self.norm1 = nn.GroupNorm(min(norm_num_groups, in_channels), in_channels, eps=eps)
        self.conv1 = conv(in_channels, out_channels, kernel_size=3, padding=1)
        if emb_dim is not None:
            self.emb = nn.Linear(emb_dim, 2 * out_channels)
        self.norm2 = nn.GroupNorm(min(norm_num_groups, out_channels), out_channels, eps=eps)
        self.conv2 = conv(out_channels, out_channels, kernel_size=3, padding=1)
        self.skip = conv(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, emb: Optional[Tensor] = None) -> Tensor:
        """``(B, C_in, *spatial)`` (and ``(B, emb_dim)``) to ``(B, C_out, *spatial)``."""
        h = self.norm2(self.conv1(F.silu(self.norm1(x))))
        if emb is not None:
            scale, shift = self.emb(F.silu(emb))[(...,) + (None,) * (x.ndim - 2)].chunk(2, dim=1)  # (B, C_out, 1..)
            h = h * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


class MultiHeadSelfAttention(nn.Module):
    """Residual multi-head self-attention over all positions of a feature map, as 3D MedDiffusion writes it.

    ``x + to_out(attention(to_qkv(norm(x))))``: a bias-free linear map to ``heads * head_dim`` queries, keys and
    values per position, scaled dot-product attention, and a 1x1 convolution back to ``channels``. Its memory
    grows with the square of the number of positions: use it at low resolution.

    Args:
        spatial_dims: 2 or 3.
        channels: channels of the feature map.
        heads: attention heads.
        head_dim: features per head (32 in 3D MedDiffusion, independent of ``channels``).
        norm: the normalisation applied before attention (a GroupNorm in the autoencoder, a channel LayerNorm in
            BiFlowNet).
    """

    def __init__(self, spatial_dims: int, channels: int, heads: int, head_dim: int, norm: nn.Module) -> None:
        super().__init__()
        self.heads = heads
        self.norm = norm
        self.to_qkv = nn.Linear(channels, 3 * heads * head_dim, bias=False)
        self.to_out = Conv[Conv.CONV, spatial_dims](heads * head_dim, channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, *spatial = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, N, C)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.to_qkv(tokens).chunk(3, dim=-1))
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, N, head_dim)
        out = out.transpose(-1, -2).reshape(b, -1, *spatial)  # (B, heads * head_dim, *spatial), head-major
        return x + self.to_out(out)
