"""The shipped recipes as a new user runs them first: ``seg2d``/``class2d``/``mask2d`` + ``quick.yaml``, with their
own objective, sampler and EMA (only the net is shrunk and the budget cut, so the test takes seconds)."""

from __future__ import annotations

import json

import pytest
import torch

from tests.integration.test_class_cli import class_map
from tests.integration.test_cli import CONFIGS, data_args, run

TINY_NET = ["--model.net.init_args.block_out_channels", "[8, 16]", "--model.net.init_args.attention_levels",
            "[false, true]", "--model.net.init_args.norm_num_groups", 8, "--model.net.init_args.attention_head_dim", 8,
            "--data.image_size", 16, "--data.batch_size", 4, "--data.num_workers", 0, "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.max_steps", 6, "--trainer.val_check_interval", 3,
            "--model.lr_warmup_steps", 2]


def quick(recipe: str) -> list:
    return ["--config", CONFIGS / recipe, "--config", CONFIGS / "experiments" / "quick.yaml"]


def test_seg2d_quick_trains_with_its_own_objective_ema_and_sampler(seg_dataset, tmp_path):
    img_dir, seg_dir = seg_dataset
    run_dir, out = tmp_path / "run", tmp_path / "samples"
    args = [*quick("seg2d.yaml"), *data_args(img_dir, seg_dir), *TINY_NET]
    assert run("fit", *args, "--trainer.default_root_dir", run_dir) == 0
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert ckpt["global_step"] == 6
    assert ckpt["hyper_parameters"]["objective"]["class_path"].endswith("RectifiedFlowObjective")
    ema = next(v for k, v in ckpt["callbacks"].items() if k.startswith("EMA"))
    assert ema["latest_update_step"] == 6 and int(ckpt["averaging_state"]["n_averaged"]) == 6
    # the checkpoint's weights are the average, which differs from the live weights it also keeps
    assert any(not torch.equal(ckpt["state_dict"][k], ckpt["current_model_state"][k]) for k in ckpt["state_dict"])
    assert len(list((run_dir / "samples").glob("*.png"))) == 2  # a preview at each step-based validation (3, 6)
    assert run("predict", *args, "--ckpt_path", run_dir / "checkpoints" / "last.ckpt", "--output_dir", out) == 0
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["sampler"]["class"] == "DPMSolverSampler" and meta["sampler"]["num_inference_steps"] == 10
    assert len(list((out / "samples").glob("*.npy"))) == len(list((seg_dir / "all" / "test").iterdir()))


@pytest.mark.parametrize("recipe", ["class2d.yaml", "mask2d.yaml"])
def test_quick_composes_after_the_other_2d_recipes(recipe, seg_dataset, tmp_path):
    img_dir, seg_dir = seg_dataset
    data = (["--data.manifest", class_map(tmp_path)] if recipe == "class2d.yaml"
            else ["--data.seg_dir", seg_dir, "--data.num_classes", 3])
    run_dir = tmp_path / "run"
    assert run("fit", *quick(recipe), *data, *TINY_NET, "--trainer.default_root_dir", run_dir) == 0
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert ckpt["global_step"] == 6 and int(ckpt["averaging_state"]["n_averaged"]) == 6
