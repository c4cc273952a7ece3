"""The FastAPI app of `tumorseg serve`: one page with the niivue viewer, and a JSON API
(documented at /docs):

    POST /api/predict                 multipart, field `files`: 202 {id, status, status_url}
    GET  /api/jobs/{id}               status, stage, progress, error, result
    GET  /api/jobs/{id}/mask          the mask: NIfTI for NIfTI input, a zip of PNGs for slices
    GET  /api/jobs/{id}/files/{name}  image.nii.gz, mask.nii.gz, truth.nii.gz for the viewer

Every refusal is a 4xx with JSON `{"detail": "..."}`: 413 for a body over `max_upload_mb`
(checked against Content-Length first, then counted as it arrives, so it is never read
whole) or a zip over its limits, 422 for input that cannot be used, 404 for unknown job
ids, 429 when `max_queued` jobs are waiting. An unexpected error is a JSON 500 without a
traceback, and is logged.

FastAPI is imported here at the top (it resolves the endpoints' annotations from this
module); only `tumorseg serve` imports this module.
"""

from __future__ import annotations

import asyncio
import logging
import mimetypes
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from tumorseg.config import ServeConfig
from tumorseg.errors import ConfigError
from tumorseg.inference import Predictor
from tumorseg.serve.jobs import VIEW_FILES, Job, JobStore
from tumorseg.serve.uploads import UploadError
from tumorseg.version import __version__

log = logging.getLogger("tumorseg")
STATIC = Path(__file__).resolve().parent / "static"
SWEEP_SECONDS = 60
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")

UPLOAD_SCHEMA = {
    "requestBody": {
        "required": True,
        "content": {"multipart/form-data": {"schema": {
            "type": "object", "required": ["files"],
            "properties": {"files": {
                "type": "array", "items": {"type": "string", "format": "binary"},
                "description": "one patient: a .zip of its folder, .tif/.png slices, or .nii/.nii.gz volumes "
                               "(FLAIR required; T1, T1c and a label optional, named *_flair, *_t1, *_t1ce, *_seg)",
            }},
        }}},
    }
}


class BodyTooLarge(Exception):
    pass


class UploadLimit:
    """ASGI middleware: a POST body over `max_bytes` is answered 413 before the app reads
    it: at once when Content-Length says so, otherwise as soon as the bytes received pass
    the limit."""

    def __init__(self, app: Any, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        message = f"the upload is larger than {self.max_bytes // 2**20} MB; send one patient (start `tumorseg " \
                  "serve --max-upload-mb N` to raise the limit)"
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            await _send_json(send, 413, {"detail": message})
            return
        received = 0
        started = False

        async def limited_receive() -> dict[str, Any]:
            nonlocal received
            msg = await receive()
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge
            return msg

        async def tracking_send(msg: dict[str, Any]) -> None:
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not started:
                await _send_json(send, 413, {"detail": message})


async def _send_json(send: Any, status: int, body: dict[str, Any]) -> None:
    import json

    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": data})


def create_app(predictor: Predictor, config: ServeConfig | None = None, work_dir: str | Path | None = None):
    """The app, around one loaded `predictor`. Job files live in a new temporary folder
    (inside `work_dir` when given), which is deleted when the app shuts down."""
    # Module scripts must come as JavaScript, whatever the system's MIME table says.
    mimetypes.add_type("text/javascript", ".js")
    mimetypes.add_type("text/css", ".css")
    config = config or ServeConfig()
    if work_dir is not None:
        if Path(work_dir).exists() and not Path(work_dir).is_dir():
            raise ConfigError(f"--work-dir {work_dir} is a file, not a folder; pass a folder (created when missing)")
        Path(work_dir).mkdir(parents=True, exist_ok=True)
    # A folder of our own, inside work_dir when given: only it is deleted at shutdown.
    root = Path(tempfile.mkdtemp(prefix="tumorseg-serve-", dir=work_dir))
    store = JobStore(root, predictor, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async def sweep() -> None:  # expired jobs go also while nobody asks
            while True:
                await asyncio.sleep(SWEEP_SECONDS)
                store.sweep()

        sweeper = asyncio.create_task(sweep())
        try:
            yield
        finally:
            sweeper.cancel()
            await run_in_threadpool(store.close)

    app = FastAPI(title="tumorseg", version=_version(), lifespan=lifespan,
                  description="Brain-tumour segmentation of one MRI patient at a time, on this computer.")
    app.state.store = store
    app.add_middleware(UploadLimit, max_bytes=config.max_upload_mb * 2**20)
    if config.host in LOOPBACK_HOSTS:  # a page of another site cannot reach us by a rebinding host name
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(LOOPBACK_HOSTS))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": "malformed request; see /docs"}, status_code=422)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.error(f"{request.method} {request.url.path} failed: {type(exc).__name__}: {exc}")
        return JSONResponse({"detail": f"internal error ({type(exc).__name__}); see the server's log"},
                            status_code=500)

    def job_or_404(job_id: str) -> Job:
        job = store.get(job_id)
        if job is None:
            raise HTTPException(404, "no such job; it may have expired (results are kept "
                                     f"{config.keep_minutes:g} minutes)")
        return job

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.post("/api/predict", status_code=202, openapi_extra=UPLOAD_SCHEMA,
              summary="Upload one patient and start its segmentation")
    async def submit(request: Request) -> dict[str, Any]:
        origin = request.headers.get("origin")
        if origin and urlsplit(origin).netloc != request.headers.get("host"):
            raise HTTPException(403, "uploads come from this app's own page; cross-site requests are refused")
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise HTTPException(415, "send multipart/form-data with the files in the field 'files'")
        try:
            form = await request.form(max_files=config.max_files, max_fields=16)
        except StarletteHTTPException as e:  # Starlette's multipart errors
            if "Too many files" in str(e.detail):
                raise HTTPException(413, f"more than {config.max_files} files in one upload") from None
            raise HTTPException(422, f"unreadable upload ({e.detail}); send multipart/form-data") from None
        try:
            uploads = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
            job = store.new_job()
            try:  # reading the volume takes a second: off the event loop
                patient = await run_in_threadpool(store.accept, job, [(f.filename, f.file) for f in uploads])
            except BaseException:
                store.discard(job)
                raise
        except UploadError as e:
            raise HTTPException(e.status, e.message) from None
        finally:
            await form.close()
        store.submit(job, patient)
        return {"id": job.id, "status": "queued", "status_url": f"/api/jobs/{job.id}"}

    @app.get("/api/jobs/{job_id}", summary="Status, progress and result of a job")
    async def status(job_id: str) -> dict[str, Any]:
        return job_or_404(job_id).to_json()

    @app.get("/api/jobs/{job_id}/mask", summary="The predicted mask (NIfTI, DICOM SEG, or a zip of PNG slices)")
    async def mask(job_id: str) -> FileResponse:
        job = job_or_404(job_id)
        if job.status != "done" or job.download is None:
            raise HTTPException(409, f"the job is {job.status}; the mask is ready when its status is done")
        media = {".zip": "application/zip", ".dcm": "application/dicom"}.get(job.download.suffix, "application/gzip")
        return FileResponse(job.download, media_type=media, filename=job.download.name)

    @app.get("/api/jobs/{job_id}/files/{name}", summary="A volume for the viewer")
    async def view_file(job_id: str, name: str) -> FileResponse:
        job = job_or_404(job_id)
        path = job.folder / "view" / name
        if name not in VIEW_FILES or job.status != "done" or not path.is_file():
            raise HTTPException(404, f"no file {name!r} for this job")
        return FileResponse(path, media_type="application/gzip")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def _version() -> str:
    return __version__
