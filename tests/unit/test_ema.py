"""EMA with a warmed-up decay, built on Lightning's EMAWeightAveraging."""

import lightning as L
import pytest
import torch
from torch.optim.swa_utils import AveragedModel

from medsynth.callbacks.ema import EMA, WarmupEMADecay
from medsynth.errors import MedsynthError


def test_warmup_decay_ramps_up_to_its_target():
    f = WarmupEMADecay(0.999)
    assert f.current(0) == pytest.approx(0.1)
    assert f.current(90) == pytest.approx(91 / 100)
    assert f.current(100_000) == 0.999
    decays = [f.current(n) for n in range(0, 20_000, 50)]
    assert all(a <= b for a, b in zip(decays, decays[1:]))


def test_share_of_the_initial_weights_after_1500_steps():
    """What the issue measured: a fixed 0.999 keeps ~22 % of the random start after 1,500 updates; the ramp keeps
    almost nothing of it."""
    def init_share(fn, steps):
        avg = AveragedModel(torch.nn.Linear(1, 1, bias=False), avg_fn=fn)
        model = torch.nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            model.weight.fill_(1.0)
            avg.module.weight.fill_(1.0)
        avg.n_averaged += 1  # the average starts as a copy of the initial weights (value 1)
        with torch.no_grad():
            model.weight.fill_(0.0)  # every later weight is 0: what remains of 1 is the initial weights' share
        for _ in range(steps):
            avg.update_parameters(model)
        return float(avg.module.weight.detach())

    fixed = init_share(lambda a, c, n: 0.999 * a + 0.001 * c, 1500)
    warm = init_share(WarmupEMADecay(0.999), 1500)
    assert fixed == pytest.approx(0.999 ** 1500, rel=1e-3)  # ~0.22
    assert warm < 0.01


class _Tiny(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _fit(callback, steps, tmp_path):
    torch.manual_seed(0)
    model = _Tiny()
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(64, 4)), batch_size=8)
    trainer = L.Trainer(max_steps=steps, callbacks=[callback], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(model, data)
    return model, callback


def test_callback_averages_with_the_ramp_and_copies_until_it_starts(tmp_path):
    model, cb = _fit(EMA(decay=0.999), 20, tmp_path)
    assert isinstance(cb._kwargs["avg_fn"], WarmupEMADecay)
    assert int(cb._average_model.n_averaged) == 20

    # without the ramp the average barely leaves the initial weights in 20 steps; with it, it follows the model
    torch.manual_seed(0)
    start = _Tiny().layer.weight.detach().clone()
    model_fixed, _ = _fit(EMA(decay=0.999, warmup=False), 20, tmp_path)
    assert (model_fixed.layer.weight - start).abs().max() < (model.layer.weight - start).abs().max()

    # before update_starting_at_step the average equals the live weights and no update is counted
    model, cb = _fit(EMA(decay=0.9, update_starting_at_step=50), 10, tmp_path)
    assert int(cb._average_model.n_averaged) == 0
    # the model now holds the average (on_train_end copies it in): the trained weights, not the initial ones
    assert not torch.allclose(model.layer.weight, start)
    model_plain, _ = _fit(EMA(decay=0.9, update_starting_at_step=50, warmup=False), 10, tmp_path)
    assert torch.equal(model.layer.weight, model_plain.layer.weight)


@pytest.mark.parametrize("kwargs", [{"decay": 1.0}, {"decay": -0.1}, {"update_every_n_steps": 0}])
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(MedsynthError):
        EMA(**kwargs)
