"""Datasets that are not the demo, built from files pip packages ship: for judging recipes on data they were not
tuned on.

All come from nilearn's MNI152 2009a template (T1 and grey/white-matter maps), sliced in other planes, with other
class counts, contrasts, sizes and dataset sizes than the demo (axial T1, 3 classes, 64 px, ~150 slices), and are
written as a user would bring them: the reference folder layout for masks, a JSON class map for classes.

    python benchmarks/datasets.py OUT_DIR            # builds every dataset below OUT_DIR

Segmentation-guided (``IMGS/{train,val,test}/*.png``, ``MASKS/all/{train,val,test}/*.png``):

- ``coronal4``: coronal T1 slices, 4 classes (background / other brain / grey matter / white matter). The set
  the recipe defaults were chosen on.
- ``sagittal4_t2``: sagittal slices in a T2-like contrast (CSF and other brain bright, GM mid, WM dark) with a
  smooth bias field and noise, 4 classes, only every other slice (a few dozen training images). Held out.
- ``axial5_pd``: axial slices in a PD-like contrast, 5 classes (GM split into left and right hemisphere), 16-bit
  PNGs. Held out.
- ``coronal3_flair``: coronal FLAIR-like slices (dark CSF), 3 classes (grey matter, white matter, and everything
  else as background: the mask does not outline the brain), every third slice (a few dozen training images). Built
  after every default was fixed, to check them once: never tuned on.

Volumes with label maps (a manifest of NIfTI ``{"image", "mask", "split"}`` records, 2 mm):

- ``axial4_t2_3d``: the T2-like volume cut across the inferior-superior axis: the inferior half trains, the
  superior half (cortex and vertex, which the inferior half barely shows) is held out; 4 classes. The demo cuts the
  T1 into posterior and anterior halves.

Class-conditional (a JSON class map ``{"0": dir, ...}`` of folders with ``train/val/test``):

- ``planes3_t2``: the T2-like volume's axial / coronal / sagittal slices, the plane as the class.
- ``contrast3``: coronal slices of three contrasts (T1, T2-like, PD-like), the contrast as the class.
- ``levels4_pd``: axial PD-like slices, the level as the class: the brain's axial slices cut into four contiguous
  bands, inferior to superior. Neighbouring bands share their border anatomy, so the judge's ceiling is below 1 and
  a sample must show its level's anatomy (not a contrast or an orientation) to be counted.
- ``levels3_t2``: coronal T2-like slices in three bands, posterior to anterior; fewer, larger classes.
- ``sides3_flair``: sagittal FLAIR-like slices of one hemisphere in three bands, lateral (cortex only) to medial
  (ventricles, corpus callosum). Built after every default was fixed, to check them once: never tuned on.

The first two are easy for a classifier (ceiling 1.0 at 32 px); the level sets are the harder test.

Class-conditional volumes (a manifest of NIfTI ``{"image", "label", "split"}`` records; whole 64^3 volumes at 3 mm,
the brain centred; 24 train / 4 val / 8 test per class). One template gives one brain, so each volume is the
template through its own seeded torchio augmentation (affine, elastic, bias field, noise; never a flip, so that a
user's class may be a side):

- ``contrast3_3d``: T1 / T2-like / PD-like volumes, the contrast as the class (a global property).
- ``lesion2_3d``: FLAIR-like volumes (dark CSF), without (class 0, ``none``) or with (class 1, ``lesion``) one
  bright synthetic lesion (15-19.5 mm radius) at a random place in the white matter of either hemisphere: a local
  structure under 1 % of the brain that the generator must draw, and only for its class.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from medsynth.data.demo import (
    PLANE_AXIS,
    _shifted,
    _square,
    downsample_volume,
    mni152_files,
    mni152_maps,
    mni152_volumes,
)
from medsynth.diffusion.conditioning import reduce_to_grid
from medsynth.io import save_json, save_png

SEG_DATASETS = ("coronal4", "sagittal4_t2", "axial5_pd", "coronal3_flair")
VOLUME_DATASETS = ("axial4_t2_3d",)
CLASS_DATASETS = ("planes3_t2", "contrast3", "levels4_pd", "levels3_t2", "sides3_flair")
CLASS_VOLUME_DATASETS = ("contrast3_3d", "lesion2_3d")
CLASS_VOLUME_SPLITS = (("train", 24), ("val", 4), ("test", 8))
"""Volumes per class in each split of the class-conditional volume datasets."""


def tissue_maps() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """T1, brain mask, GM and WM probability maps (0..1) of the template."""
    t1, gm, wm = mni152_maps()
    return t1, t1 > 0, gm, wm


def four_class_labels() -> np.ndarray:
    """0 background, 1 other brain (CSF, deep structures), 2 grey matter, 3 white matter."""
    _, brain, _, _ = tissue_maps()
    _, labels3 = mni152_volumes()
    labels = np.where(brain, 1, 0).astype(np.uint8)
    labels[labels3 == 1] = 2
    labels[labels3 == 2] = 3
    return labels


def contrast(kind: str, seed: int = 0) -> np.ndarray:
    """A volume in [0, 1]: ``t1`` (the template), ``t2`` (CSF/other bright, GM mid, WM dark), ``pd`` or ``flair``
    (CSF/other dark, GM mid, WM a little darker); the synthetic contrasts get a smooth multiplicative bias field
    and Gaussian noise."""
    t1, brain, gm, wm = tissue_maps()
    if kind == "t1":
        hi = float(np.percentile(t1[brain], 99.5))
        return np.clip(t1 / hi, 0, 1)
    other = np.clip(1.0 - gm - wm, 0, 1) * brain
    if kind == "t2":
        img = 0.95 * other + 0.55 * gm + 0.30 * wm
    elif kind == "pd":
        img = 0.60 * other + 0.85 * gm + 0.65 * wm
    elif kind == "flair":
        img = 0.10 * other + 0.55 * gm + 0.42 * wm
    else:
        raise ValueError(kind)
    rng = np.random.default_rng(seed)
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in img.shape], indexing="ij")
    bias = 1.0 + 0.15 * sum(c * g for c, g in zip(rng.uniform(-1, 1, 3), grids))
    img = img * bias + rng.normal(0, 0.02, img.shape) * brain
    return np.clip(img * brain, 0, 1).astype(np.float32)


def _slices(volume: np.ndarray, labels: np.ndarray, plane: str, min_brain: float = 0.1):
    """``(index, image, labels)`` of the slices of one plane whose brain covers at least ``min_brain``."""
    axis = PLANE_AXIS[plane]
    # one contiguous copy with the slice axis first: np.take per slice gathers across the whole volume each time
    volume, labels = (np.ascontiguousarray(np.moveaxis(a, axis, 0)) for a in (volume, labels))
    for k in range(volume.shape[0]):
        img = _square(np.rot90(volume[k]))
        lab = _square(np.rot90(labels[k]))
        if (lab > 0).mean() >= min_brain:
            yield k, img, lab


def _split(k: int) -> str:
    return "test" if k % 8 == 0 else "val" if k % 8 == 4 else "train"


def build_seg(name: str, root: Path) -> dict:
    """Write a segmentation-guided dataset ``name`` under ``root`` (``images/``, ``masks/all/``)."""
    if name == "coronal4":
        vol, labels, plane, step, bits = contrast("t1"), four_class_labels(), "coronal", 1, 8
    elif name == "sagittal4_t2":
        vol, labels, plane, step, bits = contrast("t2", seed=1), four_class_labels(), "sagittal", 2, 8
    elif name == "axial5_pd":
        labels = four_class_labels()
        x_mid = labels.shape[0] // 2  # the template's first axis runs left-right: split GM by hemisphere
        left = np.zeros(labels.shape, bool)
        left[:x_mid] = True
        labels = np.where((labels == 2) & left, 4, labels).astype(np.uint8)
        vol, plane, step, bits = contrast("pd", seed=2), "axial", 1, 16
    elif name == "coronal3_flair":
        labels = np.maximum(four_class_labels().astype(np.int16) - 1, 0).astype(np.uint8)  # other brain -> 0
        vol, plane, step, bits = contrast("flair", seed=8), "coronal", 3, 8
    else:
        raise ValueError(f"unknown dataset {name}; choose from {SEG_DATASETS}")
    counts = {"train": 0, "val": 0, "test": 0}
    for k, img, lab in _slices(vol, labels, plane):
        if k % step:
            continue
        split, stem = _split(k), f"{name}_{k:03d}.png"
        scale = 255 if bits == 8 else 65535
        dtype = np.uint8 if bits == 8 else np.uint16
        save_png(root / "images" / split / stem, (np.clip(img, 0, 1) * scale).round().astype(dtype))
        save_png(root / "masks" / "all" / split / stem, lab.astype(np.uint8))
        counts[split] += 1
    info = {"kind": "seg", "num_classes": int(labels.max()) + 1, "plane": plane, "splits": counts}
    save_json(root / "dataset.json", info)
    return info


def build_class(name: str, root: Path) -> dict:
    """Write a class-conditional dataset ``name`` under ``root``: ``classmap.json`` and one folder per class."""
    labels = four_class_labels()
    if name == "planes3_t2":
        vol = contrast("t2", seed=3)
        kinds = [(plane, vol, plane) for plane in ("axial", "coronal", "sagittal")]
    elif name == "contrast3":
        kinds = [(kind, contrast(kind, seed=4), "coronal") for kind in ("t1", "t2", "pd")]
    elif name in ("levels4_pd", "levels3_t2", "sides3_flair"):
        return _build_levels(name, root, labels)
    else:
        raise ValueError(f"unknown dataset {name}; choose from {CLASS_DATASETS}")
    classmap, counts = {}, {}
    for c, (cname, vol, plane) in enumerate(kinds):
        n = 0
        for k, img, _ in _slices(vol, labels, plane, min_brain=0.15):
            save_png(root / cname / _split(k) / f"{cname}_{k:03d}.png",
                     (np.clip(img, 0, 1) * 255).round().astype(np.uint8))
            n += 1
        classmap[str(c)] = cname
        counts[cname] = n
    save_json(root / "classmap.json", classmap)
    info = {"kind": "class", "num_classes": len(kinds), "counts": counts}
    save_json(root / "dataset.json", info)
    return info


def _build_levels(name: str, root: Path, labels: np.ndarray) -> dict:
    """A class-conditional dataset whose class is the slice's band along one axis (``levels4_pd``, ``levels3_t2``,
    ``sides3_flair``)."""
    kind, seed, plane, bands = {"levels4_pd": ("pd", 6, "axial", 4), "levels3_t2": ("t2", 7, "coronal", 3),
                                "sides3_flair": ("flair", 9, "sagittal", 3)}[name]
    vol = contrast(kind, seed=seed)
    slices = list(_slices(vol, labels, plane, min_brain=0.15))
    if name == "sides3_flair":  # one hemisphere's sagittal slices (the first axis runs left-right), lateral first
        slices = [s for s in slices if s[0] >= labels.shape[0] // 2][::-1]
    names = [f"level{b + 1}" for b in range(bands)]  # level1: inferior (axial), posterior (coronal), lateral
    counts = dict.fromkeys(names, 0)
    for i, (k, img, _) in enumerate(slices):
        cname = names[i * bands // len(slices)]
        split = "test" if k % 4 == 0 else "val" if k % 8 == 2 else "train"  # a quarter tests: a steadier ceiling
        save_png(root / cname / split / f"{cname}_{k:03d}.png", (np.clip(img, 0, 1) * 255).round().astype(np.uint8))
        counts[cname] += 1
    save_json(root / "classmap.json", {str(c): cname for c, cname in enumerate(names)})
    info = {"kind": "class", "num_classes": bands, "plane": plane, "counts": counts}
    save_json(root / "dataset.json", info)
    return info


def build_volumes(name: str, root: Path) -> dict:
    """Write a volume dataset ``name`` under ``root``: two halves at 2 mm with their label maps and
    ``manifest.json``."""
    if name != "axial4_t2_3d":
        raise ValueError(f"unknown dataset {name}; choose from {VOLUME_DATASETS}")
    affine = np.asarray(nib.load(mni152_files()["t1"]).affine, dtype=np.float64)
    vol, affine2 = downsample_volume(contrast("t2", seed=5), affine, 2.0)
    labels = four_class_labels()
    even = tuple(slice(0, 2 * s) for s in vol.shape)  # blocks of 2 voxels: each 2 mm voxel's majority label
    labels = reduce_to_grid(torch.from_numpy(labels[even].astype(np.int64)), 2).numpy().astype(np.uint8)
    cut = vol.shape[2] // 2
    halves = {"inferior": (slice(0, cut), 0, "train"), "superior": (slice(cut, None), cut, "val")}
    if affine2[2, 2] < 0:  # the third axis runs downwards: its first half is the superior one
        halves = {"superior": halves["inferior"][:2] + ("val",), "inferior": halves["superior"][:2] + ("train",)}
    records = []
    for half, (window, start, split) in halves.items():
        aff = _shifted(affine2, start, 2)
        (root / "labels").mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(np.ascontiguousarray(vol[:, :, window]), aff), root / f"{half}.nii.gz")
        nib.save(nib.Nifti1Image(np.ascontiguousarray(labels[:, :, window]), aff), root / "labels" / f"{half}.nii.gz")
        records.append({"image": f"{half}.nii.gz", "mask": f"labels/{half}.nii.gz", "split": split})
    save_json(root / "manifest.json", records)
    info = {"kind": "volumes", "num_classes": int(labels.max()) + 1, "shape": list(vol.shape), "cut_axis": 2}
    save_json(root / "dataset.json", info)
    return info


def _on_cube(vol: np.ndarray, affine: np.ndarray, side: int, center: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The ``side``^3 window of ``vol`` centred on voxel ``center`` (zero outside the volume) and its affine."""
    start = np.round(np.asarray(center) - side / 2).astype(int)
    out = np.zeros((side,) * 3, np.float32)
    src = tuple(slice(max(s, 0), min(s + side, n)) for s, n in zip(start, vol.shape))
    dst = tuple(slice(w.start - s, w.stop - s) for w, s in zip(src, start))
    out[dst] = vol[src]
    aff = affine.copy()
    aff[:3, 3] = affine[:3, :3] @ start + affine[:3, 3]
    return out, aff


