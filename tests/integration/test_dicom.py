"""DICOM series folders, NRRD and MetaImage files are read wherever a NIfTI volume is (issue #15.4): the same voxels
and geometry as the volume written as NIfTI, the same training and reconstructions; a broken series is refused in
one line naming its folder, also through the installed ``medsynth`` command."""

from __future__ import annotations

import json
import locale
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from medsynth.cli import main
from medsynth.data.volumes import VolumeDataModule, read_volume, read_volume_manifest
from medsynth.errors import DataError
from medsynth.io import read_itk_volume
from tests.integration.test_console_refusals import medsynth
from tests.unit.test_volume_units import ct_phantom

ROOT = Path(__file__).resolve().parents[2]
AE = ["--config", str(ROOT / "configs/ae3d.yaml"), "--config", str(ROOT / "configs/tests/tiny_ae3d.yaml"),
      "--data.normalization", "ct"]
# an oblique scanner geometry (LPS, as DICOM stores it): a rotation about the patient's long axis
DIRECTION = (np.cos(0.3), -np.sin(0.3), 0.0, np.sin(0.3), np.cos(0.3), 0.0, 0.0, 0.0, 1.0)


def ct_image(seed: int = 0, shape=(16, 16, 16)) -> sitk.Image:
    """A CT phantom in HU as an int16 SimpleITK image with 0.8 x 0.9 x 1.5 mm voxels and an oblique direction."""
    hu = np.round(ct_phantom(shape, seed)).astype(np.int16)  # (X, Y, Z)
    image = sitk.GetImageFromArray(np.ascontiguousarray(hu.transpose(2, 1, 0)))  # SimpleITK arrays are (Z, Y, X)
    image.SetSpacing((0.8, 0.9, 1.5))
    image.SetOrigin((-10.0, 25.0, 40.0))
    image.SetDirection(DIRECTION)
    return image


def write_dicom_series(image: sitk.Image, folder: Path, series_uid: str) -> Path:
    """One DICOM file per slice, as a scanner exports a CT series (positions, orientation, one series UID).

    GDCM sets the process's locale to "C" when it writes; it is put back, or every later test would read and write
    text as ASCII."""
    kept = locale.setlocale(locale.LC_ALL)
    try:
        return _write_dicom_series(image, folder, series_uid)
    finally:
        locale.setlocale(locale.LC_ALL, kept)


