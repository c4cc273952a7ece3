"""Shared fixtures: real data and the original checkpoint (skipped when absent), and a
small synthetic kaggle_3m folder written with Pillow."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]


def _missing(reason: str):
    """Skip, or fail when TUMORSEG_REQUIRE_DATA=1 (CI must run the real-data tests)."""
    if os.environ.get("TUMORSEG_REQUIRE_DATA") == "1":
        pytest.fail(f"TUMORSEG_REQUIRE_DATA=1 but {reason}")
    pytest.skip(reason)
DEFAULT_SEED_CHECKPOINT = REPO_ROOT.parent / "shared" / "seed" / "unet.pt"
# Fixtures that need the restored data set or the original checkpoint: a test that uses one
# is marked `realdata` and `slow`, so the fast lane (-m "not slow") never needs them.
REAL_FIXTURES = {"real_data", "real_cache", "seed_checkpoint"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if REAL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.realdata)
            item.add_marker(pytest.mark.slow)


@pytest.fixture(autouse=True, scope="session")
def _measurements_cache(tmp_path_factory: pytest.TempPathFactory):
    """Measured precision/engine choices go to a folder of this test session, never to the
    user's cache; a test run launched from inside a torchrun job does not join it."""
    # pytest-xdist workers share the folder (the base temporary folder of the whole run), so
    # that a model's engines are measured once per run, not once per worker.
    shared = tmp_path_factory.getbasetemp().parent / "measured" if os.environ.get("PYTEST_XDIST_WORKER") else None
    if shared is not None:
        shared.mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TUMORSEG_CACHE_DIR", str(shared or tmp_path_factory.mktemp("measured")))
        for name in list(os.environ):
            if name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") or \
                    name.startswith("TORCHELASTIC_"):
                mp.delenv(name)
        yield


@pytest.fixture(autouse=True, scope="session")
def _threads_per_worker():
    """Under pytest-xdist (`-n N`) the workers share the cores: each gets its share of
    PyTorch's (and so the engines') threads, so that N workers do not oversubscribe."""
    import torch

    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 1)
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
    yield


