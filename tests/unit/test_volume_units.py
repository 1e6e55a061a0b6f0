"""Units and geometry of 3D volumes (issue #15.3): the intensity normalisation is recorded in latents.json and
inverted when volumes are written, so a CT model writes Hounsfield units; optional resampling and RAS reorientation
on input, carried by the outputs."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch

from medsynth.data.latents import LatentDataModule, read_latent_manifest
from medsynth.data.volumes import Geometry, Normalization, VolumeDataModule, read_volume
from medsynth.errors import DataError
from medsynth.writers import LatentWriter, SampleWriter, in_source_units

ROOT = Path(__file__).resolve().parents[2]
AIR, SOFT_TISSUE, BONE = -1000.0, 40.0, 700.0
OBLIQUE = np.array([[0, -1.2, 0, 30.0], [1.1, 0, 0, -20.0], [0, 0, 1.5, 5.0], [0, 0, 0, 1]])


def ct_phantom(shape=(16, 16, 16), seed: int = 0) -> np.ndarray:
    """A CT-like phantom in HU: air around a soft-tissue ellipsoid (with a little noise) holding a bone sphere."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    hu = np.full(shape, AIR)
    hu[((grid / np.array([0.8, 0.7, 0.9])[:, None, None, None]) ** 2).sum(0) < 1] = SOFT_TISSUE
    hu += np.where(hu > AIR, rng.normal(0, 5, shape), 0)
    hu[((grid - 0.1) ** 2).sum(0) < 0.12] = BONE
    return hu


