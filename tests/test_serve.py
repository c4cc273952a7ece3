"""`tumorseg serve` through FastAPI's TestClient: patients in every accepted form give
`tumorseg predict`'s masks, and hostile input gets a 4xx with a JSON message, never a
500, never a file outside the job's folder."""

from __future__ import annotations

import io
import stat
import threading
import time
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn, python-multipart) is not installed")
from fastapi.testclient import TestClient  # noqa: E402
from test_nifti import PATIENT, unet_predictor  # noqa: E402

from tumorseg.cli import main  # noqa: E402
from tumorseg.config import ServeConfig  # noqa: E402
from tumorseg.data.nifti import kaggle_to_nifti  # noqa: E402
from tumorseg.data.slices import read_mask  # noqa: E402
from tumorseg.errors import ConfigError  # noqa: E402
from tumorseg.prediction import predict  # noqa: E402
from tumorseg.serve.app import create_app  # noqa: E402


def client_for(tmp_path: Path, predictor=None, **config) -> TestClient:
    app = create_app(predictor or unet_predictor(), ServeConfig(**config), tmp_path / "jobs")
    return TestClient(app, raise_server_exceptions=False, base_url="http://127.0.0.1")


def jobs_root(client: TestClient) -> Path:
    return client.app.state.store.root