@pytest.fixture(autouse=True)
def _torch_threads(_threads_per_worker):
    """Commands given --threads set PyTorch's thread count for the process; later tests
    get the count back."""
    import torch

    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------- real data


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The restored kaggle_3m folder named by $TUMORSEG_TEST_DATA (skips when absent)."""
    value = os.environ.get("TUMORSEG_TEST_DATA", "")
    path = Path(value) if value else None
    if path is None or not path.is_dir():
        where = f" ({value} does not exist)" if value else ""
        _missing(
            "real LGG data not found: set TUMORSEG_TEST_DATA to the kaggle_3m folder of the Kaggle data set "
            f"lgg-mri-segmentation{where}"
        )
    return path


@pytest.fixture(scope="session")
def real_cache(real_data: Path, tmp_path_factory: pytest.TempPathFactory):
    """`open_data` on the real raw folder, once per session. The cache goes to
    $TUMORSEG_TEST_CACHE (reused across sessions) or a temporary folder."""
    from filelock import FileLock

    from tumorseg.data import open_data

    # Under pytest-xdist every worker runs this fixture: they share one cache folder (the
    # base temporary folder of the whole run), built by the first under a lock.
    shared = tmp_path_factory.getbasetemp().parent if os.environ.get("PYTEST_XDIST_WORKER") else None
    base = os.environ.get("TUMORSEG_TEST_CACHE") or str(
        shared / "real-cache" if shared else tmp_path_factory.mktemp("real-cache"))
    Path(base).mkdir(parents=True, exist_ok=True)
    with pytest.MonkeyPatch.context() as mp, FileLock(str(Path(base) / ".tests.lock")):
        mp.setenv("TUMORSEG_CACHE", base)
        return open_data(real_data, progress=False)


@pytest.fixture(scope="session")
def seed_checkpoint() -> Path:
    """The original published unet.pt: $TUMORSEG_SEED_CHECKPOINT or ../shared/seed/unet.pt."""
    value = os.environ.get("TUMORSEG_SEED_CHECKPOINT", "")
    path = Path(value) if value else DEFAULT_SEED_CHECKPOINT
    if not path.is_file():
        _missing(
            f"original checkpoint not found at {path}: set TUMORSEG_SEED_CHECKPOINT to the "
            "published unet.pt of the original implementation"
        )
    return path


# --------------------------------------------------------------------- synthetic layout

# Patient ids deliberately unlike TCGA ones so synthetic data is never taken for real.
# PAT_A has 12 slices so that numeric order (2 before 10) differs from string order.
DEFAULT_PATIENTS: dict[str, int] = {"PAT_A_2001": 12, "PAT_B_2002": 5, "PAT_C_2003": 5}


@dataclass
class SyntheticData:
    """What `make_kaggle` wrote, to compare readers against exactly."""

    root: Path
    images: dict[str, np.ndarray] = field(default_factory=dict)  # uint8 (S, H, W, 3)
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # uint8 (S, H, W), 0/1
    slices: dict[str, list[int]] = field(default_factory=dict)

    @property
    def patients(self) -> list[str]:
        return sorted(self.images)

    def image_path(self, patient: str, n: int) -> Path:
        return self.root / patient / f"{patient}_{n}.tif"

    def mask_path(self, patient: str, n: int) -> Path:
        return self.root / patient / f"{patient}_{n}_mask.tif"


def write_rgb(path: Path, array: np.ndarray) -> None:
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)


def write_mask(path: Path, mask01: np.ndarray) -> None:
    Image.fromarray((np.asarray(mask01) > 0).astype(np.uint8) * 255).save(path)


def build_kaggle(
    root: Path,
    patients: dict[str, int] | None = None,
    size: tuple[int, int] = (32, 32),
    seed: int = 0,
    strays: bool = True,
) -> SyntheticData:
    """Write a kaggle_3m-like folder: per patient `n` slices of RGB uint8 TIFFs and
    0/255 L-mode mask TIFFs (every other slice from the 2nd carries a tumour square),
    plus stray files that readers must ignore, and a data.csv."""
    patients = DEFAULT_PATIENTS if patients is None else patients
    rng = np.random.default_rng(seed)
    h, w = size
    root.mkdir(parents=True, exist_ok=True)
    data = SyntheticData(root=root)
    for pid, n in patients.items():
        pdir = root / pid
        pdir.mkdir()
        imgs = rng.integers(0, 256, size=(n, h, w, 3), dtype=np.uint8)
        masks = np.zeros((n, h, w), dtype=np.uint8)
        for i in range(1, n, 2):
            y, x = int(rng.integers(0, h - 6)), int(rng.integers(0, w - 6))
            masks[i, y : y + 1 + i % 5, x : x + 2 + i % 4] = 1
        for i in range(n):
            write_rgb(pdir / f"{pid}_{i + 1}.tif", imgs[i])
            write_mask(pdir / f"{pid}_{i + 1}_mask.tif", masks[i])
        if strays:
            (pdir / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
            (pdir / f"._{pid}_1.tif").write_bytes(b"AppleDouble resource fork, not a TIFF")
            (pdir / "README.md").write_text("notes\n")
            (pdir / "notes.txt").write_text("not a slice\n")
        data.images[pid], data.masks[pid], data.slices[pid] = imgs, masks, list(range(1, n + 1))
    if strays:
        (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
        (root / ".hidden").write_text("hidden\n")
        (root / "README.md").write_text("# kaggle_3m\n")
        (root / "docs").mkdir()
        (root / "docs" / "about.txt").write_text("a folder without slices\n")
    lines = ["Patient,RNASeqCluster,age_at_initial_pathologic"]
    lines += [f"{pid},{k + 1},{40 + k}" for k, pid in enumerate(patients)]
    (root / "data.csv").write_text("\n".join(lines) + "\n")
    return data


@pytest.fixture
def make_kaggle(tmp_path: Path) -> Callable[..., SyntheticData]:
    """Factory: make_kaggle(name="kaggle_3m", patients=..., size=(H, W), seed=0, strays=True)."""

    def make(name: str = "kaggle_3m", **kwargs) -> SyntheticData:
        return build_kaggle(tmp_path / name, **kwargs)

    return make


@pytest.fixture
def kaggle(make_kaggle) -> SyntheticData:
    """The default synthetic folder: PAT_A (12 slices), PAT_B and PAT_C (5 each), 32x32."""
    return make_kaggle()
