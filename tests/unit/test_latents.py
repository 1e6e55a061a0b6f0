"""Latent manifests, the latent data module, and 3D class guidance on latents."""

from __future__ import annotations

import json
from functools import partial

import lightning as L
import numpy as np
import pytest
import torch

from medsynth.data.latents import LatentDataModule, read_latent_manifest
from medsynth.diffusion import DDIMSampler
from medsynth.errors import DataError, MedsynthError
from medsynth.modules import DiffusionModule
from medsynth.nets import BiFlowNet3D


def write_latents(folder, shapes: dict, channels: int = 4, labels: dict | None = None, **extra) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "latents").mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    records = []
    for name, shape in shapes.items():
        z = rng.normal(size=(channels, *shape)).astype(np.float32)
        np.save(folder / "latents" / f"{name}.npy", z)
        rec = {"latent": f"latents/{name}.npy", "name": name, "shape": list(z.shape), "affine": np.diag([2, 2, 3, 1.0]).tolist()}
        if labels:
            rec["label"] = labels[name]
        records.append(rec)
    manifest = {"kind": "medsynth latents", "version": 1, "scaling": {"method": "std", "shift": 0.5, "scale": 2.0},
                "autoencoder": {"checkpoint": "ae.ckpt", "sha256": "abc", "latent_channels": channels,
                                "downsample_factor": 4}, "class_names": None, "records": records, **extra}
    (folder / "latents.json").write_text(json.dumps(manifest))
    return folder / "latents.json"


def test_latent_manifest_reads_and_scales(tmp_path):
    m = write_latents(tmp_path / "l", {"a": (8, 8, 8), "b": (8, 8, 8)}, labels={"a": 0, "b": 1})
    dm = LatentDataModule(manifest=m, num_workers=0, val_fraction=0.0)
    dm.setup("fit")
    item = dm.datasets["train"][0]
    raw = np.load(tmp_path / "l" / "latents" / f"{item['name']}.npy")
    np.testing.assert_allclose(item["image"].numpy(), (raw - 0.5) * 2.0, rtol=1e-6)
    args = dm.model_args()
    assert args["image_channels"] == 4 and args["sample_shape"] == [8, 8, 8] and args["class_names"] == ["0", "1"]
    assert args["latent_space"]["spacing"] == [2.0, 2.0, 3.0] and args["latent_space"]["scale"] == 2.0
    assert LatentDataModule(manifest=m, output_shape=[64, 32, 32]).sample_shape() == [16, 8, 8]


@pytest.mark.parametrize("problem", ["channels", "dims", "missing", "not_manifest", "other_encoder", "other_scaling",
                                     "escape"])
def test_bad_latent_manifests_are_refused_naming_the_file(tmp_path, problem):
    m = write_latents(tmp_path / "l", {"a": (8, 8, 8), "b": (8, 8, 8)})
    info = json.loads(m.read_text())
    culprit = m
    if problem == "channels":
        np.save(tmp_path / "l" / "latents" / "b.npy", np.zeros((3, 8, 8, 8), np.float32))
        culprit = tmp_path / "l" / "latents" / "b.npy"
    elif problem == "dims":
        np.save(tmp_path / "l" / "latents" / "b.npy", np.zeros((4, 8, 8), np.float32))
        culprit = tmp_path / "l" / "latents" / "b.npy"
    elif problem == "missing":
        (tmp_path / "l" / "latents" / "b.npy").unlink()
        culprit = tmp_path / "l" / "latents" / "b.npy"
    elif problem == "not_manifest":
        m.write_text(json.dumps([{"image": "x.nii.gz"}]))
    elif problem == "other_encoder":
        info["records"][1]["autoencoder_sha256"] = "def"
        m.write_text(json.dumps(info))
    elif problem == "other_scaling":  # records merged from two encodings, each min-max scaled on its own
        info["records"][0]["scaling"] = info["scaling"]
        info["records"][1]["scaling"] = dict(info["scaling"], shift=0.1)
        m.write_text(json.dumps(info))
    elif problem == "escape":
        info["records"][1]["latent"] = "../../b.npy"
        m.write_text(json.dumps(info))
    with pytest.raises(DataError) as e:
        read_latent_manifest(m)
    assert str(culprit) in str(e.value) and "\n" not in str(e.value)


def test_shapes_must_agree_or_be_cropped_and_output_sizes_fit_the_autoencoder(tmp_path):
    m = write_latents(tmp_path / "l", {"a": (8, 8, 8), "b": (12, 8, 8)})
    with pytest.raises(DataError, match="crop_size"):
        LatentDataModule(manifest=m).model_args()
    assert LatentDataModule(manifest=m, crop_size=8).model_args()["sample_shape"] == [8, 8, 8]
    with pytest.raises(DataError, match="larger than a latent"):
        LatentDataModule(manifest=m, crop_size=10).model_args()
    with pytest.raises(DataError, match="multiple of the autoencoder's downsampling factor 4"):
        LatentDataModule(manifest=m, crop_size=8, output_shape=[30, 32, 32]).sample_shape()


