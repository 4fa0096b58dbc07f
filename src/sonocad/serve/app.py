"""`sonocad serve`: one scan in a browser, and a JSON API, on this machine (127.0.0.1 unless told otherwise).

    GET  /              the page: choose or drop a scan, read the probability, the decision at the run's
                        operating points, the heatmap; the model card; no resource from anywhere else
    POST /api/predict   multipart field `file` (PNG, JPEG, BMP, TIFF, DICOM, at most 20 MB) -> JSON
    GET  /api/model     the model card as JSON (file names, never a machine's paths)
    GET  /healthz       {"status": "ok"}
    GET  /openapi.json  the API's OpenAPI description

Uploads are read by the server itself (serve.upload: in memory, never beyond the limit, never on disk) and
decoded in memory; at most `max_decoding` at once, `max_waiting` more wait, beyond that 503. With a `token`,
the API asks for it (`Authorization: Bearer TOKEN`; the page asks the user). Every error is a JSON
`{"error": one line}`; the log names requests, never image content.

>>> app = create_app("runs/busi")      # an ASGI app: uvicorn.run(app, host="127.0.0.1", port=8000)  # doctest: +SKIP
"""
from __future__ import annotations

import base64
import hmac
import io
import json
import threading
from pathlib import Path

import numpy as np

# module level: FastAPI reads the endpoints' annotations (strings here) from this module's names
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from starlette.exceptions import HTTPException

from ..analysis.explain import caption, explained_views, render
from ..analysis.segment import has_mask_head, outline_picture, predict_masks
from ..data.images import decode_bytes, square_gray
from ..errors import OptionError, SonocadError
from ..workflows.evaluate import load
from ..zoo import resolve
from .page import PAGE
from .upload import UploadError, read_upload

MAX_BYTES = 20 * 2**20
MAX_DECODING = 8        # uploads decoded at once: each costs at most about 460 MiB (docs/serve.md)
MAX_WAITING = 32        # requests beyond those that wait for a turn; more get 503
DISCLAIMER = "Research tool, not a diagnostic device: its output is not a diagnosis."
ACCEPTED = ("image/", "application/dicom", "application/octet-stream")
UPLOAD_SCHEMA = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file"],
    "properties": {"file": {"type": "string", "format": "binary", "description": "PNG, JPEG, BMP, TIFF or DICOM"}}}}}}}


def model_card(run: str | Path, predictor) -> dict:
    """What the page and /api/model say about the model: classes, data (folder names, not paths), measured
    figures, intended use."""
    info = predictor.info
    card = {"run": Path(run).name, "model": info.config.model, "classes": info.classes, "positive": info.positive,
            "input_size": info.img_size, "trained_on": _names(info.data.get("source")), "version": info.version,
            "operating_points": info.thresholds, "intended_use": "research on breast-ultrasound lesion "
            "classification; " + DISCLAIMER}
    chosen = dict(info.operating_points or {})
    if chosen:      # the figures each point was chosen at (runs trained before these were recorded have none)
        card["chosen_on"] = {"data": _without_paths(chosen.pop("chosen_on", None), info.data),
                             "operating_points": chosen}
    card["measured"] = measured_figures(resolve(run), info)
    notice = info.site_notice(Path(run).name)          # the run by name: no machine's paths in public
    if notice:
        card["site_notice"] = notice
    return card


FIGURE_KEYS = ("n", "n_per_class", "auc", "auc_ci", "auc_ci_method")
POINT_KEYS = ("threshold", "sensitivity", "sensitivity_ci", "specificity", "specificity_ci")


def measured_figures(run: Path, info) -> dict | None:
    """The figures a run's metrics.json records, and on what: a training run's held-out test part, a shipped
    model's (both sites, then each), an adapted run's out-of-fold scores, a calibrated run's calibration set, a
    cv folder's pooled out-of-fold predictions. None without metrics.json."""
    path = run / "metrics.json"
    if not path.is_file():
        return None
    m = json.loads(path.read_text())
    data = info.data or {}
    if isinstance(m.get("test_part"), dict):          # a shipped model: the test part of both sites, then each
        parts = {k.replace("test_part_", ""): v for k, v in m.items() if k.startswith("test_part_")}
        return {**_figures(m["test_part"]), "on": "the held-out test part of both sites",
                "parts": {name: _figures(f) for name, f in parts.items()}}
    if isinstance(m.get("pooled"), dict):            # a cv folder
        return {**_figures(m["pooled"]), "on": "pooled out-of-fold predictions of the cross-validation"}
    if data.get("adapted_from"):
        on = "out-of-fold scores of the local scans, where its calibration and thresholds were chosen"
    elif data.get("calibrated_from"):
        on = "the local calibration set, where its thresholds were chosen"
    else:
        on = "the held-out test part"
    return {**_figures(m), "on": on}


