"""Perceptual loss from a local feature network: nothing is downloaded.

MONAI's ``PerceptualLoss`` fetches code and weights from a hub at run time, which fails offline and on clusters
without internet. This loss takes a feature extractor saved as TorchScript at a path the user gives instead.
Export one once on a machine with internet, for example MONAI's MedicalNet ResNet-10 (3D) or a RadImageNet
ResNet-50 (2D), wrapped in :class:`FeatureExtractor` so that the file keeps the input normalisation the network was
trained with (MONAI applies it in the similarity's ``forward``, outside ``.model``; tracing ``.model`` alone would
feed the network inputs it has never seen)::

    import torch
    from monai.losses.perceptual import MedicalNetPerceptualSimilarity
    from medsynth.losses.perceptual import FeatureExtractor
    model = MedicalNetPerceptualSimilarity(net="medicalnet_resnet10_23datasets").model  # internet once
    net = FeatureExtractor(model, normalisation="medicalnet").eval()
    torch.jit.trace(net, torch.zeros(1, 1, 32, 32, 32)).save("medicalnet_resnet10.pt")

(RadImageNet: ``RadImageNetPerceptualSimilarity(net="radimagenet_resnet50").model`` with
``normalisation="radimagenet"``, traced on ``torch.zeros(1, 3, 64, 64)``, and ``repeat_channels: 3``), then train
with ``--model.perceptual.weights medicalnet_resnet10.pt`` (see the README).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medsynth.errors import MedsynthError


class FeatureExtractor(nn.Module):
    """A perceptual feature network together with the input normalisation it was trained with, to trace and save.

    Inputs are medsynth's ``(B, C, *spatial)`` in [-1, 1]; the output is the network's (a tensor or a list of feature
    maps). The normalisations are those of MONAI's perceptual similarities:

    - ``medicalnet``: z-score over the whole input, as MedicalNet (Chen et al., 2019, "Med3D: Transfer Learning for
      3D Medical Image Analysis") was trained; the range does not matter.
    - ``radimagenet``: [-1, 1] to [0, 1], RGB to BGR, minus the BGR channel means (0.406, 0.456, 0.485), as
      RadImageNet (Mei et al., 2022) was trained; 3 channels (see ``repeat_channels``).
    - ``torchvision``: [-1, 1] to [0, 1], then ImageNet's channel mean and standard deviation; 3 channels.
    - ``none``: the input as it is.

    Args:
        model: the feature network, e.g. ``MedicalNetPerceptualSimilarity(...).model``.
        normalisation: see above.
    """

    def __init__(self, model: nn.Module,
                 normalisation: Literal["medicalnet", "radimagenet", "torchvision", "none"] = "none") -> None:
        super().__init__()
        if normalisation not in ("medicalnet", "radimagenet", "torchvision", "none"):
            raise MedsynthError(f"normalisation={normalisation!r}: use medicalnet, radimagenet, torchvision or none")
        self.model = model
        self.normalisation = normalisation

    def normalise(self, x: Tensor) -> Tensor:
        """The network's input for medsynth images ``x`` in [-1, 1]."""
        if self.normalisation == "medicalnet":
            return (x - x.mean()) / x.std()
        if self.normalisation == "none":
            return x
        x = (x + 1) / 2  # both were trained on [0, 1] inputs
        shape = (1, 3) + (1,) * (x.ndim - 2)
        if self.normalisation == "radimagenet":
            return x[:, [2, 1, 0]] - x.new_tensor([0.406, 0.456, 0.485]).view(shape)
        return (x - x.new_tensor([0.485, 0.456, 0.406]).view(shape)) / x.new_tensor([0.229, 0.224, 0.225]).view(shape)

    def forward(self, x: Tensor):
        return self.model(self.normalise(x))


class PerceptualLoss(nn.Module):
    """LPIPS-style distance (Zhang et al., 2018) between feature maps of a frozen, local TorchScript network.

    Each feature map is normalised to unit length over channels; the loss is the mean squared difference, averaged
    over layers. A 3D input is compared either with a 3D network (``mode: 3d``) or, as 3D MedDiffusion does with
    2D networks, on ``num_slices`` random slices of each of the three orthogonal planes (``mode: 2.5d``).

    Args:
        weights: TorchScript file of the feature network (``torch.jit.save``); it maps ``(B, C, *spatial)`` in
            [-1, 1] to a tensor or a list/tuple of feature maps, normalising its input itself (export it through
            :class:`FeatureExtractor`). Must exist locally; nothing is downloaded.
        mode: ``2d`` (2D inputs), ``3d`` (3D network on 3D inputs) or ``2.5d`` (2D network on slices of 3D inputs).
        num_slices: slices per plane in ``2.5d`` mode.
        repeat_channels: repeat single-channel inputs to this many channels (3 for ImageNet-style networks).
    """

    def __init__(
        self,
        weights: Optional[Path] = None,
        mode: str = "2d",
        num_slices: int = 4,
        repeat_channels: int = 1,
    ) -> None:
        super().__init__()
        if mode not in ("2d", "3d", "2.5d"):
            raise MedsynthError(f"perceptual.mode={mode!r}: use 2d, 3d or 2.5d")
        if weights is None:
            raise MedsynthError("the perceptual loss needs local weights: set model.perceptual.weights to a "
                                "TorchScript feature network (nothing is downloaded; see medsynth/losses/perceptual.py)")
        path = Path(weights)
        if not path.is_file():
            raise MedsynthError(f"{path}: perceptual-loss weights do not exist (they are never downloaded; give a "
                                "local TorchScript file, or drop model.perceptual)")
        try:
            net = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # noqa: BLE001 - any failure to load is the same problem for the user
            raise MedsynthError(f"{path}: not a TorchScript feature network ({type(exc).__name__})") from None
        self.weights = str(path)
        self.mode = mode
        self.num_slices = num_slices
        self.repeat_channels = repeat_channels
        self.net = net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> "PerceptualLoss":
        super().train(mode)
        self.net.eval()  # the feature network stays frozen, batch-norm statistics included
        return self

    def _features(self, x: Tensor) -> list[Tensor]:
        if self.repeat_channels > 1 and x.shape[1] == 1:
            x = x.repeat(1, self.repeat_channels, *([1] * (x.ndim - 2)))
        out = self.net(x)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    def _distance(self, x: Tensor, y: Tensor) -> Tensor:
        dist = []
        for fx, fy in zip(self._features(x), self._features(y)):
            fx = F.normalize(fx.float(), dim=1, eps=1e-8)
            fy = F.normalize(fy.float(), dim=1, eps=1e-8)
            dist.append((fx - fy).pow(2).sum(1).mean())
        return torch.stack(dist).mean()

    def _slices(self, x: Tensor, axis: int, index: Tensor) -> Tensor:
        # (B, C, D, H, W) -> (B * n, C, *plane)
        s = x.index_select(axis, index).movedim(axis, 1)
        return s.reshape(-1, *s.shape[2:])

    def forward(self, recon: Tensor, target: Tensor) -> Tensor:
        """Perceptual distance between reconstructions and targets ``(B, C, *spatial)`` in [-1, 1]."""
        if self.mode != "2.5d" or recon.ndim != 5:
            return self._distance(recon, target)
        losses = []
        for axis in (2, 3, 4):
            n = min(self.num_slices, recon.shape[axis])
            index = torch.randperm(recon.shape[axis], device=recon.device)[:n]
            losses.append(self._distance(self._slices(recon, axis, index), self._slices(target, axis, index)))
        return torch.stack(losses).mean()
