"""Check medsynth against the segmentation-guided diffusion project's own code, in both directions.

    python scripts/verify_segguided.py --repo PATH/segmentation-guided-diffusion [--image-size 64] [--steps 50]

``--repo`` is a checkout of mazurowski-lab/segmentation-guided-diffusion; its ``eval.py``/``training.py`` are imported
from there (nothing of it is copied here). With random weights (what is compared is the code, not a trained model):

1. import: the project's UNet2DModel (its ``main.py`` architecture: channels 128,128,256,256,512,512, two layers per
   block, attention at the 5th level; ``--width`` scales the channels) saved by the project's own
   ``SegGuidedDDIMPipeline.save_pretrained``, as its training loop saves, goes through ``medsynth import
   --num_classes K`` and ``medsynth predict``; the project's ``SegGuidedDDIMPipeline`` (loaded as its ``main.py``
   loads a model for ``eval_many``: ``UNet2DModel.from_pretrained(OUT/unet)``, ``DDIMScheduler(num_train_timesteps=
   1000)``) samples the same masks with the same per-sample seeds. Printed: the largest difference of the images in
   [0, 1] (the pipeline's output before PNG rounding).
2. unconditional: the same with a UNet without mask channel, saved and sampled by diffusers' ``DDIMPipeline``, as the
   project does for unconditional models.
3. export: ``medsynth export`` of the imported checkpoint, sampled by the project's ``SegGuidedDDIMPipeline``.

Runs on the CPU in fp32; a few minutes at the defaults. Writes only under ``--work`` (a new temporary folder by
default). Exit status 1 if a difference exceeds ``--tolerance``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medsynth.cli import main as medsynth
from medsynth.diffusion.samplers import sample_generators

SEED = 0
"""medsynth's default ``sample_seed``: sample ``i`` starts from ``torch.Generator().manual_seed(SEED * 1_000_003 + i)``."""


def load_reference(repo: Path):
    """The project's ``eval`` and ``training`` modules. Figure-saving imports it needs only for plots
    (``torchvision.utils.save_image``, ``matplotlib``) are stubbed when absent; the pipelines do not use them."""
    sys.path.insert(0, str(repo))
    stubbed = []
    for name, attrs in (("torchvision", {}), ("torchvision.utils", {"save_image": None}),
                        ("matplotlib", {}), ("matplotlib.pyplot", {}), ("matplotlib.colors", {"ListedColormap": None})):
        try:
            __import__(name)
        except ImportError:
            module = types.ModuleType(name)
            vars(module).update(attrs)
            sys.modules[name] = module
            stubbed.append(name)
    if "torchvision" in stubbed:
        sys.modules["torchvision"].utils = sys.modules["torchvision.utils"]
    if "matplotlib" in stubbed:
        sys.modules["matplotlib"].pyplot, sys.modules["matplotlib"].colors = (sys.modules["matplotlib.pyplot"],
                                                                              sys.modules["matplotlib.colors"])
    import eval as reference_eval  # noqa: E402 - from --repo
    import training as reference_training  # noqa: E402

    if stubbed:
        print(f"(stubbed for import only, not installed here: {', '.join(stubbed)})")
    return reference_eval, reference_training


def reference_unet(in_channels: int, image_size: int, width: float):
    """The UNet2DModel of the project's ``main.py`` (channel counts scaled by ``width``), random weights."""
    import diffusers

    channels = tuple(max(32, int(round(c * width / 32)) * 32) for c in (128, 128, 256, 256, 512, 512))
    torch.manual_seed(1)
    return diffusers.UNet2DModel(
        sample_size=image_size, in_channels=in_channels, out_channels=1, layers_per_block=2,
        block_out_channels=channels,
        down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D",
                          "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
    )