def test_3d_class_guidance_combines_conditional_and_null_predictions():
    torch.manual_seed(0)
    net = partial(BiFlowNet3D, channels=(8, 16), norm_num_groups=4, dit_patch=4, dit_hidden=16, dit_depth=1,
                  dit_heads=2)
    m = DiffusionModule(net=net, image_channels=4, sample_shape=[8, 8, 8], class_names=["a", "b"],
                        label_drop_prob=0.1, sampler=DDIMSampler(2)).eval()
    with torch.no_grad():  # as after training: outputs and the null label's embedding are not zero
        for p in m.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    labels = torch.tensor([0, 1])
    plain = m.sample(labels=labels, guidance_scale=1.0)
    assert plain.shape == (2, 4, 8, 8, 8)
    xt, t = torch.randn(2, 4, 8, 8, 8), torch.tensor([400, 400])
    c, u = m.denoise(xt, t, None, labels), m.denoise(xt, t, None, torch.full_like(labels, 2))
    assert not torch.allclose(c, u, atol=1e-4)
    captured = {}

    class Once(DDIMSampler):
        def sample(self, denoise, noise, objective, generators=None):
            captured["out"] = denoise(xt, t)
            return noise

    m.sample(labels=labels, guidance_scale=2.0, sampler=Once(1))
    assert torch.allclose(captured["out"], u + 2.0 * (c - u), atol=1e-4)
    # scale 1 is the conditional model: guided sampling (the doubled batch and u + w (c - u)) meets it as w -> 1
    assert torch.allclose(m.sample(labels=labels, guidance_scale=1.0 + 1e-4), plain, atol=1e-3)
    assert not torch.allclose(m.sample(labels=labels, guidance_scale=3.0), plain, atol=1e-3)


def test_a_list_of_crop_sizes_crops_each_batch_to_one_of_them(tmp_path):
    m = write_latents(tmp_path / "l", {"a": (16, 16, 16), "b": (16, 20, 16), "c": (24, 16, 16)})
    dm = LatentDataModule(manifest=m, num_workers=1, crop_size=[12, 8], batch_size=3, val_fraction=0.0)  # collate
    # in a worker process
    assert dm.training_shapes() == [[8, 8, 8], [12, 12, 12]] and dm.model_args()["sample_shape"] == [12, 12, 12]
    dm.setup("fit")
    torch.manual_seed(0)
    loader = dm.train_dataloader()
    seen = {tuple(b["image"].shape[2:]) for _ in range(12) for b in loader}
    assert seen == {(8, 8, 8), (12, 12, 12)}  # both sizes, one per batch
    assert {tuple(b["image"].shape[2:]) for b in dm.val_dataloader()} == {(12, 12, 12)}  # the largest
    # a crop size the net cannot take is refused before training, naming the setting
    net = partial(BiFlowNet3D, channels=(8, 16), norm_num_groups=4, dit_patch=4, dit_hidden=16, dit_depth=1,
                  dit_heads=2)
    model = DiffusionModule(net=net, image_channels=4, sample_shape=[12, 12, 12])
    bad = LatentDataModule(manifest=m, num_workers=0, crop_size=[10, 12])
    with pytest.raises(MedsynthError, match=r"data.crop_size.*\[10, 10, 10\]"):
        model.check_fit_inputs(bad)
    model.check_fit_inputs(dm)


@pytest.mark.parametrize("method,bounded", [("std", False), ("minmax", True)])
def test_model_args_name_the_latent_scaling_so_a_model_built_from_them_clips_only_bounded_latents(tmp_path, method,
                                                                                                   bounded):
    m = write_latents(tmp_path / "l", {"a": (8, 8, 8), "b": (8, 8, 8)})
    info = json.loads(m.read_text())
    info["scaling"]["method"] = method
    m.write_text(json.dumps(info))
    latent_space = LatentDataModule(manifest=m).model_args()["latent_space"]
    assert latent_space["method"] == method
    # no trainer, no datamodule attached (a model built from its saved hyperparameters): only the args tell
    net = partial(BiFlowNet3D, channels=(8, 16), norm_num_groups=4, dit_patch=4, dit_hidden=16, dit_depth=1,
                  dit_heads=2)
    model = DiffusionModule(net=net, image_channels=4, image_size=8, latent_space=latent_space)
    assert model.bounded() is bounded


