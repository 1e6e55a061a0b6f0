"""How realistic and how diverse samples are: FID/KID with a local feature network, and mean pairwise MS-SSIM.

FID and KID compare feature statistics of generated and real images (Heusel et al., 2017; Bińkowski et al.,
2018). The usual features come from Inception-v3, whose weights medsynth never downloads: give a TorchScript file
of the network (exported once on a machine with internet) that maps uint8 images ``(N, 3, H, W)`` in [0, 255] to
features ``(N, D)`` (a tuple/list output uses its first entry); torchmetrics computes FID and KID on those
features. For example, with ``torch-fidelity``::

    import torch
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).eval()   # downloads once
    torch.jit.trace(net, torch.zeros(1, 3, 299, 299, dtype=torch.uint8)).save("inception_fid.pt")

Scores from another feature network are not comparable with published FIDs; compare runs scored alike.

Volumes are scored by the 2.5D FID that MAISI reports (Guo et al., WACV 2025): the 2D feature network is applied to
the slices of each volume along each of its three axes, and FID is computed per plane over all slices of all
volumes (:func:`fid_2p5d`); the three scores and their mean are reported. For RAS-oriented volumes, slices across
axis 0, 1 and 2 are sagittal, coronal and axial.
"""

from __future__ import annotations

import itertools
import warnings
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.image.fid import FrechetInceptionDistance
from torchmetrics.image.kid import KernelInceptionDistance

from medsynth.errors import MedsynthError
from medsynth.metrics.reconstruction import MS_SSIM_MIN_SIDE, ms_ssim, ssim


class FeatureNet(nn.Module):
    """A frozen feature network loaded from a local TorchScript file, fed images in [-1, 1] of any channel count.

    Images are resized to ``input_size`` (bilinear), single channels repeated to three, and passed as uint8 in
    [0, 255], the convention of the Inception networks used for FID.

    Args:
        weights: the TorchScript file (see the module docstring); required, never downloaded.
        input_size: side the images are resized to (299 for Inception-v3).
    """

    def __init__(self, weights: Optional[Path] = None, input_size: int = 299) -> None:
        super().__init__()
        if weights is None:
            raise MedsynthError("FID/KID need a local feature network: give its TorchScript file (nothing is "
                                "downloaded; see medsynth/metrics/distribution.py)")
        path = Path(weights)
        if not path.is_file():
            raise MedsynthError(f"{path}: FID/KID feature network does not exist (it is never downloaded; export "
                                "Inception-v3 to TorchScript once, see medsynth/metrics/distribution.py)")
        try:
            self.net = torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as exc:  # noqa: BLE001 - any failure to load is the same problem for the user
            raise MedsynthError(f"{path}: not a TorchScript feature network ({type(exc).__name__})") from None
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.weights, self.input_size = str(path), input_size

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        """Features ``(N, D)`` of images ``(N, C, H, W)`` in [-1, 1]."""
        x = x.float()
        x = x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x[:, :3]
        x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        out = self.net(x)
        out = out[0] if isinstance(out, (tuple, list)) else out
        return out.reshape(out.shape[0], -1).double()


class _Features(nn.Module):
    """Hands precomputed features ``(N, D)`` to torchmetrics' FID/KID unchanged (their ``feature`` plug-in)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: Tensor) -> Tensor:
        return features


def _check_counts(real: Tensor, fake: Tensor, what: str) -> None:
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise MedsynthError(f"{what}: features must be (N, D) with one D, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if real.shape[0] < 2 or fake.shape[0] < 2:
        raise MedsynthError(f"{what} needs at least 2 real and 2 generated images")


def frechet_distance(real: Tensor, fake: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets ``(N, D)`` (FID when the features are
    Inception's): ``|mu_r - mu_f|^2 + tr(S_r + S_f - 2 (S_r S_f)^(1/2))``, computed by torchmetrics."""
    _check_counts(real, fake, "FID")
    fid = FrechetInceptionDistance(feature=_Features(real.shape[1]))
    fid.update(real.double(), real=True)
    fid.update(fake.double(), real=False)
    return float(fid.compute())


