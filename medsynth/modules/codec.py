"""The latent codec: how a latent diffusion model turns its samples back into images or volumes."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import lightning as L
import torch
from torch import Tensor

from medsynth.errors import MedsynthError
from medsynth.loading import load_module
from medsynth.nets.tiling import decode_tiled
from medsynth.provenance import file_sha256


class LatentCodec:
    """A frozen autoencoder with the scaling its latents were stored with: loads the autoencoder checkpoint the
    latent manifest names (checking its SHA-256), unscales samples and decodes them in overlapping, blended tiles.

    The codec is not an ``nn.Module`` child of the diffusion model on purpose: the autoencoder is never trained,
    saved in the diffusion checkpoint or averaged by EMA; it is loaded when first needed.

    Args:
        latent_space: what the latent manifest records (:class:`~medsynth.data.LatentDataModule` links it):
            ``shift`` and ``scale`` (stored latent = (z - shift) * scale), ``method`` (``minmax`` or ``std``),
            ``autoencoder`` (checkpoint path) and ``autoencoder_sha256``.
        autoencoder: the autoencoder checkpoint to use instead of the recorded path (it must be the same file).
        decode_tile: latent tile side for decoding; ``None``: twice the autoencoder's training patch, 0: whole.
        latent_channels: channels of the latents the diffusion model generates (checked against the autoencoder).
    """

    def __init__(self, latent_space: dict, autoencoder: Optional[Path] = None, decode_tile: Optional[int] = None,
                 latent_channels: Optional[int] = None) -> None:
        self.latent_space = dict(latent_space)
        self.autoencoder = Path(autoencoder) if autoencoder else None
        self.decode_tile = decode_tile
        self.latent_channels = latent_channels
        self._module: Optional[L.LightningModule] = None

    @property
    def bounded(self) -> bool:
        """Whether scaled latents live in [-1, 1] (min-max scaling) and may be clipped there; standardised ones
        (``std``) are unbounded: clipping would cut about a third of their values."""
        return self.latent_space.get("method", "minmax") == "minmax"

    def module(self, device: Optional[torch.device] = None) -> L.LightningModule:
        """The frozen autoencoder module, loaded once and checked against the latents.

        Raises:
            MedsynthError: no checkpoint known, a missing file, another file than the latents were encoded with,
                or another latent channel count.
        """
        if self._module is None:
            path = self.autoencoder or self.latent_space.get("autoencoder")
            if not path:
                raise MedsynthError("this model learns latents but no autoencoder checkpoint is known: "
                                    "--model.autoencoder AE.ckpt")
            path = Path(path)
            if not path.is_file():
                raise MedsynthError(f"{path}: autoencoder checkpoint does not exist (give --model.autoencoder AE.ckpt)")
            expected = self.latent_space.get("autoencoder_sha256")
            if expected and file_sha256(path) != expected:
                raise MedsynthError(f"{path}: not the autoencoder these latents were encoded with (SHA-256 differs "
                                    f"from the latent manifest's {expected[:12]})")
            module = load_module(path)
            channels = getattr(getattr(module, "net", None), "latent_channels", None)
            if self.latent_channels is not None and channels != self.latent_channels:
                raise MedsynthError(f"{path}: the autoencoder has {channels} latent channels but this model "
                                    f"generates {self.latent_channels}")
            for p in module.parameters():
                p.requires_grad_(False)
            self._module = module.eval()
        if device is not None:
            self._module.to(device)
        return self._module

    def unscale(self, z: Tensor) -> Tensor:
        """Scaled latents as the autoencoder produced them: ``z / scale + shift``."""
        return z.float() / float(self.latent_space["scale"]) + float(self.latent_space["shift"])

    @torch.no_grad()
    def decode(self, z: Tensor, progress: Optional[bool] = None) -> Tensor:
        """Images or volumes ``(B, C, *spatial * factor)`` in [-1, 1] from scaled latent samples
        ``(B, C_latent, *spatial)``, decoded in overlapping, blended tiles (``progress``: a bar over the tiles)."""
        module = self.module(z.device)
        factor = module.net.downsample_factor
        tile = self.decode_tile if self.decode_tile is not None else 2 * module.image_size // factor
        return decode_tiled(module.net.decode, self.unscale(z), tile or max(z.shape[2:]), factor,
                            overlap=module.hparams.predict_overlap, progress=progress).clamp(-1, 1)
