"""Class conditioning and classifier-free guidance in the DiffusionModule."""

from functools import partial

import pytest
import torch

from medsynth.diffusion import DDIMSampler
from medsynth.errors import MedsynthError
from medsynth.modules import DiffusionModule
from medsynth.nets import UNet2D

NET = partial(UNet2D, block_out_channels=(8, 16), attention_levels=(False, False), norm_num_groups=8)


def module(**kw):
    torch.manual_seed(0)
    args = dict(net=NET, image_size=8, class_names=["a", "b", "c"], label_drop_prob=0.2,
                sampler=DDIMSampler(4))
    args.update(kw)
    m = DiffusionModule(**args).eval()
    # make the null label's embedding differ from the real ones, as after training with label dropout
    if m.net.unet.class_embedding is not None:
        with torch.no_grad():
            m.net.unet.class_embedding.weight.normal_()
    return m


def test_class_embedding_has_a_null_label():
    m = module()
    assert m.net.unet.class_embedding.num_embeddings == 4


def test_guidance_scale_one_reproduces_the_conditional_model_and_larger_scales_change_it():
    m = module()
    labels = torch.tensor([0, 1, 2])
    conditional = m.sample(labels=labels, guidance_scale=1.0)  # the conditional net alone
    # through the guidance arithmetic (conditional and null predictions in one doubled batch, u + w (c - u)):
    # as w -> 1 the guided samples meet the conditional ones
    near_one = m.sample(labels=labels, guidance_scale=1.0 + 1e-4)
    assert torch.allclose(near_one, conditional, atol=1e-3)
    assert not torch.allclose(m.sample(labels=labels, guidance_scale=0.0), conditional, atol=1e-3)  # null only
    guided = m.sample(labels=labels, guidance_scale=3.0)
    assert not torch.allclose(guided, conditional, atol=1e-3)


def test_guided_output_is_the_cfg_combination():
    m = module()
    xt, t = torch.randn(2, 1, 8, 8), torch.tensor([500, 500])
    labels = torch.tensor([0, 2])
    c = m.denoise(xt, t, None, labels)
    u = m.denoise(xt, t, None, torch.full_like(labels, 3))
    captured = {}

    class Once(DDIMSampler):
        def sample(self, denoise, noise, objective, generators=None):
            captured["out"] = denoise(xt, t)
            return noise

    m.sample(labels=labels, guidance_scale=2.5, sampler=Once(1))
    assert torch.allclose(captured["out"], u + 2.5 * (c - u), atol=1e-5)


def test_mask_models_drop_to_a_null_mask():
    m = module(class_names=None, num_classes=3)
    cond, labels = m.condition({"mask": torch.randint(0, 3, (64, 8, 8))}, train=True,
                               generator=torch.Generator().manual_seed(0))
    null = cond.flatten(1).sum(1) == 0  # dropped samples: all one-hot channels zero
    assert labels is None and 0 < null.sum() < 64
    assert torch.allclose(cond[~null].sum(1), torch.ones_like(cond[~null][:, 0]))
    guided = m.sample(mask=torch.randint(0, 3, (2, 8, 8)), guidance_scale=2.0)
    assert guided.shape == (2, 1, 8, 8)


def test_label_dropout_replaces_labels_by_the_null_label():
    m = module(label_drop_prob=0.5)
    _, labels = m.condition({"label": torch.zeros(200, dtype=torch.long)}, train=True,
                            generator=torch.Generator().manual_seed(1))
    assert set(labels.unique().tolist()) == {0, 3}
    assert 60 < (labels == 3).sum() < 140


def test_guidance_errors():
    with pytest.raises(MedsynthError, match="guidance_scale=-1.0 must be >= 0"):
        module(guidance_scale=-1.0)
    m = module(label_drop_prob=0.0)
    with pytest.raises(MedsynthError, match="label_drop_prob > 0"):
        m.sample(labels=torch.tensor([0]), guidance_scale=2.0)
    with pytest.raises(MedsynthError, match="class-conditional"):
        m.sample(indices=[0])


def test_auto_guidance_guides_models_trained_for_it_and_leaves_the_rest_unguided():
    from medsynth.diffusion.conditioning import AUTO_GUIDANCE

    labels = torch.tensor([0, 2])
    m = module(guidance_scale="auto")  # class-conditional, trained with label drop
    assert m.guidable and m.guidance_weight() == AUTO_GUIDANCE > 1
    assert torch.allclose(m.sample(labels=labels), m.sample(labels=labels, guidance_scale=AUTO_GUIDANCE))
    assert not torch.allclose(m.sample(labels=labels), m.sample(labels=labels, guidance_scale=1.0), atol=1e-3)
    assert module(guidance_scale="auto", class_names=None, num_classes=3).guidance_weight() == AUTO_GUIDANCE
    # no null condition learned, or nothing to guide: auto samples the plain model instead of refusing
    for m in (module(guidance_scale="auto", label_drop_prob=0.0),
              module(guidance_scale="auto", class_names=None, label_drop_prob=0.1)):
        assert not m.guidable and m.guidance_weight() == 1.0
    plain = module(guidance_scale="auto", class_names=None)
    assert plain.sample(indices=[0, 1]).shape == (2, 1, 8, 8)
    with pytest.raises(MedsynthError, match="must be a number >= 0 or 'auto'"):
        module(guidance_scale="strong")
