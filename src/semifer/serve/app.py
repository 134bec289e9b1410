"""The FastAPI app behind ``semifer serve``: a static page plus a small JSON API.

Routes::

    GET  /                               the page (static/index.html; its scripts and styles are served here too)
    GET  /api/info                       model, detector, labels, upload limit, runs folder
    POST /api/photos                     images (form field ``files``, repeatable; ``live=1``: a webcam frame)
    GET  /api/photos/{job}/predictions.csv
    POST /api/videos                     one clip (``file``, ``smooth``, ``every``) -> a job id
    GET  /api/videos/{job}               progress, then the timeline and the files
    GET  /api/videos/{job}/files/{path}  the CSV, ABAW file, annotated video and frames
    GET  /api/runs                       the run directories under --runs
    GET  /api/run?name=NAME              one run's curves, thresholds, pseudo-labels, confusion, config

Uploads are refused past ``max_upload_mb`` before they are read (:class:`BodyLimit`) and
saved only under a temporary folder that is deleted when the server stops.
"""
from __future__ import annotations

import shutil
import tempfile
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, File, Form, HTTPException, Query, UploadFile
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles

from semifer.labels import ABAW_LABELS
from semifer.serve.jobs import PhotoService, UserError, VideoJobs, safe_name
from semifer.serve.runs import RunReader