def write_masks(seg_dir: Path, n: int, size: int, k: int) -> None:
    """``n`` random rectangle masks with classes ``0..k-1`` in the project's layout (``seg_dir/all/test``)."""
    rng = np.random.default_rng(0)
    folder = seg_dir / "all" / "test"
    folder.mkdir(parents=True)
    for i in range(n):
        mask = np.zeros((size, size), np.uint8)
        for c in range(1, k):
            y, x = rng.integers(0, size // 2, 2)
            mask[y:y + size // 3, x:x + size // 3] = c
        Image.fromarray(mask).save(folder / f"mask_{i:02d}.png")


def run(*args) -> None:
    try:
        medsynth([str(a) for a in args])
    except SystemExit as exc:
        if exc.code:
            raise SystemExit(f"medsynth {args[0]} failed (exit {exc.code})") from None


def medsynth_samples(folder: Path) -> dict[str, tuple[int, np.ndarray]]:
    """``name -> (index, image (H, W, C) in [0, 1])`` of a ``medsynth predict`` output folder."""
    out = {}
    for path in sorted((folder / "samples").glob("*.npy")):
        index = json.loads(path.with_suffix(".json").read_text())["index"]
        out[path.stem] = (int(index), (np.load(path).transpose(1, 2, 0) / 2 + 0.5).clip(0, 1))
    return out


def seg_guided_images(reference_eval, reference_training, unet_dir: Path, seg_dir: Path, names, indices, k, steps):
    """Images (B, H, W, C) in [0, 1] from the project's ``SegGuidedDDIMPipeline`` on the masks ``names``."""
    from diffusers import DDIMScheduler, UNet2DModel

    config = reference_training.TrainingConfig(segmentation_guided=True, segmentation_channel_mode="single",
                                               num_segmentation_classes=k, model_type="DDIM")
    unet = UNet2DModel.from_pretrained(str(unet_dir), use_safetensors=True)
    pipe = reference_eval.SegGuidedDDIMPipeline(unet=unet, scheduler=DDIMScheduler(num_train_timesteps=1000),
                                                eval_dataloader=None, external_config=config)
    # transforms.ToTensor() of an 8-bit mask: values / 255, shape (1, H, W)
    masks = [torch.from_numpy(np.array(Image.open(seg_dir / "all" / "test" / f"{n}.png"))).float()[None] / 255
             for n in names]
    seg_batch = {"seg_all": torch.stack(masks), "image_filenames": [f"{n}.png" for n in names]}
    return pipe(batch_size=len(names), generator=sample_generators(SEED, indices), seg_batch=seg_batch,
                num_inference_steps=steps, output_type="np").images


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, required=True, help="checkout of segmentation-guided-diffusion")
    parser.add_argument("--image-size", type=int, default=64, help="image side (a multiple of 32)")
    parser.add_argument("--width", type=float, default=1.0, help="scale of the project's channel counts (CPU speed)")
    parser.add_argument("--steps", type=int, default=50, help="DDIM steps (the project samples with 50)")
    parser.add_argument("--num-classes", type=int, default=4, help="mask classes counting background")
    parser.add_argument("--samples", type=int, default=2, help="images per check")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest difference accepted")
    parser.add_argument("--work", type=Path, help="folder for the checkpoints and samples (default: a new temp dir)")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    work = args.work or Path(tempfile.mkdtemp(prefix="verify_segguided."))
    work.mkdir(parents=True, exist_ok=True)
    reference_eval, reference_training = load_reference(args.repo.resolve())
    k, size, steps = args.num_classes, args.image_size, args.steps
    model = ["--model", "medsynth.modules.DiffusionModule"]  # its settings come from the checkpoint
    sampler = ["--model.sampler", "medsynth.diffusion.DDIMSampler", "--model.sampler.init_args.num_inference_steps",
               steps]
    results = {}

    # 1. a checkpoint saved by the project's own pipeline -> medsynth import -> medsynth predict, vs the project
    from diffusers import DDIMScheduler

    seg_dir = work / "masks"
    write_masks(seg_dir, args.samples, size, k)
    config = reference_training.TrainingConfig(segmentation_guided=True, num_segmentation_classes=k)
    saved = reference_eval.SegGuidedDDIMPipeline(unet=reference_unet(2, size, args.width),
                                                 scheduler=DDIMScheduler(num_train_timesteps=1000),
                                                 eval_dataloader=None, external_config=config)
    saved.save_pretrained(str(work / "reference"))  # what its train_loop does every save_model_epochs
    run("import", "--source", work / "reference", "--output", work / "imported.ckpt", "--num_classes", k)
    run("predict", *model, "--ckpt_path", work / "imported.ckpt", "--output_dir", work / "samples", "--data",
        "medsynth.data.SegGuidedImageDataModule", "--data.seg_dir", seg_dir, "--data.num_workers", 0, *sampler)
    mine = medsynth_samples(work / "samples")
    names = sorted(mine)
    theirs = seg_guided_images(reference_eval, reference_training, work / "reference" / "unet", seg_dir, names,
                               [mine[n][0] for n in names], k, steps)
    results["import: SegGuidedDDIMPipeline vs medsynth predict"] = max(
        float(np.abs(theirs[i] - mine[n][1]).max()) for i, n in enumerate(names))

    # 2. unconditional: diffusers' DDIMPipeline, as the project saves and samples unconditional models
    from diffusers import DDIMPipeline

    DDIMPipeline(unet=reference_unet(1, size, args.width), scheduler=DDIMScheduler(num_train_timesteps=1000)
                 ).save_pretrained(str(work / "reference_uncond"))
    run("import", "--source", work / "reference_uncond", "--output", work / "uncond.ckpt")
    run("predict", *model, "--ckpt_path", work / "uncond.ckpt", "--output_dir", work / "samples_uncond", "--data",
        "medsynth.data.SegGuidedImageDataModule", "--data.num_samples", args.samples, "--data.num_workers", 0,
        *sampler)
    mine_u = medsynth_samples(work / "samples_uncond")
    names_u = sorted(mine_u, key=lambda n: mine_u[n][0])
    pipe = DDIMPipeline.from_pretrained(str(work / "reference_uncond"))
    pipe.scheduler = DDIMScheduler(num_train_timesteps=1000)  # as the project's main.py builds it
    theirs_u = pipe(batch_size=len(names_u), generator=sample_generators(SEED, [mine_u[n][0] for n in names_u]),
                    num_inference_steps=steps, output_type="np").images
    results["unconditional: DDIMPipeline vs medsynth predict"] = max(
        float(np.abs(theirs_u[i] - mine_u[n][1]).max()) for i, n in enumerate(names_u))

    # 3. the other direction: medsynth export, sampled by the project's pipeline
    run("export", *model, "--data", "medsynth.data.SegGuidedImageDataModule", "--ckpt_path", work / "imported.ckpt",
        "--output_dir", work / "export")
    theirs_e = seg_guided_images(reference_eval, reference_training, work / "export" / "unet", seg_dir, names,
                                 [mine[n][0] for n in names], k, steps)
    results["export: medsynth export in SegGuidedDDIMPipeline vs medsynth predict"] = max(
        float(np.abs(theirs_e[i] - mine[n][1]).max()) for i, n in enumerate(names))

    params = sum(p.numel() for p in reference_unet(2, size, args.width).parameters())
    print(f"\nUNet2DModel {params / 1e6:.1f} M parameters, {size}x{size}, {k} classes, DDIM {steps} steps, "
          f"{args.samples} samples per check, fp32 CPU; files in {work}")
    print(f"{'check':<72} max |difference| (images in [0, 1])")
    for name, value in results.items():
        print(f"{name:<72} {value:.2e}")
    (work / "verify_segguided.json").write_text(json.dumps({"settings": vars(args) | {"repo": str(args.repo),
                                                            "work": str(work), "parameters": params},
                                                            "max_abs_difference": results}, indent=2, default=str))
    return 0 if all(v <= args.tolerance for v in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
