"""Checkpointing that never leaves the last steps of a run unsaved."""

from __future__ import annotations

import os
from pathlib import Path

from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from medsynth.errors import MedsynthError
from medsynth.io import write_error


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to ``.NAME.partial`` and renames it into place: a killed job never leaves a
    truncated ``.ckpt`` (Lightning writes the final path directly)."""

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.partial")
        try:
            super().save_checkpoint(checkpoint, tmp, storage_options)
            os.replace(tmp, path)
        except OSError as exc:  # disk full, quota, read-only place: one line naming the checkpoint
            tmp.unlink(missing_ok=True)
            raise write_error(path, exc) from None
        except RuntimeError as exc:  # torch.save reports a failed write as a RuntimeError of its zip writer
            tmp.unlink(missing_ok=True)
            if "write" not in str(exc).lower() and "file" not in str(exc).lower():
                raise
            raise MedsynthError(f"{path}: cannot write checkpoint ({' '.join(str(exc).split())[:120]}); free space "
                                "or choose another --trainer.default_root_dir") from None


def moved_checkpoint_state(state: dict, dirpath: str) -> dict:
    """A ``ModelCheckpoint`` state saved in another folder (the run folder was moved or copied), with its paths moved
    into ``dirpath``: files that exist there keep their role (last, best, top-k), so a resumed run keeps writing
    ``last.ckpt`` (not ``last-v1.ckpt`` beside a stale one) and keeps its best scores."""
    def moved(path):
        if not isinstance(path, str) or not path:
            return path
        candidate = os.path.join(dirpath, os.path.basename(path))
        return candidate if os.path.isfile(candidate) else ""

    state = dict(state, dirpath=dirpath)
    for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
        if key in state:
            state[key] = moved(state[key])
    if isinstance(state.get("best_k_models"), dict):
        state["best_k_models"] = {moved(k): v for k, v in state["best_k_models"].items() if moved(k)}
    return state


class RunCheckpoint(ModelCheckpoint):
    """Lightning's ``ModelCheckpoint`` that also refreshes ``last.ckpt`` when training ends between two saves.

    Lightning writes ``last.ckpt`` at the end of training only if it was never written before; a run stopped by
    ``max_steps`` in the middle of an epoch would then resume from the previous epoch. The final step is saved
    before EMA swaps its average into the live model, so a resumed run continues from the raw weights. All other
    behaviour
    (best-by-metric, every N steps, ``dirpath`` defaulting to ``<default_root_dir>/checkpoints``) is unchanged.
    It also makes every checkpoint write of the run atomic (:class:`AtomicCheckpointIO`), and a run folder that
    was moved or copied resumes with its checkpoints where they now are (:func:`moved_checkpoint_state`).
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        if type(trainer.strategy.checkpoint_io) is TorchCheckpointIO:
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        super().setup(trainer, pl_module, stage)

    def load_state_dict(self, state_dict: dict) -> None:
        saved = state_dict.get("dirpath")
        if saved and self.dirpath and os.path.realpath(saved) != os.path.realpath(self.dirpath):
            state_dict = moved_checkpoint_state(state_dict, self.dirpath)  # the run folder was moved or copied
        elif saved and self.dirpath:
            state_dict = dict(state_dict, dirpath=self.dirpath)  # the same folder spelled another way
        super().load_state_dict(state_dict)

    def _save_final(self, trainer) -> None:
        """Write last.ckpt for the final step while the live weights are still the raw ones."""
        if self.save_last and getattr(self, "_final_step", None) != trainer.global_step:
            previous = self._last_global_step_saved
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            self._final_step = trainer.global_step
            # a validation at this same step may still save the best checkpoint (and refresh last.ckpt)
            self._last_global_step_saved = previous

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        # Save the final step now, before EMA's on_train_end copies the averaged weights into the live model, so
        # last.ckpt keeps the raw weights (and the average) that a later resume continues from.
        if 0 < trainer.max_steps <= trainer.global_step:
            self._save_final(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if trainer.max_epochs is not None and 0 < trainer.max_epochs <= trainer.current_epoch + 1:
            self._save_final(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        if getattr(self, "_final_step", None) == trainer.global_step:
            return  # already saved with the raw weights
        if self.save_last and self._last_global_step_saved != trainer.global_step:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
            return
        super().on_train_end(trainer, pl_module)
