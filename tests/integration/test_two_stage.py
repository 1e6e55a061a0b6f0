"""Two-stage generation: a mask generator, then image/mask pairs from a mask-guided image model."""

import json
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from tests.integration.test_cli import BASE, data_args, run

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
MASK = ["--config", CONFIGS / "mask2d.yaml", "--config", CONFIGS / "tests" / "tiny.yaml"]


def test_mask_generator_then_image_mask_pairs(seg_dataset, tmp_path, capsys):
    img_dir, seg_dir = seg_dataset
    mask_run, image_run = tmp_path / "mask_run", tmp_path / "image_run"
    # logged: data.num_classes (3 mask classes) and the generator's num_classes (0: unconditional) share a name
    assert run("fit", *MASK, "--data.seg_dir", seg_dir, "--data.num_classes", 3, "--trainer.default_root_dir",
               mask_run, "--trainer.logger", "lightning.pytorch.loggers.CSVLogger", "--trainer.logger.save_dir",
               tmp_path / "logs") == 0
    logged = yaml.safe_load(next((tmp_path / "logs").rglob("hparams.yaml")).read_text())
    assert logged["num_classes"] == 0 and logged["image_channels"] == 3 and logged["data"]["num_classes"] == 3
    state = torch.load(mask_run / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")["state_dict"]
    assert state["net.unet.conv_in.weight"].shape[1] == 3  # unconditional, K one-hot channels in
    masks_out = tmp_path / "masks_out"
    assert run("predict", *MASK, "--ckpt_path", mask_run / "checkpoints" / "last.ckpt", "--output_dir", masks_out,
               "--data.num_samples", 3) == 0
    gen = sorted((masks_out / "masks").glob("*.png"))
    assert len(gen) == 3 and np.array(Image.open(gen[0])).max() <= 2
    assert np.load(masks_out / "samples" / "sample_00000.npy").shape == (3, 16, 16)  # all channels kept

    assert run("fit", *BASE, *data_args(img_dir, seg_dir), "--trainer.default_root_dir", image_run) == 0
    pairs = tmp_path / "pairs"
    assert run("predict", *BASE, "--config", CONFIGS / "experiments" / "pairs2d.yaml",
               "--ckpt_path", image_run / "checkpoints" / "last.ckpt",
               "--data.mask_checkpoint", mask_run / "checkpoints" / "last.ckpt", "--data.num_samples", 5,
               "--output_dir", pairs) == 0
    names = [f"pair_{i:05d}.png" for i in range(5)]
    assert sorted(p.name for p in (pairs / "samples").glob("*.png")) == names
    assert sorted(p.name for p in (pairs / "masks").glob("*.png")) == names
    assert np.load(pairs / "samples" / "pair_00000.npy").shape == (1, 16, 16)
    from medsynth.provenance import provenance

    assert provenance(pairs / "masks" / "pair_00000.png")["synthetic"] is True  # generated masks are marked
    assert json.loads((pairs / "metadata.json").read_text())["checkpoint"].endswith("image_run/checkpoints/last.ckpt")

    # a mask generator whose classes do not match the image model is refused with one line
    mask4 = tmp_path / "mask4"
    assert run("fit", *MASK, "--data.seg_dir", seg_dir, "--data.num_classes", 4, "--trainer.max_steps", 1,
               "--trainer.default_root_dir", mask4) == 0
    assert run("predict", *BASE, "--config", CONFIGS / "experiments" / "pairs2d.yaml",
               "--ckpt_path", image_run / "checkpoints" / "last.ckpt",
               "--data.mask_checkpoint", mask4 / "checkpoints" / "last.ckpt", "--output_dir", tmp_path / "bad") == 2
    assert "trained with num_classes=3 but the data gives 4" in capsys.readouterr().err
