"""Autoencoders for latent diffusion: a VQ PatchVolume autoencoder, a KL autoencoder, and their vector quantiser.

Every autoencoder here follows one protocol, which the autoencoder LightningModule, the latent writers and the
tiled decoding in :mod:`medsynth.nets.tiling` rely on:

- attributes ``spatial_dims`` (2 or 3), ``in_channels``, ``latent_channels`` and ``downsample_factor`` (the
  size reduction per spatial axis, e.g. 4 or 8);
- ``forward(x) -> (reconstruction, regularisation)``: ``x`` ``(B, in_channels, *spatial)`` gives the
  reconstruction ``(B, in_channels, *spatial)`` and a scalar regularisation loss (the KL term for
  :class:`KLAutoencoder`, the commitment loss for :class:`PatchVolumeAutoencoder`);
- ``encode(x) -> z``: a deterministic latent ``(B, latent_channels, *spatial / downsample_factor)`` (the posterior
  mean for KL, the unquantised pre-VQ features for VQ, which 3D MedDiffusion diffuses);
- ``decode(z) -> x``: the image for a latent (the VQ model quantises ``z`` first), so that in eval mode
  ``decode(encode(x))`` equals ``forward(x)[0]``;
- ``decoder_modules() -> list[nn.Module]``: what ``decode`` runs, the part stage 2 trains while the rest is frozen;
- spatial sizes that are not multiples of ``downsample_factor`` raise :class:`~medsynth.errors.MedsynthError`.
"""

from __future__ import annotations

from typing import Literal, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from monai.networks.layers import Conv
from monai.networks.nets import AutoencoderKL
from torch import Tensor, nn

from medsynth.errors import MedsynthError
from medsynth.nets.blocks import MultiHeadSelfAttention, ResBlock

# Rows of the (N, K) distance matrix computed at once: bounds its memory to ~256 MiB in float32.
_DISTANCE_CHUNK_ELEMENTS = 2**26


def check_spatial_shape(x: Tensor, spatial_dims: int, factor: int) -> None:
    """Raise :class:`MedsynthError` unless ``x`` is ``(B, C, *spatial)`` with sides that are multiples of ``factor``.

    Args:
        x: input batch ``(B, C, *spatial)``.
        spatial_dims: the number of spatial axes the net expects.
        factor: the required divisor of every spatial side (the autoencoder's downsample factor).
    """
    if x.ndim != spatial_dims + 2:
        raise MedsynthError(
            f"autoencoder expects a (B, C, *spatial) input with {spatial_dims} spatial dims, got shape {tuple(x.shape)}"
        )
    spatial = tuple(x.shape[2:])
    if any(s % factor for s in spatial):
        raise MedsynthError(
            f"input spatial shape {spatial} is not a multiple of the autoencoder's downsample factor {factor} per axis"
        )


def _check_spatial_dims(spatial_dims: int) -> None:
    if spatial_dims not in (2, 3):
        raise MedsynthError(f"net.spatial_dims must be 2 or 3, got {spatial_dims}")


