"""Class-conditional fit -> predict through the CLI, with classifier-free guidance and rectified flow."""

import json
from pathlib import Path

import numpy as np

from tests.integration.test_cli import run
from tests.unit.test_class_data import make_class_folders

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
BASE = ["--config", CONFIGS / "class2d.yaml", "--config", CONFIGS / "tests" / "tiny.yaml"]


def class_map(tmp_path):
    make_class_folders(tmp_path / "imgs", names=("bright", "dark"), n=10)
    (tmp_path / "map.json").write_text(json.dumps({"0": "imgs/bright", "1": "imgs/dark"}))
    return tmp_path / "map.json"


def test_class_conditional_fit_and_predict_writes_a_folder_per_class(tmp_path, capsys):
    manifest = class_map(tmp_path)
    run_dir = tmp_path / "run"
    assert run("fit", *BASE, "--data.manifest", manifest, "--trainer.default_root_dir", run_dir) == 0
    out = tmp_path / "samples"
    assert run("predict", *BASE, "--ckpt_path", run_dir / "checkpoints" / "last.ckpt", "--output_dir", out,
               "--data.samples_per_class", 3, "--model.guidance_scale", 2.0) == 0
    for name in ("bright", "dark"):
        assert sorted(p.name for p in (out / name).glob("*.png")) == [f"sample_{i:05d}.png" for i in range(3)]
        assert np.load(out / name / "sample_00000.npy").shape == (1, 16, 16)
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["class_names"] == ["bright", "dark"] and meta["guidance_scale"] == 2.0
    assert (out / "grid.png").is_file()
    # a negative guidance scale is refused before anything is written
    bad = tmp_path / "neg"
    assert run("predict", *BASE, "--ckpt_path", run_dir / "checkpoints" / "last.ckpt", "--output_dir", bad,
               "--model.guidance_scale", -1) == 2
    assert "guidance_scale=-1.0 must be >= 0" in capsys.readouterr().err
    assert not bad.exists()
    # auto: this model was trained with class dropout, so it is guided (the weight is recorded)
    auto = tmp_path / "auto"
    assert run("predict", *BASE, "--ckpt_path", run_dir / "checkpoints" / "last.ckpt", "--output_dir", auto,
               "--data.samples_per_class", 3, "--model.guidance_scale", "auto") == 0
    meta = json.loads((auto / "metadata.json").read_text())
    assert meta["guidance_scale"] == 2.0 and meta["guidance_setting"] == "auto"
    assert np.array_equal(np.load(auto / "dark" / "sample_00001.npy"), np.load(out / "dark" / "sample_00001.npy"))


def test_rectified_flow_with_euler_sampler(tmp_path, capsys):
    manifest = class_map(tmp_path)
    run_dir = tmp_path / "rf"
    flow = ["--model.objective", "medsynth.diffusion.RectifiedFlowObjective",
            "--model.sampler", "medsynth.diffusion.EulerSampler", "--model.sampler.init_args.num_inference_steps", 4]
    assert run("fit", *BASE, *flow, "--data.manifest", manifest, "--trainer.default_root_dir", run_dir) == 0
    out = tmp_path / "rf_samples"
    assert run("predict", *BASE, *flow, "--ckpt_path", run_dir / "checkpoints" / "last.ckpt", "--output_dir", out,
               "--data.samples_per_class", 2) == 0
    assert len(list(out.glob("*/*.npy"))) == 4
    assert json.loads((out / "metadata.json").read_text())["sampler"]["class"] == "EulerSampler"
    # an objective paired with an incompatible sampler is refused with one line
    assert run("fit", *BASE, "--model.objective", "medsynth.diffusion.RectifiedFlowObjective",
               "--data.manifest", manifest, "--trainer.default_root_dir", tmp_path / "bad") == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "DDIMSampler cannot sample a RectifiedFlowObjective" in err
