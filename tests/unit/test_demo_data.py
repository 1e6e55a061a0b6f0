import json

import numpy as np
from PIL import Image

from medsynth.data.demo import MNI152SliceDataModule, mni152_volumes


def test_tissue_labels_are_thresholded_probabilities_not_the_whole_brain():
    t1, labels = mni152_volumes()
    brain = t1 > 0
    assert set(np.unique(labels)) == {0, 1, 2}
    assert not labels[~brain].any()
    gm, wm = (labels == 1).sum() / brain.sum(), (labels == 2).sum() / brain.sum()
    # grey and white matter each cover a sizeable part of the brain but, with CSF, not all of it
    assert 0.2 < gm < 0.7 and 0.15 < wm < 0.6 and gm + wm < 0.97


def test_demo_slices_are_built_once_in_the_reference_layout(tmp_path):
    dm = MNI152SliceDataModule(cache_dir=tmp_path, image_size=32, num_workers=0)
    dm.prepare_data()
    info = json.loads((dm.root / "dataset.json").read_text())
    assert info["classes"] == ["background", "grey_matter", "white_matter"]
    assert all(info["splits"][s] > 5 for s in ("train", "val", "test"))
    stamp = (dm.root / "dataset.json").stat().st_mtime_ns
    dm.setup("fit")  # second build attempt: cache reused
    assert (dm.root / "dataset.json").stat().st_mtime_ns == stamp
    name = sorted((dm.root / "images" / "train").iterdir())[0].name
    img = np.array(Image.open(dm.root / "images" / "train" / name))
    mask = np.array(Image.open(dm.root / "masks" / "all" / "train" / name))
    assert img.shape == mask.shape and img.shape[0] == img.shape[1]
    assert not mask[img == 0].any()  # tissue only where there is brain
    item = dm.datasets["train"][0]
    assert item["image"].shape == (1, 32, 32) and item["mask"].max() <= 2
