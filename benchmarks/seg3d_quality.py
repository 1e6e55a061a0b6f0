"""How faithfully 3D mask-guided latent diffusion follows label maps, on the demo and on a volume set it was not
tuned on.

For each dataset it runs the whole chain through the real ``medsynth`` commands, as ``make demo-3d-seg`` does:
the demo autoencoder recipe on the dataset's training half (or ``--ae CKPT``), encoding with the label maps, a 3D
segmenter judge trained on the training half, then each variant's mask-guided BiFlowNet, sampled on both halves'
label maps. ``scripts/seg3d_dice.py`` scores real volumes (the ceiling), the autoencoder's reconstructions (the
bound of any latent model) and samples; the held-out half's sample Dice over its real Dice is the number that
counts. Prints a table and writes JSON.

    python benchmarks/seg3d_quality.py --datasets demo axial4_t2_3d --variants demo --out benchmarks/results/seg3d.json
    python benchmarks/seg3d_quality.py --datasets demo --variants demo --extra "eps=--model.objective
        medsynth.diffusion.DDPMObjective --model.sampler medsynth.diffusion.DDIMSampler" --ae AE.ckpt

Datasets: ``demo`` (the MNI152 T1 posterior/anterior halves, 4 tissue classes) and those of
``benchmarks/datasets.py`` with volumes (``axial4_t2_3d``). Wall times are this machine's, measured around each
command.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from datasets import VOLUME_DATASETS, build  # noqa: E402
from recipe_quality import MEDSYNTH, ROOT, run  # noqa: E402

CONFIGS = ROOT / "configs"
AE = ["--config", CONFIGS / "ae3d.yaml", "--config", CONFIGS / "experiments/ae3d_demo.yaml"]
ENCODE = ["--config", CONFIGS / "encode3d.yaml"]
JUDGE = ["--config", CONFIGS / "segmenter2d.yaml", "--config", CONFIGS / "experiments/segmenter3d_demo.yaml"]
VARIANTS: dict[str, list] = {
    # what `make demo-3d-seg` trains
    "demo": ["--config", CONFIGS / "biflownet3d_seg.yaml", "--config", CONFIGS / "experiments/biflownet3d_seg_demo.yaml"],
}
GUIDANCE = [3.0]  # what `make demo-3d-seg` samples with


def data_flags(name: str, root: Path) -> list:
    """The data section for dataset ``name``: the demo's own datamodule, or a manifest of volumes + label maps."""
    if name == "demo":
        return ["--data", "medsynth.data.MNI152VolumeDataModule", "--data.tissue_labels", "true"]
    build(name, root)
    return ["--data", "medsynth.data.VolumeDataModule", "--data.manifest", root / "manifest.json"]


def prepare(name: str, work: Path, ae: Path | None, log: Path) -> dict:
    """Autoencoder, latents with label maps and the judge for one dataset (each reused when already there)."""
    data = data_flags(name, work / "data")
    times = {}
    if ae is None:
        ae = work / "ae" / "checkpoints" / "last.ckpt"
        if not ae.is_file():
            times["autoencoder"] = run([*MEDSYNTH, "fit", *AE, *data, "--trainer.default_root_dir", work / "ae"], log)
    latents = work / "latents"
    if not (latents / "latents.json").is_file():
        times["encode"] = run([*MEDSYNTH, "predict", *ENCODE, "--ckpt_path", ae, *data, "--data.num_workers", "1",
                               "--output_dir", latents], log)
    judge = work / "judge" / "checkpoints" / "last.ckpt"
    if not judge.is_file():
        times["judge"] = run([*MEDSYNTH, "fit", *JUDGE, *data, "--trainer.default_root_dir", work / "judge"], log)
    recon = work / "reconstructions"  # what the autoencoder keeps of each volume: the bound of any latent model
    if not (recon / "metadata.json").is_file():
        times["reconstruct"] = run([*MEDSYNTH, "predict", *AE, *data, "--ckpt_path", ae, "--output_dir", recon,
                                    "--overwrite"], log)
    return {"latents": latents, "judge": judge, "recon": recon, "times": times}


def score(judge: Path, latents: Path, samples: Path, recon: Path, log: Path) -> dict:
    """``scripts/seg3d_dice.py``'s table: per volume, real (``real PATH``), reconstructed (``real RECON_PATH``)
    and sample (``sample NAME``)."""
    out = samples / "dice.json"
    pairs = [a for r in json.loads((latents / "latents.json").read_text())["records"]
             for a in ("--real", recon / f"{r['name']}.nii.gz", latents / r["mask"])]
    run([sys.executable, ROOT / "scripts/seg3d_dice.py", "--segmenter", judge, "--latents", latents / "latents.json",
         *pairs, "--samples", samples, "--out", out], log)
    return json.loads(out.read_text())


