"""The class-faithfulness judge: a classifier trained through `medsynth fit`, scoring sample folders through
`medsynth test`."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from medsynth.data import SampleDirDataModule
from medsynth.errors import DataError
from tests.integration.test_cli import run

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
CLASSES = ("disc", "square")
SIZE = 16


def make_shapes(root: Path, counts=None, seed: int = 0) -> Path:
    """Bright discs and dark squares on noisy grey, at random places and sizes, as a JSON class map whose folders
    hold ``train/``, ``val/`` and ``test/``; returns the map."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    for split, n in (counts or {"train": 8, "val": 4, "test": 4}).items():
        for name in CLASSES:
            (root / name / split).mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.normal(110, 15, (SIZE, SIZE))
                cy, cx = rng.integers(5, SIZE - 5, 2)
                r = rng.integers(3, 5)
                if name == "disc":
                    img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 230
                else:
                    img[cy - r : cy + r, cx - r : cx + r] = 15
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(root / name / split / f"{name}_{i:03d}.png")
    (root / "map.json").write_text(json.dumps({"0": "disc", "1": "square"}))
    return root / "map.json"


def cls_args(manifest) -> list:
    """A tiny classifier on the generated 16x16 shapes, quiet."""
    return ["--config", CONFIGS / "classifier2d.yaml", "--data.manifest", manifest, "--data.image_size", SIZE,
            "--data.batch_size", 4, "--data.num_workers", 0, "--trainer.logger", "false",
            "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
            "--model.net.init_args.channels", "[8, 16]"]


def fake_predict_dir(d: Path, images: dict[str, list[Path]], class_names=CLASSES, extra_meta=None) -> Path:
    """A folder laid out as `medsynth predict` of a class-conditional model writes it (``<class>/sample_NNNNN.npy``
    + ``.png``, ``metadata.json``), its samples being the given real images."""
    for name, files in images.items():
        (d / name).mkdir(parents=True)
        for i, f in enumerate(files):
            x = np.array(Image.open(f)).astype(np.float32)[None] / 127.5 - 1  # (1, H, W) in [-1, 1]
            np.save(d / name / f"sample_{i:05d}.npy", x)
            Image.open(f).save(d / name / f"sample_{i:05d}.png")
    config = {"data": {"class_path": "medsynth.data.ClassImageDataModule",
                       "init_args": {"image_size": SIZE, "channels": 1, "samples_per_class": 4}},
              "model": {"class_path": "medsynth.modules.DiffusionModule",
                        "init_args": {"num_classes": 0, "image_channels": 1, "image_size": SIZE,
                                      "class_names": list(class_names), "output": "image"}}}
    meta = {"synthetic": True, "checkpoint": "diffusion.ckpt", "checkpoint_sha256": None, "seed": 0,
            "guidance_scale": 1.0, "class_names": list(class_names),
            "num_samples": sum(len(v) for v in images.values()), "model": "DiffusionModule", "config": config,
            **(extra_meta or {})}
    (d / "metadata.json").write_text(json.dumps(meta))
    return d


