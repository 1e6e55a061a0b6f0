"""``medsynth import`` of diffusers UNet folders (the segmentation-guided project's format): detection, what is
asked for, the refusals, and that the imported net computes what the original computes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import DDIMPipeline, DDIMScheduler, DiffusionPipeline, UNet2DModel

from medsynth.convert import CONVERTERS, ImportOptions, find_converter, import_checkpoint
from medsynth.convert.diffusers_unet import DiffusersUNetConverter
from medsynth.convert.export import export_diffusers, reference_incompatibilities
from medsynth.errors import MedsynthError
from medsynth.loading import check_checkpoint, load_module
from medsynth.modules import DiffusionModule


def reference_unet(in_channels=2, out_channels=1, **overrides) -> UNet2DModel:
    """A small UNet2DModel laid out as the segmentation-guided project builds it (attention at one level)."""
    torch.manual_seed(0)
    config = dict(sample_size=16, in_channels=in_channels, out_channels=out_channels, layers_per_block=2,
                  block_out_channels=(8, 8, 16), norm_num_groups=8,
                  down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
    config.update(overrides)
    return UNet2DModel(**config)


def save_reference(folder: Path, unet: UNet2DModel, scheduler=None) -> Path:
    """What the project's ``pipeline.save_pretrained(output_dir)`` leaves: ``unet/``, ``scheduler/``."""
    unet.save_pretrained(str(folder / "unet"))
    if scheduler is not None:
        scheduler.save_pretrained(str(folder / "scheduler"))
    return folder


def test_detects_unet_folders_and_nothing_else(tmp_path):
    conv = DiffusersUNetConverter()
    save_reference(tmp_path / "pipe", reference_unet())
    assert conv.detect(tmp_path / "pipe") and conv.detect(tmp_path / "pipe" / "unet")
    (tmp_path / "other" / "unet").mkdir(parents=True)
    (tmp_path / "other" / "unet" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "config.json").write_bytes(b"\xff\x00 not json")
    (tmp_path / "file.ckpt").write_bytes(b"PK")
    for foreign in ("other", "garbage", "file.ckpt", "missing"):
        assert not conv.detect(tmp_path / foreign)
    assert find_converter(tmp_path / "pipe") is CONVERTERS[0]
    with pytest.raises(MedsynthError, match="not a checkpoint format medsynth can import.*diffusers-unet2d"):
        find_converter(tmp_path / "garbage")
    with pytest.raises(MedsynthError, match="--format nope: unknown format"):
        find_converter(tmp_path / "pipe", format="nope")
    with pytest.raises(MedsynthError, match="missing: --source does not exist"):
        find_converter(tmp_path / "missing")


def test_mask_guided_unet_needs_num_classes_and_imports_exactly(tmp_path):
    unet = reference_unet()
    source = save_reference(tmp_path / "pipe", unet, DDIMScheduler(num_train_timesteps=1000))
    out = tmp_path / "imported.ckpt"
    with pytest.raises(MedsynthError, match=r"give --num_classes K") as err:
        import_checkpoint(source, out)
    assert "\n" not in str(err.value) and not out.exists()

    path, imported, format = import_checkpoint(source, out, ImportOptions(num_classes=3))
    assert path == out and format == "diffusers-unet2d"
    ckpt = check_checkpoint(out)  # what predict/fit read
    hp = ckpt["hyper_parameters"]
    assert hp["_class_path"] == "medsynth.modules.DiffusionModule"
    assert hp["mask_encoding"] == "scalar" and hp["num_classes"] == 3 and hp["image_size"] == 16
    assert hp["objective"]["init_args"]["prediction_type"] == "epsilon"
    assert hp["sampler"]["init_args"]["num_inference_steps"] == 50
    assert ckpt["datamodule_hyper_parameters"]["num_classes"] == 3

    module = load_module(out)
    assert isinstance(module, DiffusionModule)
    mask = torch.randint(0, 3, (2, 16, 16))
    xt, t = torch.randn(2, 1, 16, 16), torch.tensor([10, 900])
    with torch.no_grad():  # medsynth's scalar encoding is the project's k/255 channel
        reference = unet(torch.cat([xt, mask[:, None].float() / 255], 1), t).sample
        mine = module.denoise(xt, t, module.condition({"mask": mask})[0])
    torch.testing.assert_close(mine, reference, atol=1e-6, rtol=0)  # float rounding of another kernel order

    with pytest.raises(MedsynthError, match="already exists; medsynth import never replaces"):
        import_checkpoint(source, out, ImportOptions(num_classes=3))


