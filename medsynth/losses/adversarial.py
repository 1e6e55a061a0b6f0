"""The adversarial part of autoencoder training: patch-discriminator losses and feature matching."""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from monai.losses import PatchAdversarialLoss
from torch import Tensor, nn


class AdversarialLoss(nn.Module):
    """Generator and discriminator losses for a MONAI ``PatchDiscriminator`` (Isola et al., 2017, pix2pix).

    The discriminator returns a list of feature maps whose last entry holds the patch logits. Its losses are
    MONAI's ``PatchAdversarialLoss`` (hinge as in VQGAN/3D MedDiffusion, on logits squashed by tanh; or least
    squares as in LSGAN, after a leaky ReLU); the generator's hinge loss is the real-side hinge on its fakes. Feature
    matching (Wang et al., 2018, pix2pixHD) compares the intermediate feature maps of real and reconstructed
    inputs with L1.

    Args:
        criterion: ``hinge`` or ``least_squares``.
    """

    def __init__(self, criterion: Literal["hinge", "least_squares"] = "hinge") -> None:
        super().__init__()
        self.criterion = criterion
        self.loss = PatchAdversarialLoss(criterion=criterion)

    def generator(self, fake_outputs: Sequence[Tensor]) -> Tensor:
        """Generator loss: make the discriminator call the reconstructions real."""
        return self.loss(fake_outputs[-1].float(), target_is_real=True, for_discriminator=False)

    def discriminator(self, real_outputs: Sequence[Tensor], fake_outputs: Sequence[Tensor]) -> Tensor:
        """Discriminator loss: real inputs real, (detached) reconstructions fake; the mean of the two."""
        real = self.loss(real_outputs[-1].float(), target_is_real=True, for_discriminator=True)
        fake = self.loss(fake_outputs[-1].float(), target_is_real=False, for_discriminator=True)
        return 0.5 * (real + fake)

    @staticmethod
    def feature_matching(real_outputs: Sequence[Tensor], fake_outputs: Sequence[Tensor]) -> Tensor:
        """Mean L1 distance between the discriminator's intermediate features of real and reconstructed inputs."""
        pairs = list(zip(real_outputs[:-1], fake_outputs[:-1]))
        if not pairs:
            return fake_outputs[-1].new_zeros(())
        return torch.stack([F.l1_loss(f.float(), r.detach().float()) for r, f in pairs]).mean()
