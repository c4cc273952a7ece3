"""Hostile and broken inputs at the command line: every case exits with 2 and prints one
line that names the offending file or option and says what to do, and no case leaves a
file behind. docs/reliability.md lists the same cases (checked below)."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import build_kaggle
from PIL import Image

from tumorseg import cli
from tumorseg.checkpoint import FORMAT_VERSION, Checkpoint, read_payload, save_checkpoint
from tumorseg.data import prepare
from tumorseg.model import UNet

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class World:
    """A small synthetic kaggle_3m folder, a valid tiny checkpoint and a plain file."""

    tmp: Path
    root: Path
    ok: Path
    file: Path

    def path(self, template: str) -> str:
        return (template.replace("{tmp}", str(self.tmp)).replace("{root}", str(self.root))
                .replace("{ok}", str(self.ok)).replace("{file}", str(self.file)))


def _checkpoint(path: Path, **fields) -> None:
    save_checkpoint(path, Checkpoint.of_model(UNet(n_features=2, depth=2), **fields))


def _slice(path: Path, array: np.ndarray, **kw) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, **kw).save(path)


# --- set-ups: each makes one hostile input inside the world --------------------------------

def _mismatch(w: World) -> None:
    raw = read_payload(w.ok)
    raw["model_config"]["n_features"] = 6
    torch.save(raw, w.tmp / "mismatch.pt")


def _newer(w: World) -> None:
    raw = read_payload(w.ok)
    raw["format_version"] = FORMAT_VERSION + 1
    torch.save(raw, w.tmp / "newer.pt")


def _truncated_checkpoint(w: World) -> None:
    (w.tmp / "cut.pt").write_bytes(w.ok.read_bytes()[:2000])


def _truncated_cache(w: World) -> None:
    prepare(w.root, w.tmp / "prepared", progress=False)
    npy = w.tmp / "prepared" / "patients" / "PAT_B_2002" / "images.npy"
    npy.write_bytes(npy.read_bytes()[:100])


def _duplicate_slice(w: World) -> None:
    pdir = w.root / "PAT_B_2002"
    (pdir / "PAT_B_2002_01.tif").write_bytes((pdir / "PAT_B_2002_1.tif").read_bytes())


def _only_masks(w: World) -> None:
    _slice(w.tmp / "masks" / "x_1_mask.png", np.zeros((8, 8), np.uint8))


def _split_without_test(w: World) -> None:
    (w.tmp / "splits.json").write_text('{"seed": 0, "test": [], "folds": [["PAT_A_2001"], ["PAT_B_2002"]]}')


def _split_of_others(w: World) -> None:
    (w.tmp / "others.json").write_text('{"seed": 0, "test": [], "folds": [["X1"], ["X2"]]}')


def _existing_run(w: World) -> None:
    (w.tmp / "run").mkdir()
    _checkpoint(w.tmp / "run" / "last.pt")


def _mixed_sizes(w: World) -> None:
    _slice(w.root / "PAT_B_2002" / "PAT_B_2002_3.tif", np.zeros((16, 32, 3), np.uint8))


def _truncated_tiff(w: World) -> None:
    path = w.root / "PAT_B_2002" / "PAT_B_2002_2.tif"
    path.write_bytes(path.read_bytes()[:300])


def _config(name: str, text: str) -> Callable[[World], None]:
    return lambda w: (w.tmp / name).write_text(text)


def _image(name: str, array: np.ndarray, **kw) -> Callable[[World], None]:
    return lambda w: _slice(w.tmp / name, array, **kw)


def _nothing(w: World) -> None:
    pass


TRAIN = ["train", "--data", "{root}", "--epochs", "1", "--n-features", "2", "--depth", "2", "--features", "none",
         "--folds", "2", "--crop", "0", "--samples-per-epoch", "4", "--out", "{tmp}/run", "--no-progress"]
EVALUATE = ["evaluate", "--data", "{root}", "--checkpoint", "{ok}", "--out", "{tmp}/report", "--no-progress"]
PREDICT = ["predict", "{root}/PAT_B_2002", "--checkpoint", "{ok}", "--out", "{tmp}/pred", "--no-progress"]

# (id, set-up, command, what the one error line must contain; "{...}" is filled in)
CASES: list[tuple[str, Callable[[World], None], list[str], str]] = [
    # --- where results go
    ("predict-out-is-a-file", _nothing, [*PREDICT, "--out", "{file}"],
     "output {file} is a file; pass a folder to --out"),
    ("evaluate-out-is-a-file", _nothing, [*EVALUATE, "--out", "{file}"], "output {file} is a file; pass a folder"),
    ("train-out-is-a-file", _nothing, [*TRAIN, "--out", "{file}"], "output {file} is a file; pass a folder"),
    ("predict-out-not-writable", _nothing, [*PREDICT, "--out", "{file}/sub"],
     "cannot write to output folder {file}/sub ({file} is a file); choose another --out"),
    ("evaluate-out-not-writable", _nothing, [*EVALUATE, "--out", "{file}/sub"],
     "cannot write to output folder {file}/sub"),
    ("train-out-not-writable", _nothing, [*TRAIN, "--out", "{file}/sub"], "cannot write to output folder {file}/sub"),
    ("train-existing-run", _existing_run, [*TRAIN, "--out", "{tmp}/run"],
     "{tmp}/run already holds a run; continue it with --resume {tmp}/run or choose another --out"),
    # --- the cache
    ("cache-not-writable", _nothing, ["prepare", "{root}", "--out", "{file}/cache"],
     "cannot write the cache at {file}/cache (Not a directory); set TUMORSEG_CACHE to a writable folder"),
    ("cache-is-a-file", _nothing, ["prepare", "{root}", "--out", "{file}"],
     "cache path {file} is a file; pass a folder"),
    ("cache-env-not-writable", _nothing, ["--env", "TUMORSEG_CACHE={file}", *EVALUATE],
     "cannot write the cache at {file}/kaggle_3m-"),
    ("cache-truncated-array", _truncated_cache, [*EVALUATE[:2], "{tmp}/prepared", *EVALUATE[3:]],
     "{tmp}/prepared/patients/PAT_B_2002/images.npy: missing or damaged cache file; run `tumorseg prepare"),
    # --- checkpoints
    ("checkpoint-missing", _nothing, [*PREDICT, "--checkpoint", "{tmp}/absent.pt"],
     "checkpoint {tmp}/absent.pt does not exist"),
    ("checkpoint-is-a-folder", _nothing, [*PREDICT, "--checkpoint", "{tmp}"],
     "{tmp} is a folder; pass a checkpoint file inside it (best.pt or last.pt)"),
    ("checkpoint-garbage", lambda w: (w.tmp / "g.pt").write_bytes(b"not a checkpoint"),
     [*PREDICT, "--checkpoint", "{tmp}/g.pt"], "{tmp}/g.pt is not a readable PyTorch checkpoint"),
    ("checkpoint-truncated", _truncated_checkpoint, [*EVALUATE, "--checkpoint", "{tmp}/cut.pt"],
     "{tmp}/cut.pt is not a readable PyTorch checkpoint"),
    ("checkpoint-not-a-dict", lambda w: torch.save(torch.zeros(2), w.tmp / "t.pt"),
     [*PREDICT, "--checkpoint", "{tmp}/t.pt"], "{tmp}/t.pt: expected a checkpoint dictionary, got Tensor"),
    ("checkpoint-config-does-not-fit-weights", _mismatch, [*PREDICT, "--checkpoint", "{tmp}/mismatch.pt"],
     "{tmp}/mismatch.pt: weights do not fit the U-Net it describes (size mismatch for layers.0"),
    ("checkpoint-newer-format", _newer, [*EVALUATE, "--checkpoint", "{tmp}/newer.pt"],
     f"{{tmp}}/newer.pt has checkpoint format version {FORMAT_VERSION + 1}, newer than the {FORMAT_VERSION} "
     "this tumorseg reads; upgrade tumorseg"),
    ("ensemble-of-different-inputs",
     lambda w: save_checkpoint(w.tmp / "flair.pt", Checkpoint.of_model(UNet(in_channels=1, n_features=2, depth=2),
                                                                       channels=("FLAIR",))),
     [*PREDICT, "--checkpoint", "{ok}", "{tmp}/flair.pt"], "an ensemble needs one input"),
    # --- values
    ("spacing-negative", _nothing, [*EVALUATE, "--spacing", "-1", "-1", "-1"],
     "spacing must be three positive numbers (mm between slices, rows, columns), got [-1.0, -1.0, -1.0]"),
    ("spacing-zero", _nothing, [*EVALUATE, "--spacing", "0", "1", "1"], "spacing must be three positive numbers"),
    ("spacing-nan", _nothing, [*EVALUATE, "--spacing", "nan", "1", "1"], "spacing must be three positive numbers"),
    ("threshold-above-1", _nothing, [*EVALUATE, "--threshold", "5"], "threshold must be between 0 and 1, got 5.0"),
    ("threshold-zero", _nothing, [*PREDICT, "--threshold", "0"], "threshold must be between 0 and 1, got 0.0"),
    ("threshold-train", _nothing, [*TRAIN, "--threshold", "1.5"], "threshold must be between 0 and 1, got 1.5"),
    ("crop-larger-than-slices", _nothing, [*TRAIN, "--crop", "64"],
     "crop 64 is larger than the 32x32 slices of the data; use --crop 32 or less, or --crop 0 for whole slices"),
    ("batch-size-zero", _nothing, [*PREDICT, "--batch-size", "0"], "batch size must be >= 1, got 0"),
    ("threads-zero", _nothing, [*TRAIN, "--threads", "0"], "--threads must be >= 1, got 0"),
    ("depth-one", _nothing, [*TRAIN, "--depth", "1"], "depth must be >= 2, got 1"),
    ("channel-unknown", _nothing, [*TRAIN, "--channels", "T2"], "unknown channel 'T2'; choose from"),
    ("lr-zero", _nothing, [*TRAIN, "--lr", "0"], "lr must be > 0, got 0.0"),
    ("epochs-zero", _nothing, [*TRAIN, "--epochs", "0"], "epochs must be >= 1, got 0"),
    ("fold-out-of-range", _nothing, [*TRAIN, "--fold", "7"], "fold must be in 0..1, or -1 for all, got 7"),
    ("test-fraction-one", _nothing, [*TRAIN, "--test-fraction", "1"], "test_fraction must be in [0, 1), got 1.0"),
    ("seed-negative", _nothing, [*TRAIN, "--seed", "-1"], "seed must be >= 0, got -1"),
    ("integer-field-not-an-integer", _nothing, [*TRAIN, "--epochs", "2.5"],
     "config field 'epochs': expected an integer, got 2.5"),
    ("config-missing", _nothing, [*TRAIN, "--config", "{tmp}/none.yaml"], "config file {tmp}/none.yaml does not exist"),
    ("config-bad-yaml", _config("bad.yaml", "epochs: [1, 2\n"), [*TRAIN, "--config", "{tmp}/bad.yaml"],
     "{tmp}/bad.yaml: cannot parse"),
    ("config-unknown-field", _config("c.json", '{"learning_rate": 1}'), [*TRAIN, "--config", "{tmp}/c.json"],
     "unknown config field(s): learning_rate"),
    ("config-null-channels", _config("n.yaml", "channels: null\n"), [*TRAIN, "--config", "{tmp}/n.yaml"],
     "config field 'channels': list at least one sequence"),
    ("device-unknown", _nothing, [*PREDICT, "--device", "tpu"],
     "unknown device 'tpu'; use cpu, cuda, cuda:N, mps or auto"),
    ("resume-nothing", _nothing, ["train", "--resume", "{tmp}/none"],
     "cannot resume: {tmp}/none/last.pt does not exist"),
    ("resume-with-options", _nothing, ["train", "--resume", "{tmp}/none", "--epochs", "3"],
     "--resume continues the saved config; drop --epochs"),
    # --- data
    ("data-missing", _nothing, [*EVALUATE[:2], "{tmp}/absent", *EVALUATE[3:]],
     "data folder {tmp}/absent does not exist"),
    ("data-without-patients", lambda w: (w.tmp / "empty").mkdir(), [*TRAIN[:2], "{tmp}/empty", *TRAIN[3:]],
     "{tmp}/empty holds no patient folder"),
    ("duplicate-slice-number-predict", _duplicate_slice, PREDICT,
     "{root}/PAT_B_2002: two files for slice 1: PAT_B_2002_01.tif and PAT_B_2002_1.tif; keep one"),
    ("duplicate-slice-number-prepare", _duplicate_slice, ["prepare", "{root}", "--out", "{tmp}/c2"],
     "{root}/PAT_B_2002: two files for slice 1:"),
    ("image-without-mask", lambda w: (w.root / "PAT_B_2002" / "PAT_B_2002_3_mask.tif").unlink(), EVALUATE,
     "{root}/PAT_B_2002/PAT_B_2002_3.tif: image without its mask"),
    ("truncated-tiff", _truncated_tiff, EVALUATE,
     "{root}/PAT_B_2002/PAT_B_2002_2.tif: unreadable or truncated image"),
    ("slices-of-mixed-sizes", _mixed_sizes, PREDICT, "{root}/PAT_B_2002/PAT_B_2002_3.tif: size 32x16 differs"),
    ("palette-png",
     lambda w: Image.fromarray(np.zeros((8, 8, 3), np.uint8)).convert("P").save(w.tmp / "p_1.png"),
     [*PREDICT[:1], "{tmp}/p_1.png", *PREDICT[2:]], "{tmp}/p_1.png: a palette image (mode P)"),
    ("rgba-png", _image("g_1.png", np.zeros((8, 8, 4), np.uint8)), [*PREDICT[:1], "{tmp}/g_1.png", *PREDICT[2:]],
     "{tmp}/g_1.png: expected 3 channels (pre-contrast, FLAIR, post-contrast) or FLAIR alone, got 4 (mode RGBA)"),
    ("16-bit-tiff", _image("s_1.tif", np.full((8, 8), 900, np.uint16)), [*PREDICT[:1], "{tmp}/s_1.tif", *PREDICT[2:]],
     "{tmp}/s_1.tif: 16-bit pixels (mode I;16), expected 8-bit (uint8); rescale each sequence linearly to 0-255"),
    ("float-tiff", _image("f_1.tif", np.full((8, 8), 0.5, np.float32)), [*PREDICT[:1], "{tmp}/f_1.tif", *PREDICT[2:]],
     "{tmp}/f_1.tif: 32-bit float pixels (mode F), expected 8-bit (uint8); rescale"),
    ("not-an-image", lambda w: (w.tmp / "notes.txt").write_text("x"), [*PREDICT[:1], "{tmp}/notes.txt", *PREDICT[2:]],
     "{tmp}/notes.txt: the extension .txt is not read; supported: .tif/.tiff/.png slices, .nii/.nii.gz volumes, "
     "DICOM files, or a .zip of a patient folder"),
    ("folder-with-only-masks", _only_masks, [*PREDICT[:1], "{tmp}/masks", *PREDICT[2:]],
     "{tmp}/masks holds only masks, no image slices to predict on"),
    ("split-missing", _nothing, [*EVALUATE, "--split", "{tmp}/none.json"],
     "split file {tmp}/none.json does not exist; pass the splits.json of a run"),
    ("split-without-test-patients", _split_without_test, [*EVALUATE, "--split", "{tmp}/splits.json"],
     "{tmp}/splits.json has no test patients; pass --fold K to evaluate a validation fold"),
    ("split-of-other-patients", _split_of_others, [*TRAIN, "--split", "{tmp}/others.json"],
     "split names patients absent from the data: X1, X2"),
    ("fold-without-split", _nothing, [*EVALUATE, "--fold", "1"], "--fold needs --split (the splits.json of a run)"),
    # --- cross-validation and export
    ("crossval-fold-out-of-range", _nothing, ["crossval", "--data", "{root}", "--out", "{tmp}/cv", "--fold", "7"],
     "--fold must be in 0..4, got 7"),
    ("crossval-crop-larger-than-slices", _nothing,
     ["crossval", *TRAIN[1:-3], "--crop", "64", "--out", "{tmp}/cv", "--no-progress"],
     "crop 64 is larger than the 32x32 slices of the data"),
    ("export-unfinished-run", lambda w: (w.tmp / "cv").mkdir(), ["export", "{tmp}/cv", "--out", "{tmp}/e.pt"],
     "{tmp}/cv is not a finished cross-validation run (no splits.json or crossval/postprocessing.json); run "
     "`tumorseg crossval` first"),
    ("export-out-is-a-folder", _nothing, ["export", "{ok}", "--out", "{tmp}"],
     "{tmp} is a folder; pass a file name to --out"),
    ("export-of-unet-pt", lambda w: torch.save({"state_dict": UNet(n_features=2, depth=2).state_dict()},
                                               w.tmp / "orig.pt"),
     ["export", "{tmp}/orig.pt", "--out", "{tmp}/e.pt"], "{tmp}/orig.pt is not a tumorseg checkpoint"),
]


@pytest.fixture
def world(tmp_path, monkeypatch) -> World:
    monkeypatch.chdir(tmp_path)  # what a command would write into the working folder is seen too
    monkeypatch.setenv("TUMORSEG_CACHE", str(tmp_path / "cache"))
    build_kaggle(tmp_path / "kaggle_3m", patients={"PAT_A_2001": 4, "PAT_B_2002": 3, "PAT_C_2003": 3}, strays=False)
    w = World(tmp=tmp_path, root=tmp_path / "kaggle_3m", ok=tmp_path / "ok.pt", file=tmp_path / "afile")
    _checkpoint(w.ok)
    w.file.write_text("a plain file\n")
    return w


def _files(root: Path, cache: bool) -> set[Path]:
    return {p for p in root.rglob("*") if cache or "cache" not in p.relative_to(root).parts[:1]}


# Cases whose error can only be found while the data are read or after: the decoded cache
# of the good patients is kept (it is valid and saves the next run the decoding).
READS_DATA = {"crop-larger-than-slices", "crossval-crop-larger-than-slices", "split-of-other-patients",
              "cache-truncated-array", "image-without-mask", "truncated-tiff", "duplicate-slice-number-prepare"}


@pytest.mark.parametrize(("case", "setup", "args", "message"), CASES, ids=[c[0] for c in CASES])
def test_hostile_input_is_one_line_exit_2_and_leaves_nothing(case, setup, args, message, world, capsys,
                                                             monkeypatch):
    setup(world)
    argv = [world.path(a) for a in args]
    if argv[0] == "--env":
        name, value = argv[1].split("=", 1)
        monkeypatch.setenv(name, value)
        argv = argv[2:]
    strict = case not in READS_DATA
    before = _files(world.tmp, cache=strict)
    code = cli.main(argv)
    out, err = capsys.readouterr()
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"tumorseg {argv[0]}: error: "), err
    assert world.path(message) in lines[0]
    assert "Traceback" not in err
    assert _files(world.tmp, cache=strict) == before, "left files behind"


def test_there_are_at_least_40_cases_and_the_docs_list_each():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)
    doc = (REPO_ROOT / "docs" / "reliability.md").read_text()
    listed = set(re.findall(r"^\| `([a-z0-9-]+)` \|", doc, flags=re.M))
    assert listed == {c[0] for c in CASES}


def test_a_garbled_data_csv_is_a_one_line_warning_not_an_error(world, capsys):
    (world.root / "data.csv").write_bytes(b"\xff\xfe\x00\x81garbage" * 20)
    assert cli.main(["prepare", str(world.root), "--out", str(world.tmp / "c"), "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "3 patients" in out
    assert err == (f"tumorseg prepare: warning: {world.root / 'data.csv'}: unreadable metadata table "
                   "(UnicodeDecodeError); going on without it\n")


def test_a_read_only_cache_folder(world, capsys, monkeypatch):
    """As root, chmod cannot make a folder read-only: the file system's refusal is simulated."""
    import tumorseg.data.cache as cache_module

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(cache_module, "atomic_write", refuse)
    code = cli.main([world.path(a) for a in EVALUATE])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith(f"tumorseg evaluate: error: cannot write the cache at {world.tmp / 'cache'}/kaggle_3m-")
    assert "(Permission denied); set TUMORSEG_CACHE to a writable folder" in err
    assert not (world.tmp / "report").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
def test_asking_for_a_missing_gpu(world, capsys):
    code = cli.main([world.path(a) for a in [*PREDICT, "--device", "cuda"]])
    assert code == 2
    assert "device cuda asked for, but PyTorch sees no CUDA GPU here; use --device cpu" in capsys.readouterr().err


@pytest.mark.slow
def test_no_progress_training_still_prints_one_line_per_epoch(world, capsys):
    code = cli.main([world.path(a) for a in [*TRAIN, "--epochs", "2", "--out", "{tmp}/run"]])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert len(re.findall(r"^epoch [12]/2: train loss", out, flags=re.M)) == 2
    assert os.path.isfile(world.tmp / "run" / "last.pt")
