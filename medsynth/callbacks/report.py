"""Scoring reports: what ``medsynth test`` measured on a sample folder, with diversity, FID/KID and plots."""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Optional

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger

import medsynth
from medsynth.data.image2d import IMAGE_SUFFIXES, read_image, resize_image, to_unit_range
from medsynth.data.volumes import Normalization, list_volume_files, read_volume, read_volume_manifest, scale_to_unit
from medsynth.errors import MedsynthError
from medsynth.io import atomic_write, check_complete, free_path, read_json, save_json, save_png
from medsynth.metrics.distribution import (
    FeatureNet,
    fid_2p5d,
    frechet_distance,
    kernel_inception_distance,
    mean_pairwise_similarity,
)
from medsynth.provenance import file_sha256
from medsynth.visual import bar_chart

REAL_SCORES = "real_test.json"
"""The file in :func:`scores_dir` holding a judge's scores on the real test split: the ceiling of later reports."""


def _scalar_metrics(trainer) -> dict[str, float]:
    return {k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith("test/")}


def _read_real_images(folder: Path, size: int, channels: int, limit: int, intensity_range=None) -> torch.Tensor:
    """Up to ``limit`` real images found anywhere below ``folder`` (evenly spread over the sorted file list),
    resized to ``size`` and scaled to [-1, 1] as training scales them (``intensity_range``, else by dtype)."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise MedsynthError(f"{folder}: no real images (.png/.npy) for FID/KID (give the image folder, e.g. IMGS)")
    if len(files) > limit:
        files = [files[round(i * (len(files) - 1) / (limit - 1))] for i in range(limit)] if limit > 1 else files[:1]
    return torch.stack([resize_image(torch.from_numpy(to_unit_range(read_image(f, channels), intensity_range)), size)
                        for f in files])


# ---------------------------------------------------------------------------------------------------- volumes


def sample_volume_files(samples_dir: Path) -> list[Path]:
    """The generated volumes (NIfTI) of a ``medsynth predict`` folder: ``samples/*.nii.gz`` or ``CLASS/*.nii.gz``
    (conditioning masks and hidden files left out), sorted."""
    return sorted(p for p in samples_dir.rglob("*.nii*") if p.is_file() and p.name.endswith((".nii", ".nii.gz"))
                  and p.relative_to(samples_dir).parts[0] != "masks"
                  and not any(part.startswith(".") for part in p.relative_to(samples_dir).parts))


def _intensity_of(samples_dir: Path) -> dict:
    """The intensity scaling a sample folder's volumes were written with (``metadata.json``'s ``intensity``)."""
    meta = samples_dir / "metadata.json"
    info = read_json(meta, "metadata") if meta.is_file() else {}
    intensity = info.get("intensity") if isinstance(info, dict) else None
    return intensity if isinstance(intensity, dict) else {}


def read_sample_volumes(samples_dir: Path, limit: int) -> tuple[list[torch.Tensor], dict]:
    """Up to ``limit`` generated volumes ``(C, X, Y, Z)`` of a sample folder, back in [-1, 1]: volumes written in
    their sources' units (HU for CT) are mapped with the range the folder's ``metadata.json`` records; older
    folders hold [-1, 1] already. Returns the volumes and that intensity record."""
    files = sample_volume_files(samples_dir)[:limit]
    if not files:
        raise MedsynthError(f"{samples_dir}: no generated volumes (*.nii.gz) to score")
    intensity = _intensity_of(samples_dir)
    volumes = []
    for f in files:
        data, _ = read_volume(f)
        x = torch.from_numpy(data)
        volumes.append(scale_to_unit(x, intensity["low"], intensity["high"]) if "low" in intensity
                       else x.clamp(-1, 1))
    return volumes, intensity


def read_real_volumes(real: Path, intensity: dict, limit: int) -> list[torch.Tensor]:
    """Up to ``limit`` real volumes ``(C, X, Y, Z)`` scaled to [-1, 1] as training scaled them (the normalisation
    the sample folder records: CT window or per-volume MRI percentiles; MRI defaults without a record).

    Args:
        real: a folder of volumes (NIfTI, NRRD, MetaImage files or DICOM series folders) or a volume manifest.
        intensity: the sample folder's intensity record (see :func:`read_sample_volumes`).
        limit: most volumes read (evenly spread over the sorted list).
    """
    if real.is_file():
        paths = [r.image for r in read_volume_manifest(real)]
    elif real.is_dir():
        paths = list_volume_files(real)
    else:
        raise MedsynthError(f"{real}: real volumes (data.real_dir) do not exist")
    if not paths:
        raise MedsynthError(f"{real}: no real volumes for 2.5D FID (NIfTI, NRRD, MetaImage or DICOM series folders)")
    if len(paths) > limit:
        paths = [paths[round(i * (len(paths) - 1) / (limit - 1))] for i in range(limit)] if limit > 1 else paths[:1]
    mode = intensity.get("mode", "mri")
    norm = Normalization(mode, tuple(intensity.get("percentiles", (0.5, 99.5))),
                         tuple(intensity.get("window", (-1000.0, 1000.0))))
    return [norm.to_unit(read_volume(p)[0])[0] for p in paths]


def volume_realism(samples: list[torch.Tensor], real_dir: Path, features: Path, intensity: dict,
                   max_volumes: int, max_slices: Optional[int] = None) -> tuple[dict[str, float], str]:
    """2.5D FID (per plane and their mean) of generated volumes in [-1, 1] against real volumes, and a note on
    how it was measured."""
    net = FeatureNet(Path(features))
    real = read_real_volumes(Path(real_dir), intensity, max_volumes)
    scores = fid_2p5d(net, real, samples, max_slices=max_slices)
    note = (f"2.5D FID: the 2D feature network on the slices of {len(samples)} generated and {len(real)} real volumes "
            "across each axis (axis0/1/2: sagittal, coronal, axial for RAS volumes), FID per plane and their mean")
    return scores, note


def scores_dir(checkpoint: str | Path) -> Path:
    """Where a checkpoint's scores on real data are kept: ``RUN/scores`` for ``RUN/checkpoints/X.ckpt``, else a
    ``scores`` folder beside the checkpoint."""
    ckpt = Path(checkpoint).resolve()
    return (ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent) / "scores"


class SampleReport(L.Callback):
    """After ``medsynth test`` on a sample folder, writes ``scores.json``, ``report.md`` and plots beside the samples.

    The judge (a segmenter or classifier checkpoint) gives its metrics (Dice per class, accuracy); this callback
    adds diversity (mean pairwise MS-SSIM, lower is more diverse), FID and KID against real images when a local
    feature network is given (nothing is downloaded; without one the report says what is missing), and the
    judge's scores on real test images as the ceiling. Those come from testing the judge on real data first:
    ``medsynth test`` on real data writes them to ``JUDGE_RUN/scores/real_test.json``, where later reports find
    them. Scores and the bar chart are also logged to W&B when a ``WandbLogger`` is set.

    The sample folder's data module may name the feature network and the real images (``--data.features``,
    ``--data.real_dir`` of :class:`~medsynth.data.SampleDirDataModule`); they win over this callback's own.

    Args:
        features: TorchScript feature network for FID/KID (see :mod:`medsynth.metrics.distribution`).
        real_dir: real images for FID/KID: a folder of ``.png``/``.npy`` (or one holding ``train``/``val``/``test``).
        max_images: at most this many samples and real images enter FID/KID and diversity.
        diversity_pairs: sample pairs averaged for diversity.
    """

    def __init__(self, features: Optional[Path] = None, real_dir: Optional[Path] = None, max_images: int = 2000,
                 diversity_pairs: int = 200) -> None:
        self.features = Path(features) if features is not None else None
        self.real_dir = Path(real_dir) if real_dir is not None else None
        self.max_images = max_images
        self.diversity_pairs = diversity_pairs

    @staticmethod
    def _samples_dir(trainer) -> Optional[Path]:
        return getattr(trainer.datamodule, "samples_dir", None)

    def on_test_start(self, trainer, pl_module) -> None:
        self._images: list[torch.Tensor] = []
        if trainer.world_size > 1 and self._samples_dir(trainer) is not None:
            # each rank would see a share of the samples (padded by the distributed sampler): diversity, FID/KID
            # and the counts must see them all once
            raise MedsynthError("scoring a sample folder runs on one device: pass --trainer.devices 1")

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if self._samples_dir(trainer) is not None and sum(len(x) for x in self._images) < self.max_images:
            self._images.append(batch["image"].detach().float().cpu())

    def on_test_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        judge = str(trainer.ckpt_path) if trainer.ckpt_path else None
        samples_dir = self._samples_dir(trainer)
        scores = _scalar_metrics(trainer)
        if samples_dir is None:  # the judge on real data: keep its scores as the ceiling of later reports
            if judge:  # the newest measurement is the ceiling; an earlier one is kept as real_test.N.json
                path = scores_dir(judge) / REAL_SCORES
                if path.is_file():
                    os.replace(path, free_path(path))
                save_json(path, {"judge": judge, "judge_sha256": file_sha256(judge), "scores": scores,
                                 "created": _now()})
            return
        images = torch.cat(self._images)[: self.max_images] if self._images else None
        notes = []
        if images is not None and len(images) >= 2:
            scores["diversity/ms_ssim"] = mean_pairwise_similarity(images, self.diversity_pairs)
        dm = trainer.datamodule
        features = getattr(dm, "features", None) or self.features
        real_dir = getattr(dm, "real_dir", None) or self.real_dir
        if features is not None and real_dir is None:
            notes.append("FID/KID not computed: a feature network but no real images (real_dir) were given")
            features = None
        if features is not None and images is not None:
            if images.ndim == 5:  # volumes: 2.5D FID over three planes of slices
                fid, note = volume_realism(list(images), Path(real_dir), Path(features),
                                           _intensity_of(samples_dir), self.max_images)
                scores.update(fid)
                notes.append(note)
            else:
                net = FeatureNet(Path(features))
                real = _read_real_images(Path(real_dir), images.shape[-1], images.shape[1], self.max_images,
                                         getattr(dm, "intensity_range", None))
                notes.append(f"FID/KID at {images.shape[-1]}x{images.shape[-1]} pixels (the judge's image size), "
                             f"features resized to the network's input")
                f_fake = torch.cat([net(b) for b in images.split(64)])
                f_real = torch.cat([net(b) for b in real.split(64)])
                scores["fid"] = frechet_distance(f_real, f_fake)
                scores["kid_mean"], scores["kid_std"] = kernel_inception_distance(f_real, f_fake)
        elif features is None and not notes:
            notes.append("FID/KID not computed: no local feature network was given (--data.features with "
                         "--data.real_dir; nothing is downloaded)")
        ceiling, why = self._ceiling(judge)
        if ceiling is None:
            notes.append(why)
        result = {"samples_dir": str(samples_dir), "judge": judge, "num_samples": 0 if images is None else len(images),
                  "scores": scores, "ceiling": ceiling, "features": str(features) if features else None,
                  "real_dir": str(real_dir) if real_dir else None, "notes": notes, "created": _now(),
                  "medsynth": medsynth.__version__}
        save_json(samples_dir / "scores.json", result)
        plots = self._plots(samples_dir, scores, ceiling)
        self._write_report(samples_dir, result, plots)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_metrics({f"score/{k}": v for k, v in scores.items()})
                for name in plots:
                    logger.log_image(key=f"score/{Path(name).stem}", images=[str(samples_dir / name)])

    @staticmethod
    def score_volume_folder(samples_dir: Path, real_dir: Optional[Path], features: Optional[Path],
                            max_volumes: int = 200, max_slices: Optional[int] = None, diversity_pairs: int = 200,
                            overwrite: bool = False) -> dict:
        """Score a folder of generated volumes without a judge: diversity and, with a feature network and real
        volumes, 2.5D FID; writes ``scores.json`` and ``report.md`` beside the samples (``python -m
        medsynth.callbacks.report``).

        Raises:
            MedsynthError: one line: an incomplete folder, earlier scores without ``overwrite``, no volumes, a
                missing feature network or real folder.
        """
        samples_dir = Path(samples_dir)
        if not samples_dir.is_dir():
            raise MedsynthError(f"{samples_dir}: sample folder does not exist")
        check_complete(samples_dir)
        for done in (samples_dir / "scores.json", samples_dir / "report.md"):
            if done.exists() and not overwrite:
                raise MedsynthError(f"{done}: already exists; pass --overwrite to score again")
        if features is not None and real_dir is None:
            raise MedsynthError(f"{features}: 2.5D FID also needs real volumes (--real-dir)")
        volumes, intensity = read_sample_volumes(samples_dir, max_volumes)
        scores, notes = {}, []
        shapes = {tuple(v.shape) for v in volumes}
        if len(volumes) >= 2 and len(shapes) == 1:
            scores["diversity/ms_ssim"] = mean_pairwise_similarity(torch.stack(volumes), diversity_pairs)
        if features is not None:
            fid, note = volume_realism(volumes, Path(real_dir), Path(features), intensity, max_volumes, max_slices)
            scores.update(fid)
            notes.append(note)
        else:
            notes.append("2.5D FID not computed: no local feature network was given (--features with --real-dir; "
                         "nothing is downloaded)")
        result = {"samples_dir": str(samples_dir), "judge": None, "num_samples": len(volumes), "scores": scores,
                  "ceiling": None, "features": str(features) if features else None,
                  "real_dir": str(real_dir) if real_dir else None, "notes": notes, "created": _now(),
                  "medsynth": medsynth.__version__}
        save_json(samples_dir / "scores.json", result)
        SampleReport._write_report(samples_dir, result, [])
        return result

    @staticmethod
    def _ceiling(judge: Optional[str]) -> tuple[Optional[dict], str]:
        """The judge's own scores on real test data, if they were measured with this very checkpoint."""
        if not judge:
            return None, "no real-image ceiling: the judge has no checkpoint file"
        path = scores_dir(judge) / REAL_SCORES
        if not path.is_file():
            return None, ("no real-image ceiling: run `medsynth test` with this judge on the real test split first "
                          f"(it keeps its scores in {path})")
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved.get("judge_sha256") != file_sha256(judge):
            return None, (f"no real-image ceiling: {path} was measured with another checkpoint ({saved.get('judge')}); "
                          "test this one on the real test split")
        return saved["scores"], ""

    @staticmethod
    def _plots(samples_dir: Path, scores: dict, ceiling: Optional[dict]) -> list[str]:
        plots = []
        for prefix, title in (("test/dice_class", "Dice per class (tick: real-image ceiling)"),
                              ("test/accuracy_", "accuracy per class (tick: real-image ceiling)")):
            per = {k[len(prefix):]: v for k, v in scores.items() if k.startswith(prefix)}
            if per:
                ref = {k[len(prefix):]: v for k, v in (ceiling or {}).items() if k.startswith(prefix)}
                name = "dice.png" if "dice" in prefix else "accuracy.png"
                save_png(samples_dir / name, bar_chart(per, ref, title))
                plots.append(name)
        return plots

    @staticmethod
    def _write_report(samples_dir: Path, result: dict, plots: list[str]) -> None:
        scores, ceiling = result["scores"], result["ceiling"] or {}
        lines = [f"# Scores of {samples_dir.name}", "",
                 f"{result['num_samples']} samples scored on {result['created']} by medsynth {result['medsynth']}; "
                 f"judge: `{result['judge']}`.", "", "| measure | samples | real images (ceiling) | fraction |",
                 "| --- | --- | --- | --- |"]
        for k, v in scores.items():
            ref = ceiling.get(k)
            frac = f"{v / ref:.3f}" if ref and k.startswith(("test/dice", "test/accuracy")) else ""
            lines.append(f"| {k} | {v:.4f} | {'' if ref is None else f'{ref:.4f}'} | {frac} |")
        lines += ["", "Diversity is the mean pairwise MS-SSIM of the samples (SSIM for volumes; lower is more "
                  f"diverse). FID/KID (2.5D FID for volumes) use the feature network `{result['features']}` against "
                  f"`{result['real_dir']}`." if result["features"] else ""]
        lines += [f"- {n}" for n in result["notes"]]
        if (samples_dir / "grid.png").is_file():
            lines += ["", "![samples](grid.png)"]
        lines += [f"![{Path(p).stem}]({p})" for p in plots]
        text = "\n".join(lines) + "\n"
        atomic_write(samples_dir / "report.md", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")




def main(argv: Optional[list[str]] = None) -> int:
    """``python -m medsynth.metrics SAMPLES_DIR [--features NET.pt --real-dir REAL]``: score a folder of
    generated volumes (diversity, 2.5D FID) without a judge; one line on stderr and status 2 on bad input."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m medsynth.metrics",
                                     description="Score a folder of generated volumes: diversity and 2.5D FID.")
    parser.add_argument("samples_dir", type=Path, help="a `medsynth predict` output folder of NIfTI volumes")
    parser.add_argument("--features", type=Path, help="TorchScript 2D feature network (never downloaded)")
    parser.add_argument("--real-dir", type=Path, help="real volumes: a folder (NIfTI/NRRD/MHA/DICOM) or a manifest")
    parser.add_argument("--max-volumes", type=int, default=200, help="most volumes read on each side")
    parser.add_argument("--max-slices", type=int, default=None, help="most slices per volume and plane")
    parser.add_argument("--overwrite", action="store_true", help="replace earlier scores.json and report.md")
    args = parser.parse_args(argv)
    try:
        result = SampleReport.score_volume_folder(args.samples_dir, args.real_dir, args.features, args.max_volumes,
                                                  args.max_slices, overwrite=args.overwrite)
    except MedsynthError as exc:
        print(f"medsynth: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(json.dumps(result["scores"], indent=2))
    return 0
