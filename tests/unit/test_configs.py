"""Every shipped YAML parses (composed as the README composes it) and every manifest reads."""

import re
from pathlib import Path

import pytest
import yaml

from medsynth.cli import expand_flags, main
from medsynth.data.manifest import read_manifest

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_MARK = "# compose after: "


def is_variant(path: Path) -> bool:
    """A variant (e.g. configs/ae3d_stage2.yaml, configs/experiments/*) only makes sense after its recipe."""
    return path.read_text().startswith(COMPOSE_MARK)


RECIPES = sorted(p for p in (ROOT / "configs").glob("*.yaml") if not is_variant(p))
VARIANTS = sorted(p for p in (ROOT / "configs").glob("**/*.yaml") if p.parent.name != "configs" or is_variant(p))


def bases_of(variant: Path) -> list[Path]:
    """A variant's first line names the recipes it composes after: ``# compose after: configs/X.yaml[, ...]``."""
    first = variant.read_text().splitlines()[0]
    assert first.startswith(COMPOSE_MARK), f"{variant} does not say which recipe it composes after"
    bases = re.findall(r"configs/[\w/]+\.yaml", first)
    assert bases, f"{variant}: no recipe named on its first line"
    return [ROOT / b for b in bases]


COMPOSED = [[r] for r in RECIPES] + [[b, p] for p in VARIANTS for b in bases_of(p)]


@pytest.mark.parametrize("configs", COMPOSED, ids=lambda cs: "+".join(p.name for p in cs))
def test_shipped_config_parses(configs, capsys):
    args = ["fit"] + [a for c in configs for a in ("--config", str(c))] + ["--print_config"]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code in (0, None)
    resolved = yaml.safe_load(capsys.readouterr().out)
    assert resolved["model"]["class_path"].startswith("medsynth.modules.")
    assert resolved["trainer"]["default_root_dir"]


@pytest.mark.parametrize("manifest", sorted((ROOT / "data_manifests").glob("*.json")), ids=lambda p: p.name)
def test_shipped_manifest_reads(manifest):
    records = read_manifest(manifest)
    assert {r.split for r in records} == {"train", "val", "test"}


def test_bare_overwrite_switch_becomes_true():
    assert expand_flags(["predict", "--overwrite"]) == ["predict", "--overwrite=true"]
    assert expand_flags(["--overwrite", "--seed", "1"]) == ["--overwrite=true", "--seed", "1"]
    assert expand_flags(["--overwrite", "false"]) == ["--overwrite", "false"]


@pytest.mark.parametrize("config, data_class", [
    ("encode3d.yaml", "medsynth.data.MNI152VolumeDataModule"),  # make demo-3d, demo-3d-seg
    ("encode2d.yaml", "medsynth.data.ClassImageDataModule"),  # docs/latent.md, class-guided LDM
    ("vae2d.yaml", "medsynth.data.MNI152SliceDataModule"),
])
def test_switching_the_data_class_after_a_recipe_keeps_a_printable_config(config, data_class, capsys):
    """A value typed by the recipe's data class (e.g. NonNegativeInt) carried to another class must still serialise:
    the run folder's config.yaml is written from it."""
    from medsynth.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["predict", "--config", str(ROOT / "configs" / config), "--data", data_class, "--print_config"])
    assert exc.value.code in (0, None)
    assert f"class_path: {data_class}" in capsys.readouterr().out


def _ema_callbacks(extra: Path, capsys, bases=("seg2d.yaml", "experiments/quick.yaml")) -> list[dict]:
    args = ["fit"] + [a for b in bases for a in ("--config", str(ROOT / "configs" / b))]
    args += ["--config", str(extra), "--print_config"]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code in (0, None)
    callbacks = yaml.safe_load(capsys.readouterr().out)["trainer"]["callbacks"]
    assert any(c["class_path"].endswith("RunCheckpoint") for c in callbacks)  # the run still keeps its checkpoints
    return [c for c in callbacks if c["class_path"] == "medsynth.callbacks.EMA"]


def test_benchmark_ema_variants_change_only_the_ema(capsys):
    """benchmarks/configs/ (the EMA rows of docs/benchmarks.md) compose after seg2d + quick and do what they say."""
    bench = ROOT / "benchmarks" / "configs"
    assert _ema_callbacks(bench / "quick_no_ema.yaml", capsys) == []
    (ema,) = _ema_callbacks(bench / "quick_ema_no_warmup.yaml", capsys)
    assert ema["init_args"]["warmup"] is False and ema["init_args"]["decay"] == 0.999
    assert _ema_callbacks(bench / "ldm2d_no_ema.yaml", capsys, ["ldm2d.yaml"]) == []
    assert _ema_callbacks(bench / "biflownet3d_demo_no_ema.yaml", capsys,
                          ["biflownet3d.yaml", "experiments/biflownet3d_demo.yaml"]) == []
    # and the recipes they are measured against do average
    assert len(_ema_callbacks(ROOT / "configs" / "ldm2d.yaml", capsys, ["ldm2d.yaml"])) == 1