def write_ct(path: Path, hu: np.ndarray, affine: np.ndarray = OBLIQUE) -> Path:
    """As scanners store CT: int16 with scl_slope 1 and scl_inter -1024 (the stored value is HU + 1024)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    img = nib.Nifti1Image(np.round(hu + 1024).astype(np.int16), affine)
    img.header.set_slope_inter(1.0, -1024.0)
    nib.save(img, path)
    return path


def test_ct_volumes_are_read_in_hu_and_the_window_inverts_exactly():
    norm = Normalization("ct", window=(-1000.0, 1000.0))
    hu = np.array([AIR, SOFT_TISSUE, BONE, 1500.0], dtype=np.float32)
    x, (low, high) = norm.to_unit(hu)
    assert (low, high) == (-1000.0, 1000.0)
    back = Normalization.from_unit(x, low, high).numpy()
    np.testing.assert_allclose(back, [AIR, SOFT_TISSUE, BONE, 1000.0], atol=1e-3)  # 1500 HU lies above the window
    desc = norm.describe()
    assert desc == {"mode": "ct", "units": "HU", "window": [-1000.0, 1000.0], "low": -1000.0, "high": 1000.0,
                    "exact": True}


def test_mri_records_the_median_of_the_per_volume_ranges_and_says_it_is_not_exact():
    desc = Normalization("mri").describe([(0.0, 100.0), (10.0, 300.0), (5.0, 200.0)])
    assert desc["low"] == 5.0 and desc["high"] == 200.0 and desc["exact"] is False
    assert "low" not in Normalization("mri").describe()  # nothing encoded: no range to claim


def test_scl_slope_and_inter_are_applied_on_reading(tmp_path):
    hu = ct_phantom()
    data, affine = read_volume(write_ct(tmp_path / "ct.nii.gz", hu))
    np.testing.assert_allclose(data[0], np.round(hu + 1024) - 1024)
    np.testing.assert_allclose(affine, OBLIQUE)


def world(affine: np.ndarray, ijk) -> np.ndarray:
    return affine[:3, :3] @ np.asarray(ijk, dtype=np.float64) + affine[:3, 3]


def test_canonical_reorientation_keeps_every_voxel_at_its_place_in_the_world():
    rng = np.random.default_rng(1)
    data = rng.normal(size=(1, 6, 7, 8)).astype(np.float32)
    out, affine = Geometry(canonical=True).apply(data, OBLIQUE)
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    assert sorted(out.shape[1:]) == sorted(data.shape[1:])
    inverse = np.linalg.inv(affine)
    for ijk in [(0, 0, 0), (5, 6, 7), (2, 3, 4)]:  # the same value sits at the same world point
        new = np.round(inverse[:3, :3] @ world(OBLIQUE, ijk) + inverse[:3, 3]).astype(int)
        assert out[(0, *new)] == data[(0, *ijk)]


def test_resampling_gives_the_asked_spacing_over_the_same_extent():
    data = ct_phantom((16, 16, 16))[None].astype(np.float32)
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    out, new_affine = Geometry(spacing=(2.0, 2.0, 2.0)).apply(data, affine)
    assert out.shape == (1, 8, 8, 16)
    np.testing.assert_allclose(np.linalg.norm(new_affine[:3, :3], axis=0), [2.0, 2.0, 2.0])
    assert out.min() >= AIR - 1e-3 and out.max() <= BONE + 1e-3  # linear interpolation stays within the data
    with pytest.raises(DataError, match=r"data.target_spacing=\[1.0, 0.0, 1.0\]"):
        VolumeDataModule(target_spacing=[1.0, 0.0, 1.0])


def test_the_datamodule_resamples_and_reorients_what_it_yields(tmp_path):
    for name in ("a", "b"):
        write_ct(tmp_path / f"{name}.nii.gz", ct_phantom((16, 16, 16)))
    (tmp_path / "m.json").write_text(json.dumps([{"image": "a.nii.gz", "split": "train"},
                                                 {"image": "b.nii.gz", "split": "val"}]))
    dm = VolumeDataModule(manifest=tmp_path / "m.json", normalization="ct", patch_size=8, num_workers=0,
                          target_spacing=[2.0, 2.0, 2.0], canonical=True)
    dm.setup("predict")
    item = dm.datasets["predict"][0]
    affine = item["affine"].numpy()
    assert nib.aff2axcodes(affine) == ("R", "A", "S")
    np.testing.assert_allclose(np.linalg.norm(affine[:3, :3], axis=0), [2.0, 2.0, 2.0])
    # RAS puts the file's 1.2 mm axis first and its 1.1 mm axis second; 16 voxels each, resampled to whole 2 mm
    # voxels within the same field of view
    assert tuple(item["image"].shape) == (1, int(16 * 1.2 / 2), int(16 * 1.1 / 2), int(16 * 1.5 / 2))
    dm.setup("fit")
    assert tuple(dm.datasets["val"][0]["image"].shape) == (1, 8, 8, 8)


def fake_run(datamodule, tmp_path: Path):
    """The trainer and autoencoder a LatentWriter sees, on one device."""
    trainer = SimpleNamespace(world_size=1, is_global_zero=True, datamodule=datamodule)
    module = SimpleNamespace(latent_description=lambda: {"spatial_dims": 3, "latent_channels": 1,
                                                         "downsample_factor": 2, "patch_size": 8})
    return trainer, module


@pytest.mark.parametrize("mode", ["ct", "mri"])
def test_latent_manifest_records_the_units_and_generated_volumes_are_written_in_them(tmp_path, mode):
    data = SimpleNamespace(class_names=None, normalization=Normalization(mode),
                           geometry=Geometry(spacing=(2.0, 2.0, 2.0), canonical=True))
    trainer, ae = fake_run(data, tmp_path)
    writer = LatentWriter(tmp_path / "latents", scaling="minmax")
    writer.on_predict_start(trainer, ae)
    ranges = {"a": (-1000.0, 1000.0), "b": (-1000.0, 1000.0)} if mode == "ct" else {"a": (0.0, 400.0),
                                                                                     "b": (20.0, 600.0)}
    for i, (name, (low, high)) in enumerate(ranges.items()):
        writer.write_on_batch_end(trainer, ae, {
            "latent": torch.randn(1, 1, 4, 4, 4), "image_shape": [[8, 8, 8]], "name": [name], "path": [f"{name}.nii"],
            "split": ["train"], "affine": torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0]))[None],
            "norm_low": torch.tensor([low]), "norm_high": torch.tensor([high])}, None, None, i)
    writer.on_predict_end(trainer, ae)
    info = read_latent_manifest(tmp_path / "latents" / "latents.json")
    assert info["geometry"] == {"target_spacing": [2.0, 2.0, 2.0], "canonical": True}
    assert {r["name"]: tuple(r["intensity_range"]) for r in info["records"]} == ranges
    expected = (-1000.0, 1000.0) if mode == "ct" else (10.0, 500.0)  # MRI: the medians of the volumes' ranges
    assert (info["intensity"]["low"], info["intensity"]["high"]) == expected
    assert info["intensity"]["units"] == ("HU" if mode == "ct" else "arbitrary (the scanner's)")

    latent_space = LatentDataModule(manifest=tmp_path / "latents" / "latents.json").model_args()["latent_space"]
    assert latent_space["intensity"] == info["intensity"]
    sample = torch.linspace(-1, 1, 512).reshape(1, 1, 8, 8, 8)  # a decoded volume in [-1, 1]
    model = SimpleNamespace(latent_space=latent_space, sampler=None, sample_seed=0, guidance_scale=1.0,
                            class_names=None)
    out = tmp_path / "samples"
    samples = SampleWriter(out)
    run = SimpleNamespace(world_size=1, precision="32", is_global_zero=True,
                          strategy=SimpleNamespace(reduce=lambda t, reduce_op: t))
    samples.on_predict_start(run, model)
    samples.write_on_batch_end(run, model, {"sample": sample, "name": ["sample_00000"], "index": [0]}, None, None, 0)
    samples.on_predict_end(run, model)
    written = nib.load(out / "samples" / "sample_00000.nii.gz")
    assert written.get_data_dtype() == np.float32
    low, high = expected
    np.testing.assert_allclose(written.get_fdata(), (sample[0, 0].double().numpy() + 1) / 2 * (high - low) + low,
                               rtol=1e-5, atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(written.affine[:3, :3], axis=0), [2.0, 2.0, 2.0])
    assert json.loads((out / "metadata.json").read_text())["intensity"]["units"] == info["intensity"]["units"]


def test_manifests_without_units_still_read_and_their_samples_stay_in_unit_range(tmp_path):
    x = torch.linspace(-1, 1, 8)
    same, units = in_source_units(x, {"shift": 0.0, "scale": 1.0})
    assert units is None and torch.equal(same, x)
    bad = {"kind": "medsynth latents", "scaling": {"shift": 0, "scale": 1}, "intensity": {"low": 5, "high": 1},
           "records": [{"latent": "a.npy", "name": "a"}]}
    np.save(tmp_path / "a.npy", np.zeros((1, 2, 2, 2), np.float32))
    (tmp_path / "latents.json").write_text(json.dumps(bad))
    with pytest.raises(DataError, match="malformed 'intensity'") as e:
        read_latent_manifest(tmp_path / "latents.json")
    assert str(tmp_path / "latents.json") in str(e.value)


# ---------------------------------------------------------------------------------------------------- through the CLI
AE = ["--config", str(ROOT / "configs/ae3d.yaml"), "--config", str(ROOT / "configs/tests/tiny_ae3d.yaml")]
ENCODE = ["--config", str(ROOT / "configs/encode3d.yaml")]
LDM = ["--config", str(ROOT / "configs/biflownet3d.yaml"), "--config", str(ROOT / "configs/tests/tiny_biflownet3d.yaml")]


@pytest.fixture
def ct_run(tmp_path):
    """Three CT phantoms (int16 + scl_inter, oblique affine) and a tiny CT autoencoder trained on them."""
    from medsynth.cli import main

    vols = tmp_path / "ct"
    for i, name in enumerate(("a", "b", "c")):
        write_ct(vols / f"{name}.nii.gz", ct_phantom((16, 16, 16), seed=i))
    manifest = vols / "manifest.json"
    manifest.write_text(json.dumps([{"image": "a.nii.gz", "split": "train"}, {"image": "b.nii.gz", "split": "train"},
                                    {"image": "c.nii.gz", "split": "val"}]))
    main(["fit", *AE, "--data.manifest", str(manifest), "--data.normalization", "ct", "--data.ct_window",
          "[-1000, 1000]", "--trainer.max_steps", "2", "--trainer.default_root_dir", str(tmp_path / "ae")])
    return manifest, tmp_path / "ae" / "checkpoints" / "last.ckpt"


def test_ct_round_trip_reconstructs_in_hounsfield_units_on_the_asked_grid(tmp_path, ct_run, monkeypatch):
    from medsynth.cli import main
    from medsynth.modules import AutoencoderModule

    manifest, ae = ct_run
    # the trained (tiny) autoencoder: whatever it reconstructs is written in HU inside the window
    main(["predict", *AE, "--ckpt_path", str(ae), "--data.manifest", str(manifest), "--output_dir",
          str(tmp_path / "recon")])
    rec = nib.load(tmp_path / "recon" / "a.nii.gz")
    assert rec.get_data_dtype() == np.float32 and rec.shape == (16, 16, 16)
    np.testing.assert_allclose(rec.affine, OBLIQUE, atol=1e-5)
    assert AIR <= rec.get_fdata().min() and rec.get_fdata().max() <= 1000.0 and np.ptp(rec.get_fdata()) > 2
    meta = json.loads((tmp_path / "recon" / "metadata.json").read_text())
    assert meta["intensity"]["units"] == "HU" and meta["intensity"]["window"] == [-1000.0, 1000.0]

    # a perfect autoencoder gives the input back exactly, in HU, resampled and reoriented as asked
    monkeypatch.setattr(AutoencoderModule, "reconstruct", lambda self, x: x)
    main(["predict", *AE, "--ckpt_path", str(ae), "--data.manifest", str(manifest), "--output_dir",
          str(tmp_path / "exact"), "--data.target_spacing", "[2.4, 2.2, 1.5]", "--data.canonical", "true"])
    out = nib.load(tmp_path / "exact" / "a.nii.gz")
    assert nib.aff2axcodes(out.affine) == ("R", "A", "S")
    np.testing.assert_allclose(np.linalg.norm(out.affine[:3, :3], axis=0), [2.4, 2.2, 1.5], atol=1e-6)
    assert out.shape == (8, 8, 16)  # twice the file's 1.2 and 1.1 mm, its 1.5 mm kept
    src = nib.load(manifest.parent / "a.nii.gz")
    expected = np.round(ct_phantom((16, 16, 16), seed=0) + 1024) - 1024
    # voxel (i, j, k) of the output is the mean of a 2x2 block of the source, found through the world coordinates
    to_src = np.linalg.inv(src.affine) @ out.affine
    for ijk in [(0, 0, 0), (4, 4, 8), (3, 5, 2), (7, 7, 15)]:
        centre = to_src[:3, :3] @ np.asarray(ijk, float) + to_src[:3, 3]
        block = expected[tuple(slice(int(np.floor(c)), int(np.floor(c)) + 2) if abs(c % 1 - 0.5) < 1e-6
                               else slice(int(round(c)), int(round(c)) + 1) for c in centre)]
        np.testing.assert_allclose(out.get_fdata()[ijk], block.mean(), atol=0.05)


@pytest.mark.slow
def test_ct_latent_chain_records_hu_in_latents_json_and_samples_come_out_in_hu(tmp_path, ct_run):
    from medsynth.cli import main

    manifest, ae = ct_run
    latents = tmp_path / "latents"
    main(["predict", *ENCODE, "--ckpt_path", str(ae), "--data.manifest", str(manifest), "--output_dir", str(latents)])
    info = json.loads((latents / "latents.json").read_text())
    assert info["intensity"]["units"] == "HU" and (info["intensity"]["low"], info["intensity"]["high"]) == (AIR, 1000)
    assert info["geometry"] == {"target_spacing": None, "canonical": False}
    assert all(r["intensity_range"] == [AIR, 1000.0] for r in info["records"])
    main(["fit", *LDM, "--data.manifest", str(latents / "latents.json"), "--trainer.default_root_dir",
          str(tmp_path / "ldm")])
    out = tmp_path / "samples"
    main(["predict", *LDM, "--ckpt_path", str(tmp_path / "ldm" / "checkpoints" / "last.ckpt"), "--data.manifest",
          str(latents / "latents.json"), "--output_dir", str(out)])
    volumes = sorted((out / "samples").glob("*.nii.gz"))
    assert volumes
    for path in volumes:
        data = nib.load(path).get_fdata()
        assert AIR <= data.min() and data.max() <= 1000.0 and np.ptp(data) > 2  # HU, not [-1, 1]
    assert json.loads((out / "metadata.json").read_text())["intensity"]["units"] == "HU"