def held_out(latents: Path) -> tuple[str, str]:
    """The held-out (validation) and training record names of a latent manifest."""
    records = json.loads((latents / "latents.json").read_text())["records"]
    split = {r["name"]: r.get("split", "train") for r in records}
    return next(n for n, s in split.items() if s != "train"), next(n for n, s in split.items() if s == "train")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=["demo", *VOLUME_DATASETS])
    p.add_argument("--variants", nargs="+", default=["demo"])
    p.add_argument("--extra", action="append", default=[], metavar="NAME=FLAGS",
                   help="a variant: the demo recipe plus these flags (repeatable)")
    p.add_argument("--ae", type=Path, help="an autoencoder checkpoint for the demo dataset (skips training one)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "seg3d_quality")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "seg3d_quality.json")
    p.add_argument("--guidance", type=float, nargs="+", default=GUIDANCE,
                   help="classifier-free guidance weights: each variant is trained once and sampled at each")
    args = p.parse_args()
    variants = dict(VARIANTS)
    for spec in args.extra:
        name, flags = spec.split("=", 1)
        variants[name] = [*VARIANTS["demo"], *shlex.split(flags)]
    results = json.loads(args.out.read_text()) if args.out.is_file() else []
    for ds in args.datasets:
        work = args.work / ds
        work.mkdir(parents=True, exist_ok=True)
        log = work / "log.txt"
        prep = prepare(ds, work, args.ae if ds == "demo" else None, log)
        val, train = held_out(prep["latents"])
        for vname in args.variants + [s.split("=", 1)[0] for s in args.extra]:
            run_dir = work / vname
            shutil.rmtree(run_dir, ignore_errors=True)  # each variant trains afresh (a run folder is never reused)
            fit_s = run([*MEDSYNTH, "fit", *variants[vname], "--data.manifest", prep["latents"] / "latents.json",
                         "--trainer.default_root_dir", run_dir], log)
            for guidance in args.guidance:
                results = sample_and_score(ds, vname, variants[vname], guidance, fit_s, run_dir, prep, val, train,
                                           log, results)
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(json.dumps(results, indent=2, default=str))
    print(f"{'dataset':14s} {'variant':12s} {'guidance':>8s} {'fit s':>6s} {'ceiling':>8s} {'recon':>7s} "
          f"{'samples':>8s} {'fraction':>9s} {'of recon':>9s} {'(train half)':>13s}")
    for r in results:
        print(f"{r['dataset']:14s} {r['variant']:12s} {r.get('guidance', 3.0):8.1f} {r['fit_s']:6d} "
              f"{r['ceiling']:8.3f} {r.get('reconstruction_dice', float('nan')):7.3f} {r['sample_dice']:8.3f} "
              f"{r['fraction']:9.2f} {r.get('fraction_of_reconstruction', float('nan')):9.2f} "
              f"{r['train_half_fraction']:13.2f}")
    print(f"wrote {args.out}")


def sample_and_score(ds: str, vname: str, flags: list, guidance: float, fit_s: float, run_dir: Path, prep: dict,
                     val: str, train: str, log: Path, results: list) -> list:
    """Sample both halves' label maps at one guidance weight, score them, and return ``results`` with the row
    (replacing an earlier row of the same dataset, variant and weight)."""
    samples = run_dir / f"samples_g{guidance:g}"
    predict_s = run([*MEDSYNTH, "predict", *flags, "--ckpt_path", run_dir / "checkpoints/last.ckpt",
                     "--data.predict_masks", prep["latents"] / "masks", "--model.guidance_scale", guidance,
                     "--output_dir", samples, "--overwrite"], log)
    table = score(prep["judge"], prep["latents"], samples, prep["recon"], log)
    real = {Path(k.split(" ", 1)[1]).name.split(".")[0]: v["mean"] for k, v in table.items()
            if k.startswith("real ") and str(prep["recon"]) not in k}
    recon = {Path(k.split(" ", 1)[1]).name.split(".")[0]: v["mean"] for k, v in table.items()
             if k.startswith("real ") and str(prep["recon"]) in k}
    sample = {k.split(" ", 1)[1].split(".")[0]: v["mean"] for k, v in table.items() if k.startswith("sample ")}
    row = {"dataset": ds, "variant": vname, "guidance": guidance, "fit_s": round(fit_s),
           "predict_s": round(predict_s), "ceiling": real[val], "reconstruction_dice": recon[val],
           "sample_dice": sample[val], "fraction": sample[val] / real[val],
           "fraction_of_reconstruction": sample[val] / recon[val], "train_half_fraction": sample[train] / real[train],
           "table": table, "prepare_s": prep["times"]}
    key = (ds, vname, guidance)
    return [r for r in results if (r["dataset"], r["variant"], r.get("guidance", 3.0)) != key] + [row]


if __name__ == "__main__":
    main()