STATIC = Path(__file__).resolve().parent / "static"
MAX_FILES = 50  # photos in one request


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets a 413 with a readable message.

    Checked on the declared Content-Length before anything is read, and counted while the
    body streams in for requests that declare none (chunked).
    """

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    def _message(self) -> str:
        return f"upload too large: the limit is {self.limit / 2**20:g} MB per request (semifer serve --max-upload-mb)"

    async def _refuse(self, scope, receive, send) -> None:
        await JSONResponse({"detail": self._message()}, status_code=413)(scope, receive, send)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._refuse(scope, receive, send)
        seen, over, started = 0, False, False

        async def counted():
            nonlocal seen, over
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    over = True
                    raise ValueError(self._message())
            return msg

        async def guarded(msg):
            nonlocal started
            if over:
                return  # whatever the app answers to the interrupted body is replaced by the 413 below
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, counted, guarded)
        except ValueError:
            if not over:
                raise
        if over and not started:
            await self._refuse(scope, receive, send)


def create_app(model=None, runs: Path | str | None = None, detector: str = "auto",
               detector_options: dict | None = None, detect_every: int = 5, max_upload_mb: float = 50.0,
               workdir: Path | str | None = None, warm: bool = True) -> FastAPI:
    """The app for a model (path, bundled name or None = the bundled default) and a runs folder.

    ``workdir``: where uploads and results go (default: a new temporary folder, removed on shutdown).
    ``warm``: run the detector and classifier once now, so the first request is not the slow one.
    """
    import numpy as np

    from semifer.infer import Predictor

    def make_predictor(every: int = 1) -> Predictor:
        return Predictor(model, detector=detector, detector_options=detector_options, detect_every=every)

    predictor = make_predictor()
    if warm:
        predictor.predict(np.full((480, 640, 3), 128, np.uint8))  # a webcam-sized frame
        predictor.classify([np.zeros((112, 112, 3), np.uint8)])
    own_workdir = workdir is None
    work = Path(tempfile.mkdtemp(prefix="semifer-serve-") if own_workdir else workdir)
    work.mkdir(parents=True, exist_ok=True)
    photos = PhotoService(predictor, work)
    videos = VideoJobs(lambda: make_predictor(detect_every), work)
    reader = RunReader(runs)
    limit = int(max_upload_mb * 2**20)

    @asynccontextmanager
    async def lifespan(app):
        yield
        videos.close()
        photos.close()
        if own_workdir:
            shutil.rmtree(work, ignore_errors=True)

    app = FastAPI(title="semifer", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, limit=limit)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.state.photos, app.state.videos, app.state.runs, app.state.workdir = photos, videos, reader, work

    def save(upload: UploadFile, path: Path) -> None:
        with open(path, "wb") as f:
            shutil.copyfileobj(upload.file, f, 1 << 20)

    @app.get("/", include_in_schema=False)
    def index():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/api/info")
    def info():
        return {"model": predictor.model_path, "detector": predictor.detector_name, "labels": list(ABAW_LABELS),
                "max_upload_mb": max_upload_mb, "runs": str(reader.root) if reader.root else None,
                "workdir": str(work)}

    @app.post("/api/photos")
    def post_photos(files: list[UploadFile] = File(...), live: bool = Form(False)):
        if not files or len(files) > (1 if live else MAX_FILES):
            raise HTTPException(400, f"send between 1 and {1 if live else MAX_FILES} photo(s) at a time")

        def saved(folder: Path) -> list[tuple[str, Path]]:
            uploads = []
            for i, up in enumerate(files):
                name = up.filename or f"photo{i}"
                path = folder / f"{i:03d}" / safe_name(name)
                path.parent.mkdir(parents=True)
                save(up, path)
                uploads.append((name, path))
            return uploads

        if live:  # a webcam frame: answered, then forgotten (not one of the kept photo results)
            folder = work / "live" / uuid.uuid4().hex
            try:
                return {"job": None, "csv": None, "results": [photos.predict_live(*saved(folder)[0])]}
            except UserError as e:
                raise HTTPException(400, str(e)) from None
            finally:
                shutil.rmtree(folder, ignore_errors=True)
        job, folder = photos.folders.new()
        try:
            results = photos.predict(saved(folder / "upload"), folder)
        except BaseException:
            photos.folders.drop(job)
            raise
        finally:
            shutil.rmtree(folder / "upload", ignore_errors=True)  # only the CSV is kept, for the download link
        if not (folder / "predictions.csv").is_file():  # nothing readable in the request
            photos.folders.drop(job)
            return {"job": None, "csv": None, "results": results}
        return {"job": job, "csv": f"/api/photos/{job}/predictions.csv", "results": results}

    @app.get("/api/photos/{job}/predictions.csv")
    def photo_csv(job: str):
        folder = photos.folder(job)
        if folder is None or not (folder / "predictions.csv").is_file():
            raise HTTPException(404, "no such result (the server keeps the last 20 photo requests)")
        return FileResponse(folder / "predictions.csv", media_type="text/csv", filename="predictions.csv")

    @app.post("/api/videos")
    def post_video(file: UploadFile = File(...), smooth: float = Form(0.0), every: int = Form(1)):
        try:
            job = videos.submit(file.filename or "video", lambda path: save(file, path), smooth, every)
        except UserError as e:
            raise HTTPException(400, str(e)) from None
        return job.state()

    @app.get("/api/videos/{job}")
    def video_state(job: str):
        j = videos.jobs.get(job)
        if j is None:
            raise HTTPException(404, "no such video job (the server keeps the last 10)")
        return j.state()

    @app.get("/api/videos/{job}/files/{rel:path}")
    def video_file(job: str, rel: str):
        path = videos.file(job, rel)
        if path is None:
            raise HTTPException(404, "no such file")
        names = {".csv": "predictions.csv", ".txt": path.name}
        return FileResponse(path, filename=names.get(path.suffix, path.name))

    @app.get("/api/runs")
    def runs_list():
        return {"root": str(reader.root) if reader.root else None, "runs": reader.listing()}

    @app.get("/api/run")
    def run_data(name: str = Query(...)):
        try:
            return reader.data(reader.resolve(name))
        except (KeyError, FileNotFoundError):
            raise HTTPException(404, f"no run {name!r}") from None

    return app


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 7860) -> None:
    """Run ``app`` with uvicorn until Ctrl-C."""
    import uvicorn

    # access logs off: the webcam alone posts several frames a second
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
