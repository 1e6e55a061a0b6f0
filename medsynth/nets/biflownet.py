"""BiFlowNet: the 3D latent denoiser of 3D MedDiffusion, a 3D UNet fused with a DiT run on latent sub-volumes."""

from __future__ import annotations

import math
from typing import Literal, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medsynth.errors import MedsynthError
from medsynth.nets.blocks import MultiHeadSelfAttention, ResBlock

FusionPoint = Literal["early", "late"]


def sinusoidal_embedding(
    values: Tensor, dim: int, max_period: float = 10000.0, sin_first: bool = False, freq_shift: float = 0.0
) -> Tensor:
    """Sinusoidal features of scalar values (the Transformer / ADM timestep embedding; Vaswani et al., 2017).

    Args:
        values: ``(N,)`` scalars (timesteps in ``[0, T)``, sizes in voxels, positions); any real value.
        dim: features per value; an odd ``dim`` gets a zero last feature.
        max_period: the longest wavelength, in the units of ``values``.
        sin_first: ``sin`` features before ``cos`` (3D MedDiffusion's order) instead of ``cos`` first.
        freq_shift: frequencies are ``max_period ** (-k / (dim // 2 - freq_shift))``; 1 reaches exactly
            ``1 / max_period`` at the last feature (3D MedDiffusion), 0 stops one step short (ADM).

    Returns:
        ``(N, dim)`` float32: ``cos`` and ``sin`` of ``values`` at ``dim // 2`` geometric frequencies from 1 down
        to about ``1 / max_period``.
    """
    half = dim // 2
    k = torch.arange(half, device=values.device, dtype=torch.float32)
    freqs = torch.exp(-math.log(max_period) * k / (half - freq_shift))
    args = values.float()[:, None] * freqs[None]  # (N, dim // 2)
    parts = [torch.sin(args), torch.cos(args)] if sin_first else [torch.cos(args), torch.sin(args)]
    return F.pad(torch.cat(parts, dim=-1), (0, dim % 2))


def sincos_grid_embedding(grid: Sequence[int], dim: int, device: Optional[torch.device] = None) -> Tensor:
    """Frozen 3D sin-cos position embedding of a ``(gd, gh, gw)`` grid, as DiT's 2D one (Peebles & Xie, 2023).

    Each axis gets ``2 * (dim // 6)`` features (``sin`` and ``cos`` of the integer grid index, MAE-style
    frequencies); the remaining ``dim % 6`` features are zero.

    Args:
        grid: the number of positions along each of the three axes.
        dim: features per position.
        device: where to build the table.

    Returns:
        ``(gd * gh * gw, dim)`` float32, positions in C order (depth slowest), the order of
        ``Conv3d(...).flatten(2)``.
    """
    axis_dim = 2 * (dim // 6)
    coords = torch.meshgrid(*(torch.arange(g, device=device, dtype=torch.float32) for g in grid), indexing="ij")
    parts = []
    for c in coords:
        # MAE/DiT frequencies: omega_k = 10000 ** (-k / (axis_dim / 2)); sin block then cos block.
        omega = 10000.0 ** (-torch.arange(axis_dim // 2, device=device, dtype=torch.float32) / max(axis_dim // 2, 1))
        args = c.reshape(-1, 1) * omega[None]  # (G, axis_dim // 2)
        parts += [torch.sin(args), torch.cos(args)]
    emb = torch.cat(parts, dim=-1)  # (G, 3 * axis_dim)
    return F.pad(emb, (0, dim - emb.shape[-1]))


class _SelfAttention3D(nn.Module):
    """Multi-head self-attention over all voxels of a feature map, as a residual block."""

    def __init__(self, channels: int, heads: int, groups: int) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.GroupNorm(groups, channels)
        self.qkv = nn.Conv3d(channels, 3 * channels, 1)
        self.proj = nn.Conv3d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c = x.shape[:2]
        qkv = self.qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, -1).transpose(-1, -2)
        out = F.scaled_dot_product_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2])  # (B, heads, N, C / heads)
        return x + self.proj(out.transpose(-1, -2).reshape(x.shape))


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale) + shift


def _fusion_name(side: FusionPoint, level: int) -> str:
    """The key of a DiT fusion map: ``"early"`` / ``"late"`` at level 0, ``"early1"`` / ``"late1"`` at level 1."""
    return side if level == 0 else f"{side}{level}"