def test_unconditional_unet_needs_no_flag_and_refuses_one(tmp_path):
    source = save_reference(tmp_path / "pipe", reference_unet(in_channels=1))
    with pytest.raises(MedsynthError, match="unconditional UNet"):
        import_checkpoint(source, tmp_path / "a.ckpt", ImportOptions(num_classes=3))
    with pytest.raises(MedsynthError, match="--autoencoder: .* pixel-space UNet"):
        import_checkpoint(source, tmp_path / "a.ckpt", ImportOptions(autoencoder=tmp_path / "ae.ckpt"))
    _, imported, _ = import_checkpoint(source, tmp_path / "b.ckpt")
    assert imported.model["init_args"]["num_classes"] == 0
    assert any("no scheduler/" in n for n in imported.notes)  # the assumed noise process is said


@pytest.mark.parametrize("change, culprit", [
    ({"flip_sin_to_cos": False}, "flip_sin_to_cos=False"),
    ({"down_block_types": ("DownBlock2D", "SkipDownBlock2D", "DownBlock2D")}, "down_block_types"),
    ({"in_channels": 5}, "4 conditioning channels"),
    ({"num_class_embeds": 3}, "class-conditional"),
])
def test_nets_medsynth_cannot_express_are_refused_in_one_line(tmp_path, change, culprit):
    folder = tmp_path / "pipe" / "unet"
    save_reference(tmp_path / "pipe", reference_unet())
    config = json.loads((folder / "config.json").read_text())
    config.update({k: list(v) if isinstance(v, tuple) else v for k, v in change.items()})
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(MedsynthError, match=culprit) as err:
        import_checkpoint(tmp_path / "pipe", tmp_path / "x.ckpt", ImportOptions(num_classes=2))
    assert "\n" not in str(err.value) and not (tmp_path / "x.ckpt").exists()


def test_scheduler_folder_sets_the_objective(tmp_path):
    scheduler = DDIMScheduler(num_train_timesteps=500, beta_schedule="squaredcos_cap_v2",
                              prediction_type="v_prediction", timestep_spacing="trailing")
    source = save_reference(tmp_path / "pipe", reference_unet(), scheduler)
    _, imported, _ = import_checkpoint(source, tmp_path / "x.ckpt", ImportOptions(num_classes=2))
    objective = imported.model["init_args"]["objective"]["init_args"]
    assert objective["num_train_timesteps"] == 500 and objective["prediction_type"] == "v_prediction"
    assert objective["beta_schedule"] == "squaredcos_cap_v2"
    assert any("timestep_spacing='trailing'" in n for n in imported.notes)


def test_init_from_starts_fit_from_the_weights_and_refuses_misfits(tmp_path):
    source = save_reference(tmp_path / "pipe", reference_unet())
    ckpt, _, _ = import_checkpoint(source, tmp_path / "x.ckpt", ImportOptions(num_classes=3))
    imported_net = check_checkpoint(ckpt)["hyper_parameters"]["net"]["init_args"]
    from medsynth.nets import UNet2D

    def module(**kw):
        factory = lambda i, o, **extra: UNet2D(i, o, **{**imported_net, **kw, **extra})  # noqa: E731
        return DiffusionModule(net=factory, num_classes=3, image_size=16, mask_encoding="scalar", init_from=ckpt)

    fresh = module()
    fresh.setup("fit")
    for key, value in check_checkpoint(ckpt)["state_dict"].items():
        assert torch.equal(fresh.state_dict()[key], value), key
    with pytest.raises(MedsynthError, match=r"x.ckpt \(model.init_from\): its weights do not fit"):
        module(block_out_channels=[8, 8, 32]).check_fit_inputs()