def _figures(m: dict) -> dict:
    return {**{k: m.get(k) for k in FIGURE_KEYS}, "operating_points": {
        name: {k: op.get(k) for k in POINT_KEYS} for name, op in (m.get("operating_points") or {}).items()}}


def _names(source):
    """A data source (a folder or manifest, or a list of them) by name only: no machine's paths in public."""
    if isinstance(source, (list, tuple)):
        return [_names(s) for s in source]
    return Path(source).name if isinstance(source, str) else source


def _without_paths(text, data: dict):
    """`text` with every data source the run records (training, calibration) written by its name only."""
    if not isinstance(text, str):
        return text
    sources = []
    for part in (data, data.get("base_data") or {}, data.get("calibration_data") or {}):
        found = part.get("source") if isinstance(part, dict) else None
        sources += found if isinstance(found, list) else [found]
    for s in sorted((s for s in sources if isinstance(s, str) and s), key=len, reverse=True):
        text = text.replace(s, Path(s).name)
    return text


def decode_upload(predictor, data: bytes, name: str) -> np.ndarray:
    """An uploaded scan decoded as the run was trained: (1, S, S) uint8."""
    cfg = predictor.info.config
    return np.array(square_gray(decode_bytes(data, name), predictor.info.img_size, cfg.resize,
                                cfg.clean_overlays))[None]


def analyse(predictor, image: np.ndarray, name: str) -> dict:
    """Probabilities (the run's test-time views), the decision at each operating point and a heatmap picture
    (PNG, base64) for one decoded scan (decode_upload)."""
    torch_model = hasattr(predictor.members[0][0], "backbone")     # Grad-CAM needs the PyTorch model
    cams, probs = explained_views(predictor, image) if torch_model else (None, predictor.predict_proba(image))
    probs = probs[0]
    out = {"name": name, "probabilities": {c: float(p) for c, p in zip(predictor.classes, probs)},
           "predicted": predictor.decide(probs[None])[0], "notice": DISCLAIMER}
    if predictor.info.binary:
        out["probability"] = float(probs[1])
        out["decisions"] = {n: {"threshold": float(t), "decision": predictor.classes[int(probs[1] >= t)]}
                            for n, t in (predictor.info.thresholds or {"default": 0.5}).items()
                            if t is not None and np.isfinite(t)}
    if cams is not None:
        out["heatmap_png"] = _png(render(image[0], cams[0], caption(predictor, probs)))
    if torch_model and has_mask_head(predictor):       # where the model finds the lesion
        lesion = predict_masks(predictor, image)[0]
        out["outline_png"] = _png(outline_picture(image[0], lesion))
        out["lesion_fraction"] = float((lesion >= 0.5).mean())
    return out


def _png(picture) -> str:
    buf = io.BytesIO()
    picture.save(buf, "PNG", compress_level=1)
    return base64.b64encode(buf.getvalue()).decode()


class Admission:
    """At most `decoding` requests decode at once and `waiting` more wait for a turn (each holding its upload, at
    most max_bytes); a request beyond those is turned away (503) before its body is read."""

    def __init__(self, decoding: int, waiting: int):
        self.decoding = threading.BoundedSemaphore(decoding)
        self.capacity, self.active, self.lock = decoding + waiting, 0, threading.Lock()

    def enter(self) -> bool:
        with self.lock:
            if self.active >= self.capacity:
                return False
            self.active += 1
            return True

    def leave(self) -> None:
        with self.lock:
            self.active -= 1