class _PostNormResBlock3D(nn.Module):
    """3D MedDiffusion's ResNet block: (conv 3x3x3, GroupNorm, [scale-shift], SiLU) twice plus a 1x1 skip.

    The conditioning ``emb`` enters as a scale-shift after the first GroupNorm (``emb_dim=None``: no conditioning).
    Submodule names follow the original (``mlp``, ``block1.proj``, ``block1.norm``, ``res_conv``).
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: Optional[int], groups: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_channels)) if emb_dim else None
        self.block1 = nn.Module()
        self.block1.proj = nn.Conv3d(in_channels, out_channels, 3, padding=1)
        self.block1.norm = nn.GroupNorm(groups, out_channels)
        self.block2 = nn.Module()
        self.block2.proj = nn.Conv3d(out_channels, out_channels, 3, padding=1)
        self.block2.norm = nn.GroupNorm(groups, out_channels)
        self.res_conv = nn.Conv3d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: Tensor, emb: Optional[Tensor] = None) -> Tensor:
        h = self.block1.norm(self.block1.proj(x))  # (B, C_out, *spatial)
        if self.mlp is not None:
            scale, shift = self.mlp(emb)[(...,) + (None,) * (x.ndim - 2)].chunk(2, dim=1)  # (B, C_out, 1, 1, 1)
            h = h * (scale + 1) + shift
        h = F.silu(self.block2.norm(self.block2.proj(F.silu(h))))
        return h + self.res_conv(x)


class _ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of each voxel with a learnt gain and no bias (3D MedDiffusion's UNet norm)."""

    def __init__(self, channels: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(1, channels, 1, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        var, mean = torch.var_mean(x, dim=1, unbiased=False, keepdim=True)
        return (x - mean) / (var + self.eps).sqrt() * self.gamma


class _UpsampleConv3d(nn.Conv3d):
    """Nearest-neighbour 2x upsampling followed by this 3x3x3 convolution (keys stay those of the conv)."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _DiTBlock(nn.Module):
    """A DiT block with adaLN-Zero conditioning (Peebles & Xie, 2023): attention and MLP, each gated by ``c``.

    With ``skip`` (the output half of a U-shaped DiT, as U-ViT, Bao et al., 2023) the input is first concatenated
    with a long skip from the input half and mapped back to ``hidden`` by ``skip_linear``.
    """

    def __init__(self, hidden: int, heads: int, cond_dim: int, mlp_ratio: float = 4.0, skip: bool = False) -> None:
        super().__init__()
        self.heads = heads
        self.skip_linear = nn.Linear(2 * hidden, hidden) if skip else None
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden, mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden, hidden))
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 6 * hidden))

    def forward(self, x: Tensor, c: Tensor, skip: Optional[Tensor] = None) -> Tensor:
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        n, t, d = x.shape  # (N, tokens, hidden)
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(c)[:, None].chunk(6, dim=-1)  # (N, 1, hidden)
        h = _modulate(self.norm1(x), shift1, scale1)
        q, k, v = self.qkv(h).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, d)
        x = x + gate1 * self.proj(attn)
        return x + gate2 * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class _DiTFinalLayer(nn.Module):
    """DiT's final layer: adaLN-modulated LayerNorm and a linear map from each token to its voxels' features."""

    def __init__(self, hidden: int, cond_dim: int, out_features: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.modulation = nn.Sequential(nn.SiLU(), nn.Linear(cond_dim, 2 * hidden))
        self.linear = nn.Linear(hidden, out_features)

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.modulation(c)[:, None].chunk(2, dim=-1)
        return self.linear(_modulate(self.norm(x), shift, scale))  # (N, tokens, out_features)


class BiFlowNet3D(nn.Module):
    """BiFlowNet, the denoiser of 3D MedDiffusion (Wang et al., 2024): a 3D UNet fused with a sub-volume DiT.

    3D MedDiffusion ("3D MedDiffusion: A 3D Medical Latent Diffusion Model for Controllable and High-quality
    Medical Image Generation", Wang et al., 2024) denoises latent volumes of a patch-wise autoencoder with two
    branches whose features are added together:

    - **Conditioning.** ``emb`` ``(B, 4 * channels[0])`` is the sum of the timestep embedding (sinusoidal of ``t``
      and a two-layer MLP, as ADM), the class embedding ``nn.Embedding(num_class_embeds, .)`` (the diffusion
      module uses the last index as the null label for classifier-free guidance) and, with
      ``resolution_conditioning``, a resolution embedding (sinusoidal of each latent side D, H, W and an MLP), so
      one net serves several output sizes. The paper concatenates a resolution embedding; adding keeps one width.
    - **Inter-patch branch.** A 3D UNet over the whole latent volume: a 3x3x3 input conv to ``channels[0]``, then
      per level ``num_res_blocks`` ResBlocks (GroupNorm, SiLU, conv; ``emb`` enters as a scale-shift), a
      stride-2 conv down; at the lowest level ResBlock, self-attention (``mid_attention_heads``), ResBlock; the
      decoder mirrors it with nearest-neighbour upsampling plus conv and one skip connection per encoder
      ResBlock (concatenated); the head is GroupNorm, SiLU and a zero-initialised 3x3x3 conv to ``out_channels``.
    - **Intra-patch branch.** A DiT (Peebles & Xie, 2023) over each ``dit_patch``-sided sub-volume of the *input
      latent* independently: sub-volumes are folded into the batch dimension ``(B * n_sub, C, p, p, p)`` (so its
      memory grows linearly with the volume), each is cut into ``(dit_patch / dit_token_patch) ** 3`` tokens by a
      linear patch embedding (a conv with kernel = stride = ``dit_token_patch``), frozen 3D sin-cos positions are
      added (a non-persistent buffer), and ``dit_depth`` DiT blocks with adaLN-Zero run on
      ``emb`` plus a frozen sin-cos embedding of the sub-volume's index in the whole volume (so a sub-volume
      knows where it lies; its tokens still never attend across sub-volumes).
    - **Fusion** ("features fused at the early and late levels"). For each point in ``dit_fusion`` a DiT final
      layer (adaLN LayerNorm and a zero-initialised linear map from each token to ``channels[0]`` features for each
      of its voxels) is unpatchified and the sub-volumes folded back into a ``(B, channels[0], D, H, W)`` map.
      ``"early"`` reads the tokens after the first ``ceil(dit_depth / 2)`` DiT blocks and is added to the input
      conv's output, before the first (full-resolution) encoder level; ``"late"`` reads them after all
      ``dit_depth`` blocks and is added to the decoder's full-resolution features right after the last
      upsampling, before that level's ResBlocks. As in the paper, DiT features enter the UNet only at full
      resolution, the encoder side from the DiT's earlier blocks and the decoder side from its last.

    At initialisation the output conv, the fusion maps and every adaLN modulation are zero (so the net outputs
    zero); gradients reach every parameter within a few optimiser steps.

    **The original network** (``variant="meddiffusion"``; ``configs/experiments/biflownet3d_meddiffusion.yaml``
    sets its training defaults: 157,618,016 trainable parameters, and checkpoints of the original load into it,
    see :mod:`medsynth.convert.meddiffusion`). It differs from the light default in these points:

    - conditioning: the timestep embedding puts ``sin`` first with frequencies reaching ``1 / 10000``, its MLP
      uses GELU; the resolution embedding is a linear layer on ``(D, H, W) / 64`` of the latent, *concatenated*
      (``emb`` is ``(B, 8 * channels[0])``); the DiT sees ``emb`` alone (no sub-volume index);
    - UNet: ResBlocks are post-norm (conv, GroupNorm, scale-shift, SiLU); every ResBlock of the levels in
      ``attention_levels`` and the lowest level are followed by self-attention (channel LayerNorm, ``heads``
      of ``attention_head_dim`` features); the first ``full_resolution_levels`` levels keep full resolution;
      downsampling is a kernel-4 stride-2 conv and upsampling a transposed conv; a decoder level's last ResBlock
      maps to the next level's width; the head is a ResBlock on the decoder output concatenated with the input
      conv's output, then a 1x1 conv;
    - DiT: U-shaped with long skips (U-ViT): one input block per full-resolution level, ``dit_depth`` middle
      blocks, one output block per full-resolution level (each concatenating the matching input block's tokens),
      and a final layer after every input and output block: input block ``i`` feeds encoder level ``i``, output
      block ``j`` decoder level ``full_resolution_levels - 1 - j`` (four fusion points at the defaults).

    Spatial sides must be multiples of ``2 ** (len(channels) - 1)`` (``2 ** (len(channels) -
    full_resolution_levels)`` for the original) and of ``dit_patch``; the net is not tied to one size.

    Args:
        in_channels: channels of the noised latent (plus any conditioning channels); set by the module.
        out_channels: channels of the prediction; set by the module.
        num_class_embeds: number of class labels (including the null label) for class conditioning, or ``None``.
        channels: UNet channels per resolution level; each level after the first (after the first
            ``full_resolution_levels`` for the original) halves every side.
        num_res_blocks: ResBlocks per UNet level (encoder and decoder alike).
        norm_num_groups: GroupNorm groups; must divide every entry of ``channels``.
        mid_attention_heads: heads of the self-attention at the lowest UNet level (must divide ``channels[-1]``);
            0 leaves it out. Its memory grows with the square of the lowest level's voxel count. The original
            uses these heads for every UNet attention.
        dit_patch: side of the latent sub-volumes the DiT sees, in latent voxels (8 in the paper).
        dit_token_patch: side of each token's cube inside a sub-volume, in latent voxels; divides ``dit_patch``.
        dit_hidden: DiT token width; a multiple of ``dit_heads``.
        dit_depth: DiT blocks (at least 1); for the original, the middle blocks of the U-shaped DiT.
        dit_heads: DiT attention heads.
        dit_fusion: where DiT features are added to the UNet: any of ``"early"`` (encoder, full resolution) and
            ``"late"`` (decoder, full resolution); empty leaves the DiT out (a plain 3D UNet). The original needs
            both.
        resolution_conditioning: add an embedding of the input's spatial size to the conditioning (the original
            requires it).
        variant: ``"light"`` (medsynth's compact net) or ``"meddiffusion"`` (the original network, above).
        attention_levels: (original) UNet levels, counted from 0 at full resolution, whose ResBlocks are each
            followed by self-attention (3D MedDiffusion: the two lowest of five).
        attention_head_dim: (original) features per UNet attention head.
        full_resolution_levels: (original) leading UNet levels at full resolution; the DiT feeds each of them on
            both the encoder and the decoder side. Their ``channels`` must equal ``channels[0]``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_class_embeds: Optional[int] = None,
        channels: Sequence[int] = (64, 128, 256),
        num_res_blocks: int = 1,
        norm_num_groups: int = 32,
        mid_attention_heads: int = 4,
        dit_patch: int = 8,
        dit_token_patch: int = 2,
        dit_hidden: int = 256,
        dit_depth: int = 2,
        dit_heads: int = 4,
        dit_fusion: Sequence[FusionPoint] = ("early", "late"),
        resolution_conditioning: bool = True,
        variant: Literal["light", "meddiffusion"] = "light",
        attention_levels: Sequence[int] = (),
        attention_head_dim: int = 32,
        full_resolution_levels: int = 1,
    ) -> None:
        super().__init__()
        channels = tuple(channels)
        dit_fusion = tuple(dit_fusion)
        attention_levels = tuple(int(a) for a in attention_levels)
        self._check_settings(
            channels, num_res_blocks, norm_num_groups, mid_attention_heads, dit_patch, dit_token_patch, dit_hidden,
            dit_depth, dit_heads, dit_fusion, num_class_embeds,
        )
        self._check_variant(
            variant, channels, dit_fusion, resolution_conditioning, attention_levels, attention_head_dim,
            full_resolution_levels, mid_attention_heads,
        )
        self.in_channels, self.out_channels = in_channels, out_channels
        self.num_class_embeds = num_class_embeds
        self.channels = channels
        self.dit_patch, self.dit_token_patch = dit_patch, dit_token_patch
        self.dit_fusion = dit_fusion
        self.resolution_conditioning = resolution_conditioning
        self.variant = variant
        self.full_resolution_levels = full_resolution_levels
        original = variant == "meddiffusion"
        c0, groups = channels[0], norm_num_groups
        self.emb_dim = emb_dim = 8 * c0 if original else 4 * c0

        # Conditioning: time (+ class) (+ resolution), one (B, emb_dim) vector.
        time_dim = 4 * c0
        act = nn.GELU() if original else nn.SiLU()
        self.time_mlp = nn.Sequential(nn.Linear(c0, time_dim), act, nn.Linear(time_dim, time_dim))
        self.class_embedding = nn.Embedding(num_class_embeds, time_dim) if num_class_embeds is not None else None
        res_in = 3 if original else 3 * c0
        self.resolution_mlp = (
            nn.Sequential(nn.Linear(res_in, time_dim), nn.SiLU(), nn.Linear(time_dim, time_dim))
            if resolution_conditioning
            else None
        )

        # Inter-patch branch: the UNet. Per level: ResBlocks with an attention (or Identity) after each, then a
        # downsampler; upsamplers[i] maps level i + 1's decoder output to level i's decoder input.
        def res_block(cin: int, cout: int) -> nn.Module:
            return _PostNormResBlock3D(cin, cout, emb_dim, groups) if original else ResBlock(3, cin, cout, groups, emb_dim=emb_dim)

        def attention(c: int, level: int) -> nn.Module:
            if level not in attention_levels:
                return nn.Identity()
            return MultiHeadSelfAttention(3, c, mid_attention_heads, attention_head_dim, _ChannelLayerNorm(c))

        full_res = full_resolution_levels
        self.conv_in = nn.Conv3d(in_channels, c0, 3, padding=1)
        self.down_levels, self.down_attentions, self.downsamplers = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        prev = c0
        for i, c in enumerate(channels):
            blocks, attentions = nn.ModuleList(), nn.ModuleList()
            for _ in range(num_res_blocks):
                blocks.append(res_block(prev, c))
                attentions.append(attention(c, i))
                prev = c
            self.down_levels.append(blocks)
            self.down_attentions.append(attentions)
            if i < len(channels) - 1:
                if not original:
                    self.downsamplers.append(nn.Conv3d(c, c, 3, stride=2, padding=1))
                else:
                    self.downsamplers.append(nn.Conv3d(c, c, 4, stride=2, padding=1) if i >= full_res - 1 else nn.Identity())
        self.mid_block1 = res_block(channels[-1], channels[-1])
        if original:  # the original always attends at the lowest level
            c = channels[-1]
            self.mid_attention = MultiHeadSelfAttention(3, c, mid_attention_heads, attention_head_dim, _ChannelLayerNorm(c))
        else:
            self.mid_attention = (
                _SelfAttention3D(channels[-1], mid_attention_heads, groups) if mid_attention_heads else nn.Identity()
            )
        self.mid_block2 = res_block(channels[-1], channels[-1])
        self.up_levels, self.up_attentions = nn.ModuleList(), nn.ModuleList()
        for i, c in enumerate(channels):
            # The original's last ResBlock of a decoder level already maps to the next (higher) level's width.
            outs = [c] * num_res_blocks if not original else [c] * (num_res_blocks - 1) + [channels[max(i - 1, 0)]]
            self.up_levels.append(nn.ModuleList(res_block(2 * c, o) for o in outs))
            self.up_attentions.append(nn.ModuleList(attention(o, i) for o in outs))
        if not original:
            self.upsamplers = nn.ModuleList(
                _UpsampleConv3d(channels[i + 1], channels[i], 3, padding=1) for i in range(len(channels) - 1)
            )
            self.norm_out = nn.GroupNorm(groups, c0)
            self.conv_out = nn.Conv3d(c0, out_channels, 3, padding=1)
            nn.init.zeros_(self.conv_out.weight)
            nn.init.zeros_(self.conv_out.bias)
        else:
            self.upsamplers = nn.ModuleList(
                nn.ConvTranspose3d(channels[i], channels[i], 4, stride=2, padding=1) if i >= full_res - 1 else nn.Identity()
                for i in range(len(channels) - 1)
            )
            self.final_block = _PostNormResBlock3D(2 * c0, c0, None, groups)
            self.conv_out = nn.Conv3d(c0, out_channels, 1)

        # Intra-patch branch: the sub-volume DiT and its fusion maps.
        self.dit_read_after = {"early": math.ceil(dit_depth / 2), "late": dit_depth}
        if dit_fusion:
            grid = dit_patch // dit_token_patch
            self.patch_embed = nn.Conv3d(in_channels, dit_hidden, dit_token_patch, stride=dit_token_patch)
            self.register_buffer(
                "token_pos", sincos_grid_embedding((grid,) * 3, dit_hidden)[None], persistent=False
            )  # (1, tokens, hidden): frozen, computed, not saved
            self.dit_blocks = nn.ModuleList(_DiTBlock(dit_hidden, dit_heads, emb_dim) for _ in range(dit_depth))
            features = dit_token_patch**3 * c0
            if not original:
                self.dit_final = nn.ModuleDict(
                    {name: _DiTFinalLayer(dit_hidden, emb_dim, features) for name in dit_fusion}
                )
            else:
                self.dit_input_blocks = nn.ModuleList(
                    _DiTBlock(dit_hidden, dit_heads, emb_dim) for _ in range(full_res)
                )
                self.dit_input_final = nn.ModuleList(
                    _DiTFinalLayer(dit_hidden, emb_dim, features) for _ in range(full_res)
                )
                self.dit_output_blocks = nn.ModuleList(
                    _DiTBlock(dit_hidden, dit_heads, emb_dim, skip=True) for _ in range(full_res)
                )
                self.dit_output_final = nn.ModuleList(
                    _DiTFinalLayer(dit_hidden, emb_dim, features) for _ in range(full_res)
                )
            self._init_dit()

    @staticmethod
    def _check_settings(
        channels, num_res_blocks, groups, mid_heads, patch, token_patch, hidden, depth, heads, fusion, num_classes
    ) -> None:
        if not channels or any(c < 1 for c in channels):
            raise MedsynthError(f"net.channels must be a non-empty list of positive widths, got {list(channels)}")
        bad = [c for c in channels if c % groups]
        if bad:
            raise MedsynthError(f"net.norm_num_groups={groups} does not divide channels {bad}")
        if num_res_blocks < 1:
            raise MedsynthError(f"net.num_res_blocks must be at least 1, got {num_res_blocks}")
        if mid_heads < 0 or (mid_heads and channels[-1] % mid_heads):
            raise MedsynthError(f"net.mid_attention_heads={mid_heads} must be 0 or divide channels[-1]={channels[-1]}")
        if num_classes is not None and num_classes < 1:
            raise MedsynthError(f"net.num_class_embeds must be None or at least 1, got {num_classes}")
        unknown = [f for f in fusion if f not in ("early", "late")]
        if unknown or len(set(fusion)) != len(fusion):
            raise MedsynthError(f"net.dit_fusion must hold distinct 'early'/'late' entries, got {list(fusion)}")
        if fusion:
            if token_patch < 1 or patch < 1 or patch % token_patch:
                raise MedsynthError(f"net.dit_token_patch={token_patch} must divide net.dit_patch={patch}")
            if heads < 1 or hidden % heads:
                raise MedsynthError(f"net.dit_heads={heads} must divide net.dit_hidden={hidden}")
            if depth < 1:
                raise MedsynthError(f"net.dit_depth must be at least 1, got {depth}")

    @staticmethod
    def _check_variant(variant, channels, fusion, resolution, attention_levels, head_dim, full_res, mid_heads) -> None:
        if variant not in ("light", "meddiffusion"):
            raise MedsynthError(f"net.variant must be 'light' or 'meddiffusion', got {variant!r}")
        if variant == "light":
            if attention_levels or full_res != 1:
                raise MedsynthError(
                    "net.attention_levels and net.full_resolution_levels are options of net.variant=meddiffusion"
                )
            return
        if set(fusion) != {"early", "late"} or not resolution:
            raise MedsynthError(
                "net.variant=meddiffusion needs net.dit_fusion=[early, late] and net.resolution_conditioning=true"
            )
        if not 1 <= full_res <= len(channels) - 1 or any(c != channels[0] for c in channels[:full_res]):
            raise MedsynthError(
                f"net.full_resolution_levels={full_res} must be in [1, {len(channels) - 1}] with those levels' "
                f"channels equal to channels[0]={channels[0]}, got channels {list(channels)}"
            )
        if any(not 0 <= a < len(channels) for a in attention_levels) or head_dim < 1 or mid_heads < 1:
            raise MedsynthError(
                f"net.attention_levels {list(attention_levels)} must be levels in [0, {len(channels) - 1}], and "
                f"net.attention_head_dim ({head_dim}) and net.mid_attention_heads ({mid_heads}) positive"
            )

    def _init_dit(self) -> None:
        """DiT's initialisation: Xavier linears and patch embedding, zero adaLN modulations and output maps."""
        finals = [*self.dit_final.values()] if self.variant == "light" else [*self.dit_input_final, *self.dit_output_final]
        blocks = [*self.dit_blocks] + ([] if self.variant == "light" else [*self.dit_input_blocks, *self.dit_output_blocks])
        for m in [self.patch_embed, *(sub for b in blocks + finals for sub in b.modules())]:
            if isinstance(m, (nn.Linear, nn.Conv3d)):
                nn.init.xavier_uniform_(m.weight.view(m.weight.shape[0], -1))
                nn.init.zeros_(m.bias)
        for m in blocks + finals:
            nn.init.zeros_(m.modulation[-1].weight)
            nn.init.zeros_(m.modulation[-1].bias)
        for m in finals:
            nn.init.zeros_(m.linear.weight)
            nn.init.zeros_(m.linear.bias)

    @property
    def size_multiple(self) -> int:
        """The number every spatial side must be a multiple of: ``2 ** downsamplings`` and ``dit_patch``."""
        m = 2 ** (len(self.channels) - self.full_resolution_levels)
        return math.lcm(m, self.dit_patch) if self.dit_fusion else m

    def embed_conditions(
        self, t: Tensor, class_labels: Optional[Tensor], spatial_shape: Sequence[int], batch_size: int
    ) -> Tensor:
        """The conditioning vector: time, plus class, plus resolution embeddings.

        Args:
            t: timesteps, ``(B,)`` or a scalar, int or float (in ``[0, T)``).
            class_labels: ``(B,)`` long labels in ``[0, num_class_embeds)``, or ``None``.
            spatial_shape: the latent's ``(D, H, W)`` in voxels.
            batch_size: ``B``.

        Returns:
            ``(B, emb_dim)``: ``4 * channels[0]``, or ``8 * channels[0]`` for the original (resolution concatenated).
        """
        original = self.variant == "meddiffusion"
        t = torch.as_tensor(t, device=self.conv_in.weight.device).reshape(-1).expand(batch_size)
        t_emb = sinusoidal_embedding(t, self.channels[0], sin_first=original, freq_shift=float(original))
        emb = self.time_mlp(t_emb.to(self.conv_in.weight.dtype))
        if class_labels is not None:
            emb = emb + self.class_embedding(class_labels)
        if self.resolution_mlp is not None:
            sizes = torch.tensor([float(s) for s in spatial_shape], device=emb.device)
            if original:
                # The original's resolution input: the latent's sides over 64, concatenated to the embedding.
                size_emb = self.resolution_mlp((sizes / 64.0).to(emb.dtype)[None]).expand(batch_size, -1)
                return torch.cat([emb, size_emb], dim=1)
            size_emb = sinusoidal_embedding(sizes, self.channels[0]).reshape(1, -1)  # (1, 3 * C0)
            emb = emb + self.resolution_mlp(size_emb.to(emb.dtype))
        return emb

    def intra_patch_features(self, x: Tensor, emb: Tensor) -> dict[str, Tensor]:
        """Run the DiT on every ``dit_patch`` sub-volume of ``x`` and return its fusion features.

        Args:
            x: the input latent ``(B, C_in, D, H, W)``; sides multiples of ``dit_patch``.
            emb: the conditioning ``(B, emb_dim)`` from :meth:`embed_conditions`.

        Returns:
            ``(B, channels[0], D, H, W)`` maps by fusion point: ``"early"`` / ``"late"`` are added to the encoder /
            decoder input of level 0, and (original only) ``"early1"`` / ``"late1"`` to those of level 1, etc.
        """
        b, c, *spatial = x.shape
        p = self.dit_patch
        n = [s // p for s in spatial]  # sub-volumes per axis
        # Fold the sub-volumes into the batch: (B * n_sub, C, p, p, p), sub-volume index in C order.
        sub = x.reshape(b, c, n[0], p, n[1], p, n[2], p).permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(-1, c, p, p, p)
        tokens = self.patch_embed(sub).flatten(2).transpose(1, 2) + self.token_pos.to(x.dtype)  # (N, T, hidden)
        if self.variant == "meddiffusion":
            cond = emb[:, None].expand(b, math.prod(n), self.emb_dim).reshape(-1, self.emb_dim)  # (N, E)
            out, saved = {}, []
            for level, (block, final) in enumerate(zip(self.dit_input_blocks, self.dit_input_final)):
                tokens = block(tokens, cond)
                saved.append(tokens)
                out[_fusion_name("early", level)] = self._unfold(final(tokens, cond), b, n)
            for block in self.dit_blocks:
                tokens = block(tokens, cond)
            for j, (block, final) in enumerate(zip(self.dit_output_blocks, self.dit_output_final)):
                tokens = block(tokens, cond, saved.pop())
                level = self.full_resolution_levels - 1 - j
                out[_fusion_name("late", level)] = self._unfold(final(tokens, cond), b, n)
            return out
        where = sincos_grid_embedding(n, self.emb_dim, device=x.device).to(emb.dtype)  # (n_sub, E)
        cond = (emb[:, None] + where[None]).reshape(-1, self.emb_dim)  # (N, E)
        out = {}
        for depth, block in enumerate(self.dit_blocks, start=1):
            tokens = block(tokens, cond)
            for name in self.dit_fusion:
                if self.dit_read_after[name] == depth:
                    out[name] = self._unfold(self.dit_final[name](tokens, cond), b, n)
        return out

    def _unfold(self, tokens: Tensor, b: int, n: Sequence[int]) -> Tensor:
        """Token features ``(B * n_sub, T, tp**3 * C0)`` back to a volume ``(B, C0, D, H, W)``."""
        p, tp, c0 = self.dit_patch, self.dit_token_patch, self.channels[0]
        g = p // tp
        v = tokens.reshape(b, *n, g, g, g, tp, tp, tp, c0)
        # (b, n0, n1, n2, g0, g1, g2, t0, t1, t2, c) -> (b, c, n0, g0, t0, n1, g1, t1, n2, g2, t2)
        v = v.permute(0, 10, 1, 4, 7, 2, 5, 8, 3, 6, 9)
        return v.reshape(b, c0, n[0] * p, n[1] * p, n[2] * p)

    def check_spatial_shape(self, spatial: Sequence[int]) -> None:
        """Refuse a spatial shape ``(D, H, W)`` this net cannot denoise (before any sampling starts)."""
        spatial, m = tuple(int(s) for s in spatial), self.size_multiple
        if len(spatial) != 3 or any(s % m or s <= 0 for s in spatial):
            raise MedsynthError(
                f"BiFlowNet3D cannot produce latents of shape {spatial}: each of 3 sides must be a multiple of {m} "
                f"(2 ** downsamplings = {2 ** (len(self.channels) - self.full_resolution_levels)}"
                + (f", dit_patch = {self.dit_patch})" if self.dit_fusion else ")")
            )

    def _check_input(self, x: Tensor, class_labels: Optional[Tensor]) -> None:
        if x.ndim != 5 or x.shape[1] != self.in_channels:
            raise MedsynthError(
                f"BiFlowNet3D expects a (B, {self.in_channels}, D, H, W) input, got shape {tuple(x.shape)}"
            )
        self.check_spatial_shape(x.shape[2:])
        if class_labels is not None and self.class_embedding is None:
            raise MedsynthError("BiFlowNet3D got class_labels but was built with num_class_embeds=None")
        if class_labels is None and self.class_embedding is not None:
            raise MedsynthError("BiFlowNet3D was built with num_class_embeds but got no class_labels")
        if class_labels is not None and tuple(class_labels.shape) != (x.shape[0],):
            raise MedsynthError(
                f"BiFlowNet3D class_labels must have shape ({x.shape[0]},), got {tuple(class_labels.shape)}"
            )

    def forward(self, x: Tensor, t: Tensor, class_labels: Optional[Tensor] = None) -> Tensor:
        """Predict from the noised latent ``x`` ``(B, C_in, D, H, W)`` at timesteps ``t`` ``(B,)``.

        Args:
            x: noised latent ``(B, in_channels, D, H, W)``; sides multiples of :attr:`size_multiple`.
            t: timesteps ``(B,)`` (or a scalar), int or float in ``[0, T)``.
            class_labels: ``(B,)`` long labels, required exactly when built with ``num_class_embeds``.

        Returns:
            ``(B, out_channels, D, H, W)``.
        """
        self._check_input(x, class_labels)
        emb = self.embed_conditions(t, class_labels, x.shape[2:], x.shape[0])  # (B, E)
        dit = self.intra_patch_features(x, emb) if self.dit_fusion else {}
        h = self.conv_in(x)  # (B, C0, *spatial)
        first = h
        skips = []
        for i, (blocks, attentions) in enumerate(zip(self.down_levels, self.down_attentions)):
            if _fusion_name("early", i) in dit:
                h = h + dit[_fusion_name("early", i)]
            for block, attention in zip(blocks, attentions):
                h = attention(block(h, emb))
                skips.append(h)
            if i < len(self.downsamplers):
                h = self.downsamplers[i](h)
        h = self.mid_block2(self.mid_attention(self.mid_block1(h, emb)), emb)
        for i in reversed(range(len(self.channels))):
            if i < len(self.upsamplers):
                h = self.upsamplers[i](h)  # (B, C, *spatial_i)
            if _fusion_name("late", i) in dit:
                h = h + dit[_fusion_name("late", i)]
            for block, attention in zip(self.up_levels[i], self.up_attentions[i]):
                h = attention(block(torch.cat([h, skips.pop()], dim=1), emb))
        if self.variant == "meddiffusion":
            return self.conv_out(self.final_block(torch.cat([h, first], dim=1)))  # (B, C_out, *spatial)
        return self.conv_out(F.silu(self.norm_out(h)))  # (B, C_out, *spatial)
