"""3D MedDiffusion checkpoints into medsynth: files in the original layouts, written from medsynth's own nets through
the inverse key mapping, convert back to the same weights and outputs; damaged or foreign files are refused."""

import argparse
from pathlib import Path

import pytest
import torch

from medsynth.convert import ImportOptions
from medsynth.convert.meddiffusion import (
    CONVERTERS,
    BiFlowNetConverter,
    PatchVolumeConverter,
    biflownet_key_map,
    instantiate,
    patchvolume_key_map,
)
from medsynth.errors import MedsynthError
from medsynth.nets import BiFlowNet3D, PatchVolumeAutoencoder
from medsynth.nets.biflownet import sincos_grid_embedding
from tests.unit.test_biflownet import one_thread  # noqa: F401  (tiny tensors run on one thread)


class _HasEveryKey(dict):
    """Lets a key map list every name the original could have (the inverse mapping keeps those medsynth has)."""

    def __contains__(self, key):
        return True


def original_layout(own: dict, mapping_of, names: tuple = ()) -> dict:
    """A medsynth state dict renamed to the original's names (``names``: ones the key map counts blocks by)."""
    mapping = mapping_of(_HasEveryKey(dict.fromkeys(names)))
    assert mapping
    return {src: own[dst].clone() for src, dst in mapping.items() if dst in own}


def randomised(net: torch.nn.Module) -> torch.nn.Module:
    torch.manual_seed(1)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))  # no zero-initialised layer hides a mapping mistake
    return net.eval()


# ---------------------------------------------------------------------------------------------------- PatchVolume

AE_ARGS = dict(
    spatial_dims=3, in_channels=1, channels=[8, 16, 16], num_res_blocks=2, latent_channels=4, num_codes=16,
    norm_num_groups=4, norm_eps=1e-6, mid_attention_heads=4, attention_head_dim=32, quant_convs=True,
    downsample_kernel=4, upsample="transposed", encoder_out_kernel=3,
)


def write_patchvolume(path: Path, stage: int = 1) -> PatchVolumeAutoencoder:
    torch.manual_seed(0)
    net = randomised(PatchVolumeAutoencoder(**AE_ARGS))
    state = original_layout(net.state_dict(), lambda s: patchvolume_key_map(s, levels=3, prefix=""))
    state["volume_discriminator.model0.0.weight"] = torch.randn(4, 1, 4, 4, 4)  # left out by the converter
    cfg = {"model": {"n_hiddens": 8, "downsample": [4, 4, 4], "num_groups": 4, "embedding_dim": 4, "n_codes": 16,
                     "stage": stage, "discriminator_iter_start": 12000, "l1_weight": 4.0, "lr": 3e-4},
           "dataset": {"image_channels": 1, "patch_size": 16}}
    torch.save({"epoch": 1, "global_step": 10, "pytorch-lightning_version": "1.9.0", "state_dict": state,
                "hyper_parameters": {"cfg": cfg}}, path)
    return net


