"""Checkpointing that never leaves the last steps of a run unsaved."""

from __future__ import annotations

import os
from pathlib import Path

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to ``.NAME.partial`` and renames it into place: a killed job never leaves a
    truncated ``.ckpt`` (Lightning writes the final path directly)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.partial")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` that also refreshes ``last.ckpt`` when training ends between two saves.

    Lightning writes ``last.ckpt`` at the end of training only if it was never written before; a run stopped by
    ``max_steps`` in the middle of an epoch would then resume from the previous epoch. All other behaviour
    (best-by-metric, every N steps, ``dirpath`` defaulting to ``<default_root_dir>/checkpoints``) is unchanged.
    It also makes every checkpoint write of the run atomic (:class:`AtomicCheckpointIO`).
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        super().setup(trainer, pl_module, stage)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            return
        super().on_train_end(trainer, pl_module)