def wait(client: TestClient, job_id: str, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(f"/api/jobs/{job_id}").json()
        if body["status"] in ("done", "failed"):
            return body
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish in {timeout} s: {body}")


def zip_folder(folder: Path, top: str | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in sorted(folder.iterdir()):
            zf.write(p, arcname=f"{top or folder.name}/{p.name}")
    return buf.getvalue()


def upload(client: TestClient, files: list[tuple[str, bytes]]):
    return client.post("/api/predict", files=[("files", (name, data)) for name, data in files])


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")} if root.exists() else set()


# --------------------------------------------------------------------------- round trips


def test_a_zipped_patient_gives_predicts_masks(kaggle, tmp_path):
    predictor = unet_predictor()
    [expected] = predict([kaggle.root / PATIENT], tmp_path / "cli", predictor=predictor, show_progress=False)
    with client_for(tmp_path, predictor) as client:
        r = upload(client, [(f"{PATIENT}.zip", zip_folder(kaggle.root / PATIENT))])
        assert r.status_code == 202, r.text
        job = r.json()
        assert job["status"] == "queued" and job["status_url"] == f"/api/jobs/{job['id']}"
        body = wait(client, job["id"])
        assert body["status"] == "done" and body["progress"] == 1.0, body
        result = body["result"]
        assert (result["name"], result["input"], result["slices"]) == (PATIENT, "slices", 12)
        assert (result["tumour_slices"], result["tumour_pixels"]) == (expected.tumour_slices, expected.tumour_pixels)
        assert result["volume_ml"] is None and result["has_label"] and 0 <= result["dice"] <= 1
        got = client.get(result["download"])
        assert got.status_code == 200 and got.headers["content-type"] == "application/zip"
        with zipfile.ZipFile(io.BytesIO(got.content)) as zf:
            names = sorted(zf.namelist())
            assert names == sorted(f"{PATIENT}/{PATIENT}_{n}_pred.png" for n in kaggle.slices[PATIENT])
            zf.extractall(tmp_path / "web")
        for name in names:
            assert np.array_equal(read_mask(tmp_path / "web" / name), read_mask(tmp_path / "cli" / name)), name
        image = client.get(result["viewer"]["image"])
        mask = client.get(result["viewer"]["mask"])
        truth = client.get(result["viewer"]["truth"])
        assert image.status_code == mask.status_code == truth.status_code == 200
        vol = nib.Nifti1Image.from_bytes(__import__("gzip").decompress(mask.content))
        assert vol.shape == (32, 32, 12) and int(np.asarray(vol.dataobj).sum()) == expected.tumour_pixels
        per_slice = np.asarray(vol.dataobj).sum(axis=(0, 1))
        assert result["tumour_slice"] == int(per_slice.argmax())
    assert list((tmp_path / "jobs").iterdir()) == []  # shutdown removes every job's files, and only them


def test_nifti_files_give_predicts_mask_volume_and_dice(kaggle, tmp_path):
    kaggle_to_nifti(kaggle.root / PATIENT, tmp_path / "nii")
    folder = tmp_path / "nii" / PATIENT
    predictor = unet_predictor()
    predict([folder], tmp_path / "cli", predictor=predictor, show_progress=False)
    with client_for(tmp_path, predictor) as client:
        r = upload(client, [(p.name, p.read_bytes()) for p in sorted(folder.iterdir())])
        assert r.status_code == 202, r.text
        body = wait(client, r.json()["id"])
        result = body["result"]
        assert result["input"] == "nifti" and result["volume_ml"] > 0 and result["dice"] is not None
        got = client.get(result["download"])
        assert got.headers["content-disposition"].endswith(f'"{PATIENT}_pred.nii.gz"')
        mine = nib.Nifti1Image.from_bytes(__import__("gzip").decompress(got.content))
        cli = nib.load(str(tmp_path / "cli" / PATIENT / f"{PATIENT}_pred.nii.gz"))
        assert np.array_equal(np.asarray(mine.dataobj), np.asarray(cli.dataobj))
        assert np.allclose(mine.affine, cli.affine)
        job_dir = jobs_root(client) / body["id"]
        assert job_dir.is_dir() and not (job_dir / "input").exists()  # the upload is removed when the job ends


def test_one_nifti_file_alone_is_taken_as_flair(kaggle, tmp_path):
    kaggle_to_nifti(kaggle.root / PATIENT, tmp_path / "nii")
    data = (tmp_path / "nii" / PATIENT / f"{PATIENT}_flair.nii.gz").read_bytes()
    with client_for(tmp_path) as client:
        r = upload(client, [("scan.nii.gz", data)])
        assert r.status_code == 202, r.text
        result = wait(client, r.json()["id"])["result"]
        assert result["name"] == "scan" and not result["has_label"] and result["dice"] is None


def test_slice_files_without_masks(kaggle, tmp_path):
    files = [(f"{PATIENT}_{n}.tif", (kaggle.root / PATIENT / f"{PATIENT}_{n}.tif").read_bytes())
             for n in kaggle.slices[PATIENT]]
    with client_for(tmp_path) as client:
        r = upload(client, files)
        assert r.status_code == 202, r.text
        result = wait(client, r.json()["id"])["result"]
        assert result["slices"] == 12 and not result["has_label"] and result["viewer"]["truth"] is None


# --------------------------------------------------------------------------- hostile input


def test_an_upload_over_the_limit_is_413_and_never_read_whole(tmp_path):
    big = b"\0" * (2 * 2**20)
    with client_for(tmp_path, max_upload_mb=1) as client:
        r = upload(client, [("a.nii.gz", big)])
        assert r.status_code == 413 and "larger than 1 MB" in r.json()["detail"]

        def chunks():  # no Content-Length: counted as it arrives
            yield b"--x\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.nii\"\r\n\r\n"
            for _ in range(40):
                yield b"\0" * 2**16

        r = client.post("/api/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"})
        assert r.status_code == 413 and "larger than 1 MB" in r.json()["detail"]
        assert list(jobs_root(client).iterdir()) == []


def _zip(entries: list[tuple[str, bytes]], symlink: str | None = None) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries:
            zf.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
    return buf.getvalue()


@pytest.mark.parametrize(("archive", "status", "message"), [
    (_zip([("../evil_1.tif", b"x")]), 422, "unsafe entry '../evil_1.tif'"),
    (_zip([("p/../../evil_1.tif", b"x")]), 422, "unsafe entry"),
    (_zip([("/abs/evil_1.tif", b"x")]), 422, "unsafe entry '/abs/evil_1.tif'"),
    (_zip([("C:/evil_1.tif", b"x")]), 422, "unsafe entry"),
    (_zip([], symlink="p/link_1.tif"), 422, "is a symbolic link"),
    (_zip([("p/bomb_1.tif", b"\0" * (3 * 2**20))]), 413, "unpacks to 3 MB; at most 2 MB"),
    (_zip([(f"p/many_{i}.tif", b"x") for i in range(30)]), 413, "holds 30 entries; at most 20"),
    (_zip([("a/x_1.tif", b"x"), ("b/x_2.tif", b"x")]), 422, "several folders"),
    (b"PK\x03\x04 not really a zip", 422, "not a readable zip file"),
    (_zip([("p/notes.txt", b"hello")]), 422, "no files uploaded"),
    (_zip([("p/x_1.tif", b"not a tiff at all")]), 422, "x_1.tif: unreadable or truncated image"),
])
def test_hostile_zips_are_refused_and_leave_nothing(archive, status, message, tmp_path):
    outside = files_under(tmp_path.parent)
    with client_for(tmp_path, max_unpacked_mb=2, max_files=20) as client:
        r = upload(client, [("patient.zip", archive)])
        assert r.status_code == status, r.text
        assert message in r.json()["detail"] and "Traceback" not in r.text
        assert "/jobs/" not in r.json()["detail"]  # no server paths in messages
        assert list(jobs_root(client).iterdir()) == []  # the refused job's files are gone
    assert files_under(tmp_path.parent) - outside == {tmp_path / "jobs"}  # the work dir, left empty


def _nifti(shape) -> bytes:
    img = nib.Nifti1Image(np.zeros(shape, dtype=np.float32), np.eye(4))
    return img.to_bytes()


@pytest.mark.parametrize(("files", "status", "message"), [
    ([], 422, "no files uploaded"),
    ([("notes.txt", b"hello")], 422, "notes.txt: the extension .txt is not read; supported: "),
    ([("..", b"x")], 422, "file name '..' is not allowed"),
    ([(".hidden.tif", b"x")], 422, "is not allowed"),
    ([("a_1.tif", b"garbage")], 422, "a_1.tif: unreadable or truncated image"),
    ([("a_flair.nii.gz", b"garbage")], 422, "a_flair.nii.gz: not a readable NIfTI file"),
    ([("a_flair.nii", _nifti((4, 4, 3, 2)))], 422, "is a 4-D series"),
    ([("a_flair.nii", _nifti((4, 4)))], 422, "is 2-D"),
    ([("a_1.tif", b"x"), ("a_flair.nii", b"x")], 422, "the files mix nifti and slice files"),
    ([("a.zip", b"x"), ("b.zip", b"x")], 422, "send a zip alone"),
    ([("a_1.tif", b"x"), ("a_1.tif", b"y")], 422, "two files named a_1.tif"),
    ([("a_1_mask.tif", b"x")], 422, "only masks"),
])
def test_bad_files_are_refused_with_a_message(files, status, message, tmp_path):
    with client_for(tmp_path) as client:
        r = upload(client, files) if files else client.post("/api/predict", files={"other": ("x", b"x")})
        assert r.status_code == status, r.text
        assert message in r.json()["detail"], r.json()


def test_requests_that_are_not_uploads(tmp_path):
    with client_for(tmp_path) as client:
        r = client.post("/api/predict", json={"files": []})
        assert r.status_code == 415 and "multipart/form-data" in r.json()["detail"]
        r = client.post("/api/predict", content=b"--x\r\ngarbage", headers={"content-type": "multipart/form-data"})
        assert 400 <= r.status_code < 500 and "detail" in r.json()


@pytest.mark.parametrize("job_id", ["0" * 32, "abc", "..%2F..%2Fetc%2Fpasswd", "%2E%2E", "A" * 32, "0" * 31 + "/"])
def test_unknown_or_path_like_job_ids_are_404(job_id, tmp_path):
    with client_for(tmp_path) as client:
        for url in (f"/api/jobs/{job_id}", f"/api/jobs/{job_id}/mask", f"/api/jobs/{job_id}/files/image.nii.gz"):
            r = client.get(url)
            assert r.status_code == 404 and "detail" in r.json(), (url, r.text)


def test_view_files_outside_the_list_are_404(kaggle, tmp_path):
    with client_for(tmp_path) as client:
        r = upload(client, [(f"{PATIENT}.zip", zip_folder(kaggle.root / PATIENT))])
        job_id = r.json()["id"]
        wait(client, job_id)
        for name in ("..%2F..%2Fjobs", "%2E%2E", "summary.csv", "%2Fetc%2Fpasswd", "image.nii.gz%00"):
            assert client.get(f"/api/jobs/{job_id}/files/{name}").status_code == 404


class Gate:
    """A model that waits until released: keeps jobs running for the busy test."""

    def __init__(self, predictor):
        self.predictor, self.event = predictor, threading.Event()

    def __getattr__(self, name):
        return getattr(self.predictor, name)

    def predict_volume(self, *args, **kwargs):
        self.event.wait(30)
        return self.predictor.predict_volume(*args, **kwargs)

    def segment(self, *args, **kwargs):
        self.event.wait(30)
        return self.predictor.segment(*args, **kwargs)


def test_many_requests_at_once_get_202_or_429_never_500(kaggle, tmp_path):
    gate = Gate(unet_predictor())
    archive = zip_folder(kaggle.root / "PAT_B_2002")
    with client_for(tmp_path, gate, max_queued=3) as client:
        codes: list[int] = []

        def send():
            codes.append(upload(client, [("p.zip", archive)]).status_code)

        threads = [threading.Thread(target=send) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(codes) == [202] * 3 + [429] * 5, codes
        r = upload(client, [("p.zip", archive)])
        assert r.status_code == 429 and "try again" in r.json()["detail"]
        gate.event.set()
        jobs = list(jobs_root(client).iterdir())
        assert len(jobs) == 3
        for j in jobs:
            assert wait(client, j.name)["status"] == "done"
        assert upload(client, [("p.zip", archive)]).status_code == 202


def test_finished_jobs_are_deleted_after_keep_minutes(kaggle, tmp_path):
    with client_for(tmp_path, keep_minutes=1) as client:
        job_id = upload(client, [("p.zip", zip_folder(kaggle.root / "PAT_B_2002"))]).json()["id"]
        wait(client, job_id)
        store = client.app.state.store
        assert store.sweep(now=time.monotonic() + 30) == 0 and (store.root / job_id).is_dir()
        assert store.sweep(now=time.monotonic() + 61) == 1
        assert not (store.root / job_id).exists()
        assert client.get(f"/api/jobs/{job_id}").status_code == 404


def test_a_failing_job_reports_why_and_keeps_serving(kaggle, tmp_path):
    class Broken:
        def __getattr__(self, name):
            return getattr(unet_predictor(), name)

        def predict_volume(self, *args, **kwargs):
            raise RuntimeError("out of memory")

    with client_for(tmp_path, Broken()) as client:
        job_id = upload(client, [("p.zip", zip_folder(kaggle.root / "PAT_B_2002"))]).json()["id"]
        body = wait(client, job_id)
        assert body["status"] == "failed" and body["error"] == "internal error (RuntimeError); see the log"
        assert client.get(f"/api/jobs/{job_id}/mask").status_code == 409
        assert not (jobs_root(client) / job_id / "input").exists()
        assert client.get("/").status_code == 200


def test_the_page_the_viewer_and_the_api_docs_are_served(tmp_path):
    with client_for(tmp_path) as client:
        page = client.get("/")
        assert page.status_code == 200 and "viewer" in page.text and "http" not in page.text.replace(
            "http-equiv", "")  # no CDN, no external URL
        assert client.get("/static/niivue/LICENSE").status_code == 200
        docs = client.get("/openapi.json").json()
        assert {"/api/predict", "/api/jobs/{job_id}", "/api/jobs/{job_id}/mask"} <= set(docs["paths"])
        assert "multipart/form-data" in docs["paths"]["/api/predict"]["post"]["requestBody"]["content"]


# --------------------------------------------------------------------------- the command


def test_serve_listens_on_loopback_unless_asked_and_warns(monkeypatch, capsys, tmp_path):
    import uvicorn
    from test_nifti import _checkpoint

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append(kw))
    args = ["serve", "--checkpoint", str(_checkpoint(tmp_path)), "--engine", "torch", "--precision", "fp32",
            "--port", "0"]
    assert main(args) == 0
    assert calls[-1]["host"] == "127.0.0.1"
    out, err = capsys.readouterr()
    assert "open http://127.0.0.1:0/" in out and "warning" not in err
    assert main([*args, "--host", "0.0.0.0"]) == 0
    assert calls[-1]["host"] == "0.0.0.0"
    assert "warning: listening on 0.0.0.0: anyone who can reach this computer" in capsys.readouterr().err


def test_serve_refuses_a_port_in_use_and_bad_limits(capsys, tmp_path):
    import socket

    from test_nifti import _checkpoint

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        assert main(["serve", "--checkpoint", str(_checkpoint(tmp_path)), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"cannot listen on 127.0.0.1:{port}" in err and len(err.strip().splitlines()) == 1
    assert main(["serve", "--max-upload-mb", "0"]) == 2
    assert "max_upload_mb must be an integer >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="port must be in 0-65535"):
        ServeConfig(port=70000)


def test_a_real_patient_round_trip_equals_tumorseg_predict(real_data, tmp_path):
    """The shipped model on a real patient (fold 0, never seen by the first ensemble member): the web
    app's NIfTI mask and Dice are `tumorseg predict`'s and `evaluate`'s."""
    from tumorseg.inference import Predictor
    from tumorseg.metrics import score_patient

    patient = "TCGA_DU_5853_19950823"
    predictor = Predictor.from_checkpoints()
    kaggle_to_nifti(real_data / patient, tmp_path / "nii")
    folder = tmp_path / "nii" / patient
    [cli] = predict([folder], tmp_path / "cli", predictor=predictor, show_progress=False)
    with client_for(tmp_path, predictor) as client:
        r = upload(client, [(p.name, p.read_bytes()) for p in sorted(folder.iterdir())])
        assert r.status_code == 202, r.text
        body = wait(client, r.json()["id"], timeout=300)
        result = body["result"]
        got = client.get(result["download"])
    mine = np.asarray(nib.Nifti1Image.from_bytes(__import__("gzip").decompress(got.content)).dataobj)
    expected = nib.load(str(tmp_path / "cli" / patient / f"{patient}_pred.nii.gz"))
    assert np.array_equal(mine, np.asarray(expected.dataobj)) and mine.sum() == cli.tumour_pixels > 1000
    assert result["volume_ml"] == pytest.approx(cli.volume_ml)
    truth = np.asarray(nib.load(str(folder / f"{patient}_seg.nii.gz")).dataobj) > 0
    assert result["dice"] == pytest.approx(score_patient(patient, mine > 0, truth, surface=False).dice)
    assert result["dice"] > 0.85


def test_decoded_size_cross_site_and_host_checks(kaggle, tmp_path):
    big = nib.Nifti1Image(np.zeros((512, 512, 256), dtype=np.uint8), np.eye(4)).to_bytes()
    import gzip

    with client_for(tmp_path, max_unpacked_mb=64) as client:
        r = upload(client, [("big_flair.nii.gz", gzip.compress(big))])  # 65 KB on the wire, 256 MB as float32
        assert r.status_code == 413 and "decodes to more than 64 MB" in r.json()["detail"]
        r = client.post("/api/predict", files=[("files", ("a_1.tif", b"x"))], headers={"origin": "http://evil.example"})
        assert r.status_code == 403 and "cross-site" in r.json()["detail"]
        r = client.get("/", headers={"host": "rebound.example"})
        assert r.status_code == 400
        r = upload(client, [(f"x_{i}.tif", b"x") for i in range(2001)])
        assert r.status_code == 413 and "more than 2000 files" in r.json()["detail"]


def test_work_dir_is_never_deleted_only_the_apps_own_folder(tmp_path):
    keep = tmp_path / "mine.txt"
    keep.write_text("precious")
    app = create_app(unet_predictor(), ServeConfig(), tmp_path)
    with TestClient(app, base_url="http://127.0.0.1") as client:
        root = client.app.state.store.root
        assert root.parent == tmp_path and root.is_dir()
    assert keep.read_text() == "precious" and not root.exists()


# --------------------------------------------------------------------------- DICOM


def _dicom_study(folder: Path) -> None:
    """Two series of one study in folders of their own, files without a suffix and with
    the same names in both (as scanner exports write them)."""
    from dicom_helpers import Study, write_series

    study = Study()
    flair = np.zeros((6, 16, 16), dtype=np.int64)
    flair[2:4, 4:10, 5:11] = 1000
    write_series(folder / "s1", flair, study=study, description="AX T2 FLAIR", number=3, names="ordered")
    write_series(folder / "s2", flair // 2, study=study, description="AX T1", number=4, names="ordered")
    for path in folder.rglob("*.dcm"):
        path.rename(path.with_suffix(""))  # IM0001 ... in both folders


def test_a_dicom_study_is_uploaded_as_files_or_as_a_zip_and_gives_a_seg(tmp_path):
    from test_prediction import flair_predictor

    _dicom_study(tmp_path / "study")
    files = sorted(p for p in (tmp_path / "study").rglob("*") if p.is_file())
    assert len({p.name for p in files}) == 6 < len(files)  # names repeat across the series
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in files:
            zf.write(p, arcname=f"export/{p.relative_to(tmp_path / 'study')}")
    with client_for(tmp_path, flair_predictor()) as client:
        for sent in ([(p.name, p.read_bytes()) for p in files], [("export.zip", buf.getvalue())]):
            r = upload(client, sent)
            assert r.status_code == 202, r.text
            body = wait(client, r.json()["id"])
            assert body["status"] == "done", body
            result = body["result"]
            assert result["input"] == "dicom" and result["tumour_pixels"] == 2 * 6 * 6
            assert result["download_name"].endswith("_seg.dcm")
            mask = client.get(result["download"])
            assert mask.status_code == 200 and mask.headers["content-type"] == "application/dicom"
            assert mask.content[128:132] == b"DICM"
            assert client.get(result["viewer"]["uncertain"]).status_code == 200


def test_a_dicom_study_that_decodes_over_the_limit_is_refused_at_upload(tmp_path):
    from dicom_helpers import Study, write_series

    flair = np.zeros((8, 512, 512), dtype=np.int64)  # 4 MB of int16 pixels, 8 MB as float32
    write_series(tmp_path / "study", flair, study=Study(), description="AX T2 FLAIR", number=3)
    files = sorted(p for p in (tmp_path / "study").rglob("*") if p.is_file())
    with client_for(tmp_path, max_unpacked_mb=6) as client:
        r = upload(client, [(p.name, p.read_bytes()) for p in files])
        assert r.status_code == 413, r.text
        assert r.json()["detail"] == ("the upload decodes to more than 6 MB of images (8 MB as float32); send one "
                                      "patient (start `tumorseg serve --max-unpacked-mb N` to raise the limit)")
