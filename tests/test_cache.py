"""The decoded cache: contents, statistics, incremental refresh, and failure safety."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import write_rgb

from tumorseg.data.cache import (
    CACHE_VERSION,
    MANIFEST,
    default_cache_dir,
    open_cache,
    open_data,
    prepare,
    volume_percentiles,
)
from tumorseg.errors import DataError

OLD_NS = 1_000_000_000 * 10**9  # 2001-09-09, an mtime no freshly written file has


def npy_files(cache_root: Path) -> list[Path]:
    return sorted((cache_root / "patients").rglob("*.npy"))


def age_npy_files(cache_root: Path) -> None:
    """Stamp every cached array with an old mtime, so that a rewrite is visible."""
    for p in npy_files(cache_root):
        os.utime(p, ns=(OLD_NS, OLD_NS))


def rewritten(cache_root: Path) -> set[str]:
    """Patients with an array whose mtime is no longer the old stamp."""
    return {p.parent.name for p in npy_files(cache_root) if p.stat().st_mtime_ns != OLD_NS}


def temporaries(root: Path) -> list[str]:
    return [name for _, _, files in os.walk(root) for name in files if name.endswith(".tmp")]


def test_prepare_writes_manifest_and_arrays(kaggle, tmp_path):
    out = tmp_path / "cache"
    cache = prepare(kaggle.root, out, progress=False)
    assert cache.root == out and cache.patients == kaggle.patients
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["version"] == CACHE_VERSION
    assert manifest["source"] == str(kaggle.root.resolve())
    assert manifest["percentiles"] == [10.0, 99.0]
    assert [r["patient"] for r in manifest["patients"]] == kaggle.patients
    assert [p.relative_to(out).as_posix() for p in npy_files(out)] == [
        f"patients/{p}/{a}.npy" for p in kaggle.patients for a in ("images", "masks")]
    assert temporaries(out) == []


def test_cached_values_round_trip_exactly(kaggle, tmp_path):
    cache = prepare(kaggle.root, tmp_path / "cache", progress=False)
    for p in kaggle.patients:
        images, masks = cache.images(p), cache.masks(p)
        assert images.dtype == np.uint8 and masks.dtype == np.uint8
        assert np.array_equal(images, kaggle.images[p])
        assert np.array_equal(masks, kaggle.masks[p])
        rec = cache.records[p]
        assert rec.slices == kaggle.slices[p]
        assert (rec.height, rec.width, rec.has_masks) == (32, 32, True)
        assert rec.tumour_pixels == int(kaggle.masks[p].sum())
        assert rec.tumour_slices == int((kaggle.masks[p].reshape(len(masks), -1).max(1)).sum())
    # PAT_A: tumour on slices 2, 4, ..., 12 (indices 1, 3, ..., 11).
    assert cache.records["PAT_A_2001"].tumour_slices == 6


def test_percentiles_match_numpy_per_channel(kaggle, tmp_path):
    cache = prepare(kaggle.root, tmp_path / "cache", progress=False)
    for p in kaggle.patients:
        vol = kaggle.images[p]
        rec = cache.records[p]
        assert rec.low == [float(np.percentile(vol[..., c], 10)) for c in range(3)]
        assert rec.high == [float(np.percentile(vol[..., c], 99)) for c in range(3)]


def test_volume_percentiles_by_hand():
    # Channel 0 holds 0..10 (11 values): 10th percentile 1.0, 99th 9.9; channel 1 is 7s.
    images = np.zeros((11, 1, 1, 2), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(11)
    images[:, 0, 0, 1] = 7
    low, high = volume_percentiles(images)
    assert low == pytest.approx([1.0, 7.0]) and high == pytest.approx([9.9, 7.0])


def test_metadata_is_kept(kaggle, tmp_path):
    cache = prepare(kaggle.root, tmp_path / "cache", progress=False)
    assert cache.metadata["PAT_A_2001"]["RNASeqCluster"] == "1"
    assert sorted(cache.metadata) == kaggle.patients


def test_rerunning_prepare_is_a_no_op(kaggle, tmp_path):
    out = tmp_path / "cache"
    prepare(kaggle.root, out, progress=False)
    age_npy_files(out)
    os.utime(out / MANIFEST, ns=(OLD_NS, OLD_NS))
    cache = prepare(kaggle.root, out, progress=False)
    assert rewritten(out) == set()
    assert (out / MANIFEST).stat().st_mtime_ns == OLD_NS
    assert cache.patients == kaggle.patients


def test_touching_one_file_redecodes_only_that_patient(kaggle, tmp_path):
    out = tmp_path / "cache"
    prepare(kaggle.root, out, progress=False)
    age_npy_files(out)
    path = kaggle.image_path("PAT_B_2002", 3)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))
    prepare(kaggle.root, out, progress=False)
    assert rewritten(out) == {"PAT_B_2002"}


def test_changing_one_file_updates_its_patient(kaggle, tmp_path):
    out = tmp_path / "cache"
    prepare(kaggle.root, out, progress=False)
    age_npy_files(out)
    new = np.full((32, 32, 3), 200, dtype=np.uint8)
    path = kaggle.image_path("PAT_C_2003", 4)
    write_rgb(path, new)
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 5_000_000_000))  # coarse clocks
    cache = prepare(kaggle.root, out, progress=False)
    assert rewritten(out) == {"PAT_C_2003"}
    expected = kaggle.images["PAT_C_2003"].copy()
    expected[3] = new
    assert np.array_equal(cache.images("PAT_C_2003"), expected)
    assert cache.records["PAT_C_2003"].high == [
        float(np.percentile(expected[..., c], 99)) for c in range(3)]


def test_removing_a_patient_folder_drops_it(kaggle, tmp_path):
    import shutil

    out = tmp_path / "cache"
    prepare(kaggle.root, out, progress=False)
    shutil.rmtree(kaggle.root / "PAT_B_2002")
    cache = prepare(kaggle.root, out, progress=False)
    assert cache.patients == ["PAT_A_2001", "PAT_C_2003"]
    assert not (out / "patients" / "PAT_B_2002").exists()
    assert [r["patient"] for r in json.loads((out / MANIFEST).read_text())["patients"]] == [
        "PAT_A_2001", "PAT_C_2003"]


def test_adding_a_patient_decodes_only_it(make_kaggle, tmp_path):
    data = make_kaggle(patients={"PAT_A_2001": 3, "PAT_B_2002": 2})
    out = tmp_path / "cache"
    prepare(data.root, out, progress=False)
    age_npy_files(out)
    extra = make_kaggle(name="other", patients={"PAT_D_2004": 2}, seed=9)
    (extra.root / "PAT_D_2004").rename(data.root / "PAT_D_2004")
    cache = prepare(data.root, out, progress=False)
    assert rewritten(out) == {"PAT_D_2004"}
    assert np.array_equal(cache.images("PAT_D_2004"), extra.images["PAT_D_2004"])


def test_failure_in_third_patient_keeps_the_first_two(kaggle, tmp_path):
    bad = kaggle.image_path("PAT_C_2003", 2)
    bad.write_bytes(bad.read_bytes()[:200])
    out = tmp_path / "cache"
    with pytest.raises(DataError, match="PAT_C_2003_2.tif: unreadable or truncated image"):
        prepare(kaggle.root, out, progress=False)
    assert temporaries(out) == []
    cache = open_cache(out)
    assert cache.patients == ["PAT_A_2001", "PAT_B_2002"]
    assert np.array_equal(cache.images("PAT_B_2002"), kaggle.images["PAT_B_2002"])
    assert not (out / "patients" / "PAT_C_2003" / "images.npy").exists()
    # After the file is repaired only the missing patient is decoded.
    age_npy_files(out)
    write_rgb(bad, kaggle.images["PAT_C_2003"][1])
    cache = prepare(kaggle.root, out, progress=False)
    assert rewritten(out) == {"PAT_C_2003"}
    assert cache.patients == kaggle.patients


def test_failure_while_writing_leaves_no_temporaries(kaggle, tmp_path, monkeypatch):
    # The 5th array written (PAT_C's images) fails half-way through the write.
    real_save = np.save
    calls = []

    def flaky_save(file, arr, *args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            file.write(b"\x93NUMPY partial")
            raise OSError("disk full")
        return real_save(file, arr, *args, **kwargs)

    monkeypatch.setattr(np, "save", flaky_save)
    out = tmp_path / "cache"
    with pytest.raises(DataError) as e:
        prepare(kaggle.root, out, progress=False)
    assert str(e.value) == (f"cannot write the cache at {out} (disk full); set TUMORSEG_CACHE to a writable "
                            "folder or pass --out to `tumorseg prepare`")
    assert temporaries(out) == []
    assert open_cache(out).patients == ["PAT_A_2001", "PAT_B_2002"]
    assert not (out / "patients" / "PAT_C_2003" / "images.npy").exists()


def test_unlabelled_folder(make_kaggle, tmp_path):
    data = make_kaggle(patients={"PAT_U_1": 2}, strays=False)
    for n in (1, 2):
        data.mask_path("PAT_U_1", n).unlink()
    with pytest.raises(DataError, match="image without its mask"):
        prepare(data.root, tmp_path / "cache", progress=False)
    cache = prepare(data.root, tmp_path / "cache", require_masks=False, progress=False)
    rec = cache.records["PAT_U_1"]
    assert cache.masks("PAT_U_1") is None
    assert (rec.has_masks, rec.tumour_pixels, rec.tumour_slices) == (False, 0, 0)


def test_open_data_on_raw_folder_uses_tumorseg_cache(kaggle, tmp_path, monkeypatch):
    base = tmp_path / "cache-base"
    monkeypatch.setenv("TUMORSEG_CACHE", str(base))
    cache = open_data(kaggle.root, progress=False)
    assert cache.root == default_cache_dir(kaggle.root)
    assert cache.root.parent == base
    assert cache.root.name.startswith("kaggle_3m-") and len(cache.root.name) == len("kaggle_3m-") + 10
    assert cache.patients == kaggle.patients
    # A cache folder is opened as it is.
    again = open_data(cache.root)
    assert again.root == cache.root and again.patients == kaggle.patients


def test_default_cache_dir_differs_by_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TUMORSEG_CACHE", str(tmp_path))
    a, b = default_cache_dir(tmp_path / "x" / "kaggle_3m"), default_cache_dir(tmp_path / "kaggle_3m")
    assert a != b and a.parent == b.parent == tmp_path


def test_prepare_on_missing_folder(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        prepare(tmp_path / "nowhere", tmp_path / "cache", progress=False)


def test_prepare_into_a_file(kaggle, tmp_path):
    target = tmp_path / "cache.txt"
    target.write_text("x")
    with pytest.raises(DataError, match="is a file"):
        prepare(kaggle.root, target, progress=False)


@pytest.mark.parametrize(
    "manifest, fragment",
    [("{broken", "unreadable cache manifest"), ('{"version": 99, "patients": []}',
                                                  f"cache version 99 is not {CACHE_VERSION}")],
)
def test_open_cache_rejects_bad_manifest(tmp_path, manifest, fragment):
    (tmp_path / MANIFEST).write_text(manifest)
    with pytest.raises(DataError, match=fragment):
        open_cache(tmp_path)


def test_a_cache_folder_that_cannot_be_written_is_one_clear_error(kaggle, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder would go")
    with pytest.raises(DataError) as e:
        prepare(kaggle.root, blocker / "cache", progress=False)
    msg = str(e.value)
    assert msg.startswith(f"cannot write the cache at {blocker / 'cache'} (Not a directory)")
    assert msg.endswith("set TUMORSEG_CACHE to a writable folder or pass --out to `tumorseg prepare`")


def test_a_truncated_cached_array_is_decoded_again(kaggle, tmp_path):
    out = tmp_path / "cache"
    prepare(kaggle.root, out, progress=False)
    images = out / "patients" / "PAT_B_2002" / "images.npy"
    images.write_bytes(images.read_bytes()[:200])
    with pytest.raises(DataError) as e:
        open_cache(out).images("PAT_B_2002")
    assert str(e.value) == (f"{images}: missing or damaged cache file; run `tumorseg prepare "
                            f"{kaggle.root.resolve()}` to rebuild it")
    cache = prepare(kaggle.root, out, progress=False)
    assert np.array_equal(cache.images("PAT_B_2002"), kaggle.images["PAT_B_2002"])


def test_a_failed_first_prepare_leaves_no_folders(kaggle, tmp_path):
    (kaggle.root / "PAT_A_2001" / "PAT_A_2001_1_mask.tif").unlink()
    out = tmp_path / "cache"
    with pytest.raises(DataError, match="image without its mask"):
        prepare(kaggle.root, out, progress=False)
    assert not out.exists()


def test_a_binary_data_csv_warns_and_goes_on_without_metadata(kaggle, tmp_path):
    (kaggle.root / "data.csv").write_bytes(b"\xff\xfe\x00garbage\x00\x81" * 10)
    with pytest.warns(UserWarning, match="data.csv: unreadable metadata table"):
        cache = prepare(kaggle.root, tmp_path / "cache", progress=False)
    assert cache.metadata == {} and cache.patients == kaggle.patients