def test_patch_volume_checkpoint_round_trips(tmp_path):
    path = tmp_path / "PatchVolume.ckpt"
    source = write_patchvolume(path, stage=2)
    converter = PatchVolumeConverter()
    assert converter.detect(path) and not BiFlowNetConverter().detect(path)
    imported = converter.convert(path, ImportOptions())
    args = imported.model["init_args"]
    assert imported.model["class_path"] == "medsynth.modules.AutoencoderModule"
    assert args["net"]["init_args"] == {**AE_ARGS, "decay": 0.99, "commitment_weight": 0.25, "dead_code_threshold": 1.0}  # the architecture read back from names, shapes and the config
    assert args["image_size"] == args["predict_patch_size"] == 16  # the patches it was trained and encodes on
    # the original's volumes are stored in [0, 1] and mapped linearly to [-1, 1]
    assert imported.data["init_args"] == {"patch_size": 16, "normalization": "ct", "ct_window": [0.0, 1.0]}
    assert not any(k.startswith("net.volume") or "discriminator" in k for k in imported.state_dict)
    assert any("4x" in note and "stage 2" in note for note in imported.notes)
    assert any("ae3d_stage2.yaml --model.init_from" in note for note in imported.notes)
    module = instantiate(imported)
    for key, value in source.state_dict().items():
        assert torch.equal(module.net.state_dict()[key], value), key
    x = torch.rand(1, 1, 16, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(module.net.encode(x), source.encode(x))
        assert torch.equal(module.net(x)[0], source(x)[0])


# ---------------------------------------------------------------------------------------------------- BiFlowNet

NET_ARGS = dict(
    variant="meddiffusion", channels=[24, 24, 48], num_res_blocks=2, norm_num_groups=24, mid_attention_heads=8,
    attention_head_dim=32, attention_levels=[2], full_resolution_levels=2, dit_patch=8, dit_token_patch=2,
    dit_hidden=24, dit_depth=1, dit_heads=8, dit_fusion=["early", "late"], resolution_conditioning=True,
)


def biflownet_state(seed: int) -> tuple[BiFlowNet3D, dict]:
    torch.manual_seed(seed)
    net = randomised(BiFlowNet3D(4, 4, num_class_embeds=3, **NET_ARGS))
    # the original's DiT block counts, which the key map reads from the names: 2 input, 1 middle, 2 output blocks
    blocks = ("IntraPatchFlow_input.0.", "IntraPatchFlow_input.1.", "IntraPatchFlow_mid.0.",
              "IntraPatchFlow_output.0.", "IntraPatchFlow_output.1.")
    state = original_layout(net.state_dict(), lambda s: biflownet_key_map(s, levels=3, prefix=""), names=blocks)
    state["pos_embed"] = sincos_grid_embedding((4, 4, 4), 24)[None]  # the original keeps its frozen table
    return net, state


def write_biflownet(path: Path) -> tuple[BiFlowNet3D, BiFlowNet3D]:
    (model, model_state), (ema, ema_state) = biflownet_state(0), biflownet_state(1)
    args = argparse.Namespace(model_dim=24, dim_mults=[1, 1, 2], volume_channels=4, num_classes=3, timesteps=1000,
                              loss_type="l1", resolution=[8, 8, 16], batch_size=2)
    torch.save({"model": model_state, "ema": ema_state, "scaler": {}, "opt": {"state": {}}, "args": args,
                "epoch": 3}, path)
    return model, ema


def net_output(net, x, labels):
    with torch.no_grad():
        return net(x, torch.tensor([3, 800]), class_labels=labels)


def test_biflownet_checkpoint_round_trips_with_ema_weights_by_default(tmp_path):
    path = tmp_path / "0001000.pt"
    model, ema = write_biflownet(path)
    converter = BiFlowNetConverter()
    assert converter.detect(path) and not PatchVolumeConverter().detect(path)
    x, labels = torch.randn(2, 4, 8, 8, 16), torch.tensor([0, 2])
    for weights, source in (("ema", ema), ("model", model)):
        imported = converter.convert(path, ImportOptions(weights=weights))
        args = imported.model["init_args"]
        assert args["net"]["init_args"] == NET_ARGS
        assert args["objective"]["init_args"]["loss"] == "l1" and args["sample_shape"] == [8, 8, 16]
        module = instantiate(imported)
        assert module.net.class_embedding.weight.shape == (4, 96)  # plus medsynth's null label
        assert torch.equal(net_output(module.net, x, labels), net_output(source, x, labels))
        assert "latent_space" not in args  # no autoencoder given: latents only
        optimizer = module.optimizer(module.net.parameters(), lr=module.lr)
        assert type(optimizer) is torch.optim.Adam and optimizer.defaults["weight_decay"] == 0  # the original's


def imported_autoencoder(folder: Path):
    """An imported PatchVolume and a medsynth checkpoint of it (the minimal content ``load_module`` reads)."""
    write_patchvolume(folder / "PatchVolume.ckpt")
    ae = PatchVolumeConverter().convert(folder / "PatchVolume.ckpt", ImportOptions())
    path = folder / "ae_medsynth.ckpt"
    torch.save({"state_dict": ae.state_dict,
                "hyper_parameters": {"_class_path": ae.model["class_path"], **ae.model["init_args"]}}, path)
    return ae, path


def test_a_checkpoint_in_torchs_legacy_format_converts(tmp_path):
    path = tmp_path / "legacy.pt"
    _, state = biflownet_state(0)
    torch.save({"model": state, "ema": state, "args": argparse.Namespace(resolution=[8, 8, 8])}, path,
               _use_new_zipfile_serialization=False)
    assert BiFlowNetConverter().detect(path)
    imported = BiFlowNetConverter().convert(path, ImportOptions())
    assert torch.equal(imported.state_dict["net.conv_in.weight"], state["init_conv.weight"])


def test_biflownet_latents_are_scaled_by_the_imported_autoencoders_codebook(tmp_path):
    ae, ae_ckpt = imported_autoencoder(tmp_path)
    write_biflownet(tmp_path / "model.pt")
    imported = BiFlowNetConverter().convert(tmp_path / "model.pt", ImportOptions(autoencoder=ae_ckpt))
    space = imported.model["init_args"]["latent_space"]
    codebook = ae.state_dict["net.quantizer.codebook"]
    s = torch.tensor([-1.0, 0.0, 1.0])
    # the original: (s + 1) / 2 * (max - min) + min; medsynth: s / scale + shift
    expected = (s + 1) / 2 * (codebook.max() - codebook.min()) + codebook.min()
    assert torch.allclose(s / space["scale"] + space["shift"], expected, atol=1e-6)
    assert space["method"] == "minmax" and imported.model["init_args"]["autoencoder"] == str(ae_ckpt)


# ---------------------------------------------------------------------------------------------------- refusals


def test_converters_are_exposed_with_their_names():
    assert [c.name for c in CONVERTERS] == ["meddiffusion-patchvolume", "meddiffusion-biflownet"]


def test_truncated_foreign_and_missing_files_are_refused_in_one_line(tmp_path):
    good = tmp_path / "good.pt"
    write_biflownet(good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"weight": torch.zeros(2)}}, foreign)
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint")
    for converter in CONVERTERS:
        for path in (truncated, foreign, text, tmp_path / "missing.pt", tmp_path):
            assert not converter.detect(path)
    for path, message in ((truncated, "not a readable torch checkpoint"), (foreign, "not a 3D MedDiffusion"),
                          (tmp_path / "missing.pt", "no such file")):
        for converter in CONVERTERS:
            with pytest.raises(MedsynthError, match=message) as e:
                converter.convert(path, ImportOptions())
            assert str(path) in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("damage, message", [
    ("shape", r"downs\.2\.0\.block1\.proj\.bias is \(5,\)"),
    ("extra", "IntraPatchFlow_mid.0.extra.weight, which 3D MedDiffusion's network does not have"),
    ("missing", "no weights for"),
    ("pos_embed", "pos_embed is not the frozen"),
])
def test_mismatched_biflownet_weights_are_refused(tmp_path, damage, message):
    _, state = biflownet_state(0)
    if damage == "shape":
        state["downs.2.0.block1.proj.bias"] = torch.zeros(5)
    elif damage == "extra":
        state["IntraPatchFlow_mid.0.extra.weight"] = torch.zeros(3)
    elif damage == "missing":
        del state["mid_block1.block2.norm.weight"]
    else:
        state["pos_embed"] = torch.randn_like(state["pos_embed"])
    path = tmp_path / "damaged.pt"
    torch.save({"model": state, "ema": state, "args": argparse.Namespace()}, path)
    with pytest.raises(MedsynthError, match=message) as e:
        BiFlowNetConverter().convert(path, ImportOptions())
    assert str(path) in str(e.value)


