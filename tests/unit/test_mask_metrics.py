"""The mask generator's judge (medsynth.metrics.masks) on generated label maps: real-like draws score near their
ceiling, noise, copies and a collapsed generator are each told apart."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from monai.metrics import compute_dice

from medsynth.io import save_png
from medsynth.metrics.masks import mask_scores, pairwise_dice

SIZE, K = 32, 3


def draw_masks(n: int, seed: int) -> torch.Tensor:
    """``n`` 'anatomies': an ellipse (class 1) of random size and position holding a smaller one (class 2)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:SIZE, :SIZE]
    out = []
    for _ in range(n):
        cy, cx = rng.uniform(12, 20, 2)
        ry, rx = rng.uniform(7, 12, 2)
        m = np.zeros((SIZE, SIZE), np.int64)
        m[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1] = 1
        m[((yy - cy) / (ry * 0.5)) ** 2 + ((xx - cx) / (rx * 0.5)) ** 2 <= 1] = 2
        out.append(m)
    return torch.from_numpy(np.stack(out))


def test_pairwise_dice_matches_monai():
    a, b = draw_masks(5, 1), draw_masks(4, 2)
    ours = pairwise_dice(a, b, K)
    one_hot = lambda x: torch.nn.functional.one_hot(x, K).permute(0, 3, 1, 2).float()  # noqa: E731
    for i in range(len(a)):
        theirs = compute_dice(one_hot(a[i:i + 1]).expand(len(b), -1, -1, -1), one_hot(b), include_background=False)
        assert torch.allclose(ours[i], theirs.mean(1), atol=1e-5)
    assert torch.allclose(pairwise_dice(a, a, K).diagonal(), torch.ones(len(a)))


def test_pairwise_dice_counts_only_classes_either_map_holds():
    a = torch.zeros(1, 4, 4, dtype=torch.long)
    a[0, :2] = 1  # 8 pixels of class 1, no class 2
    b = torch.zeros(1, 4, 4, dtype=torch.long)
    b[0, :1] = 1  # 4 of them
    assert pairwise_dice(a, b, K).item() == pytest.approx(2 * 4 / (8 + 4))
    empty = torch.zeros(1, 4, 4, dtype=torch.long)
    assert pairwise_dice(empty, empty, K).item() == 1.0
    assert pairwise_dice(a, empty, K).item() == 0.0


def test_scores_tell_real_like_draws_from_noise_copies_and_collapse():
    train, test = draw_masks(60, 10), draw_masks(20, 11)
    fresh = mask_scores(draw_masks(40, 12), train, test, K)
    assert 0.9 < fresh["fidelity_fraction"] < 1.1 and 0.9 < fresh["coverage_fraction"] < 1.1
    assert fresh["copies"] < 0.2
    assert fresh["area_distance"] < 3 * fresh["area_distance_real"] + 0.01

    noise = mask_scores(torch.randint(0, K, (40, SIZE, SIZE)), train, test, K)
    assert noise["fidelity_fraction"] < 0.6 and noise["area_distance"] > 5 * fresh["area_distance"]

    copies = mask_scores(train[:40], train, test, K)
    assert copies["copies"] == 1.0 and copies["fidelity_fraction"] > fresh["fidelity_fraction"]

    collapsed = mask_scores(draw_masks(1, 13).expand(40, -1, -1), train, test, K)
    assert collapsed["fidelity_fraction"] > 0.8  # each sample is plausible ...
    assert collapsed["coverage_fraction"] < fresh["coverage_fraction"] - 0.05  # ... but one shape is not the set


def _write(folder, masks):
    for i, m in enumerate(masks):
        save_png(folder / f"m{i:03d}.png", m.numpy().astype(np.uint8))


def test_command_writes_scores_and_refuses_bad_input(tmp_path):
    _write(tmp_path / "samples" / "masks", draw_masks(8, 20))
    _write(tmp_path / "real" / "train", draw_masks(12, 21))
    _write(tmp_path / "real" / "test", draw_masks(6, 22))
    cmd = [sys.executable, "-m", "medsynth.metrics.masks", str(tmp_path / "samples" / "masks"),
           "--train", str(tmp_path / "real" / "train"), "--test", str(tmp_path / "real" / "test"),
           "--num-classes", str(K)]
    # the missing-folder refusal runs beside the first scoring (each command mostly waits on its imports)
    missing = subprocess.Popen([*cmd[:5], str(tmp_path / "nowhere"), *cmd[6:], "--overwrite"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    scores = json.loads((tmp_path / "samples" / "mask_scores.json").read_text())["scores"]
    assert scores["samples"] == 8 and scores["train"] == 12 and 0 < scores["fidelity"] <= 1

    again = subprocess.run(cmd, capture_output=True, text=True)  # never replaces earlier scores silently
    assert again.returncode == 2 and "mask_scores.json: exists" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1

    _, missing_err = missing.communicate(timeout=300)
    assert missing.returncode == 2 and "nowhere: no such folder" in missing_err
