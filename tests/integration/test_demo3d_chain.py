"""Slow: the whole 3D chain of `make demo-3d` on the MNI152 demo, with tiny nets on CPU:
autoencoder → encode → BiFlowNet → generated NIfTI volumes."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medsynth.cli import main
from medsynth.provenance import provenance

ROOT = Path(__file__).resolve().parents[2]
C = lambda name: str(ROOT / "configs" / name)  # noqa: E731


@pytest.mark.slow
def test_demo_3d_chain_with_tiny_nets(tmp_path):
    ae = ["--config", C("ae3d.yaml"), "--config", C("experiments/ae3d_demo.yaml"),
          "--model.net.init_args.channels", "[8, 16]", "--model.net.init_args.num_codes", "64",
          "--model.net.init_args.norm_num_groups", "4", "--model.discriminator", "null",
          "--data.patch_size", "16", "--data.num_workers", "0", "--trainer.logger", "false",
          "--trainer.enable_progress_bar", "false"]
    main(["fit", *ae, "--trainer.max_steps", "30", "--trainer.default_root_dir", str(tmp_path / "ae")])
    ae_ckpt = tmp_path / "ae" / "checkpoints" / "last.ckpt"

    latents = tmp_path / "latents"
    main(["predict", "--config", C("encode3d.yaml"), "--ckpt_path", str(ae_ckpt),
          "--data", "medsynth.data.MNI152VolumeDataModule", "--data.num_workers", "0", "--output_dir", str(latents)])
    info = json.loads((latents / "latents.json").read_text())
    assert {r["name"]: r["split"] for r in info["records"]} == {"posterior": "train", "anterior": "val"}
    assert info["records"][0]["shape"] == [8, 56, 32, 48]  # 98x58x94 padded to the 16-voxel patch, halved

    ldm = ["--config", C("biflownet3d.yaml"), "--config", C("experiments/biflownet3d_demo.yaml"),
           "--model.net.init_args.channels", "[8, 16]", "--model.net.init_args.norm_num_groups", "4",
           "--model.net.init_args.dit_patch", "4", "--model.net.init_args.dit_hidden", "16",
           "--model.net.init_args.dit_heads", "2", "--model.sampler.init_args.num_inference_steps", "3",
           "--data.crop_size", "8", "--data.output_shape", "[32, 32, 32]", "--trainer.logger", "false",
           "--trainer.enable_progress_bar", "false"]
    main(["fit", *ldm, "--data.manifest", str(latents / "latents.json"), "--trainer.max_steps", "10",
          "--trainer.default_root_dir", str(tmp_path / "ldm")])
    out = tmp_path / "generated"
    main(["predict", *ldm, "--ckpt_path", str(tmp_path / "ldm/checkpoints/last.ckpt"), "--output_dir", str(out)])
    files = sorted((out / "samples").glob("*.nii.gz"))
    assert len(files) == 2
    img = nib.load(files[0])
    assert img.shape == (32, 32, 32)
    np.testing.assert_allclose(img.header.get_zooms(), (2.0, 2.0, 2.0), rtol=1e-4)  # the source spacing
    assert np.isfinite(img.get_fdata()).all() and provenance(files[0])["synthetic"] is True
    assert (out / "grid.png").is_file() and json.loads((out / "metadata.json").read_text())["num_samples"] == 2
