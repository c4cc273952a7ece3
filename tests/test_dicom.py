"""DICOM input (data.dicom) and DICOM SEG output (dicomseg), on series written here with
pydicom: small synthetic arrays in the fast lane, a real kaggle_3m patient in the slow one."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_helpers import (
    AXIAL,
    PATIENT_ID,
    PATIENT_NAME,
    Study,
    sample_grid,
    smooth,
    tilted,
    write_enhanced,
    write_series,
)

from tumorseg.data.dicom import (
    MAX_BYTES,
    classify_series,
    is_dicom_input,
    read_dicom_patients,
    read_dicom_seg_label,
    skip_reason,
)
from tumorseg.data.nifti import write_nifti
from tumorseg.data.resample import resample_to_grid
from tumorseg.dicomseg import seg_description, write_dicom_seg, write_patient_seg
from tumorseg.errors import DataError

SHAPE = (6, 12, 10)  # slices, rows, columns


def _volume(seed: int = 0, offset: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, SHAPE) + offset


def _no_identity(text: str) -> None:
    assert PATIENT_NAME not in text and "Doe" not in text and PATIENT_ID not in text


def _error(folder: Path, **kwargs) -> str:
    with pytest.raises(DataError) as e:
        read_dicom_patients(folder, **kwargs)
    _no_identity(str(e.value))
    return str(e.value)


# ---------------------------------------------------------------------- pure parts

@pytest.mark.parametrize(("description", "agent", "role"), [
    ("AX FLAIR", False, "FLAIR"),
    ("t2_tirm_tra_dark-fluid", False, "FLAIR"),
    ("AX T2 FLAIR POST", True, "FLAIR"),
    ("BraTS T2F", False, "FLAIR"),
    ("AX T1 FLAIR", False, "T1"),  # a T1-weighted FLAIR is a T1
    ("AX T1 SE", False, "T1"),
    ("AX T1 SE", True, "T1c"),  # told apart by ContrastBolusAgent alone
    ("T1 PRE", True, "T1"),  # the words win over a filled-in agent
    ("AX T1+C", False, "T1c"),
    ("T1c", False, "T1c"),
    ("t1_mprage_tra POST GAD", False, "T1c"),
    ("MPRAGE", False, "T1"),
    ("SAG T1 C+", False, "T1c"),
    ("AX T2 FSE", False, None),
    ("DWI b1000", False, None),
    ("T12 something", False, None),
])
def test_series_are_classified_by_their_words_and_contrast_agent(description, agent, role):
    assert classify_series(description, "", agent) == role


@pytest.mark.parametrize(("image_type", "skipped"), [
    (("ORIGINAL", "PRIMARY", "M", "ND"), False),
    (("ORIGINAL", "PRIMARY", "LOCALIZER"), True),
    (("DERIVED", "SECONDARY", "MPR"), True),
    (("DERIVED", "SECONDARY"), True),
    (("DERIVED", "PRIMARY", "M", "ND", "NORM"), False),
])
def test_localizers_and_reformats_are_recognised_by_image_type(image_type, skipped):
    assert (skip_reason(image_type) is not None) == skipped


def test_resample_to_grid_by_hand():
    vol = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    eye = np.eye(4)
    assert np.array_equal(resample_to_grid(vol, eye, vol.shape, eye), vol)
    shifted = eye.copy()
    shifted[:3, 3] = (0, 1, 0)  # destination voxel j sits at source j + 1
    out = resample_to_grid(vol, eye, (2, 2, 4), shifted)
    assert np.array_equal(out, vol[:, 1:])
    half = eye.copy()
    half[2, 3] = 0.5  # halfway between columns: the mean of neighbours
    out = resample_to_grid(vol, eye, (2, 3, 3), half)
    assert np.allclose(out, (vol[..., :-1] + vol[..., 1:]) / 2)
    outside = eye.copy()
    outside[0, 3] = 5
    assert np.array_equal(resample_to_grid(vol, eye, vol.shape, outside, cval=-1), np.full(vol.shape, -1))
    near = eye.copy()
    near[2, 3] = 0.4  # nearest neighbour: the column before
    assert np.array_equal(resample_to_grid(vol, eye, (2, 3, 3), near, order=0), vol[..., :-1])
    assert np.allclose(resample_to_grid(vol, eye, (2, 3, 3), near), vol[..., :-1] + 0.4)


# ---------------------------------------------------------------------- reading series

def test_an_axial_study_reads_exactly_whatever_the_file_names_and_order(tmp_path):
    study = Study()
    flair, pre, post = _volume(0), _volume(1), _volume(2)
    write_series(tmp_path / "x", flair, study=study, description="AX T2 FLAIR", number=4, slope=2.0, intercept=-3)
    write_series(tmp_path / "x" / "y", pre, study=study, description="AX T1 SE", number=5, names="ordered")
    write_series(tmp_path / "z", post, study=study, description="AX T1 SE", number=6, contrast_agent="GADOBUTROL")
    (tmp_path / "notes").write_text("not DICOM, no suffix\n")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    assert is_dicom_input(tmp_path) and not is_dicom_input(tmp_path / "notes")
    [p] = read_dicom_patients(tmp_path)
    assert p.name.startswith("study-") and len(p.name) == len("study-") + 8
    _no_identity(p.name + p.summary())
    assert p.volume.dtype == np.float32 and p.volume.shape == (*SHAPE, 3)
    assert np.array_equal(p.volume[..., 1], flair * 2.0 - 3)  # RescaleSlope/Intercept applied
    assert np.array_equal(p.volume[..., 0], pre)
    assert np.array_equal(p.volume[..., 2], post)  # T1c told from T1 by ContrastBolusAgent
    assert [(u.role, u.number) for u in p.series] == [("FLAIR", 4), ("T1", 5), ("T1c", 6)]
    assert p.label is None and p.filled == []
    # voxel (column, row, slice) -> RAS: LPS origin (-100, -120, -40) negated in x and y
    assert np.allclose(p.grid.affine, [[-0.94, 0, 0, 100], [0, -0.94, 0, 120], [0, 0, 3, -40], [0, 0, 0, 1]])
    assert p.grid.spacing == pytest.approx((3.0, 0.94, 0.94))
    assert p.grid.voxel_ml == pytest.approx(3 * 0.94 * 0.94 / 1000)


def test_a_dicomdir_export_with_suffixless_files_is_read(tmp_path):
    from pydicom.fileset import FileSet

    study = Study()
    flair = _volume(3)
    paths = write_series(tmp_path / "src", flair, study=study)
    fs = FileSet()
    for path in paths:
        fs.add(path)
    fs.write(tmp_path / "export")
    assert (tmp_path / "export" / "DICOMDIR").is_file()
    assert all("." not in p.name for p in (tmp_path / "export").rglob("*") if p.is_file())
    assert is_dicom_input(tmp_path / "export" / "DICOMDIR")
    [p] = read_dicom_patients(tmp_path / "export" / "DICOMDIR")
    assert np.array_equal(p.volume[..., 1], flair)
    assert p.filled == ["pre-contrast", "post-contrast"]  # filled with FLAIR, as kaggle_3m does
    assert np.array_equal(p.volume[..., 0], flair) and np.array_equal(p.volume[..., 2], flair)


def test_slices_are_sorted_by_position_not_by_instance_number(tmp_path):
    flair = _volume(4)
    # slices written at descending positions: slice 0 of the array is the most superior
    positions = [15.0, 12.0, 9.0, 6.0, 3.0, 0.0]
    write_series(tmp_path, flair, positions=positions)
    [p] = read_dicom_patients(tmp_path)
    assert np.array_equal(p.volume[..., 1], flair[::-1])  # model slice 0 is the most inferior


def test_an_oblique_series_is_read_in_its_own_plane_and_its_mask_stays_on_its_grid(tmp_path):
    flair = _volume(5)
    orientation = tilted(20)
    write_series(tmp_path / "in", flair, orientation=orientation, origin=(-50, -60, -10))
    [p] = read_dicom_patients(tmp_path / "in")
    assert np.array_equal(p.volume[..., 1], flair)  # no interpolation: the tilted slices as they are
    a = np.deg2rad(20)
    col_dir_lps = np.array([0, np.cos(a), np.sin(a)])
    normal_lps = np.cross([1, 0, 0], col_dir_lps)
    flip = np.array([-1, -1, 1])
    assert np.allclose(p.grid.affine[:3, 0], flip * [0.94, 0, 0])
    assert np.allclose(p.grid.affine[:3, 1], flip * 0.94 * col_dir_lps)
    assert np.allclose(p.grid.affine[:3, 2], flip * 3.0 * normal_lps)
    assert np.allclose(p.grid.affine[:3, 3], flip * [-50, -60, -10])
    mask = np.zeros(SHAPE, dtype=bool)
    mask[2, 3:7, 4:6] = True
    nii = write_nifti(tmp_path / "m.nii.gz", mask, p.grid)
    import nibabel as nib

    img = nib.load(nii)
    assert np.allclose(img.affine, p.grid.affine, atol=1e-4)
    assert np.array_equal(np.asarray(img.dataobj).transpose(2, 1, 0) > 0, mask)
    seg = write_patient_seg(tmp_path / "seg.dcm", p, mask)
    ds = pydicom.dcmread(seg)
    sources = {str(s.SOPInstanceUID): s for s in p.flair_sources}
    for frame in ds.PerFrameFunctionalGroupsSequence:
        ref = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        assert np.allclose([float(v) for v in frame.PlanePositionSequence[0].ImagePositionPatient],
                           [float(v) for v in sources[ref].ImagePositionPatient], atol=1e-4)
    orient = ds.SharedFunctionalGroupsSequence[0].PlaneOrientationSequence[0].ImageOrientationPatient
    assert np.allclose([float(v) for v in orient], orientation, atol=1e-6)
    assert np.array_equal(read_dicom_seg_label(seg, p), mask)


def test_a_sagittal_series_is_turned_into_axial_slices(tmp_path):
    # along a row toward posterior, down a column toward inferior: the normal (their cross
    # product) and so the sorted slices run toward the patient's right
    sag = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)
    vol = _volume(6)  # (slices right-ward, rows inferior-ward, columns posterior-ward)
    write_series(tmp_path, vol, orientation=sag, step=1.0, spacing=(2.0, 1.5))
    [p] = read_dicom_patients(tmp_path)
    # model (S, P, L): slice = superior, row = posterior, column = left
    expected = vol[::-1, ::-1, :].transpose(1, 2, 0)
    assert np.array_equal(p.volume[..., 1], expected)
    assert p.grid.spacing == pytest.approx((2.0, 1.5, 1.0))
    mask = np.random.default_rng(0).random(expected.shape) > 0.7
    back = p.to_source(mask)
    assert back.shape == SHAPE and np.array_equal(p.from_source(back), mask)
    assert np.array_equal(back, mask.transpose(2, 0, 1)[::-1, ::-1, :])


def test_multiframe_enhanced_mr_reads_like_single_frames_and_its_seg_round_trips(tmp_path):
    study = Study()
    flair = _volume(7)
    write_enhanced(tmp_path / "mf", flair, study=study, slope=0.5, intercept=10)  # frames in reverse slice order
    [p] = read_dicom_patients(tmp_path)
    assert np.array_equal(p.volume[..., 1], flair * 0.5 + 10)
    assert len(p.flair_sources) == 1 and list(p.source_index) == list(range(len(flair)))[::-1]
    mask = np.zeros(SHAPE, dtype=bool)
    mask[1, 2:5, 3:8] = True
    mask[4, 0, 0] = True
    seg = write_patient_seg(tmp_path / "out" / "seg.dcm", p, mask)
    assert np.array_equal(read_dicom_seg_label(seg, p), mask)
    ds = pydicom.dcmread(seg)
    frames = ds.pixel_array.reshape(-1, *SHAPE[1:]).astype(bool)
    src = pydicom.dcmread(tmp_path / "mf", stop_before_pixels=True)
    for f, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        ref = item.DerivationImageSequence[0].SourceImageSequence[0]
        n = int(ref.ReferencedFrameNumber) - 1
        src_ipp = src.PerFrameFunctionalGroupsSequence[n].PlanePositionSequence[0].ImagePositionPatient
        assert [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient] == pytest.approx(
            [float(v) for v in src_ipp])
        slice_k = len(flair) - 1 - n  # frame n holds slice len-1-n
        assert np.array_equal(frames[f], mask[slice_k])


def test_a_dicom_seg_round_trips_through_highdicom_and_pydicom(tmp_path):
    flair = _volume(8)
    write_series(tmp_path / "in", flair)
    [p] = read_dicom_patients(tmp_path / "in")
    rng = np.random.default_rng(1)
    mask = rng.random(SHAPE) > 0.6
    mask[3] = False  # an empty slice keeps its frame
    qc = {"qc": "review", "qc_reason": "unusual volume"}
    seg = write_patient_seg(tmp_path / "out" / "p_seg.dcm", p, mask, qc=qc)
    assert np.array_equal(read_dicom_seg_label(seg, p), mask)
    # pydicom alone: one frame per source image, referencing it and carrying its position
    ds = pydicom.dcmread(seg)
    assert ds.Modality == "SEG" and ds.SegmentationType == "BINARY"
    assert ds.SeriesDescription == "tumorseg FLAIR abnormality [REVIEW]"
    assert ds.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"  # Neoplasm
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == p.series[0].uid
    sources = {str(s.SOPInstanceUID): k for k, s in enumerate(p.flair_sources)}
    frames = ds.pixel_array.reshape(-1, *SHAPE[1:]).astype(bool)
    assert len(frames) == len(sources)
    in_source_order = p.to_source(mask)
    seen = set()
    for f, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        k = sources[uid]
        seen.add(uid)
        assert [float(v) for v in item.PlanePositionSequence[0].ImagePositionPatient] == pytest.approx(
            [float(v) for v in p.flair_sources[k].ImagePositionPatient])
        assert np.array_equal(frames[f], in_source_order[k])
    assert seen == set(sources)
    sidecar = json.loads((tmp_path / "out" / "p_seg.json").read_text())
    assert sidecar["qc"] == "review" and sidecar["qc_reason"] == "unusual volume"
    assert sidecar["sop_instance_uid"] == ds.SOPInstanceUID
    _no_identity(json.dumps(sidecar))
    assert not [f for f in (tmp_path / "out").iterdir() if f.name.startswith(".")]  # atomic: no temporary left


def test_seg_description_and_mask_shape_checks(tmp_path):
    assert seg_description("tumorseg FLAIR abnormality", None) == "tumorseg FLAIR abnormality"
    assert seg_description("tumorseg FLAIR abnormality", {"qc": "ok"}) == "tumorseg FLAIR abnormality"
    assert seg_description("x", {"qc": "review"}) == "x [REVIEW]"
    write_series(tmp_path / "in", _volume(9))
    [p] = read_dicom_patients(tmp_path / "in")
    with pytest.raises(DataError, match=r"mask of shape \(5, 12, 10\).*expected \(6, 12, 10\)"):
        write_dicom_seg(tmp_path / "s.dcm", np.zeros((5, 12, 10), bool), p.flair_sources)
    assert not (tmp_path / "s.dcm").exists()


# ---------------------------------------------------------------------- refusals

def test_a_missing_slice_is_refused_naming_the_series(tmp_path):
    paths = write_series(tmp_path, _volume(10), description="AX FLAIR FS", number=3)
    paths[2].unlink()
    msg = _error(tmp_path)
    assert 'series "AX FLAIR FS" (number 3) misses slices' in msg and "6.00 mm" in msg and "\n" not in msg


def test_mixed_orientations_are_refused(tmp_path):
    orientations = [AXIAL] * 5 + [tilted(10)]
    write_series(tmp_path, _volume(11), orientations=orientations)
    msg = _error(tmp_path)
    assert 'series "AX FLAIR" (number 1) mixes slice orientations' in msg


def test_uneven_spacing_and_several_images_at_one_position_are_refused(tmp_path):
    write_series(tmp_path / "a", _volume(12), positions=[0, 3, 6, 9, 13, 16])
    assert "uneven slice spacing" in _error(tmp_path / "a")
    write_series(tmp_path / "b", _volume(12), positions=[0, 3, 3, 6, 9, 12])
    assert "several images at one position" in _error(tmp_path / "b")


def test_images_of_different_sizes_are_refused(tmp_path):
    study = Study()
    uid = pydicom.uid.generate_uid()
    write_series(tmp_path, _volume(13)[:3], study=study, series_uid=uid)
    write_series(tmp_path, np.zeros((3, 8, 10)), study=study, series_uid=uid, positions=[9, 12, 15], seed=1)
    assert "images of different sizes" in _error(tmp_path)


def test_images_of_different_pixel_spacings_are_refused(tmp_path):
    study = Study()
    uid = pydicom.uid.generate_uid()
    write_series(tmp_path, _volume(13)[:3], study=study, series_uid=uid, description="AX FLAIR", number=7)
    write_series(tmp_path, _volume(13)[3:], study=study, series_uid=uid, positions=[9, 12, 15], seed=1,
                 spacing=(0.9, 0.9), description="AX FLAIR", number=7)
    assert 'series "AX FLAIR" (number 7) has images of different pixel spacings' in _error(tmp_path)


def test_localizers_are_skipped(tmp_path, caplog):
    study = Study()
    flair = _volume(14)
    write_series(tmp_path, flair, study=study, number=2)
    write_series(tmp_path, _volume(15)[:3], study=study, description="FLAIR localizer", number=1, seed=3,
                 image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), orientations=[AXIAL, tilted(90), AXIAL])
    write_series(tmp_path, _volume(16), study=study, description="AX FLAIR MPR", number=9, seed=4,
                 image_type=("DERIVED", "SECONDARY", "MPR"))
    with caplog.at_level(logging.DEBUG, logger="tumorseg"):
        [p] = read_dicom_patients(tmp_path)
    assert np.array_equal(p.volume[..., 1], flair)
    assert "LOCALIZER" in caplog.text and "MPR" in caplog.text
    _no_identity(caplog.text)


def test_two_studies_in_one_folder_are_two_patients(tmp_path, caplog):
    first, second = Study(), Study(patient_name="Roe^Richard", patient_id="OTHER-ID")
    write_series(tmp_path / "a", _volume(17), study=first)
    write_series(tmp_path / "b", _volume(18), study=second)
    with caplog.at_level(logging.DEBUG, logger="tumorseg"):
        patients = read_dicom_patients(tmp_path)
    assert len(patients) == 2 and len({p.name for p in patients}) == 2
    by_volume = {int(p.volume[0, 0, 0, 1]): p for p in patients}
    assert set(by_volume) == {int(_volume(17)[0, 0, 0]), int(_volume(18)[0, 0, 0])}
    for p in patients:
        assert "Roe" not in p.name and "OTHER" not in p.name
        _no_identity(p.name)
    _no_identity(caplog.text)
    assert "Roe" not in caplog.text


def test_an_ambiguous_flair_is_refused_listing_the_candidates_and_an_override_picks_one(tmp_path):
    study = Study()
    a = write_series(tmp_path, _volume(19), study=study, description="AX FLAIR", number=3)
    b = write_series(tmp_path, _volume(20), study=study, description="COR FLAIR", number=8, seed=5)
    uid_a, uid_b = (str(pydicom.dcmread(x[0]).SeriesInstanceUID) for x in (a, b))
    msg = _error(tmp_path)
    assert "2 candidate FLAIR series" in msg and uid_a in msg and uid_b in msg
    assert '"AX FLAIR" number 3' in msg and '"COR FLAIR" number 8' in msg and "--flair-series UID" in msg
    [p] = read_dicom_patients(tmp_path, series={"FLAIR": uid_b})
    assert np.array_equal(p.volume[..., 1], _volume(20)) and p.series[0].uid == uid_b
    # the override can give a series any role, whatever its description
    [p] = read_dicom_patients(tmp_path, series={"FLAIR": uid_a, "T1c": uid_b})
    assert np.array_equal(p.volume[..., 2], _volume(20)) and p.filled == ["pre-contrast"]
    assert "no series with SeriesInstanceUID 1.2.3" in _error(tmp_path, series={"FLAIR": "1.2.3"})
    assert "unknown series role 'T2'" in _error(tmp_path, series={"T2": uid_a})


def test_no_flair_is_refused_listing_the_series(tmp_path):
    write_series(tmp_path, _volume(21), description="AX T1 SE", number=5)
    msg = _error(tmp_path)
    assert "no FLAIR series" in msg and '"AX T1 SE" number 5' in msg and "--flair-series" in msg


def test_the_memory_limit_is_checked_before_pixel_data_is_read(tmp_path, monkeypatch):
    write_series(tmp_path, _volume(22), description="AX FLAIR", number=2)
    assert MAX_BYTES == 2 * 1024**3
    msg = _error(tmp_path, max_bytes=1000)
    assert 'series "AX FLAIR" (number 2) 12x10x6' in msg and "over the limit" in msg
    assert "TUMORSEG_MAX_DICOM_GB" in msg
    monkeypatch.setenv("TUMORSEG_MAX_DICOM_GB", "1e-6")  # about 1 kB: the same refusal from the environment
    assert "over the limit of 0.00 GiB" in _error(tmp_path)
    monkeypatch.setenv("TUMORSEG_MAX_DICOM_GB", "lots")
    assert "TUMORSEG_MAX_DICOM_GB='lots' is not a positive number of GiB" in _error(tmp_path)


def test_compressed_pixel_data_without_a_decoder_names_the_extra(tmp_path):
    from pydicom.encaps import encapsulate
    from pydicom.pixels import get_decoder
    from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, RLELossless

    paths = write_series(tmp_path / "rle", _volume(23))
    for path in paths:  # RLE: decoded by pydicom itself
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless)
        ds.save_as(path)
    [p] = read_dicom_patients(tmp_path / "rle")
    assert np.array_equal(p.volume[..., 1], _volume(23))
    for syntax, folder in ((JPEGLosslessSV1, "jpegls"), (JPEG2000Lossless, "j2k")):
        for path in write_series(tmp_path / folder, _volume(23)):
            ds = pydicom.dcmread(path)
            ds.file_meta.TransferSyntaxUID = syntax
            ds.PixelData = encapsulate([b"\xff\xd8\xff not a real codestream"])
            ds["PixelData"].VR = "OB"
            ds.save_as(path)
    extra = "pip install 'tumorseg[dicom-compressed]'"
    if not get_decoder(JPEGLosslessSV1).is_available:  # no pylibjpeg/gdcm here: the extra is named
        msg = _error(tmp_path / "jpegls")
        assert f"no decoder installed for its {JPEGLosslessSV1.name} pixel data" in msg and extra in msg
    msg = _error(tmp_path / "j2k")  # a decoder may exist (Pillow), but the data is damaged
    assert JPEG2000Lossless.name in msg and extra in msg


def test_non_dicom_folders_are_not_dicom_input(tmp_path):
    (tmp_path / "a.tif").write_bytes(b"II*\x00")
    (tmp_path / "x").write_text("hello")
    assert not is_dicom_input(tmp_path)
    assert not is_dicom_input(tmp_path / "missing")
    with pytest.raises(DataError, match="holds no DICOM MR image series"):
        read_dicom_patients(tmp_path)


# ---------------------------------------------------------------------- grids

def test_t1_on_a_1mm_grid_is_resampled_onto_a_5mm_flair_grid(tmp_path, caplog):
    study = Study()
    flair_shape = (6, 20, 20)
    origin = (-20.0, -20.0, -12.0)
    f_pos = sample_grid(flair_shape, AXIAL, origin, (2.0, 2.0), 5.0)
    write_series(tmp_path / "f", np.round(smooth(f_pos)), study=study, origin=origin, spacing=(2.0, 2.0), step=5.0)
    t1_shape, t1_origin = (36, 44, 44), (-22.0, -22.0, -14.0)  # 1 mm isotropic, a little larger
    t1_pos = sample_grid(t1_shape, AXIAL, t1_origin, (1.0, 1.0), 1.0)
    write_series(tmp_path / "t", np.round(smooth(t1_pos)), study=study, origin=t1_origin, spacing=(1.0, 1.0),
                 step=1.0, description="AX T1 3D PRE", number=2)
    with caplog.at_level(logging.WARNING, logger="tumorseg"):
        [p] = read_dicom_patients(tmp_path)
    assert caplog.text.count("resampled onto the FLAIR grid") == 1
    assert p.series[1].role == "T1" and p.series[1].resampled
    truth = smooth(f_pos)
    assert np.abs(p.volume[..., 0] - truth).max() < 3.0  # values 100..900; rounding 0.5 + interpolation
    assert np.abs(p.volume[..., 1] - np.round(truth)).max() == 0


# ---------------------------------------------------------------------- a real patient

CHANNEL_SERIES = [("AX T1 PRE", None, 3), ("AX T2 FLAIR", None, 4), ("AX T1 POST", "GADOLINIUM", 5)]


def _real_patient(real_data: Path):
    from tumorseg.data.kaggle import find_patient_dirs, read_patient

    for d in find_patient_dirs(real_data):
        _, images, masks = read_patient(d)
        if masks is not None and masks.sum() > 2000:
            return images, masks
    pytest.skip("no patient with a tumour in the real data")


def _write_real(folder: Path, images: np.ndarray) -> None:
    study = Study()
    for c, (description, agent, number) in enumerate(CHANNEL_SERIES):
        write_series(folder / description.replace(" ", "_"), images[..., c], study=study, description=description,
                     number=number, contrast_agent=agent, spacing=(0.94, 0.94), step=3.0, seed=c,
                     origin=(-120.0, -120.0, -60.0))


@pytest.mark.slow
@pytest.mark.realdata
def test_a_real_patient_reads_back_exactly_from_dicom(real_data, tmp_path):
    images, _ = _real_patient(real_data)
    _write_real(tmp_path, images)
    [p] = read_dicom_patients(tmp_path)
    assert p.volume.shape == images.shape
    assert np.array_equal(p.volume, images.astype(np.float32))
    assert [u.role for u in p.series] == ["FLAIR", "T1", "T1c"] and not any(u.resampled for u in p.series)


@pytest.mark.slow
@pytest.mark.realdata
def test_the_dicom_route_predicts_the_tiff_route_mask(real_data, tmp_path):
    from tumorseg.data.nifti import to_training_scale
    from tumorseg.inference import Predictor

    images, _ = _real_patient(real_data)
    _write_real(tmp_path / "dcm", images)
    [p] = read_dicom_patients(tmp_path / "dcm")
    predictor = Predictor.from_checkpoints(None, engine="openvino", precision="fp32")
    tiff_mask = predictor.segment(images).mask
    volume, resampled = to_training_scale(p)
    assert resampled is None  # 0.94 mm: the training scale
    dicom_mask = predictor.segment(volume).mask
    assert tiff_mask.sum() > 500  # a patient with a tumour the model finds
    dice = 2 * int((tiff_mask & dicom_mask).sum()) / (int(tiff_mask.sum()) + int(dicom_mask.sum()))
    assert dice >= 0.99
    seg = write_patient_seg(tmp_path / "seg.dcm", p, dicom_mask)
    assert np.array_equal(read_dicom_seg_label(seg, p), dicom_mask)


# --------------------------------------------------------------------------- predict and evaluate


def _box_study(folder: Path) -> np.ndarray:
    """A one-series study whose FLAIR is 1000 inside a box and 0 elsewhere; the box (model layout)."""
    flair = np.zeros(SHAPE, dtype=np.int64)
    flair[2:4, 3:8, 2:6] = 1000
    write_series(folder, flair, description="AX T2 FLAIR")
    return flair > 0


def test_predict_writes_a_dicom_seg_of_the_mask_and_evaluate_scores_against_a_seg_or_nifti_label(tmp_path):
    from test_prediction import flair_predictor

    from tumorseg.data.cache import dicom_source, prepare
    from tumorseg.data.inputs import find_inputs
    from tumorseg.evaluation import evaluate
    from tumorseg.prediction import predict

    box = _box_study(tmp_path / "study")
    (ref,) = find_inputs([tmp_path / "study"])
    assert ref.kind == "dicom" and ref.name.startswith("study-")
    (summary,) = predict([tmp_path / "study"], tmp_path / "out", predictor=flair_predictor(), show_progress=False)
    assert summary.tumour_pixels == int(box.sum())
    assert summary.volume_ml == pytest.approx(box.sum() * 3 * 0.94 ** 2 / 1e3)
    assert 'FLAIR: "AX T2 FLAIR" (1)' in summary.notes
    folder = tmp_path / "out" / ref.name
    seg, nifti = folder / f"{ref.name}_seg.dcm", folder / f"{ref.name}_pred.nii.gz"
    assert seg.is_file() and nifti.is_file()
    patient = read_dicom_patients(tmp_path / "study")[0]
    assert np.array_equal(read_dicom_seg_label(seg, patient), box)  # the SEG holds the predicted mask

    # The SEG as the label of the same study: Dice 1; a NIfTI label on the FLAIR's grid too.
    label = tmp_path / "label.nii.gz"
    write_nifti(label, box, patient.grid)
    for truth in (seg, label):
        cache = prepare(tmp_path / "study", tmp_path / f"cache-{truth.name}",
                        sources=[dicom_source(tmp_path / "study", truth)], progress=False)
        report = evaluate(cache, tmp_path / f"report-{truth.name}", predictor=flair_predictor(), show_progress=False,
                          plots=False)
        assert report["patients"][0]["dice"] == 1.0 and report["patients"][0]["true_voxels"] == int(box.sum())


def test_evaluate_refuses_a_dicom_study_without_its_label(tmp_path):
    from tumorseg.errors import TumorsegError
    from tumorseg.evaluation import evaluate_data

    _box_study(tmp_path / "study")
    with pytest.raises(TumorsegError, match="--dicom DIR and --label SEG_OR_NIFTI go together"):
        evaluate_data(tmp_path / "report", dicom=tmp_path / "study")


def test_convert_writes_a_dicom_study_as_a_nifti_patient_that_reads_back_the_same(tmp_path, capsys):
    from tumorseg.cli import main
    from tumorseg.data.nifti import find_sequences, read_nifti_patient

    study = Study()
    flair, pre = _volume(0), _volume(1)
    write_series(tmp_path / "in" / "a", flair, study=study, description="AX FLAIR", number=2)
    write_series(tmp_path / "in" / "b", pre, study=study, description="AX T1", number=3)
    assert main(["convert", str(tmp_path / "in"), "--out", str(tmp_path / "out")]) == 0
    (patient,) = read_dicom_patients(tmp_path / "in")
    written = sorted(p.name for p in (tmp_path / "out" / patient.name).iterdir())
    assert written == [f"{patient.name}_flair.nii.gz", f"{patient.name}_t1.nii.gz"]  # no T1c series: none written
    back = read_nifti_patient(find_sequences(tmp_path / "out" / patient.name))
    assert np.array_equal(back.volume, patient.volume) and np.allclose(back.grid.affine, patient.grid.affine)
    assert "1 patients written to" in capsys.readouterr().out
