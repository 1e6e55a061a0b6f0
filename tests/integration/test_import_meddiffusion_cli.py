"""3D MedDiffusion checkpoints through the command line: ``medsynth import`` the PatchVolume autoencoder, then the
BiFlowNet decoding with it, then ``medsynth predict`` writes class-conditional NIfTI volumes (``DIR/<class>/
sample_NNNNN.nii.gz``) without any latent manifest, the same as the imported model generates in-process."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml

from medsynth.cli import main
from medsynth.convert import ImportOptions
from medsynth.convert.meddiffusion import BiFlowNetConverter, instantiate
from medsynth.diffusion import DDPMSampler
from tests.unit.test_meddiffusion_convert import write_biflownet, write_patchvolume

ROOT = Path(__file__).resolve().parents[2]
# what a user passes: medsynth's latent diffusion config (its net and sampler give way to the checkpoint's net and
# to the sampler set here: 4 DDPM steps keep the test fast)
PREDICT = ["predict", "--config", str(ROOT / "configs/biflownet3d.yaml"),
           "--model.sampler", "medsynth.diffusion.DDPMSampler", "--model.sampler.init_args.num_inference_steps", "4",
           "--model.sampler.init_args.progress", "false", "--data.num_samples", "2", "--data.num_workers", "0",
           "--trainer.enable_progress_bar", "false"]
CLASSES = ["class0", "class1", "class2"]  # the fixture's BiFlowNet has 3 classes


@pytest.fixture
def imported(tmp_path):
    """Tiny checkpoints in the original layouts (a 4x PatchVolume, a 3-class BiFlowNet with latents 8x8x16 of 4
    channels), imported as the user would."""
    write_patchvolume(tmp_path / "PatchVolume.ckpt")
    write_biflownet(tmp_path / "0001000.pt")
    main(["import", "--source", str(tmp_path / "PatchVolume.ckpt"), "--output", str(tmp_path / "ae.ckpt")])
    main(["import", "--source", str(tmp_path / "0001000.pt"), "--autoencoder", str(tmp_path / "ae.ckpt"),
          "--output", str(tmp_path / "ldm.ckpt")])
    return tmp_path


def in_process(folder: Path, labels: list[int], steps: int = 4) -> torch.Tensor:
    """The imported BiFlowNet and autoencoder generating in-process (no CLI): samples 0..n-1 with ``labels``."""
    model = instantiate(BiFlowNetConverter().convert(folder / "0001000.pt",
                                                     ImportOptions(autoencoder=folder / "ae.ckpt")))
    model.sampler = DDPMSampler(num_inference_steps=steps, progress=False)
    batch = {"index": torch.arange(len(labels)), "name": [f"sample_{i:05d}" for i in range(len(labels))],
             "label": torch.tensor(labels)}
    return model.predict_step(batch, 0)["sample"]


def test_predict_writes_class_conditional_volumes_like_in_process_generation(imported, capsys):
    out = imported / "generated"
    main([*PREDICT, "--ckpt_path", str(imported / "ldm.ckpt"), "--data.output_shape", "[32, 32, 64]",
          "--output_dir", str(out)])
    expected = in_process(imported, [0, 0, 1, 1, 2, 2])  # two per class, indices in class order
    assert expected.shape == (6, 1, 32, 32, 64)
    for label, name in enumerate(CLASSES):
        files = sorted((out / name).glob("*.nii.gz"))
        assert [f.name for f in files] == [f"sample_{2 * label + i:05d}.nii.gz" for i in range(2)]
        for i, file in enumerate(files):
            img = nib.load(file)
            assert img.shape == (32, 32, 64)
            np.testing.assert_allclose(img.header.get_zooms(), (1.0, 1.0, 1.0))  # imported latent space: 1 mm
            np.testing.assert_allclose(img.get_fdata(), expected[2 * label + i, 0].numpy(), atol=1e-5)
    # another class from the same noise: a different volume
    assert not np.allclose(nib.load(out / "class0" / "sample_00000.nii.gz").get_fdata(),
                           nib.load(out / "class1" / "sample_00002.nii.gz").get_fdata())
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["class_names"] == CLASSES and meta["num_samples"] == 6


def test_the_command_import_prints_samples_as_imported_at_the_default_size(imported, capsys):
    out = imported / "default_size"
    # no config: the import's sampler (DDPM, here told 4 steps instead of the original's 1000) and decoding chunk
    # stand; the size is the BiFlowNet's training resolution (8x8x16 latents) decoded at 4x
    main(["predict",  # the model and data classes come from the checkpoint, as import says
          "--model.sampler.init_args.num_inference_steps", "4", "--data.num_samples", "1", "--data.num_workers", "0",
          "--data.spacing", "[1.5, 1.5, 2.0]", "--trainer.enable_progress_bar", "false",
          "--ckpt_path", str(imported / "ldm.ckpt"), "--output_dir", str(out)])
    model = yaml.safe_load((out / "config.yaml").read_text())["model"]["init_args"]
    assert model["sampler"]["class_path"] == "medsynth.diffusion.DDPMSampler" and model["decode_tile"] == 32
    expected = in_process(imported, [0, 1, 2])
    for label, name in enumerate(CLASSES):
        img = nib.load(out / name / f"sample_{label:05d}.nii.gz")
        assert img.shape == (32, 32, 64)
        np.testing.assert_allclose(img.header.get_zooms(), (1.5, 1.5, 2.0))
        np.testing.assert_allclose(img.get_fdata(), expected[label, 0].numpy(), atol=1e-5)


def test_generation_without_a_manifest_refuses_in_one_line(imported, capsys):
    main(["import", "--source", str(imported / "0001000.pt"), "--output", str(imported / "latents_only.ckpt")])
    assert "import it again with --autoencoder" in capsys.readouterr().out  # said at import already
    cases = [
        # no autoencoder given at import: the model knows no latent space, so there is nothing to generate in
        (["--ckpt_path", str(imported / "latents_only.ckpt")], "data.manifest is not set"),
        # 30 is not a multiple of the autoencoder's 4x
        (["--ckpt_path", str(imported / "ldm.ckpt"), "--data.output_shape", "[30, 32, 64]"],
         "multiple of the autoencoder's downsampling factor 4"),
        # a class-conditional model has no mask channels: masks are refused before anything else is read
        (["--ckpt_path", str(imported / "ldm.ckpt"), "--data.num_classes", "3"], "its weights do not fit"),
    ]
    capsys.readouterr()
    for args, message in cases:
        out = imported / "refused"
        with pytest.raises(SystemExit) as e:
            main([*PREDICT, *args, "--output_dir", str(out)])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("medsynth: error:") and message in err[0], err
        assert not out.exists() or not any(out.iterdir())
