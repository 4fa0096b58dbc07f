"""`sonocad serve`: one scan in a browser, and a JSON API, on this machine (127.0.0.1 unless told otherwise).

    GET  /              the page: choose or drop a scan, read the probability, the decision at the run's
                        operating points, the heatmap; the model card; no resource from anywhere else
    POST /api/predict   multipart field `file` (PNG, JPEG, BMP, TIFF, DICOM, at most 20 MB) -> JSON
    GET  /api/model     the model card as JSON
    GET  /healthz       {"status": "ok"}
    GET  /openapi.json  the API's OpenAPI description

Uploads are decoded in memory and never written to disk; the log names requests, never image content.

>>> app = create_app("runs/busi")      # an ASGI app: uvicorn.run(app, host="127.0.0.1", port=8000)  # doctest: +SKIP
"""
from __future__ import annotations

import base64
import io
import json
import threading
from pathlib import Path

import numpy as np

# module level: FastAPI reads the endpoints' annotations (strings here) from this module's names
from fastapi import FastAPI, File, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse

from ..analysis.explain import caption, explained_views, render
from ..data.images import decode_bytes, square_gray
from ..errors import SonocadError
from ..workflows.evaluate import load
from ..zoo import resolve

MAX_BYTES = 20 * 2**20
DISCLAIMER = "Research tool, not a diagnostic device: its output is not a diagnosis."
ACCEPTED = ("image/", "application/dicom", "application/octet-stream")


def model_card(run: str | Path, predictor) -> dict:
    """What the page and /api/model say about the model: classes, data, measured figures, intended use."""
    info = predictor.info
    card = {"run": Path(run).name, "model": info.config.model, "classes": info.classes, "positive": info.positive,
            "input_size": info.img_size, "trained_on": info.data.get("source"), "version": info.version,
            "operating_points": info.thresholds, "intended_use": "research on breast-ultrasound lesion "
            "classification; " + DISCLAIMER}
    chosen = dict(info.operating_points or {})
    if chosen:      # the figures each point was chosen at (runs trained before these were recorded have none)
        card["chosen_on"] = {"data": chosen.pop("chosen_on", None), "operating_points": chosen}
    metrics = resolve(run) / "metrics.json"
    if metrics.is_file():
        m = json.loads(metrics.read_text())
        card["test_part"] = {k: m.get(k) for k in ("n", "n_per_class", "auc", "auc_ci", "auc_ci_method")}
        card["test_part"]["operating_points"] = {
            name: {k: op[k] for k in ("threshold", "sensitivity", "sensitivity_ci", "specificity", "specificity_ci")}
            for name, op in m.get("operating_points", {}).items()}
    return card


def analyse(predictor, data: bytes, name: str) -> dict:
    """Probabilities (the run's test-time views), the decision at each operating point and a heatmap picture
    (PNG, base64) for one uploaded scan."""
    cfg = predictor.info.config
    image = np.array(square_gray(decode_bytes(data, name), predictor.info.img_size, cfg.resize,
                                 cfg.clean_overlays))[None]
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
        buf = io.BytesIO()
        render(image[0], cams[0], caption(predictor, probs)).save(buf, "PNG", compress_level=1)
        out["heatmap_png"] = base64.b64encode(buf.getvalue()).decode()
    return out


def create_app(run: str | Path, precision: str = "auto", max_bytes: int = MAX_BYTES):
    """The FastAPI application serving `run` (a run directory, a cv folder or an exported .onnx file)."""
    predictor = load(run, precision)
    card = model_card(run, predictor)
    busy = threading.Lock()          # one model, one scan at a time; requests queue
    app = FastAPI(title="sonocad", description=DISCLAIMER, docs_url=None, redoc_url=None)

    def error(status: int, message: str) -> JSONResponse:
        return JSONResponse({"error": message}, status_code=status)

    @app.get("/", response_class=HTMLResponse)
    def page() -> str:
        return PAGE

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/api/model")
    def model() -> dict:
        return card

    @app.post("/api/predict")
    async def predict(request: Request, file: UploadFile = File(...)):
        size = int(request.headers.get("content-length") or 0)
        if size > max_bytes + 64 * 1024:
            return error(413, f"upload of {size:,} bytes is over the limit of {max_bytes:,}")
        kind = (file.content_type or "application/octet-stream").lower()
        if not kind.startswith(ACCEPTED):
            return error(415, f"{kind} is not an image; send PNG, JPEG, BMP, TIFF or DICOM")
        data = await file.read(max_bytes + 1)
        if len(data) > max_bytes:
            return error(413, f"upload is over the limit of {max_bytes:,} bytes")
        name = Path(file.filename or "upload").name

        def work():
            with busy:
                return analyse(predictor, data, name)
        try:
            return await run_in_threadpool(work)
        except SonocadError as e:
            message = str(e)
            return error(413 if "over the limit" in message or "decompression bomb" in message else 415, message)

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


