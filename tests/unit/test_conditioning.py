import pytest
import torch
import torch.nn.functional as F

from medsynth.diffusion.conditioning import (
    MaskPatchEmbedding,
    ablate_mask,
    batch_mask_channels,
    encode_mask,
    mask_channels,
    reduce_to_grid,
)
from medsynth.errors import MedsynthError


def test_one_hot_encoding_marks_each_pixel_with_its_class():
    mask = torch.tensor([[[0, 1], [2, 2]]])  # (1, 2, 2)
    enc = encode_mask(mask, 3, "one_hot")
    assert enc.shape == (1, 3, 2, 2)
    assert torch.equal(enc.argmax(1), mask)
    assert torch.equal(enc.sum(1), torch.ones(1, 2, 2))


def test_scalar_encoding_matches_reference_k_over_255():
    mask = torch.tensor([[[0, 1], [2, 5]]])
    enc = encode_mask(mask, 6, "scalar")
    assert enc.shape == (1, 1, 2, 2)
    assert torch.allclose(enc[0, 0], mask[0].float() / 255)


def test_mask_channels():
    assert mask_channels(0, "one_hot") == 0
    assert mask_channels(4, "one_hot") == 4
    assert mask_channels(4, "scalar") == 1
    assert mask_channels(4, "patch_embedding", 32) == 32
    assert mask_channels(0, "patch_embedding", 32) == 0


def test_the_patch_embedding_sees_every_label_inside_a_latent_voxels_block():
    g = torch.Generator().manual_seed(0)
    embed = MaskPatchEmbedding(num_classes=3, channels=5, factor=4, spatial_dims=3)
    mask = torch.randint(0, 3, (2, 8, 8, 12), generator=g)
    out = embed(encode_mask(mask, 3, "patch_embedding"))
    assert out.shape == (2, 5, 2, 2, 3)
    moved = mask.clone()
    moved[0, 1, 2, 3] = (mask[0, 1, 2, 3] + 1) % 3  # one image voxel of latent voxel (0, 0, 0) of sample 0
    diff = (embed(encode_mask(moved, 3, "patch_embedding")) - out).abs().sum(1)
    assert diff[0, 0, 0, 0] > 0 and diff.flatten()[1:].eq(0).all()  # that latent voxel only
    assert MaskPatchEmbedding(3, 5, 4, 2)(encode_mask(mask[:, 0], 3, "patch_embedding")).shape == (2, 5, 2, 3)
    with pytest.raises(MedsynthError, match="blocks of 4"):
        embed(encode_mask(mask[:, :6], 3, "patch_embedding"))


def test_reduce_to_grid_takes_each_blocks_majority_not_its_first_voxel():
    mask = torch.zeros(8, 8, dtype=torch.long)
    mask[1:4, 1:4] = 2  # 9 of the first block's 16 pixels, but not its first pixel
    mask[4, 4] = 1  # 1 of 16: the second block's first pixel
    coarse = reduce_to_grid(mask, 4)
    assert coarse.tolist() == [[2, 0], [0, 0]]
    nearest = F.interpolate(mask[None, None].float(), size=(2, 2), mode="nearest")[0, 0].long()
    assert nearest.tolist() == [[0, 0], [0, 1]]  # what nearest-neighbour resizing made of it
    assert torch.equal(reduce_to_grid(mask, 1), mask)


def test_batch_mask_channels_reads_the_mask_its_encoding_needs():
    mask, full = torch.randint(0, 3, (1, 2, 2)), torch.randint(0, 3, (1, 8, 8))
    assert batch_mask_channels({"mask": mask}, 3, "one_hot").shape == (1, 3, 2, 2)
    assert batch_mask_channels({"mask": mask, "full_mask": full}, 3, "patch_embedding", 4).shape == (1, 3, 8, 8)
    assert batch_mask_channels({"mask": mask}, 3, "patch_embedding", 1).shape == (1, 3, 2, 2)  # pixel space
    with pytest.raises(MedsynthError, match="full_mask"):
        batch_mask_channels({"mask": mask}, 3, "patch_embedding", 4)


def test_ablation_with_zero_probability_is_identity():
    mask = torch.randint(0, 4, (3, 8, 8))
    assert torch.equal(ablate_mask(mask, 4, 0.0), mask)


def test_ablation_with_probability_one_leaves_only_background():
    mask = torch.randint(0, 4, (3, 8, 8))
    assert (ablate_mask(mask, 4, 1.0) == 0).all()


def test_ablation_removes_whole_classes_per_sample_and_never_invents_labels():
    g = torch.Generator().manual_seed(0)
    mask = torch.arange(4).repeat_interleave(4).reshape(1, 4, 4).repeat(64, 1, 1)  # every class in every sample
    out = ablate_mask(mask, 4, 0.5, generator=g)
    for m_in, m_out in zip(mask, out):
        for k in range(1, 4):
            kept = m_out[m_in == k]
            assert (kept == k).all() or (kept == 0).all()  # a class is removed entirely or kept entirely
        assert set(m_out.unique().tolist()) <= set(m_in.unique().tolist())
    assert (out[mask == 0] == 0).all()
    # per-sample draws: the 64 samples do not all share one ablation pattern
    patterns = {tuple(int((o == k).any()) for k in range(1, 4)) for o in out}
    assert len(patterns) > 1
    removed = (out != mask).float().sum() / (mask != 0).float().sum()
    assert 0.3 < removed < 0.7
