"""Preview grids of samples during training, on disk and in Weights & Biases."""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import WandbLogger

from medsynth.io import save_png
from medsynth.provenance import png_text
from medsynth.visual import colorize_mask, make_grid, to_uint8


class SampleGridLogger(L.Callback):
    """Every ``every_n_epochs`` epochs, sample on the first validation batch's masks and save a grid.

    Rows: conditioning masks, samples, the real images (unconditional models: samples only). The grid is written
    to ``<default_root_dir>/samples/epoch=E-step=S.png`` and logged to W&B when a ``WandbLogger`` is in use.
    Sampling runs inside the validation epoch, so with EMA it shows the averaged weights.

    Args:
        every_n_epochs: epochs between grids; 0 disables.
        num_samples: images per grid (at most the validation batch size for masked models).
        seed: sampling seed, fixed so successive grids differ only by the weights.
    """

    def __init__(self, every_n_epochs: int = 5, num_samples: int = 8, seed: int = 0) -> None:
        self.every_n_epochs = every_n_epochs
        self.num_samples = num_samples
        self.seed = seed

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
        samples = pl_module.sample(mask, labels, indices=list(range(n)), seed=self.seed)
        rows = []
        if mask is not None:
            rows.append([colorize_mask(m) for m in mask])
        rows.append([to_uint8(s) for s in samples])
        rows.append([to_uint8(x) for x in batch["image"][:n]])
        path = Path(trainer.default_root_dir) / "samples" / f"epoch={trainer.current_epoch:04d}-step={trainer.global_step}.png"
        save_png(path, make_grid(rows), text=png_text(None, self.seed, -1))  # a preview holds synthetic images
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image(key="samples", images=[str(path)], step=trainer.global_step,
                                 caption=["rows: masks, samples, real" if mask is not None else "rows: samples, real"])
