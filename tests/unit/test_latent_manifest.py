"""The latent manifest's one definition (medsynth.data.latent_manifest): what LatentWriter writes reads back
through read_latent_manifest and LatentDataModule; malformed manifests are refused in one line naming the file."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from medsynth.data.latent_manifest import (
    LATENT_MANIFEST,
    LATENT_MANIFEST_KIND,
    LATENT_MANIFEST_VERSION,
    latent_scaling,
    read_latent_manifest,
)
from medsynth.data.latents import LatentDataModule
from medsynth.errors import DataError
from medsynth.writers import LatentWriter


def encode_into(folder, latents: dict[str, torch.Tensor], scaling: str = "minmax", masks: bool = True):
    """Run a LatentWriter over 2D latents ``(C, H, W)`` with labels and masks, as an encoding predict would."""
    trainer = SimpleNamespace(world_size=1, is_global_zero=True,
                              datamodule=SimpleNamespace(class_names=["cat", "dog"], num_classes=3))
    module = SimpleNamespace(latent_description=lambda: {"spatial_dims": 2, "latent_channels": 2,
                                                         "downsample_factor": 4, "patch_size": 16})
    writer = LatentWriter(folder, scaling=scaling)
    writer.on_predict_start(trainer, module)
    for i, (name, z) in enumerate(latents.items()):
        batch = {"latent": z[None], "image_shape": [[z.shape[1] * 4, z.shape[2] * 4]], "name": [f"{name}.png"],
                 "split": ["train" if i else "val"], "label": torch.tensor([i % 2])}
        if masks:
            batch["mask"] = torch.full((1, z.shape[1] * 4, z.shape[2] * 4), i % 3, dtype=torch.int64)
        writer.write_on_batch_end(trainer, module, batch, None, None, i)
    writer.on_predict_end(trainer, module)
    return folder / LATENT_MANIFEST


def test_a_manifest_the_writer_writes_reads_back_with_its_scaling_and_records(tmp_path):
    gen = torch.Generator().manual_seed(0)
    latents = {name: torch.randn(2, 4, 4, generator=gen) * 3 + 1 for name in ("b", "a", "c")}
    path = encode_into(tmp_path / "enc", latents)
    info = read_latent_manifest(path)
    assert info["kind"] == LATENT_MANIFEST_KIND and info["version"] == LATENT_MANIFEST_VERSION
    assert [r["name"] for r in info["records"]] == ["a", "b", "c"]  # sorted by name
    assert info["num_classes"] == 3 and info["class_names"] == ["cat", "dog"]
    assert info["autoencoder"]["downsample_factor"] == 4 and info["autoencoder"]["latent_channels"] == 2
    for rec in info["records"]:  # paths made absolute, files the writer wrote
        np.testing.assert_array_equal(np.load(rec["latent"]), latents[rec["name"]].numpy())
        assert (tmp_path / "enc" / "masks" / f"{rec['name']}.png").samefile(rec["mask"])
    everything = torch.cat([z.flatten() for z in latents.values()]).double()
    scaled = (everything - info["scaling"]["shift"]) * info["scaling"]["scale"]
    assert scaled.min().item() == pytest.approx(-1.0) and scaled.max().item() == pytest.approx(1.0)

    data = LatentDataModule(manifest=path, num_classes=None, num_workers=0)
    args = data.model_args()  # the reader's side of the format: the model's description of these latents
    assert args["num_classes"] == 3 and args["image_channels"] == 2 and args["class_names"] == ["cat", "dog"]
    assert args["latent_space"]["method"] == "minmax" and args["latent_space"]["downsample_factor"] == 4
    data.setup("fit")
    assert [r["name"] for r in data.records("val")] == ["b"]  # the first encoded, written with split val


def test_latent_scaling_standardises_or_maps_the_range_onto_unit_interval():
    z = torch.tensor([-3.0, 0.0, 1.0, 6.0], dtype=torch.float64)
    stats = (z.min().item(), z.max().item(), z.numel(), z.sum().item(), (z * z).sum().item())
    minmax = latent_scaling("minmax", *stats)
    assert ((z - minmax["shift"]) * minmax["scale"]).tolist() == pytest.approx([-1.0, -1 / 3, -1 / 9, 1.0])
    std = latent_scaling("std", *stats)
    standard = (z - std["shift"]) * std["scale"]
    assert standard.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert standard.std(unbiased=False).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="minmax"):
        latent_scaling("min_max", *stats)


@pytest.mark.parametrize("problem", ["version", "method", "scale", "intensity", "name", "records", "kind"])
def test_malformed_manifests_are_refused_in_one_line_naming_the_file(tmp_path, problem):
    path = encode_into(tmp_path / "enc", {"a": torch.ones(2, 4, 4), "b": torch.zeros(2, 4, 4)}, masks=False)
    info = json.loads(path.read_text())
    if problem == "version":
        info["version"] = LATENT_MANIFEST_VERSION + 1
    elif problem == "method":
        info["scaling"]["method"] = "min_max"
        for rec in info["records"]:
            rec["scaling"] = info["scaling"]
    elif problem == "scale":
        info["scaling"]["scale"] = 0
    elif problem == "intensity":
        info["intensity"] = {"low": 100, "high": -100}
    elif problem == "name":
        del info["records"][1]["name"]
    elif problem == "records":
        info["records"] = {"a": "latents/a.npy"}
    elif problem == "kind":
        info["kind"] = "medsynth samples"
    path.write_text(json.dumps(info))
    with pytest.raises(DataError) as e:
        read_latent_manifest(path)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and "\n" not in message


def test_a_manifest_without_version_or_volume_keys_still_reads(tmp_path):
    """Manifests written before ``version``, ``intensity`` or ``geometry`` were recorded (and hand-written ones)."""
    (tmp_path / "latents").mkdir()
    np.save(tmp_path / "latents" / "a.npy", np.zeros((2, 4, 4), np.float32))
    (tmp_path / LATENT_MANIFEST).write_text(json.dumps({
        "kind": LATENT_MANIFEST_KIND, "scaling": {"shift": 0.0, "scale": 1.0}, "autoencoder": {},
        "records": [{"latent": "latents/a.npy", "name": "a"}]}))
    info = read_latent_manifest(tmp_path / LATENT_MANIFEST)
    assert info["records"][0]["latent"] == str(tmp_path / "latents" / "a.npy")
    assert LatentDataModule(manifest=tmp_path / LATENT_MANIFEST).model_args()["latent_space"]["method"] == "minmax"
