"""DDP ranks seeded alike by seed_everything must still draw different noise: modules offset the global generator
by the rank when fitting starts."""

from types import SimpleNamespace

import pytest
import torch

from medsynth.modules import AutoencoderModule, DiffusionModule
from medsynth.nets import KLAutoencoder


def draws_per_rank(make, world_size: int) -> list[torch.Tensor]:
    out = []
    for rank in range(world_size):
        module = make()
        torch.manual_seed(1234)  # what seed_everything does on every rank
        module._trainer = SimpleNamespace(world_size=world_size, global_rank=rank, precision="32-true",
                                          gradient_clip_val=None)
        module.on_fit_start()
        out.append(torch.randn(16))
    return out


@pytest.mark.parametrize("make", [
    lambda: DiffusionModule(image_size=8),
    lambda: AutoencoderModule(net=KLAutoencoder(channels=(8, 16), latent_channels=2, norm_num_groups=4), image_size=8),
], ids=["diffusion", "autoencoder"])
def test_ranks_draw_different_noise_and_one_process_is_unchanged(make):
    a, b = draws_per_rank(make, 2)
    assert not torch.equal(a, b)
    single = draws_per_rank(make, 1)[0]
    torch.manual_seed(1234)
    assert torch.equal(single, torch.randn(16))  # a single process keeps the user's seed as it is
