"""Check medsynth's 3D MedDiffusion converters against the original code (ShanghaiTech-IMPACT/3D-MedDiffusion).

Builds the original PatchVolume (4x and 8x) and BiFlowNet at their training defaults from the original code with
random weights (every zero-initialised layer given random values, so that a mistaken mapping shows), saves them
in the original checkpoint formats (a Lightning ``.ckpt`` written by ``Trainer.save_checkpoint``; a ``.pt`` with
``model``, ``ema``, ``args`` as ``train_BiFlowNet_SingleRes.py`` writes it), converts them with
:mod:`medsynth.convert.meddiffusion`, builds the medsynth modules from the result and compares outputs on the same
inputs in float32. Prints a table; exits 1 if any maximum absolute difference exceeds ``--tolerance``.

    python scripts/verify_meddiffusion_import.py --repo PATH/TO/3D-MedDiffusion [--work DIR]

The original needs ``einops_exts``, ``timm``, ``omegaconf`` and ``pytorch_lightning`` importable. Where
``torchvision`` is missing (it is only used there for the LPIPS loss network and unused imports), the LPIPS
network is replaced by an empty module and ``torchvision`` by an empty package; where ``timm`` cannot import for
the same reason, its ``Attention`` and ``to_2tuple`` are loaded from timm's own files without timm's package
``__init__``. None of this touches the networks compared.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import importlib.util
import sys
import tempfile
import types
from pathlib import Path

import torch
from torch import nn


def make_original_importable(repo: Path) -> None:
    """Put the original repository on ``sys.path``, working around a missing torchvision (see the module doc)."""
    sys.path.insert(0, str(repo))
    # Import what checks for torchvision before any stand-in exists (their availability checks are cached).
    for name in ("pytorch_lightning", "lightning", "torchmetrics", "medsynth.modules", "medsynth.convert.meddiffusion"):
        importlib.import_module(name)
    try:
        importlib.import_module("torchvision")
    except ImportError:
        vision = types.ModuleType("torchvision")
        vision.__path__ = []
        for sub in ("transforms", "utils", "models"):
            setattr(vision, sub, types.ModuleType(f"torchvision.{sub}"))
            sys.modules[f"torchvision.{sub}"] = getattr(vision, sub)
        sys.modules["torchvision"] = vision
        lpips = types.ModuleType("AutoEncoder.model.lpips")

        class LPIPS(nn.Module):  # the perceptual loss network: not part of the autoencoder compared
            def forward(self, x, y):
                return (x - y).abs().mean()

        lpips.LPIPS = LPIPS
        sys.modules["AutoEncoder.model.lpips"] = lpips
    try:
        importlib.import_module("timm.models.vision_transformer")
    except ImportError:
        for name in [m for m in sys.modules if m == "timm" or m.startswith("timm.")]:
            del sys.modules[name]
        spec = importlib.util.find_spec("timm")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("the original code needs timm (pip install timm)") from None
        root = Path(list(spec.submodule_search_locations)[0])
        for name, folder in (("timm", root), ("timm.layers", root / "layers"), ("timm.models", root / "models")):
            package = types.ModuleType(name)
            package.__path__ = [str(folder)]
            sys.modules[name] = package
        attention = importlib.import_module("timm.layers.attention")
        helpers = importlib.import_module("timm.layers.helpers")
        vit = types.ModuleType("timm.models.vision_transformer")
        vit.Attention = attention.Attention
        layers = types.ModuleType("timm.models.layers")
        layers.to_2tuple = helpers.to_2tuple
        sys.modules["timm.models.vision_transformer"], sys.modules["timm.models.layers"] = vit, layers


def randomise(net: nn.Module, seed: int) -> None:
    """Random values for every parameter and buffer the original initialises to a constant (zeros, ones)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in list(net.named_parameters()) + list(net.named_buffers()):
            if not p.is_floating_point() or p.numel() == 0 or name.endswith("pos_embed") or "codebook" in name:
                continue  # the frozen position table and the (already random) codebook stay as the original has them
            if torch.all(p == p.flatten()[0]):
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def patch_volume_rows(work: Path, factor: int, side: int) -> tuple[list[tuple], Path, nn.Module]:
    """Compare one PatchVolume; returns table rows, the medsynth checkpoint of the imported autoencoder and the
    original autoencoder."""
    import pytorch_lightning as pl
    from AutoEncoder.model.PatchVolume import patchvolumeAE
    from omegaconf import OmegaConf

    from medsynth.convert import ImportOptions
    from medsynth.convert.meddiffusion import PatchVolumeConverter, instantiate

    cfg = OmegaConf.load(Path(sys.path[0]) / "config" / f"PatchVolume_{factor}x.yaml")
    torch.manual_seed(factor)
    original = patchvolumeAE(cfg)
    randomise(original, factor)
    original.eval()
    path = work / f"PatchVolume_{factor}x.ckpt"
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(original)
    trainer.save_checkpoint(path)

    converter = PatchVolumeConverter()
    assert converter.detect(path), f"{path} not detected"
    imported = converter.convert(path, ImportOptions())
    module = instantiate(imported)
    net = module.net
    params = sum(p.numel() for n, p in original.named_parameters()
                 if n.split(".")[0] in ("encoder", "decoder", "pre_vq_conv", "post_vq_conv"))

    x = torch.rand(1, 1, side, side, side, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z_orig = original.pre_vq_conv(original.encoder(x))
        z_ours = net.encode(x)
        codes_orig = original.codebook(z_orig)["encodings"]
        _, codes_ours = net.quantizer.quantize(z_ours)
        recon_orig = original.decode(z_orig, quantize=True)
        recon_ours = net.decode(z_ours)
        embed_orig = original.codebook.embeddings
    rows = [
        (f"PatchVolume {factor}x", "parameters (encoder+decoder+VQ convs)", params, sum(p.numel() for p in net.parameters())),
        (f"PatchVolume {factor}x", f"encode {tuple(x.shape[2:])} (pre-VQ latent)", maxdiff(z_orig, z_ours), None),
        (f"PatchVolume {factor}x", "code indices that differ", int((codes_orig != codes_ours).sum()), None),
        (f"PatchVolume {factor}x", "decode (quantised)", maxdiff(recon_orig, recon_ours), None),
        (f"PatchVolume {factor}x", "codebook min/max", maxdiff(embed_orig.min(), net.quantizer.codebook.min())
         + maxdiff(embed_orig.max(), net.quantizer.codebook.max()), None),
    ]
    if factor == 8:  # the original's chunked decode of large latents vs medsynth's tiles without overlap
        from medsynth.nets.tiling import decode_tiled

        z = torch.randn(1, 8, 8, 8, 16, generator=torch.Generator().manual_seed(1)) * embed_orig.std()
        with torch.no_grad():
            sliding = original.decode_sliding(z, quantize=True, patch_size=32, compress_ratio=8)
            tiled = decode_tiled(net.decode, z, 4, 8, overlap=0.0)
        rows.append((f"PatchVolume {factor}x", "decode in chunks (decode_sliding vs decode_tiled)",
                     maxdiff(sliding, tiled), None))
    ckpt = work / f"medsynth_ae_{factor}x.ckpt"
    torch.save({"state_dict": imported.state_dict,
                "hyper_parameters": {"_class_path": imported.model["class_path"], **imported.model["init_args"]}},
               ckpt)
    return rows, ckpt, original


def biflownet_rows(work: Path, autoencoder: Path) -> list[tuple]:
    from ddpm.BiFlowNet import BiFlowNet, GaussianDiffusion

    from medsynth.convert import ImportOptions
    from medsynth.convert.meddiffusion import BiFlowNetConverter, instantiate

    args = argparse.Namespace(
        model_dim=72, dim_mults=[1, 1, 2, 4, 8], volume_channels=8, num_classes=7, use_attn=[0, 0, 0, 1, 1],
        vq_size=64, num_dit=1, patch_size=1, timesteps=1000, loss_type="l1", resolution=[32, 32, 32], batch_size=16,
    )
    torch.manual_seed(0)
    model = BiFlowNet(dim=args.model_dim, dim_mults=args.dim_mults, channels=args.volume_channels, init_kernel_size=3,
                      cond_classes=args.num_classes, learn_sigma=False, use_sparse_linear_attn=args.use_attn,
                      vq_size=args.vq_size, num_mid_DiT=args.num_dit, patch_size=args.patch_size)
    randomise(model, 0)
    ema = copy.deepcopy(model)
    with torch.no_grad():  # EMA weights that differ from the live ones, so the converter's choice shows
        for p in ema.parameters():
            if p.requires_grad:
                p.mul_(0.9)
    path = work / "0010000.pt"
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    torch.save({"model": model.state_dict(), "ema": ema.state_dict(), "scaler": {}, "opt": opt.state_dict(),
                "args": args, "epoch": 3}, path)

    converter = BiFlowNetConverter()
    assert converter.detect(path), f"{path} not detected"
    rows = []
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    for weights, reference in (("ema", ema), ("model", model)):
        imported = converter.convert(path, ImportOptions(weights=weights, autoencoder=autoencoder))
        module = instantiate(imported)
        reference.eval()
        for shape in ((16, 16, 16), (8, 16, 24)):
            g = torch.Generator().manual_seed(sum(shape))
            x = torch.randn(2, 8, *shape, generator=g)
            t, y = torch.tensor([10, 900]), torch.tensor([0, 5])
            res = (torch.tensor(shape, dtype=torch.float32) / 64.0).expand(2, 3)
            with torch.no_grad():
                out_orig = reference(x, t, y=y, res=res)
                out_ours = module.net(x, t, class_labels=y)
            rows.append(("BiFlowNet", f"{weights} weights, eps prediction {shape}", maxdiff(out_orig, out_ours),
                         float(out_orig.abs().max())))
    module_trainable = sum(p.numel() for p in module.net.parameters()) - module.net.class_embedding.weight.shape[1]
    rows.insert(0, ("BiFlowNet", "trainable parameters (without the null label)", trainable, module_trainable))
    diffusion = GaussianDiffusion(channels=8, timesteps=1000, loss_type="l1")
    ours = module.objective.alphas_cumprod
    rows.append(("BiFlowNet", "cosine schedule alphas_cumprod", maxdiff(diffusion.alphas_cumprod, ours), None))
    rows.append(("BiFlowNet", "  relative error at t = 999 (beta capped at 0.9999)",
                 maxdiff(diffusion.alphas_cumprod[-1], ours[-1]) / float(diffusion.alphas_cumprod[-1]), None))
    scale, shift = module.latent_space["scale"], module.latent_space["shift"]
    s = torch.linspace(-1, 1, 5)
    lo, hi = [float(v) for v in torch.load(autoencoder, weights_only=True)["state_dict"]["net.quantizer.codebook"]
              .aminmax()]
    rows.append(("BiFlowNet", "latent unscaling s -> (s+1)/2 (max-min) + min",
                 maxdiff(((s + 1) / 2) * (hi - lo) + lo, s / scale + shift), None))
    return rows


def generation_rows(work: Path, autoencoder: Path, original_ae: nn.Module, steps: int = 50) -> list[tuple]:
    """Class-conditional generation as ``evaluation/class_conditional_generation.py`` does it (DDPM over all
    ``steps`` training timesteps, codebook min-max unscaling, quantised decode) against medsynth's ``predict_step``
    of the imported models, with the same initial and per-step noise. A small BiFlowNet keeps it fast on a CPU."""
    import diffusers.schedulers.scheduling_ddpm as scheduling_ddpm
    from ddpm.BiFlowNet import BiFlowNet, GaussianDiffusion

    import medsynth.modules.diffusion as medsynth_diffusion
    from medsynth.convert import ImportOptions
    from medsynth.convert.meddiffusion import BiFlowNetConverter, instantiate

    args = argparse.Namespace(model_dim=24, dim_mults=[1, 1, 2], volume_channels=8, num_classes=3,
                              use_attn=[0, 0, 1], vq_size=64, num_dit=1, patch_size=2, timesteps=steps,
                              loss_type="l1", resolution=[8, 8, 16])
    torch.manual_seed(5)
    model = BiFlowNet(dim=24, dim_mults=args.dim_mults, channels=8, init_kernel_size=3, cond_classes=3,
                      learn_sigma=False, use_sparse_linear_attn=args.use_attn, vq_size=64, num_mid_DiT=1,
                      patch_size=2).eval()
    randomise(model, 5)
    path = work / "small_biflownet.pt"
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "args": args}, path)
    module = instantiate(BiFlowNetConverter().convert(path, ImportOptions(autoencoder=autoencoder)))

    g = torch.Generator().manual_seed(7)
    z = torch.randn(1, 8, *args.resolution, generator=g)
    noises = [torch.randn(1, 8, *args.resolution, generator=g) for _ in range(steps)]
    label = 2
    # the original: p_sample_loop draws torch.randn_like once per step (the last one multiplied by 0)
    queue = list(noises)
    randn_like = torch.randn_like
    torch.randn_like = lambda x, **kw: queue.pop(0)
    try:
        diffusion = GaussianDiffusion(channels=8, timesteps=steps, loss_type="l1")
        res = torch.tensor(args.resolution, dtype=torch.float32) / 64.0
        latent_orig = diffusion.sample(model, z, y=torch.tensor([label]), res=res, strategy="ddpm")
    finally:
        torch.randn_like = randn_like
    embeddings = original_ae.codebook.embeddings
    unscaled = ((latent_orig + 1.0) / 2.0) * (embeddings.max() - embeddings.min()) + embeddings.min()
    volume_orig = original_ae.decode(unscaled, quantize=True)

    # medsynth: the same starting noise, and the same noise at every step with t > 0 (diffusers draws none at 0)
    queue = list(noises)
    initial, draw = medsynth_diffusion.initial_noise, scheduling_ddpm.randn_tensor
    medsynth_diffusion.initial_noise = lambda shape, generators, device=None: z.clone()
    scheduling_ddpm.randn_tensor = lambda shape, **kw: queue.pop(0)
    try:
        latent_ours = module.sample(labels=torch.tensor([label]), indices=[0])
        volume_ours = module.decode(latent_ours)
    finally:
        medsynth_diffusion.initial_noise, scheduling_ddpm.randn_tensor = initial, draw
    return [
        ("generation", f"{steps}-step DDPM latent, class {label}, {tuple(args.resolution)}",
         maxdiff(latent_orig, latent_ours), float(latent_orig.abs().max())),
        # medsynth keeps generated volumes in the data range [-1, 1]; the original writes them unclipped
        ("generation", f"decoded volume {tuple(volume_orig.shape[2:])}, clipped to [-1, 1]",
         maxdiff(volume_orig.clamp(-1, 1), volume_ours), float(volume_orig.abs().max())),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", type=Path, required=True, help="a checkout of ShanghaiTech-IMPACT/3D-MedDiffusion")
    parser.add_argument("--work", type=Path, default=None, help="where to write the checkpoints (default: a temp dir)")
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--side", type=int, default=32, help="side of the test volume for the autoencoders")
    ns = parser.parse_args()
    torch.set_grad_enabled(False)
    make_original_importable(ns.repo.resolve())
    work = ns.work or Path(tempfile.mkdtemp(prefix="verify_meddiffusion_"))
    work.mkdir(parents=True, exist_ok=True)
    rows, ae4, original4 = patch_volume_rows(work, 4, ns.side)
    rows8, ae8, _ = patch_volume_rows(work, 8, ns.side)
    rows += rows8 + biflownet_rows(work, ae8) + generation_rows(work, ae4, original4)
    failed = False
    print(f"{'network':<16} {'check':<56} {'value':>14} {'reference':>14}")
    for net, check, value, ref in rows:
        exact = "parameters" in check or "differ" in check
        # float32 cumulative products agree to ~1e-4 relative where abar is ~1e-10 (an absolute ~1e-14)
        tolerance = 1e-3 if "relative" in check else ns.tolerance
        bad = (value != ref) if "parameters" in check else (value != 0 if "differ" in check else value > tolerance)
        failed |= bad
        shown = f"{value:,}" if exact else f"{value:.3g}"
        ref_shown = "" if ref is None else (f"{ref:,}" if exact else f"|max| {ref:.3g}")
        print(f"{net:<16} {check:<56} {shown:>14} {ref_shown:>14}{'  FAIL' if bad else ''}")
    print("all within tolerance" if not failed else "SOME CHECKS FAILED")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
