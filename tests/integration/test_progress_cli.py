"""``medsynth predict`` shows denoising progress when forced (issue #16); fit's previews stay silent."""

from __future__ import annotations

from tests.integration.test_cli import BASE, data_args, run


def test_predict_shows_denoising_progress_when_forced_and_fit_previews_do_not(seg_dataset, tmp_path, capfd):
    img_dir, seg_dir = seg_dataset
    dargs = data_args(img_dir, seg_dir)
    run_dir = tmp_path / "run"
    # a preview grid every epoch (2 epochs of 2 batches), with the sampler's bar forced on
    assert run("fit", *BASE, *dargs, "--trainer.default_root_dir", run_dir, "--model.sampler.init_args.progress",
               "true", "--trainer.callbacks+=medsynth.callbacks.SampleGridLogger",
               "--trainer.callbacks.every_n_epochs=1") == 0
    assert list((run_dir / "samples").glob("*.png"))
    assert "denoising" not in capfd.readouterr().err
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert run("predict", *BASE, *dargs, "--ckpt_path", ckpt, "--output_dir", tmp_path / "out",
               "--model.sampler.init_args.progress", "true") == 0
    err = capfd.readouterr().err
    assert "denoising (DDIMSampler)" in err and "3/3" in err
    assert run("predict", *BASE, *dargs, "--ckpt_path", ckpt, "--output_dir", tmp_path / "out2") == 0
    assert "denoising" not in capfd.readouterr().err  # not a terminal: quiet by default