def test_a_patch_volume_whose_config_contradicts_its_weights_is_refused(tmp_path):
    path = tmp_path / "PatchVolume.ckpt"
    write_patchvolume(path)
    ckpt = torch.load(path, weights_only=False)
    ckpt["hyper_parameters"]["cfg"]["model"]["downsample"] = [8, 8, 8]
    torch.save(ckpt, path)
    with pytest.raises(MedsynthError, match=r"downsample \[8, 8, 8\] but its weights have 3 levels \(4x\)"):
        PatchVolumeConverter().convert(path, ImportOptions())


def test_imported_models_generate_class_conditional_volumes(tmp_path):
    from medsynth.diffusion import DDPMSampler

    _, ae_ckpt = imported_autoencoder(tmp_path)
    write_biflownet(tmp_path / "model.pt")
    imported = BiFlowNetConverter().convert(tmp_path / "model.pt", ImportOptions(autoencoder=ae_ckpt))
    args = imported.model["init_args"]
    assert args["sampler"]["init_args"]["num_inference_steps"] == 1000 and args["decode_tile"] == 32
    assert args["latent_space"]["downsample_factor"] == 4 and args["latent_space"]["latent_channels"] == 4
    module = instantiate(imported)
    module.sampler = DDPMSampler(num_inference_steps=4, progress=False)  # a few steps keep the test fast
    batch = {"index": torch.tensor([0, 0]), "name": ["a", "b"], "label": torch.tensor([0, 2])}
    out = module.predict_step(batch, 0)
    volumes = out["sample"]
    assert volumes.shape == (2, 1, 32, 32, 64)  # the latent [8, 8, 16] decoded at 4x
    assert volumes.abs().max() <= 1 and not torch.equal(volumes[0], volumes[1])  # same noise, another class
    assert out["label"].tolist() == [0, 2]


class _Payload:
    """Unpickling this calls ``pathlib.Path.touch`` on a marker file, unless the unpickler refuses the call."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_reading_a_checkpoint_never_calls_what_it_names(tmp_path):
    marker = tmp_path / "called"
    path = tmp_path / "hostile.pt"
    torch.save({"model": _Payload(marker), "ema": {}, "args": None}, path)
    for converter in CONVERTERS:
        assert not converter.detect(path)
        with pytest.raises(MedsynthError, match=f"{path}: not a"):  # an unreadable or a foreign checkpoint
            converter.convert(path, ImportOptions())
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the plain loader would have called it
    assert marker.exists()
