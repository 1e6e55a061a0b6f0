"""Checkpointing that never leaves the last steps of a run unsaved."""

from __future__ import annotations

from lightning.pytorch.callbacks import ModelCheckpoint


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` that also refreshes ``last.ckpt`` when training ends between two saves.

    Lightning writes ``last.ckpt`` at the end of training only if it was never written before; a run stopped by
    ``max_steps`` in the middle of an epoch would then resume from the previous epoch. All other behaviour
    (best-by-metric, every N steps, ``dirpath`` defaulting to ``<default_root_dir>/checkpoints``) is unchanged.
    """

    def on_train_end(self, trainer, pl_module) -> None:
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            return
        super().on_train_end(trainer, pl_module)