def create_app(run: str | Path, precision: str = "auto", max_bytes: int = MAX_BYTES, token: str | None = None,
               max_decoding: int = MAX_DECODING, max_waiting: int = MAX_WAITING):
    """The FastAPI application serving `run` (a run directory, a cv folder or an exported .onnx file). With a
    `token`, the API answers only requests that carry it (`Authorization: Bearer TOKEN`)."""
    for option, value in (("max_decoding", max_decoding), ("max_waiting", max_waiting)):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 4096 or \
                (option == "max_decoding" and value < 1):
            raise OptionError(option, f"must be a whole number from {int(option == 'max_decoding')} to 4096, "
                                      f"not {value!r}")
    predictor = load(run, precision)
    card = model_card(run, predictor)
    busy = threading.Lock()          # one model, one scan at a time
    admission = Admission(max_decoding, max_waiting)
    app = FastAPI(title="sonocad", description=DISCLAIMER, docs_url=None, redoc_url=None)

    def error(status: int, message: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status, headers=headers)

    def refused(request: Request) -> JSONResponse | None:
        """401 when the server has a token and the request does not carry it."""
        if token is None:
            return None
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode()):
            return None
        return error(401, "this server asks for its access token (Authorization: Bearer TOKEN)",
                     {"WWW-Authenticate": "Bearer"})

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return error(422, f"{where or 'request'}: {first.get('msg', 'invalid request')}".replace("\n", " "))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail).replace("\n", " "), getattr(exc, "headers", None))

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        return PAGE

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/api/model")
    async def model(request: Request):
        return refused(request) or card

    @app.post("/api/predict", openapi_extra=UPLOAD_SCHEMA)
    async def predict(request: Request):
        if (no := refused(request)) is not None:
            return no
        if not admission.enter():
            return error(503, f"busy: {admission.capacity} scans are being analysed or wait; try again shortly",
                         {"Retry-After": "2"})
        try:
            try:
                upload = await read_upload(request, max_bytes)
            except UploadError as e:
                return error(e.status, e.message)
            if not upload.content_type.startswith(ACCEPTED):
                return error(415, f"{upload.content_type} is not an image; send PNG, JPEG, BMP, TIFF or DICOM")

            def work():
                with admission.decoding:
                    image = decode_upload(predictor, upload.data, upload.name)
                with busy:
                    return analyse(predictor, image, upload.name)
            try:
                return await run_in_threadpool(work)
            except SonocadError as e:
                message = str(e)
                return error(413 if "over the limit" in message or "decompression bomb" in message else 415, message)
        finally:
            admission.leave()

    return app


def serve_in_background(app, wait: float = 30.0):
    """Serve `app` on a free port of 127.0.0.1 in a daemon thread (for tests and benchmarks); returns (url,
    server) once /healthz answers; set `server.should_exit = True` to stop it."""
    import socket
    import time
    import urllib.request

    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/healthz", timeout=1) as r:
                if r.status == 200:
                    return url, server
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"the server on {url} did not answer within {wait:.0f} s")


TOKEN_VARIABLE = "SONOCAD_TOKEN"
MIN_TOKEN = 16


def is_loopback(host: str) -> bool:
    """Whether `host` is an address only this machine reaches (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False        # a host name or an address of the network


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 8000, precision: str = "auto",
          token: str | None = None, insecure: bool = False, max_decoding: int = MAX_DECODING,
          max_waiting: int = MAX_WAITING) -> None:
    """Serve `run` until interrupted. An address other than this machine's loopback needs an access token
    (`token`, or $SONOCAD_TOKEN), or `insecure` to serve without one, said in a warning."""
    import os
    import sys

    import uvicorn

    if not 1 <= port <= 65535:
        raise OptionError("port", f"must be between 1 and 65535, not {port}")
    token = token or os.environ.get(TOKEN_VARIABLE) or None
    if token is not None and (len(token) < MIN_TOKEN or not token.isprintable() or " " in token):
        raise OptionError("token", f"must be at least {MIN_TOKEN} printable characters without spaces, e.g. "
                          "python3 -c 'import secrets; print(secrets.token_urlsafe())'")
    local = is_loopback(host)
    if not local and token is None and not insecure:
        raise OptionError("host", f"{host} serves to the network: give an access token (--token, or "
                          f"${TOKEN_VARIABLE}), or serve without one with --insecure")
    app = create_app(run, precision, token=token, max_decoding=max_decoding, max_waiting=max_waiting)
    if not local and token is None:
        print(f"sonocad: warning: serving on {host}:{port} without an access token (--insecure): anyone who "
              "reaches this port can send scans and read the model card", file=sys.stderr, flush=True)
    if not local:
        print("sonocad: warning: plain HTTP: scans and the token cross the network unencrypted unless TLS is put in "
              "front of the server (docs/serve.md)", file=sys.stderr, flush=True)
    print(f"sonocad serves {run} at http://{host}:{port}/ ({DISCLAIMER}) Ctrl-C stops it.", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
