"""Preview grids of samples during training, on disk and in Weights & Biases."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_warn

from medsynth.io import save_png
from medsynth.provenance import png_text
from medsynth.visual import colorize_mask, make_grid, pad_to, picture_rows


class SampleGridLogger(L.Callback):
    """Every ``every_n_epochs`` epochs, sample on the first validation batch's conditions and save a grid.

    Images: rows of conditioning masks, samples, the real images (unconditional models: samples, real). Volumes:
    one row per volume with its three orthogonal mid-slices (sagittal, coronal, axial), the samples' rows above the
    real volumes'. Latent models show decoded pictures: their frozen autoencoder decodes samples and real latents
    (without one, the latents' first channel is shown, with a warning). The grid is written to
    ``<default_root_dir>/samples/epoch=E-step=S.png`` (marked synthetic) and logged to W&B when a
    ``WandbLogger`` is in use. Sampling runs inside the validation epoch, so with EMA it shows the averaged weights.

    Args:
        every_n_epochs: epochs between grids; 0 disables.
        num_samples: images or volumes per grid (at most the validation batch size for conditioned models).
        seed: sampling seed, fixed so successive grids differ only by the weights.
    """

    def __init__(self, every_n_epochs: int = 5, num_samples: int = 8, seed: int = 0) -> None:
        self.every_n_epochs = every_n_epochs
        self.num_samples = num_samples
        self.seed = seed
        self._warned = False

    def _decoded(self, pl_module, samples: torch.Tensor, real: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples and real examples as images/volumes: decoded by a latent model's autoencoder."""
        if getattr(pl_module, "latent_space", None) is None or self._warned:
            return samples, real
        try:
            return pl_module.decode(samples), pl_module.decode(real.to(pl_module.device))
        except Exception as exc:  # noqa: BLE001 - a preview must never end a training run
            rank_zero_warn(f"sample previews show raw latents (first channel) from now on: the autoencoder could "
                           f"not decode them ({type(exc).__name__}: {exc})")
            self._warned = True  # not retried: loading and hashing the autoencoder again would fail again
            return samples, real

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if (
            batch_idx != 0
            or dataloader_idx != 0
            or self.every_n_epochs <= 0
            or trainer.sanity_checking
            or (trainer.current_epoch + 1) % self.every_n_epochs
            or not trainer.is_global_zero
            or not hasattr(pl_module, "sample")
        ):
            return
        n = min(self.num_samples, batch["image"].shape[0])
        mask = batch["mask"][:n] if "mask" in batch else None
        labels = batch["label"][:n] if "label" in batch else None
        full = batch["full_mask"][:n] if "full_mask" in batch else None
        samples = pl_module.sample(mask, labels, indices=list(range(n)), seed=self.seed, full_mask=full)
        samples, real = self._decoded(pl_module, samples, batch["image"][:n])
        rows = []
        if mask is not None and samples.ndim == 4:
            shown = batch.get("image_mask", mask)[:n]
            if shown.shape[-2:] != samples.shape[-2:]:  # latent-grid masks beside decoded images
                shown = F.interpolate(shown[:, None].float(), size=samples.shape[-2:], mode="nearest")[:, 0].long()
            rows.append([colorize_mask(m) for m in shown])
        rows += picture_rows(samples) + picture_rows(real)
        kind = "volumes, each sagittal / coronal / axial" if samples.ndim == 5 else "images"
        caption = f"rows: {'masks, ' if mask is not None and samples.ndim == 4 else ''}sampled then real {kind}"
        side = max(max(p.shape[:2]) for row in rows for p in row)
        rows = [[pad_to(p, side) for p in row] for row in rows]
        path = Path(trainer.default_root_dir) / "samples" / f"epoch={trainer.current_epoch:04d}-step={trainer.global_step}.png"
        save_png(path, make_grid(rows), text=png_text(None, self.seed, -1))  # a preview holds synthetic images
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="samples", images=[str(path)], step=trainer.global_step, caption=[caption])