class VectorQuantizer(nn.Module):
    """A vector quantiser with an EMA codebook, dead-code restart and a commitment loss.

    Each channel vector of ``z`` is replaced by its nearest code (van den Oord et al., 2017, "Neural Discrete
    Representation Learning"); gradients pass straight through to ``z``. The codebook is not trained by the
    optimiser but follows exponential moving averages of the vectors assigned to each code (Razavi et al., 2019,
    "Generating Diverse High-Fidelity Images with VQ-VAE-2", appendix), with Laplace-smoothed cluster sizes. Codes
    whose EMA cluster size falls below ``dead_code_threshold`` are restarted from random encoder vectors of the
    current batch, as in the 3D MedDiffusion VQ-GAN. Codes start as small N(0, 0.1²) draws with an EMA cluster
    size of 1, so with the default threshold the codes unused in the first steps are restarted from data, which in
    effect initialises the codebook from the encoder outputs.

    The EMA update and restarts happen only in training mode (``self.training``): call ``.eval()`` on the
    quantiser to freeze the codebook (e.g. in stage 2). Under ``torch.distributed`` the per-batch counts and sums
    are all-reduced and the restart vectors broadcast from rank 0, so the codebooks stay identical on all ranks;
    every rank must therefore call ``forward`` in training mode the same number of times.

    After each ``forward``, ``last_perplexity`` (``exp`` of the entropy of the code usage in the batch, between 1
    and ``num_codes``) and ``last_restarted`` (codes restarted in that step) are available for logging.

    Args:
        num_codes: codebook size K (8192 in 3D MedDiffusion).
        code_dim: code dimension D; the channels of the input.
        decay: EMA decay in [0, 1) of the cluster sizes and sums (0.99 in 3D MedDiffusion).
        commitment_weight: weight beta of the commitment loss ``beta * mse(z, sg[z_q])``.
        dead_code_threshold: codes whose EMA cluster size (in vectors per step) drops below this are restarted;
            0 disables restarts.
        eps: Laplace smoothing constant of the cluster sizes (> 0).
    """

    codebook: Tensor
    cluster_size: Tensor
    embed_sum: Tensor

    def __init__(
        self,
        num_codes: int = 8192,
        code_dim: int = 8,
        decay: float = 0.99,
        commitment_weight: float = 0.25,
        dead_code_threshold: float = 1.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if num_codes < 1 or code_dim < 1:
            raise MedsynthError(f"num_codes and code_dim must be positive, got {num_codes} and {code_dim}")
        if not 0.0 <= decay < 1.0:
            raise MedsynthError(f"decay must be in [0, 1), got {decay}")
        if commitment_weight < 0 or dead_code_threshold < 0 or eps <= 0:
            raise MedsynthError(
                f"commitment_weight and dead_code_threshold must be >= 0 and eps > 0, got {commitment_weight}, "
                f"{dead_code_threshold}, {eps}"
            )
        self.num_codes = num_codes
        self.code_dim = code_dim
        self.decay = decay
        self.commitment_weight = commitment_weight
        self.dead_code_threshold = dead_code_threshold
        self.eps = eps
        codebook = 0.1 * torch.randn(num_codes, code_dim)
        self.register_buffer("codebook", codebook)  # (K, D)
        self.register_buffer("cluster_size", torch.ones(num_codes))  # (K,), EMA of vectors per code per step
        self.register_buffer("embed_sum", codebook.clone())  # (K, D), EMA of the sums; codebook = sum / size
        self.last_perplexity: Tensor = torch.tensor(float("nan"))
        self.last_restarted: int = 0

    def _flatten(self, z: Tensor) -> Tensor:
        if z.ndim < 2 or z.shape[1] != self.code_dim:
            raise MedsynthError(f"quantiser expects (B, {self.code_dim}, *spatial) input, got {tuple(z.shape)}")
        return z.movedim(1, -1).reshape(-1, self.code_dim)  # (N, D)

    @torch.no_grad()
    def nearest_codes(self, flat: Tensor) -> Tensor:
        """The index ``(N,)`` of the nearest code (Euclidean, computed in float32) for each row of ``flat`` ``(N, D)``."""
        with torch.autocast(device_type=flat.device.type, enabled=False):
            flat = flat.float()
            codebook = self.codebook.float()
            code_sq = codebook.pow(2).sum(1)  # (K,)
            rows = max(1, _DISTANCE_CHUNK_ELEMENTS // self.num_codes)
            indices = []
            for chunk in flat.split(rows):
                # |x - c|^2 = |x|^2 - 2 x.c + |c|^2; |x|^2 is constant per row and does not change the argmin.
                dist_sq = code_sq[None] - 2.0 * chunk @ codebook.t()  # (n, K)
                indices.append(dist_sq.argmin(1))
            return torch.cat(indices) if indices else flat.new_zeros(0, dtype=torch.long)

    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """Quantise ``z`` without touching the codebook.

        Args:
            z: encoder features ``(B, D, *spatial)``.

        Returns:
            ``(z_q, indices)``: the nearest codes ``(B, D, *spatial)`` in ``z``'s dtype with the straight-through
            gradient ``z + sg[z_q - z]``, and the code indices ``(B, *spatial)`` (long).
        """
        flat = self._flatten(z)  # (N, D)
        indices = self.nearest_codes(flat)  # (N,)
        z_q = self.codebook[indices].to(z.dtype)  # (N, D)
        z_q = z_q.view(z.shape[0], *z.shape[2:], self.code_dim).movedim(-1, 1)  # (B, D, *spatial)
        z_q = z + (z_q - z).detach()
        return z_q, indices.view(z.shape[0], *z.shape[2:])

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Quantise ``z``, return the commitment loss and, in training mode, update the codebook.

        Args:
            z: encoder features ``(B, D, *spatial)`` for any number of spatial axes.

        Returns:
            ``(z_q, loss, indices)``: straight-through quantised features ``(B, D, *spatial)``, the scalar
            commitment loss ``commitment_weight * mse(z, sg[z_q])`` (float32), and code indices ``(B, *spatial)``.
        """
        z_q, indices = self.quantize(z)
        loss = self.commitment_weight * F.mse_loss(z.float(), z_q.detach().float())
        flat_indices = indices.reshape(-1)
        counts = torch.bincount(flat_indices, minlength=self.num_codes).float()  # (K,)
        self.last_restarted = 0
        if self.training:
            counts = self._update(self._flatten(z).detach().float(), flat_indices, counts)
        probs = counts / counts.sum().clamp_min(1.0)
        self.last_perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum()).detach()
        return z_q, loss, indices

    @torch.no_grad()
    def _update(self, flat: Tensor, indices: Tensor, counts: Tensor) -> Tensor:
        """EMA-update the codebook with the vectors ``flat`` ``(N, D)`` assigned to ``indices``; return global counts."""
        sums = torch.zeros_like(self.embed_sum, dtype=torch.float32).index_add_(0, indices, flat)  # (K, D)
        distributed = dist.is_available() and dist.is_initialized()
        if distributed:
            dist.all_reduce(counts)
            dist.all_reduce(sums)
        self.cluster_size.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        self.embed_sum.mul_(self.decay).add_(sums, alpha=1.0 - self.decay)
        total = self.cluster_size.sum()
        # Laplace smoothing keeps the division finite for codes with a (near) zero cluster size.
        smoothed = (self.cluster_size + self.eps) / (total + self.num_codes * self.eps) * total  # (K,)
        self.codebook.copy_(self.embed_sum / smoothed[:, None])

        dead = self.cluster_size < self.dead_code_threshold  # identical on all ranks: the sizes are all-reduced
        num_dead = int(dead.sum())
        if num_dead and flat.shape[0]:
            if flat.shape[0] >= num_dead:
                choice = torch.randperm(flat.shape[0], device=flat.device)[:num_dead]
            else:
                choice = torch.randint(flat.shape[0], (num_dead,), device=flat.device)
            new_codes = flat[choice].contiguous()  # (num_dead, D)
            if distributed:
                dist.broadcast(new_codes, src=0)
            new_codes = new_codes.to(self.codebook.dtype)
            self.codebook[dead] = new_codes
            # Restarted codes get the threshold as cluster size and a consistent sum, so that codebook = sum / size.
            self.cluster_size[dead] = self.dead_code_threshold
            self.embed_sum[dead] = new_codes * self.dead_code_threshold
            self.last_restarted = num_dead
        return counts


class _Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 convolution (avoids transposed-conv checkerboards)."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = Conv[Conv.CONV, spatial_dims](in_channels, out_channels, kernel_size=3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class PatchVolumeAutoencoder(nn.Module):
    """The PatchVolume VQ autoencoder of 3D MedDiffusion: conv encoder, EMA vector quantiser, conv decoder.

    Wang et al., 2024, "3D MedDiffusion: A 3D Medical Diffusion Model for Controllable and High-quality Medical
    Image Generation". The encoder is trained on patches (e.g. 64³) and applied patch-wise to whole volumes
    (:func:`medsynth.nets.tiling.encode_patchwise`); the decoder then decodes the stitched latent jointly. The
    latents used for diffusion are the unquantised encoder features (:meth:`encode`). Works in 2D and 3D.

    Encoder: 3x3 conv to ``channels[0]``, then per level ``num_res_blocks`` residual blocks (GroupNorm + SiLU) and,
    between levels, a stride-2 conv; optionally a middle block (ResBlock, self-attention, ResBlock); GroupNorm, SiLU
    and a conv to ``latent_channels``; optionally a 1x1 "pre-VQ" conv. Decoder: the mirror image (optional
    "post-VQ" 1x1 conv, conv in, optional middle block, levels with upsampling), ending in GroupNorm, SiLU and a 3x3
    conv to ``in_channels`` without an output activation (data are in [-1, 1]; the reconstruction is
    unconstrained). The protocol is described in the module docstring.

    The original network of 3D MedDiffusion is ``channels=[48, 96, 96]`` (4x) or ``[48, 96, 192, 192]`` (8x),
    ``num_res_blocks=2``, ``norm_num_groups=24``, ``norm_eps=1e-6``, ``mid_attention_heads=4``,
    ``quant_convs=true``, ``downsample_kernel=4``, ``upsample="transposed"``, ``encoder_out_kernel=3``
    (``configs/experiments/ae3d_meddiffusion_{4x,8x}.yaml``: 8,485,641 and 34,818,921 parameters); its
    checkpoints load into it (:mod:`medsynth.convert.meddiffusion`).

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels.
        channels: feature channels per level; ``len(channels) - 1`` stride-2 downsamplings, so (64, 128, 256)
            gives a 4x and four entries an 8x smaller latent per axis.
        num_res_blocks: residual blocks per level (>= 1).
        latent_channels: latent (and code) dimension (8 in 3D MedDiffusion).
        num_codes: codebook size (8192 in 3D MedDiffusion).
        decay: codebook EMA decay in [0, 1).
        commitment_weight: weight of the commitment loss.
        dead_code_threshold: EMA cluster size below which a code is restarted; 0 disables restarts.
        norm_num_groups: GroupNorm groups; a level uses ``min(norm_num_groups, channels)``, which must divide its
            channels.
        norm_eps: the GroupNorms' epsilon (1e-6 in 3D MedDiffusion).
        mid_attention_heads: heads of a middle block (ResBlock, self-attention, ResBlock) at the lowest resolution
            of encoder and decoder; 0 leaves it out.
        attention_head_dim: features per head of that self-attention.
        quant_convs: 1x1 convs on the latent before quantisation (part of :meth:`encode`) and after it (part of
            :meth:`decode`).
        downsample_kernel: kernel of the stride-2 downsampling convs (3, or 4 as 3D MedDiffusion; padding 1).
        upsample: ``"nearest_conv"`` (nearest 2x and a 3x3 conv to the next level's width) or ``"transposed"``
            (a kernel-4 stride-2 transposed conv keeping the width; the next level's first ResBlock changes it).
        encoder_out_kernel: kernel of the encoder's last conv to ``latent_channels`` (1, or 3).
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        channels: Sequence[int] = (64, 128, 256),
        num_res_blocks: int = 1,
        latent_channels: int = 8,
        num_codes: int = 8192,
        decay: float = 0.99,
        commitment_weight: float = 0.25,
        dead_code_threshold: float = 1.0,
        norm_num_groups: int = 32,
        norm_eps: float = 1e-5,
        mid_attention_heads: int = 0,
        attention_head_dim: int = 32,
        quant_convs: bool = False,
        downsample_kernel: Literal[3, 4] = 3,
        upsample: Literal["nearest_conv", "transposed"] = "nearest_conv",
        encoder_out_kernel: Literal[1, 3] = 1,
    ) -> None:
        super().__init__()
        _check_spatial_dims(spatial_dims)
        channels = tuple(int(c) for c in channels)
        if not channels or min(channels) < 1:
            raise MedsynthError(f"net.channels must be a non-empty list of positive counts, got {channels}")
        if in_channels < 1 or latent_channels < 1 or num_res_blocks < 1 or norm_num_groups < 1:
            raise MedsynthError(
                "net.in_channels, net.latent_channels, net.num_res_blocks and net.norm_num_groups must be positive"
            )
        bad = [c for c in channels if c % min(norm_num_groups, c)]
        if bad:
            raise MedsynthError(f"net.norm_num_groups={norm_num_groups} does not divide channels {bad}")
        if downsample_kernel not in (3, 4) or encoder_out_kernel not in (1, 3) or mid_attention_heads < 0:
            raise MedsynthError(
                f"net.downsample_kernel must be 3 or 4, net.encoder_out_kernel 1 or 3 and net.mid_attention_heads "
                f">= 0, got {downsample_kernel}, {encoder_out_kernel}, {mid_attention_heads}"
            )
        if upsample not in ("nearest_conv", "transposed"):
            raise MedsynthError(f"net.upsample must be 'nearest_conv' or 'transposed', got {upsample!r}")
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.latent_channels = latent_channels
        self.downsample_factor = 2 ** (len(channels) - 1)
        conv = Conv[Conv.CONV, spatial_dims]

        def res_block(cin: int, cout: int) -> nn.Module:
            return ResBlock(spatial_dims, cin, cout, norm_num_groups, norm_eps)

        def norm(c: int) -> nn.GroupNorm:
            return nn.GroupNorm(min(norm_num_groups, c), c, eps=norm_eps)

        def mid_block(c: int) -> list[nn.Module]:
            if not mid_attention_heads:
                return []
            attention = MultiHeadSelfAttention(spatial_dims, c, mid_attention_heads, attention_head_dim, norm(c))
            return [res_block(c, c), attention, res_block(c, c)]

        encoder: list[nn.Module] = [conv(in_channels, channels[0], kernel_size=3, padding=1)]
        prev = channels[0]
        for level, ch in enumerate(channels):
            for _ in range(num_res_blocks):
                encoder.append(res_block(prev, ch))
                prev = ch
            if level < len(channels) - 1:
                encoder.append(conv(ch, ch, kernel_size=downsample_kernel, stride=2, padding=1))
        encoder += mid_block(prev)
        out_pad = encoder_out_kernel // 2
        encoder += [norm(prev), nn.SiLU(), conv(prev, latent_channels, encoder_out_kernel, padding=out_pad)]
        self.encoder = nn.Sequential(*encoder)
        quant_conv = (lambda: conv(latent_channels, latent_channels, 1)) if quant_convs else nn.Identity
        self.pre_quant_conv, self.post_quant_conv = quant_conv(), quant_conv()

        self.quantizer = VectorQuantizer(
            num_codes=num_codes,
            code_dim=latent_channels,
            decay=decay,
            commitment_weight=commitment_weight,
            dead_code_threshold=dead_code_threshold,
        )

        decoder: list[nn.Module] = [conv(latent_channels, channels[-1], kernel_size=3, padding=1)]
        decoder += mid_block(channels[-1])
        prev = channels[-1]
        for level in reversed(range(len(channels))):
            for _ in range(num_res_blocks):
                decoder.append(res_block(prev, channels[level]))
                prev = channels[level]
            if level > 0 and upsample == "transposed":
                transposed = Conv[Conv.CONVTRANS, spatial_dims]
                decoder.append(transposed(prev, prev, kernel_size=4, stride=2, padding=1))
            elif level > 0:
                decoder.append(_Upsample(spatial_dims, prev, channels[level - 1]))
                prev = channels[level - 1]
        decoder += [norm(prev), nn.SiLU(), conv(prev, in_channels, 3, padding=1)]
        self.decoder = nn.Sequential(*decoder)

    def encode(self, x: Tensor) -> Tensor:
        """Unquantised latent ``(B, latent_channels, *spatial / f)`` of images ``x`` ``(B, in_channels, *spatial)``."""
        check_spatial_shape(x, self.spatial_dims, self.downsample_factor)
        return self.pre_quant_conv(self.encoder(x))

    def decode(self, z: Tensor) -> Tensor:
        """Image ``(B, in_channels, *spatial)`` of latent ``z`` ``(B, latent_channels, *spatial / f)``, quantised first.

        The codebook is never updated here (only :meth:`forward` in training mode updates it).
        """
        z_q, _ = self.quantizer.quantize(z)
        return self.decoder(self.post_quant_conv(z_q))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Reconstruct ``x`` ``(B, in_channels, *spatial)``; returns ``(reconstruction, commitment loss)``.

        In training mode the quantiser also updates its EMA codebook (put ``quantizer.eval()`` to freeze it).
        """
        z_q, loss, _ = self.quantizer(self.encode(x))  # (B, L, *spatial / f)
        return self.decoder(self.post_quant_conv(z_q)), loss

    def decoder_modules(self) -> list[nn.Module]:
        """The modules stage 2 trains (everything after the codebook); the rest is frozen there."""
        return [self.post_quant_conv, self.decoder]


class KLAutoencoder(AutoencoderKL):
    """A KL-regularised autoencoder (MONAI ``AutoencoderKL``) with medsynth's autoencoder protocol.

    Rombach et al., 2022, "High-Resolution Image Synthesis with Latent Diffusion Models", in MONAI's implementation
    (Pinaya et al., 2022, "Brain Imaging Generation with Latent Diffusion Models"). ``out_channels`` equals
    ``in_channels``. :meth:`encode` returns the posterior mean only; MONAI's ``(mu, sigma)`` pair is
    :meth:`encode_distribution`. The protocol is described in the module docstring.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels (also the output channels).
        channels: feature channels per level; ``len(channels) - 1`` downsamplings by 2.
        latent_channels: latent channels.
        num_res_blocks: residual blocks per level.
        attention_levels: per level, whether it uses self-attention (default: none).
        norm_num_groups: GroupNorm groups; must divide every entry of ``channels``.
        with_encoder_nonlocal_attn: add a self-attention block at the end of the encoder.
        with_decoder_nonlocal_attn: add a self-attention block at the start of the decoder.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        channels: Sequence[int] = (64, 128, 256),
        latent_channels: int = 4,
        num_res_blocks: int = 1,
        attention_levels: Optional[Sequence[bool]] = None,
        norm_num_groups: int = 32,
        with_encoder_nonlocal_attn: bool = False,
        with_decoder_nonlocal_attn: bool = False,
    ) -> None:
        _check_spatial_dims(spatial_dims)
        channels = tuple(int(c) for c in channels)
        if not channels or min(channels) < 1:
            raise MedsynthError(f"net.channels must be a non-empty list of positive counts, got {channels}")
        attention_levels = (False,) * len(channels) if attention_levels is None else tuple(attention_levels)
        if len(attention_levels) != len(channels):
            raise MedsynthError(
                f"net.attention_levels has {len(attention_levels)} entries but net.channels has {len(channels)}"
            )
        bad = [c for c in channels if c % norm_num_groups]
        if bad:
            raise MedsynthError(f"net.norm_num_groups={norm_num_groups} does not divide channels {bad}")
        super().__init__(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=in_channels,
            num_res_blocks=num_res_blocks,
            channels=channels,
            attention_levels=attention_levels,
            latent_channels=latent_channels,
            norm_num_groups=norm_num_groups,
            with_encoder_nonlocal_attn=with_encoder_nonlocal_attn,
            with_decoder_nonlocal_attn=with_decoder_nonlocal_attn,
        )
        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.downsample_factor = 2 ** (len(channels) - 1)

    def encode_distribution(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Posterior mean and standard deviation, each ``(B, latent_channels, *spatial / f)``, of ``x``."""
        check_spatial_shape(x, self.spatial_dims, self.downsample_factor)
        return super().encode(x)

    def encode(self, x: Tensor) -> Tensor:  # type: ignore[override]
        """Posterior mean ``(B, latent_channels, *spatial / f)`` of images ``x`` ``(B, in_channels, *spatial)``."""
        return self.encode_distribution(x)[0]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        """Reconstruct ``x`` ``(B, in_channels, *spatial)``; returns ``(reconstruction, KL divergence)``.

        In training mode the latent is sampled, ``z = mu + sigma * eps``; in eval mode ``z = mu``. The KL divergence
        to N(0, I) is summed over latent channels and voxels and averaged over the batch (the MONAI tutorials' form).
        """
        mu, sigma = self.encode_distribution(x)  # (B, L, *spatial / f) each
        z = self.sampling(mu, sigma) if self.training else mu
        reconstruction = self.decode(z)
        mu, sigma = mu.float(), sigma.float()
        kl = 0.5 * (mu.pow(2) + sigma.pow(2) - 2.0 * torch.log(sigma) - 1.0)
        return reconstruction, kl.flatten(1).sum(1).mean()

    def reconstruct(self, x: Tensor) -> Tensor:
        """Decode the posterior mean of ``x`` (MONAI's ``reconstruct``, kept working with the mean-only ``encode``)."""
        return self.decode(self.encode(x))

    def encode_stage_2_inputs(self, x: Tensor) -> Tensor:
        """A posterior sample ``mu + sigma * eps`` (MONAI's latent-diffusion inferers call this)."""
        return self.sampling(*self.encode_distribution(x))

    def decoder_modules(self) -> list[nn.Module]:
        """The modules stage 2 trains (everything that ``decode`` runs); the rest is frozen there."""
        return [self.post_quant_conv, self.decoder]


__all__ = ["VectorQuantizer", "PatchVolumeAutoencoder", "KLAutoencoder", "check_spatial_shape"]