def _lesion(wm: np.ndarray, x_mid: float, rng: np.random.Generator) -> np.ndarray:
    """A soft ball (0..1) of radius 5-6.5 voxels centred in deep white matter of either hemisphere (at least 6
    voxels from the midline, voxel index ``x_mid`` on the first axis)."""
    x = np.arange(wm.shape[0])[:, None, None]
    candidates = np.argwhere((wm > 0.9) & (np.abs(x - x_mid) > 6))
    c = candidates[rng.integers(len(candidates))]
    r = rng.uniform(5.0, 6.5)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in wm.shape], indexing="ij"))
    dist = np.sqrt(((grid - c[:, None, None, None]) ** 2).sum(0))
    return (1.0 / (1.0 + np.exp((dist - r) / 0.5))).astype(np.float32)


def build_class_volumes(name: str, root: Path, spacing_mm: float = 3.0, side: int = 64) -> dict:
    """Write a class-conditional volume dataset ``name`` under ``root``: the volumes as
    ``<class>/<class>_<split>_NNN.nii.gz`` and ``manifest.json`` (records with ``label`` and ``split``).

    Each class's template volume is resampled to ``spacing_mm``, cut to a ``side``^3 cube around the brain, then each
    volume draws its own augmentation (seeded by its index, so a rebuild is identical): a small affine (scales
    0.92-1.08, rotations up to 8 degrees, shifts up to 6 mm), an elastic deformation (up to 6 mm), a smooth bias
    field and noise, the background kept zero.
    """
    import torchio as tio

    if name not in CLASS_VOLUME_DATASETS:
        raise ValueError(f"unknown dataset {name}; choose from {CLASS_VOLUME_DATASETS}")
    affine = np.asarray(nib.load(mni152_files()["t1"]).affine, dtype=np.float64)
    factor = spacing_mm / float(abs(affine[0, 0]))
    _, brain, _, wm = tissue_maps()
    brain3, affine3 = downsample_volume(brain.astype(np.float32), affine, factor)
    wm3, _ = downsample_volume(wm.astype(np.float32), affine, factor)
    box = np.argwhere(brain3 > 0.5)
    center = (box.min(0) + box.max(0) + 1) / 2
    brain_cube, cube_affine = _on_cube(brain3, affine3, side, center)
    wm_cube, _ = _on_cube(wm3, affine3, side, center)
    x_mid = float(np.linalg.solve(cube_affine, [0.0, 0.0, 0.0, 1.0])[0])  # voxel index of the midline (world x = 0)
    if name == "contrast3_3d":
        classes = ["t1", "t2", "pd"]
        templates = {c: _on_cube(downsample_volume(contrast(c, seed=7), affine, factor)[0], affine3, side, center)[0]
                     for c in classes}
    else:
        classes = ["none", "lesion"]
        flair = _on_cube(downsample_volume(contrast("flair", seed=8), affine, factor)[0], affine3, side, center)[0]
        templates = {c: flair for c in classes}
    augment = tio.Compose([
        tio.RandomAffine(scales=0.08, degrees=8, translation=6, image_interpolation="linear"),
        tio.RandomElasticDeformation(num_control_points=6, max_displacement=6),
        tio.RandomBiasField(coefficients=0.05),  # a multiplicative field of roughly +-20 % (0.3 gave 3x)
    ])
    records, index = [], 0
    for label, cname in enumerate(classes):
        for split, n in CLASS_VOLUME_SPLITS:
            for i in range(n):
                index += 1
                rng = np.random.default_rng(1000 * (label + 1) + index)
                img = templates[cname].copy()
                if cname == "lesion":  # a bright lesion in white matter, as white-matter lesions on FLAIR
                    ball = _lesion(wm_cube, x_mid, rng)
                    img = img * (1 - ball) + 1.0 * ball * (brain_cube > 0.5)
                torch.manual_seed(1000 * (label + 1) + index)
                subject = augment(tio.Subject(image=tio.ScalarImage(tensor=torch.from_numpy(img)[None], affine=cube_affine),
                                              brain=tio.LabelMap(tensor=torch.from_numpy(brain_cube > 0.5)[None].to(torch.uint8),
                                                                 affine=cube_affine)))
                x = subject["image"].data[0].numpy()
                inside = subject["brain"].data[0].numpy() > 0
                x = np.clip(x + rng.normal(0, 0.02, x.shape), 0, 1) * inside
                rel = f"{cname}/{cname}_{split}_{i:03d}.nii.gz"  # names (file stems) are unique in a manifest
                (root / cname).mkdir(parents=True, exist_ok=True)
                nib.save(nib.Nifti1Image(x.astype(np.float32), cube_affine), root / rel)
                records.append({"image": rel, "label": label, "split": split})
    save_json(root / "manifest.json", records)
    info = {"kind": "class_volumes", "num_classes": len(classes), "class_names": classes, "shape": [side] * 3,
            "spacing_mm": spacing_mm, "splits": {s: n for s, n in CLASS_VOLUME_SPLITS}}
    save_json(root / "dataset.json", info)
    return info


def build(name: str, root: Path) -> dict:
    """Build dataset ``name`` into ``root`` unless it is there; return its ``dataset.json``."""
    if (root / "dataset.json").is_file():
        return json.loads((root / "dataset.json").read_text())
    if name in VOLUME_DATASETS:
        return build_volumes(name, root)
    if name in CLASS_VOLUME_DATASETS:
        return build_class_volumes(name, root)
    return build_seg(name, root) if name in SEG_DATASETS else build_class(name, root)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--names", nargs="*", default=[*SEG_DATASETS, *CLASS_DATASETS, *VOLUME_DATASETS,
                                                  *CLASS_VOLUME_DATASETS])
    args = p.parse_args()
    for name in args.names:
        print(name, build(name, args.out / name))


if __name__ == "__main__":
    main()
