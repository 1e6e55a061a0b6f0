"""Pictures of autoencoder reconstructions during training, on disk and in Weights & Biases."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import WandbLogger

from medsynth.io import save_png
from medsynth.provenance import png_text
from medsynth.visual import make_grid, picture_rows


class ReconstructionLogger(L.Callback):
    """Every ``every_n_epochs`` epochs, save inputs beside their reconstructions from the first validation batch.

    2D: a grid with a row of inputs above a row of reconstructions. 3D: per volume, its three orthogonal
    mid-slices (sagittal, coronal, axial), input then reconstruction. Written to
    ``<default_root_dir>/reconstructions/epoch=E-step=S.png`` and logged to W&B when a ``WandbLogger`` is in use.

    Args:
        every_n_epochs: epochs between pictures; 0 disables.
        num_images: inputs shown (at most the validation batch size).
    """

    def __init__(self, every_n_epochs: int = 1, num_images: int = 4) -> None:
        self.every_n_epochs = every_n_epochs
        self.num_images = num_images

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if (
            batch_idx != 0
            or dataloader_idx != 0
            or self.every_n_epochs <= 0
            or trainer.sanity_checking
            or (trainer.current_epoch + 1) % self.every_n_epochs
            or not trainer.is_global_zero
            or not isinstance(outputs, dict)
            or "reconstruction" not in outputs
        ):
            return
        x, recon = outputs["image"][: self.num_images], outputs["reconstruction"][: self.num_images]
        rows = picture_rows(x) + picture_rows(recon)
        kind = "volumes (sagittal / coronal / axial mid-slices)" if x.ndim == 5 else "images"
        caption = f"rows: input {kind}, then their reconstructions"
        path = (Path(trainer.default_root_dir) / "reconstructions"
                / f"epoch={trainer.current_epoch:04d}-step={trainer.global_step}.png")
        save_png(path, make_grid(rows), text=png_text(None, None, -1))  # reconstructions are synthetic
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="reconstructions", images=[str(path)], step=trainer.global_step, caption=[caption])