def write_masked_latents(folder, shapes: dict, num_classes: int = 3, factor: int = 4):
    """Latents (factor 4) with label maps at image resolution, each label a random blob pattern."""
    import nibabel as nib

    path = write_latents(folder, shapes)
    info = json.loads(path.read_text())
    rng = np.random.default_rng(1)
    (folder / "masks").mkdir()
    for rec in info["records"]:
        image_shape = [s * factor for s in rec["shape"][1:]]
        coarse = rng.integers(0, num_classes, size=[max(1, s // 2) for s in image_shape])
        labels = np.kron(coarse, np.ones((2,) * len(image_shape), dtype=np.int64))[tuple(slice(0, s) for s in image_shape)]
        nib.save(nib.Nifti1Image(labels.astype(np.uint8), np.diag([2, 2, 3, 1.0])), folder / "masks" / f"{rec['name']}.nii.gz")
        rec["mask"], rec["image_shape"] = f"masks/{rec['name']}.nii.gz", image_shape
    info["num_classes"] = num_classes
    path.write_text(json.dumps(info))
    return path


def test_crops_and_flips_keep_the_image_resolution_mask_on_its_latent_window(tmp_path):
    from medsynth.diffusion.conditioning import reduce_to_grid

    m = write_masked_latents(tmp_path / "l", {"a": (8, 8, 8), "b": (8, 12, 8)})
    for crop in (4, [4, 6]):
        dm = LatentDataModule(manifest=m, num_classes=None, num_workers=0, crop_size=crop, flip_axes=[0, 2],
                              batch_size=2, val_fraction=0.0)
        dm.setup("fit")
        torch.manual_seed(0)
        for batch in list(dm.train_dataloader()) * 3:
            side = batch["image"].shape[-1]
            assert batch["mask"].shape == (2, side, side, side) and batch["full_mask"].shape == (2, *(4 * side,) * 3)
            for mask, full in zip(batch["mask"], batch["full_mask"]):
                assert torch.equal(reduce_to_grid(full, 4), mask)  # the same window, flipped alike


def test_a_patch_embedding_model_conditions_on_the_image_resolution_mask(tmp_path):
    m = write_masked_latents(tmp_path / "l", {"a": (8, 8, 8), "b": (8, 8, 8)})
    dm = LatentDataModule(manifest=m, num_classes=None, num_workers=0, crop_size=4, batch_size=2, val_fraction=0.0)
    dm.setup("fit")
    args = dm.model_args()
    net = partial(BiFlowNet3D, channels=(8, 16), norm_num_groups=4, dit_patch=4, dit_token_patch=2, dit_hidden=16,
                  dit_depth=1, dit_heads=2)
    model = DiffusionModule(net=net, sampler=DDIMSampler(num_inference_steps=2), mask_encoding="patch_embedding",
                            mask_embedding_channels=6, label_drop_prob=0.2, **{k: args[k] for k in ("num_classes", "image_channels",
                                                                        "sample_shape", "latent_space")})
    assert model.net.in_channels == 4 + 6
    before = model.mask_embedding.proj.weight.detach().clone()
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)
    trainer.fit(model, dm)  # the embedding is trained with the net
    assert not torch.allclose(model.mask_embedding.proj.weight, before)
    batch = next(iter(dm.train_dataloader()))
    model.eval()
    full = batch["full_mask"][:1]
    moved = full.roll(1, dims=1)  # a label map that differs only inside the latent voxels' blocks
    same_grid = batch["mask"][:1]
    a = model.sample(same_grid, indices=[0], full_mask=full)
    b = model.sample(same_grid, indices=[0], full_mask=moved)
    assert not torch.allclose(a, b)  # the model sees below the latent grid
    with pytest.raises(MedsynthError, match="full_mask"):
        model.sample(same_grid, indices=[0])


def test_crops_per_latent_fill_an_epoch_with_different_crops_of_each_latent(tmp_path):
    m = write_latents(tmp_path / "l", {"a": (16, 16, 16), "b": (16, 16, 16)})
    dm = LatentDataModule(manifest=m, num_workers=0, crop_size=4, crops_per_latent=3, batch_size=6, val_fraction=0.0)
    dm.setup("fit")
    torch.manual_seed(0)
    batch = next(iter(dm.train_dataloader()))
    assert len(dm.datasets["train"]) == 6 and batch["image"].shape == (6, 4, 4, 4, 4)
    assert sorted(batch["name"]) == ["a", "a", "a", "b", "b", "b"]
    crops = [c for c, name in zip(batch["image"], batch["name"]) if name == "a"]
    assert not torch.equal(crops[0], crops[1]) or not torch.equal(crops[1], crops[2])  # their own windows
    assert len(dm.datasets["val"]) == 2  # validation reads each latent once