def _write_dicom_series(image: sitk.Image, folder: Path, series_uid: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetImageIO("GDCMImageIO")  # the files have no suffix to tell the format
    d = image.GetDirection()
    for k in range(image.GetDepth()):
        slice_ = image[:, :, k]
        for tag, value in (("0008|0060", "CT"), ("0020|000d", "1.2.826.0.1.3680043.2.1125.1"),
                           ("0020|000e", series_uid), ("0008|0018", f"{series_uid}.{k + 1}"),
                           ("0020|0037", "\\".join(f"{v:.6f}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))),
                           ("0020|0032", "\\".join(f"{v:.6f}" for v in image.TransformIndexToPhysicalPoint((0, 0, k)))),
                           ("0020|0013", str(k + 1)), ("0028|1052", "0"), ("0028|1053", "1")):
            slice_.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"IM{k:04d}"))  # scanners often write no suffix
        writer.Execute(slice_)
    return folder


@pytest.fixture
def scans(tmp_path):
    """Three CT phantoms, each as a DICOM series folder, NIfTI, NRRD and MetaImage, with a manifest per format."""
    root = tmp_path / "scans"
    for i, name in enumerate(("a", "b", "c")):
        image = ct_image(seed=i)
        write_dicom_series(image, root / "dicom" / name, f"1.2.826.0.1.3680043.2.1125.1.{i + 1}")
        for suffix in (".nii.gz", ".nrrd", ".mha"):
            (root / suffix.strip(".")).mkdir(parents=True, exist_ok=True)
            sitk.WriteImage(image, str(root / suffix.strip(".") / f"{name}{suffix}"))
    splits = {"a": "train", "b": "train", "c": "val"}
    manifests = {}
    for fmt, suffix in (("dicom", ""), ("nii.gz", ".nii.gz"), ("nrrd", ".nrrd"), ("mha", ".mha")):
        manifests[fmt] = root / f"{fmt}.json"
        manifests[fmt].write_text(json.dumps([{"image": f"{fmt}/{n}{suffix}", "split": s} for n, s in splits.items()]))
    return root, manifests


def test_dicom_nrrd_and_metaimage_read_as_the_same_volume_in_nifti(scans):
    root, _ = scans
    nifti, nifti_affine = read_volume(root / "nii.gz" / "a.nii.gz")
    assert nifti.min() == -1000 and nifti.max() == 700  # HU
    for path in (root / "dicom" / "a", root / "nrrd" / "a.nrrd", root / "mha" / "a.mha"):
        data, affine = read_volume(path)
        assert data.dtype == np.float32 and data.shape == nifti.shape, path
        np.testing.assert_array_equal(data, nifti)
        np.testing.assert_allclose(affine, nifti_affine, atol=1e-4)
    # and NIfTI read by nibabel agrees with SimpleITK's geometry: RAS, 0.8 x 0.9 x 1.5 mm
    np.testing.assert_allclose(np.linalg.norm(nifti_affine[:3, :3], axis=0), [0.8, 0.9, 1.5], atol=1e-5)


def test_folder_maps_list_dicom_series_folders_and_itk_files(scans, tmp_path):
    root, _ = scans
    mixed = tmp_path / "mixed"
    shutil.copytree(root / "dicom" / "a", mixed / "series_1.2.840.1")  # a UID-like folder name keeps its dots
    shutil.copy(root / "nrrd" / "b.nrrd", mixed / "b.nrrd")
    shutil.copy(root / "mha" / "c.mha", mixed / "c.mha")
    (mixed / "README.txt").write_text("not a volume")  # other files in a class folder are not volumes
    (tmp_path / "m.json").write_text(json.dumps({"0": "mixed"}))
    records = read_volume_manifest(tmp_path / "m.json")
    assert [(r.name, r.image.name, r.label) for r in records] == [("b", "b.nrrd", 0), ("c", "c.mha", 0),
                                                                   ("series_1.2.840.1", "series_1.2.840.1", 0)]


def test_a_dicom_series_trains_and_reconstructs_like_the_same_volumes_as_nifti(scans, tmp_path):
    root, manifests = scans
    outputs = {}
    for fmt in ("dicom", "nii.gz"):
        run, out = tmp_path / f"run_{fmt}", tmp_path / f"recon_{fmt}"
        main(["fit", *AE, "--data.manifest", str(manifests[fmt]), "--trainer.max_steps", "2",
              "--trainer.default_root_dir", str(run), "--seed_everything", "7"])
        main(["predict", *AE, "--ckpt_path", str(run / "checkpoints" / "last.ckpt"), "--data.manifest",
              str(manifests[fmt]), "--output_dir", str(out)])
        outputs[fmt] = {n: nib.load(out / f"{n}.nii.gz") for n in ("a", "b", "c")}  # outputs stay NIfTI
    for name in ("a", "b", "c"):
        dicom, nifti = outputs["dicom"][name], outputs["nii.gz"][name]
        np.testing.assert_allclose(dicom.affine, nifti.affine, atol=1e-4)
        np.testing.assert_allclose(dicom.get_fdata(), nifti.get_fdata(), atol=1e-3)  # same data, same training
        assert -1000 <= dicom.get_fdata().min() and dicom.get_fdata().max() <= 1000  # HU


# ---------------------------------------------------------------------------------------------------- refusals
def missing_slice(series: Path) -> str:
    (series / "IM0007").unlink()
    return "missing slice"


def mixed_series(series: Path) -> str:
    other = write_dicom_series(ct_image(seed=5), series.parent / "other", "1.2.826.0.1.3680043.2.1125.9.9")
    shutil.copy(other / "IM0003", series / "XX0003")
    return "series"


def non_dicom_file(series: Path) -> str:
    (series / "notes.txt").write_text("scanned on Tuesday")
    return "notes.txt, which is not a DICOM file"


def duplicate_slice(series: Path) -> str:
    shutil.copy(series / "IM0004", series / "IM0004_copy")
    return "one position"


BROKEN = [missing_slice, mixed_series, non_dicom_file, duplicate_slice]


@pytest.mark.parametrize("break_series", BROKEN, ids=lambda f: f.__name__)
def test_a_broken_series_is_refused_in_one_line_naming_its_folder(scans, break_series, tmp_path, capsys):
    root, manifests = scans
    series = root / "dicom" / "b"
    expected = break_series(series)
    with pytest.raises(DataError, match=expected) as err:
        read_volume(series)
    assert str(err.value).startswith(f"{series}: ") and "\n" not in str(err.value)
    run = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *AE, "--data.manifest", str(manifests["dicom"]), "--trainer.default_root_dir", str(run)])
    err_lines = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and len(err_lines) == 1, err_lines
    assert err_lines[0].startswith(f"medsynth: error: {series}: ") and expected in err_lines[0]
    assert not run.exists()