def tiny_module(**kw) -> DiffusionModule:
    from functools import partial

    from medsynth.nets import UNet2D

    torch.manual_seed(0)
    net = partial(UNet2D, block_out_channels=(8, 16), attention_levels=(False, True), norm_num_groups=8)
    return DiffusionModule(net=net, image_size=16, **kw).eval()


@pytest.mark.parametrize("settings, problem", [
    ({"num_classes": 3, "mask_encoding": "scalar"}, None),
    ({}, None),
    ({"num_classes": 3}, "one_hot masks of 3 channels"),
    ({"objective": "v"}, "prediction_type='v_prediction'"),
    ({"objective": "flow"}, "a RectifiedFlowObjective"),
])
def test_export_records_what_the_reference_cannot_sample_and_imports_back_exactly(tmp_path, settings, problem):
    from medsynth.diffusion import DDIMSampler, DDPMObjective, EulerSampler, RectifiedFlowObjective
    from medsynth.diffusion.samplers import sample_generators

    settings = dict(settings)
    kind = settings.pop("objective", None)
    if kind == "v":
        settings["objective"] = DDPMObjective(prediction_type="v_prediction")
    if kind == "flow":
        settings.update(objective=RectifiedFlowObjective(), sampler=EulerSampler(3, shift=2.0))
    module = tiny_module(**settings)
    problems = reference_incompatibilities(module)
    assert (problem is None and problems == []) or (problem is not None and problem in "; ".join(problems))
    out = export_diffusers(module, tmp_path / "export")
    config = json.loads((out / "unet" / "config.json").read_text())
    if problem is None:  # kept out of what diffusers prints on loading
        assert "medsynth" not in config and config["_medsynth"]["reference_pipeline"] == "compatible"
    else:  # diffusers prints keys it does not know whenever it loads the net: the warning reaches its users
        assert "_medsynth" not in config and config["medsynth"]["reference_pipeline"].startswith("INCOMPATIBLE")
    scheduler = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    index = json.loads((out / "model_index.json").read_text())
    if kind == "flow":
        assert scheduler["_class_name"] == "FlowMatchEulerDiscreteScheduler" and scheduler["shift"] == 2.0
        assert index["_class_name"] == "DiffusionPipeline"  # no diffusers pipeline samples it: loading fails loudly
    else:
        assert scheduler["_class_name"] == "DDIMScheduler"
        assert scheduler["prediction_type"] == module.objective.prediction_type
        assert index["_class_name"] == ("SegGuidedDDIMPipeline" if module.conditional else "DDIMPipeline")
    if not module.conditional and kind is None:  # diffusers loads it offline and samples what medsynth samples
        pipe = DiffusionPipeline.from_pretrained(str(out))
        assert isinstance(pipe, DDIMPipeline)
        theirs = pipe(batch_size=2, generator=sample_generators(0, [0, 1]), num_inference_steps=3,
                      output_type="np").images
        mine = (module.sample(indices=[0, 1], sampler=DDIMSampler(3)) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1)
        assert abs(torch.from_numpy(theirs) - mine).max() < 1e-4

    _, imported, _ = import_checkpoint(out, tmp_path / "x.ckpt")  # no flag: the record tells
    loaded = load_module(tmp_path / "x.ckpt")
    assert type(loaded.objective) is type(module.objective) and loaded.mask_encoding == module.mask_encoding
    mask = torch.randint(0, 3, (2, 16, 16)) if module.conditional else None
    sampler = EulerSampler(3, shift=2.0) if kind == "flow" else DDIMSampler(3)
    assert torch.equal(loaded.sample(mask, indices=[0, 1], sampler=sampler),
                       module.sample(mask, indices=[0, 1], sampler=sampler))
