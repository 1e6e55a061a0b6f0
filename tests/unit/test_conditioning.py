import torch

from medsynth.diffusion.conditioning import ablate_mask, encode_mask, mask_channels


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