def test_the_installed_command_refuses_a_broken_series_in_one_line(scans, tmp_path):
    root, manifests = scans
    series = root / "dicom" / "c"
    missing_slice(series)
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    result = medsynth("fit", *AE, "--data.manifest", manifests["dicom"], "--trainer.default_root_dir",
                      tmp_path / "run", cwd=tmp_path)
    err = result.stderr.strip().splitlines()
    assert result.returncode == 2 and len(err) == 1, result.stderr
    assert err[0].startswith(f"medsynth: error: {series}: ") and "missing slice" in err[0]
    assert result.stdout == "" and sorted(str(p) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("problem", ["truncated_nrrd", "truncated_mha", "nifti_named_mha", "empty_folder",
                                     "one_slice"])
def test_bad_itk_files_and_folders_are_one_line_naming_them(tmp_path, problem, capfd):
    if problem.startswith("truncated"):
        path = tmp_path / f"x.{problem[-4:].strip('_')}"
        sitk.WriteImage(ct_image(), str(path))
        path.write_bytes(path.read_bytes()[:-1000])
        # the format library's own reason, not ITK's source file and object address
        expected = "fread got only" if path.suffix == ".nrrd" else "data not read completely"
    elif problem == "nifti_named_mha":
        path = tmp_path / "x.mha"
        sitk.WriteImage(ct_image(), str(tmp_path / "x.nii"))
        (tmp_path / "x.nii").rename(path)
        expected = "is named .mha but its content is nifti"
    elif problem == "empty_folder":
        path = tmp_path / "series"
        path.mkdir()
        expected = "holds no files"
    else:
        path = write_dicom_series(ct_image()[:, :, :1], tmp_path / "series", "1.2.3.4")
        expected = "one slice"
    capfd.readouterr()
    with pytest.raises(DataError, match=expected) as err:
        read_volume(path)
    assert str(err.value).startswith(f"{path}: ") and "\n" not in str(err.value)
    assert capfd.readouterr() == ("", "")  # what ITK and MetaIO print is held back


def test_resampling_applies_to_dicom_as_to_nifti(scans):
    root, manifests = scans
    items = {}
    for fmt in ("dicom", "nii.gz"):
        dm = VolumeDataModule(manifest=manifests[fmt], normalization="ct", patch_size=8, num_workers=0,
                              target_spacing=[1.5, 1.5, 1.5], canonical=True)
        dm.setup("predict")
        items[fmt] = dm.datasets["predict"][0]
    np.testing.assert_allclose(items["dicom"]["affine"], items["nii.gz"]["affine"], atol=1e-4)
    np.testing.assert_allclose(items["dicom"]["image"], items["nii.gz"]["image"], atol=1e-5)
    assert nib.aff2axcodes(items["dicom"]["affine"].numpy()) == ("R", "A", "S")


def test_reading_a_series_keeps_the_process_locale(tmp_path):
    """GDCM sets the C locale while it works; after medsynth reads a series, Python still reads and writes text in
    the user's encoding (a later config.yaml or report.md with a non-ASCII path would fail otherwise)."""
    folder = write_dicom_series(ct_image(), tmp_path / "series", "1.2.826.0.1.3680043.2.1125.9")
    before = locale.setlocale(locale.LC_CTYPE)
    read_itk_volume(folder)
    assert locale.setlocale(locale.LC_CTYPE) == before
