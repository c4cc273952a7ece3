"""Patient-level splits: disjoint parts, balanced folds, seeded, saved and checked."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from tumorseg.data.kaggle import find_patient_dirs
from tumorseg.data.splits import Split, load_split, make_split, save_split
from tumorseg.errors import TumorsegError


def names(n: int) -> list[str]:
    return [f"PAT_{i:03d}" for i in range(n)]


def check_partition(split: Split, patients: list[str]) -> None:
    """Every patient in exactly one of test / one fold; train/val of each fold disjoint
    and together the non-test patients."""
    counts = Counter(split.test) + Counter(p for f in split.folds for p in f)
    assert set(counts) == set(patients)
    assert set(counts.values()) == {1}
    non_test = set(patients) - set(split.test)
    for k in range(len(split.folds)):
        train, val = split.train(k), split.val(k)
        assert not set(train) & set(val)
        assert set(train) | set(val) == non_test
        assert len(train) + len(val) == len(non_test)
        assert not set(train) & set(split.test)


@pytest.mark.parametrize(
    "n, folds, test_fraction, n_test, sizes",
    [
        (10, 5, 0.0, 0, [2, 2, 2, 2, 2]),
        (11, 5, 0.0, 0, [3, 2, 2, 2, 2]),
        (14, 5, 0.0, 0, [3, 3, 3, 3, 2]),
        (10, 3, 0.2, 2, [3, 3, 2]),
        (23, 4, 0.25, 6, [5, 4, 4, 4]),  # round(5.75) = 6 test, 17 left
        (2, 2, 0.0, 0, [1, 1]),
    ],
)
def test_make_split_partitions_patients(n, folds, test_fraction, n_test, sizes):
    patients = names(n)
    split = make_split(patients, folds=folds, test_fraction=test_fraction, seed=3)
    check_partition(split, patients)
    assert len(split.test) == n_test
    assert [len(f) for f in split.folds] == sizes
    assert max(sizes) - min(sizes) <= 1
    assert split.seed == 3


def test_make_split_does_not_depend_on_input_order():
    patients = names(17)
    assert make_split(patients, seed=5) == make_split(list(reversed(patients)), seed=5)


def test_same_seed_same_split_other_seed_different():
    patients = names(20)
    a = make_split(patients, folds=4, test_fraction=0.2, seed=0)
    assert make_split(patients, folds=4, test_fraction=0.2, seed=0) == a
    b = make_split(patients, folds=4, test_fraction=0.2, seed=1)
    assert (b.folds, b.test) != (a.folds, a.test)
    check_partition(b, patients)


def test_parts_are_sorted_lists():
    split = make_split(names(9), folds=3, seed=2)
    for part in [*split.folds, split.test]:
        assert part == sorted(part)


@pytest.mark.parametrize(
    "patients, folds, test_fraction, fragment",
    [
        (names(3), 5, 0.0, "3 patients cannot fill 5 folds"),
        (names(6), 4, 0.5, "3 patients cannot fill 4 folds"),
        (names(6), 1, 0.0, "folds must be >= 2, got 1"),
        (names(6), 2, 1.0, "test_fraction must be in [0, 1), got 1.0"),
        (names(6), 2, -0.1, "test_fraction must be in [0, 1), got -0.1"),
        (["PAT_A", "PAT_B", "PAT_A"], 2, 0.0, "duplicates"),
    ],
)
def test_make_split_errors(patients, folds, test_fraction, fragment):
    with pytest.raises(TumorsegError) as info:
        make_split(patients, folds=folds, test_fraction=test_fraction)
    assert fragment in str(info.value)


@pytest.mark.parametrize("fold", [-1, 3])
def test_unknown_fold_raises(fold):
    split = make_split(names(6), folds=3)
    with pytest.raises(TumorsegError, match=r"folds 0\.\.2"):
        split.train(fold)
    with pytest.raises(TumorsegError, match=r"folds 0\.\.2"):
        split.val(fold)


def test_save_load_round_trip(tmp_path):
    split = make_split(names(13), folds=3, test_fraction=0.2, seed=7)
    path = tmp_path / "sub" / "split.json"
    save_split(split, path)
    assert json.loads(path.read_text()) == {
        "seed": 7, "test": split.test, "folds": split.folds}
    loaded = load_split(path)
    assert loaded == split
    assert [loaded.train(k) for k in range(3)] == [split.train(k) for k in range(3)]


@pytest.mark.parametrize(
    "content, fragment",
    [
        ({"seed": 0, "test": ["PAT_1"], "folds": [["PAT_1", "PAT_2"], ["PAT_3"]]},
         "patient PAT_1 is in both test and fold 0"),
        ({"seed": 0, "test": [], "folds": [["PAT_1", "PAT_2"], ["PAT_3", "PAT_2"]]},
         "patient PAT_2 is in both fold 0 and fold 1"),
        ({"seed": 0, "folds": [["PAT_1", "PAT_1"], ["PAT_3"]]},
         "patient PAT_1 is in both fold 0 and fold 0"),
    ],
)
def test_load_split_rejects_overlap(tmp_path, content, fragment):
    path = tmp_path / "split.json"
    path.write_text(json.dumps(content))
    with pytest.raises(TumorsegError) as info:
        load_split(path)
    assert fragment in str(info.value)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("text", ["{not json", '{"seed": 0}', "[1, 2]"])
def test_load_split_rejects_unreadable(tmp_path, text):
    path = tmp_path / "split.json"
    path.write_text(text)
    with pytest.raises(TumorsegError, match="not a readable split file"):
        load_split(path)


def test_load_split_missing_file(tmp_path):
    with pytest.raises(TumorsegError, match="absent.json does not exist; pass the splits.json of a run"):
        load_split(tmp_path / "absent.json")


def test_held_out_patients_of_a_fold_or_the_test_set(tmp_path):
    from tumorseg.data.splits import held_out_patients

    patients = [f"P{i:02d}" for i in range(12)]
    split = make_split(patients, folds=3, test_fraction=0.25, seed=1)
    save_split(split, tmp_path / "s.json")
    assert held_out_patients(tmp_path / "s.json") == sorted(split.test) and len(split.test) == 3
    assert held_out_patients(tmp_path / "s.json", 2) == split.val(2)
    save_split(make_split(patients, folds=3, seed=1), tmp_path / "no-test.json")
    with pytest.raises(TumorsegError, match="has no test patients; pass --fold K"):
        held_out_patients(tmp_path / "no-test.json")
    with pytest.raises(TumorsegError, match="fold 3 does not exist"):
        held_out_patients(tmp_path / "s.json", 3)


@pytest.mark.realdata
def test_real_patients_five_folds_disjoint(real_data):
    patients = [d.name for d in find_patient_dirs(real_data)]
    n = len(patients)
    if n < 10:
        pytest.skip(f"a five-fold split with a test set needs at least 10 patients; {real_data} has {n}")
    split = make_split(patients, folds=5, seed=0)
    check_partition(split, patients)
    assert sorted(len(f) for f in split.folds) == sorted([n // 5 + (i < n % 5) for i in range(5)])
    held_out = make_split(patients, folds=5, test_fraction=0.2, seed=0)
    check_partition(held_out, patients)
    assert len(held_out.test) == round(0.2 * n)  # 18 of the 88-patient development subset