def test_classifier_learns_the_classes_and_scores_class_faithfulness(tmp_path, capsys):
    manifest = make_shapes(tmp_path / "shapes")
    run_dir = tmp_path / "cls"
    base = cls_args(manifest)
    assert run("fit", *base, "--trainer.max_steps", 40, "--trainer.default_root_dir", run_dir) == 0
    last = run_dir / "checkpoints" / "last.ckpt"
    ckpt = torch.load(last, weights_only=False, map_location="cpu")
    assert ckpt["hyper_parameters"]["class_names"] == list(CLASSES) and ckpt["global_step"] == 40
    # real validation images: bright discs and dark squares are told apart
    capsys.readouterr()
    assert run("validate", *base, "--ckpt_path", last, "--trainer.default_root_dir", run_dir) == 0
    out = capsys.readouterr().out
    accuracy = float(re.search(r"val/accuracy\s*\W\s*([0-9.]+)", out).group(1))
    assert accuracy > 0.8 and "val/accuracy_square" in out

    # the real test split: the ceiling, kept beside the classifier's checkpoints for later reports
    assert run("test", *base, "--ckpt_path", last, "--trainer.default_root_dir", run_dir) == 0
    ceiling = json.loads((run_dir / "scores" / "real_test.json").read_text())["scores"]
    assert ceiling["test/accuracy"] > 0.8 and "test/accuracy_disc" in ceiling

    real = {name: sorted((manifest.parent / name / "test").glob("*.png")) for name in CLASSES}
    score = ["test", *base, "--ckpt_path", last, "--data", "medsynth.data.SampleDirDataModule"]
    scores = {}
    for kind, folders in (("real", real), ("swapped", {"disc": real["square"], "square": real["disc"]})):
        d = fake_predict_dir(tmp_path / kind, folders)
        assert run(*score, "--data.samples_dir", d, "--trainer.default_root_dir", tmp_path / f"score_{kind}") == 0
        result = json.loads((d / "scores.json").read_text())
        assert result["judge"] == str(last) and result["num_samples"] == 8 and result["ceiling"] == ceiling
        assert "test/accuracy" in (d / "report.md").read_text() and (d / "accuracy.png").is_file()
        scores[kind] = result["scores"]
    assert scores["real"]["test/accuracy"] == pytest.approx(ceiling["test/accuracy"])  # the same images
    assert scores["real"]["test/accuracy"] > 0.8 and scores["real"]["test/accuracy_disc"] > 0.7
    assert scores["swapped"]["test/accuracy"] < 0.2

    # samples of another class list (here: another order) than the classifier was trained on are refused
    d = fake_predict_dir(tmp_path / "reordered", real, class_names=CLASSES[::-1])
    assert run(*score, "--data.samples_dir", d) == 2
    assert "class_names" in capsys.readouterr().err.strip().splitlines()[-1]


def test_scoring_refuses_unknown_or_empty_class_folders(tmp_path, capsys):
    png = tmp_path / "x.png"
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(png)
    d = fake_predict_dir(tmp_path / "unknown", {"disc": [png], "circle": [png]})
    code = run("test", "--config", CONFIGS / "classifier2d.yaml", "--data", "medsynth.data.SampleDirDataModule",
               "--data.samples_dir", d)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "circle: not a class of these samples" in err[0]

    d = fake_predict_dir(tmp_path / "empty", {"disc": [png], "square": []})
    dm = SampleDirDataModule(samples_dir=d)
    assert dm.model_args() == {"num_classes": 0, "image_channels": 1, "image_size": SIZE, "class_names": list(CLASSES)}
    with pytest.raises(DataError, match="square: no samples"):
        dm.setup("test")

    d = fake_predict_dir(tmp_path / "ok", {"square": [png, png]})  # a class without a folder is not scored
    dm = SampleDirDataModule(samples_dir=d, image_size=8)
    dm.setup("test")
    item = dm.datasets["test"][1]
    assert item["image"].shape == (1, 8, 8) and item["label"] == 1 and item["name"] == "square/sample_00001.npy"

    d = fake_predict_dir(tmp_path / "nothing", {"disc": [png]}, class_names=())
    with pytest.raises(DataError, match="nothing to score against"):
        SampleDirDataModule(samples_dir=d)


def test_a_mask_folder_is_not_scored_by_a_classifier(tmp_path, capsys):
    d = tmp_path / "masks_run"
    (d / "samples").mkdir(parents=True)
    (d / "masks").mkdir()
    config = {"data": {"init_args": {"num_classes": 3, "channels": 1, "image_size": SIZE}}}
    (d / "metadata.json").write_text(json.dumps({"synthetic": True, "class_names": None, "config": config}))
    code = run("test", "--config", CONFIGS / "classifier2d.yaml", "--data", "medsynth.data.SampleDirDataModule",
               "--data.samples_dir", d)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "a classifier needs class-labelled data" in err[0]