def kernel_inception_distance(real: Tensor, fake: Tensor, subsets: int = 50, subset_size: int = 100,
                              seed: int = 0) -> tuple[float, float]:
    """KID (Bińkowski et al., 2018): the unbiased squared MMD with the polynomial kernel ``(x.y / D + 1)^3``,
    mean and standard deviation over ``subsets`` random subsets of ``subset_size`` (fewer when fewer images are
    given), computed by torchmetrics; the subsets are drawn from ``seed``, so a score repeats."""
    _check_counts(real, fake, "KID")
    m = min(subset_size, real.shape[0], fake.shape[0])
    with warnings.catch_warnings():  # "will save all extracted features": they are already in memory here
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=_Features(real.shape[1]), subsets=subsets, subset_size=m)
    kid.update(real.double(), real=True)
    kid.update(fake.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = kid.compute()
    return float(mean), float(std)


def mean_pairwise_similarity(samples: Tensor, max_pairs: int = 200, seed: int = 0) -> float:
    """Diversity: the mean MS-SSIM (SSIM for images too small for three scales, and for volumes) over pairs of
    samples ``(N, C, *spatial)`` in [-1, 1]; lower means more diverse (identical samples give 1)."""
    n = samples.shape[0]
    if n < 2:
        raise MedsynthError("diversity needs at least 2 samples")
    pairs = list(itertools.combinations(range(n), 2))
    if len(pairs) > max_pairs:
        g = torch.Generator().manual_seed(seed)
        pairs = [pairs[i] for i in torch.randperm(len(pairs), generator=g)[:max_pairs].tolist()]
    a = samples[[i for i, _ in pairs]].float()
    b = samples[[j for _, j in pairs]].float()
    multiscale = samples.ndim == 4 and min(samples.shape[2:]) >= MS_SSIM_MIN_SIDE
    values = ms_ssim(a, b) if multiscale else ssim(a, b)
    return float(values.mean())


SLICE_AXES = (0, 1, 2)
"""The spatial axes of a volume ``(C, X, Y, Z)`` that 2.5D FID slices across (one plane each)."""


def volume_slices(volume: Tensor, axis: int, max_slices: Optional[int] = None,
                  center_fraction: float = 1.0) -> Tensor:
    """The 2D slices ``(S, C, H, W)`` of a volume ``(C, X, Y, Z)`` across one spatial ``axis``.

    Args:
        volume: one volume, any value range (scale it to [-1, 1] as the feature network expects).
        axis: 0, 1 or 2: the spatial axis the slices are taken across.
        max_slices: at most this many slices, evenly spaced (all when ``None``).
        center_fraction: keep only this central share (0, 1] of the slices (MAISI's ``center_slices_ratio``), to
            leave out the mostly empty ends of a scan.
    """
    if volume.ndim != 4 or axis not in SLICE_AXES:
        raise MedsynthError(f"volume_slices: expected a (C, X, Y, Z) volume and an axis in 0..2, got "
                            f"{tuple(volume.shape)} and {axis}")
    if not 0 < center_fraction <= 1:
        raise MedsynthError(f"center_fraction={center_fraction}: must lie in (0, 1]")
    slices = volume.movedim(axis + 1, 0)  # (S, C, H, W)
    n = slices.shape[0]
    keep = max(1, round(n * center_fraction))
    start = (n - keep) // 2
    index = torch.arange(start, start + keep)
    if max_slices is not None and keep > max_slices:
        index = index[torch.linspace(0, keep - 1, max_slices).round().long()]
    return slices[index]


@torch.no_grad()
def plane_features(net: nn.Module, volumes: Sequence[Tensor], axis: int, max_slices: Optional[int] = None,
                   center_fraction: float = 1.0, batch_size: int = 64) -> Tensor:
    """Features ``(N_slices, D)`` of the slices across ``axis`` of every volume ``(C, X, Y, Z)`` in [-1, 1]
    (volumes may differ in shape: the feature network resizes each slice)."""
    out = []
    for volume in volumes:
        slices = volume_slices(volume.float(), axis, max_slices, center_fraction)
        out += [net(batch) for batch in slices.split(batch_size)]
    return torch.cat(out)


def fid_2p5d(net: nn.Module, real: Sequence[Tensor], fake: Sequence[Tensor], max_slices: Optional[int] = None,
             center_fraction: float = 1.0) -> dict[str, float]:
    """2.5D FID of generated against real volumes: FID of the 2D features of their slices, per plane.

    Args:
        net: a 2D feature network taking images ``(N, C, H, W)`` in [-1, 1] (e.g. :class:`FeatureNet`).
        real: real volumes ``(C, X, Y, Z)`` scaled to [-1, 1] as training scales them.
        fake: generated volumes ``(C, X, Y, Z)`` in [-1, 1].
        max_slices: at most this many evenly spaced slices per volume and plane (all when ``None``).
        center_fraction: central share of each volume's slices used (see :func:`volume_slices`).

    Returns:
        ``{"fid_2.5d/axis0": ..., "fid_2.5d/axis1": ..., "fid_2.5d/axis2": ..., "fid_2.5d": mean of the three}``.

    Raises:
        MedsynthError: no volumes on one side, or fewer than 2 slices in a plane.
    """
    if not real or not fake:
        raise MedsynthError(f"2.5D FID needs real and generated volumes (got {len(real)} real, {len(fake)} "
                            "generated)")
    scores = {}
    for axis in SLICE_AXES:
        f_real = plane_features(net, real, axis, max_slices, center_fraction)
        f_fake = plane_features(net, fake, axis, max_slices, center_fraction)
        scores[f"fid_2.5d/axis{axis}"] = frechet_distance(f_real, f_fake)
    scores["fid_2.5d"] = sum(scores.values()) / len(SLICE_AXES)
    return scores