def serve(run: str | Path, host: str = "127.0.0.1", port: int = 8000, precision: str = "auto") -> None:
    """Serve `run` until interrupted."""
    import uvicorn

    app = create_app(run, precision)
    print(f"sonocad serves {run} at http://{host}:{port}/ ({DISCLAIMER}) Ctrl-C stops it.", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")


PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>sonocad</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{font-family:system-ui,sans-serif;max-width:900px;margin:1.5em auto;color:#222;padding:0 1em}
.note{background:#fff4e0;padding:.6em;border-left:4px solid #e90}#drop{border:2px dashed #888;padding:2em;
text-align:center;margin:1em 0;cursor:pointer}#drop.over{background:#eef}table{border-collapse:collapse}
td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}#err{color:#b00}img{max-width:100%}</style></head>
<body><h1>sonocad</h1><p class="note" id="notice">Research tool, not a diagnostic device: its output is not a
diagnosis.</p>
<div id="drop">Drop a scan here, or <label>choose one <input type="file" id="file"></label>
<br><small>PNG, JPEG, BMP, TIFF or DICOM, at most 20 MB; it is analysed in memory, not stored.</small></div>
<p id="err" role="alert"></p><div id="result" hidden><h2>Result</h2>
<p>Probability of <span id="positive"></span>: <b id="prob"></b> &nbsp;(<span id="predicted"></span>)</p>
<table id="decisions"></table><p><img id="heatmap" alt="heatmap over the scan"></p></div>
<h2>Model card</h2><div id="card">loading...</div>
<script>
const $ = (id) => document.getElementById(id);
function row(cells, head) { const tr = document.createElement("tr"); for (const c of cells) {
  const td = document.createElement(head ? "th" : "td"); td.textContent = c; tr.appendChild(td); } return tr; }
let card = null;
fetch("/api/model").then(r => r.json()).then(c => { card = c; const box = $("card"); box.textContent = "";
  const t = document.createElement("table");
  t.appendChild(row(["model", c.model + " (" + c.input_size + " px)"]));
  t.appendChild(row(["classes", c.classes.join(", ")]));
  t.appendChild(row(["trained on", JSON.stringify(c.trained_on)]));
  if (c.test_part) { const tp = c.test_part; t.appendChild(row(["held-out test part", "n = " + tp.n +
      ", AUC " + tp.auc.toFixed(3) + " (95% CI " + tp.auc_ci[0].toFixed(3) + "-" + tp.auc_ci[1].toFixed(3) + ")"])); }
  t.appendChild(row(["intended use", c.intended_use])); box.appendChild(t); });
async function send(file) {
  $("err").textContent = ""; const form = new FormData(); form.append("file", file);
  const r = await fetch("/api/predict", {method: "POST", body: form}); const j = await r.json();
  if (!r.ok) { $("err").textContent = j.error || ("error " + r.status); $("result").hidden = true; return; }
  $("positive").textContent = card ? card.positive || j.predicted : "";
  $("prob").textContent = j.probability !== undefined ? j.probability.toFixed(4) : JSON.stringify(j.probabilities);
  $("predicted").textContent = "called " + j.predicted + " at the default operating point";
  const t = $("decisions"); t.textContent = ""; const chosen = card && card.chosen_on ? card.chosen_on : null;
  t.appendChild(row(["operating point", "threshold", "decision", "sensitivity / specificity where chosen (" +
    (chosen ? chosen.data : "not recorded") + ")", "sensitivity / specificity on the held-out test part"], true));
  const pair = (op) => op ? op.sensitivity.toFixed(3) + " / " + op.specificity.toFixed(3) : "n/a";
  for (const [name, d] of Object.entries(j.decisions || {})) {
    const val = chosen ? chosen.operating_points[name] : null;
    const test = card && card.test_part ? card.test_part.operating_points[name] : null;
    const promise = val && val.promised_sensitivity !== undefined ? " (promises sensitivity \u2265 " +
      val.promised_sensitivity.toFixed(3) + " on new cases)" : "";
    t.appendChild(row([name, d.threshold.toFixed(3), d.decision, pair(val) + promise, pair(test)])); }
  if (j.heatmap_png) { $("heatmap").src = "data:image/png;base64," + j.heatmap_png; $("heatmap").hidden = false; }
  else { $("heatmap").hidden = true; }
  $("result").hidden = false; }
$("file").addEventListener("change", (e) => { if (e.target.files[0]) send(e.target.files[0]); });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => { e.preventDefault(); drop.classList.remove("over");
  if (e.dataTransfer.files[0]) send(e.dataTransfer.files[0]); });
</script></body></html>"""
