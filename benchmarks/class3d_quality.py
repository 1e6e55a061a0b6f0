"""How faithfully class-conditional 3D latent diffusion follows its classes, on volume sets that are not the demo.

For each dataset (``benchmarks/datasets.py``: ``contrast3_3d``, ``lesion2_3d``) it runs the whole chain through the
real ``medsynth`` commands: the demo autoencoder recipe on the training volumes, encoding (labels carried into
``latents.json``), a 3D class judge (``configs/experiments/classifier3d.yaml``) trained on the training volumes and
tested on the held-out test volumes (the ceiling), the judge on the autoencoder's reconstructions of those test
volumes (the bound of any latent model), then each variant's class-conditional BiFlowNet, sampled whole-volume per
class and scored by the judge through ``medsynth test --data medsynth.data.SampleDirDataModule``. The fraction that
counts is sample accuracy over the judge's accuracy on held-out real volumes. Prints a table and writes JSON.

    python benchmarks/class3d_quality.py --datasets contrast3_3d lesion2_3d --variants eps rflow
    python benchmarks/class3d_quality.py --datasets lesion2_3d --extra "lr1e-3=--model.lr 1e-3"

Variants are the demo recipe (``configs/biflownet3d.yaml`` + ``configs/experiments/biflownet3d_demo.yaml``) plus
flags (``VARIANTS``; add more with ``--extra NAME=FLAGS``); each trains afresh. Wall times are this machine's,
measured around each command.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from datasets import CLASS_VOLUME_DATASETS, build  # noqa: E402
from recipe_quality import MEDSYNTH, ROOT, run, score_samples  # noqa: E402
from seg3d_quality import AE, ENCODE  # noqa: E402

from medsynth.io import save_json  # noqa: E402

CONFIGS = ROOT / "configs"
JUDGE = ["--config", CONFIGS / "classifier2d.yaml", "--config", CONFIGS / "experiments/classifier3d.yaml"]
DEMO = ["--config", CONFIGS / "biflownet3d.yaml", "--config", CONFIGS / "experiments/biflownet3d_demo.yaml"]
RFLOW = ["--model.objective", "medsynth.diffusion.RectifiedFlowObjective",
         "--model.sampler", "medsynth.diffusion.DPMSolverSampler", "--model.sampler.init_args.num_inference_steps", 20]
EPSILON = ["--model.objective", "medsynth.diffusion.DDPMObjective", "--model.objective.init_args.prediction_type",
           "epsilon", "--model.objective.init_args.beta_schedule", "squaredcos_cap_v2"]
VARIANTS: dict[str, list] = {
    "demo": DEMO,  # what `make demo-3d` trains, as shipped
    # the recipe before #12's measurement: DDPM epsilon on the cosine schedule, DDIM 25 steps
    "eps": [*DEMO, *EPSILON, "--model.sampler", "medsynth.diffusion.DDIMSampler",
            "--model.sampler.init_args.num_inference_steps", 25],
    # the same sampler as rflow, to tell the objective's effect from the sampler's
    "eps_dpm": [*DEMO, *EPSILON, "--model.sampler", "medsynth.diffusion.DPMSolverSampler",
                "--model.sampler.init_args.num_inference_steps", 20],
    "rflow": [*DEMO, *RFLOW],  # rectified flow, as configs/biflownet3d_seg.yaml
    "rflow_lr1e-3": [*DEMO, *RFLOW, "--model.lr", 1e-3],
    # trained with class dropout (the base recipe's 0.1), sampled with classifier-free guidance 2
    "rflow_cfg2": [*DEMO, *RFLOW, "--model.label_drop_prob", 0.1, "--model.guidance_scale", 2.0],
}
QUIET = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
JUDGE_FLAGS = {
    # a lesion is under 1 % of the brain: average pooling dilutes it, the strongest response anywhere does not
    "lesion2_3d": ["--model.net.init_args.pooling", "max"],
}


def prepare(name: str, work: Path, log: Path) -> dict:
    """Dataset, autoencoder, latents, judge (and its ceiling) and the judge's score on the autoencoder's
    reconstructions of the test volumes; each reused when already there."""
    info = build(name, work / "data")
    manifest = work / "data" / "manifest.json"
    data = ["--data", "medsynth.data.VolumeDataModule", "--data.manifest", manifest]
    side = info["shape"][0]
    times = {}
    ae = work / "ae" / "checkpoints" / "last.ckpt"
    if not ae.is_file():
        times["autoencoder"] = run([*MEDSYNTH, "fit", *AE, *data, *QUIET, "--trainer.default_root_dir", work / "ae"], log)
    latents = work / "latents"
    if not (latents / "latents.json").is_file():
        times["encode"] = run([*MEDSYNTH, "predict", *ENCODE, "--ckpt_path", ae, *data, "--data.num_workers", 1,
                               "--output_dir", latents, "--overwrite"], log)
    judge_flags = [*JUDGE, *JUDGE_FLAGS.get(name, []), *data, "--data.patch_size", side, *QUIET]
    judge = work / "judge" / "checkpoints" / "last.ckpt"
    if not judge.is_file():
        times["judge"] = run([*MEDSYNTH, "fit", *judge_flags, "--trainer.default_root_dir", work / "judge"], log)
    real = work / "judge" / "scores" / "real_test.json"
    if not real.is_file():
        times["judge_test"] = run([*MEDSYNTH, "test", *judge_flags, "--ckpt_path", judge,
                                   "--trainer.default_root_dir", work / "judge"], log)
    recon = work / "reconstructions"  # what the autoencoder keeps of each test volume: the bound of a latent model
    if not (recon / "scores.json").is_file():
        shutil.rmtree(recon, ignore_errors=True)
        times["reconstruct"] = run([*MEDSYNTH, "predict", *AE, *data, "--data.predict_split", "test", "--ckpt_path", ae,
                                    "--output_dir", recon / "volumes", "--overwrite", *QUIET], log)
        as_class_samples(manifest, recon)
        score(judge_flags, judge, recon, log)
    return {"latents": latents, "judge": judge, "judge_flags": judge_flags, "info": info, "times": times,
            "ceiling": json.loads(real.read_text())["scores"],
            "recon": json.loads((recon / "scores.json").read_text())["scores"]}


def as_class_samples(manifest: Path, recon: Path) -> None:
    """Lay the reconstructions of the test volumes out as a class-conditional sample folder
    (``recon/<label>/NAME.nii.gz`` + ``metadata.json``) so that ``medsynth test`` scores them as it scores samples."""
    records = [r for r in json.loads(manifest.read_text()) if r.get("split") == "test"]
    names = sorted({str(r["label"]) for r in json.loads(manifest.read_text())}, key=int)
    for r in records:
        stem = Path(r["image"]).name
        (recon / str(r["label"])).mkdir(parents=True, exist_ok=True)
        shutil.move(recon / "volumes" / stem, recon / str(r["label"]) / stem)
    shutil.rmtree(recon / "volumes")
    save_json(recon / "metadata.json", {"synthetic": True, "class_names": names,
                                        "what": "the autoencoder's reconstructions of the real test volumes"})


def score(judge_flags: list, judge: Path, samples: Path, log: Path) -> dict:
    """The judge's scores on a class-conditional sample folder (``test/accuracy`` and per class)."""
    return score_samples(judge_flags, judge, samples, samples.parent / "judged", log)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=list(CLASS_VOLUME_DATASETS), choices=CLASS_VOLUME_DATASETS)
    p.add_argument("--variants", nargs="*", default=["eps", "rflow"], choices=list(VARIANTS))
    p.add_argument("--extra", action="append", default=[], metavar="NAME=FLAGS",
                   help="a variant: the demo recipe plus these flags (repeatable)")
    p.add_argument("--num-samples", type=int, default=8, help="volumes sampled per class")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale at sampling (default: the variant's, e.g. its own "
                        "--model.guidance_scale flag, else the recipe's)")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "class3d_quality")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "class3d_quality.json")
    args = p.parse_args()
    variants = {k: VARIANTS[k] for k in args.variants}
    for spec in args.extra:
        name, flags = spec.split("=", 1)
        variants[name] = [*DEMO, *shlex.split(flags)]
    results = json.loads(args.out.read_text()) if args.out.is_file() else []
    for ds in args.datasets:
        work = args.work / ds
        work.mkdir(parents=True, exist_ok=True)
        log = work / "log.txt"
        prep = prepare(ds, work, log)
        ceiling, recon = prep["ceiling"]["test/accuracy"], prep["recon"]["test/accuracy"]
        print(f"[{ds}] judge on held-out real volumes {ceiling:.3f}, on their reconstructions {recon:.3f}", flush=True)
        for vname, flags in variants.items():
            run_dir = work / vname
            shutil.rmtree(run_dir, ignore_errors=True)  # each variant trains afresh (a run folder is never reused)
            fit_s = run([*MEDSYNTH, "fit", *flags, "--data.manifest", prep["latents"] / "latents.json", *QUIET,
                         "--trainer.default_root_dir", run_dir], log)
            samples = run_dir / "samples"
            predict_s = run([*MEDSYNTH, "predict", *flags, "--ckpt_path", run_dir / "checkpoints/last.ckpt",
                             "--data.output_shape", json.dumps(prep["info"]["shape"]),
                             "--data.num_samples", args.num_samples, "--output_dir", samples, "--overwrite", *QUIET,
                             *(["--model.guidance_scale", args.guidance] if args.guidance is not None else [])], log)
            scores = score(prep["judge_flags"], prep["judge"], samples, log)
            row = {"dataset": ds, "variant": vname, "flags": shlex.join(map(str, flags[len(DEMO):])),
                   "fit_s": round(fit_s), "predict_s": round(predict_s),
                   "guidance": json.loads((samples / "metadata.json").read_text()).get("guidance_scale"),
                   "num_samples_per_class": args.num_samples, "ceiling": ceiling, "reconstruction_accuracy": recon,
                   "sample_accuracy": scores["test/accuracy"], "fraction": scores["test/accuracy"] / ceiling,
                   "fraction_of_reconstruction": scores["test/accuracy"] / recon if recon else None,
                   "per_class": {k.split("_", 1)[1]: v for k, v in scores.items() if k.startswith("test/accuracy_")},
                   "diversity_ms_ssim": scores.get("diversity/ms_ssim"), "prepare_s": prep["times"]}
            print(f"[{ds}] {vname}: sample accuracy {row['sample_accuracy']:.3f}, fraction {row['fraction']:.2f} "
                  f"(fit {fit_s:.0f} s, predict {predict_s:.0f} s)", flush=True)
            results = [r for r in results if (r["dataset"], r["variant"]) != (ds, vname)] + [row]
            args.out.parent.mkdir(parents=True, exist_ok=True)
            save_json(args.out, results)
    print(f"\n{'dataset':13s} {'variant':10s} {'fit s':>6s} {'ceiling':>8s} {'recon':>6s} {'samples':>8s} "
          f"{'fraction':>9s} {'of recon':>9s}")
    for r in results:
        print(f"{r['dataset']:13s} {r['variant']:10s} {r['fit_s']:6d} {r['ceiling']:8.3f} "
              f"{r['reconstruction_accuracy']:6.3f} {r['sample_accuracy']:8.3f} {r['fraction']:9.2f} "
              f"{r['fraction_of_reconstruction'] or float('nan'):9.2f}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
