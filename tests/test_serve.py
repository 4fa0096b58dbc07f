"""sonocad serve: the page, the JSON API, and bad uploads answered with one line while the server keeps serving."""
import base64
import io
import re

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from sonocad.serve.app import create_app  # noqa: E402


@pytest.fixture(scope="module")
def client(tiny_run):
    return TestClient(create_app(tiny_run, max_bytes=2 * 2**20))


def _png(path) -> bytes:
    return path.read_bytes()


def test_page_has_no_outside_resources_and_the_notice(client):
    r = client.get("/")
    assert r.status_code == 200 and "not a diagnostic device" in r.text
    assert not re.search(r"""(src|href)\\s*=\\s*["']?(https?:)?//""", r.text)       # nothing from elsewhere
    assert "http://" not in r.text and "https://" not in r.text
    assert client.get("/healthz").json() == {"status": "ok"}
    card = client.get("/api/model").json()
    assert card["classes"] == ["benign", "malignant"] and card["test_part"]["auc"] is not None
    assert "not a diagnostic device" in card["intended_use"]
    assert "/api/predict" in client.get("/openapi.json").json()["paths"]


def test_predict_gives_the_runs_probability_and_a_heatmap(client, tiny_run, phantoms):
    from sonocad.deploy.predictor import Predictor

    path = phantoms / "malignant" / "malignant (3).png"
    r = client.post("/api/predict", files={"file": ("scan.png", _png(path), "image/png")})
    assert r.status_code == 200, r.text
    j = r.json()
    want = Predictor.load(tiny_run).predict_proba([str(path)])[0, 1]
    assert j["probability"] == pytest.approx(float(want), abs=1e-6)
    assert set(j["decisions"]) >= {"default", "youden"} and "not a diagnostic device" in j["notice"]
    Image.open(io.BytesIO(base64.b64decode(j["heatmap_png"]))).verify()


def test_dicom_upload(client, phantoms):
    from test_dicom import write_dicom

    img = np.asarray(Image.open(phantoms / "benign" / "benign (2).png").convert("L"))
    buf = io.BytesIO()
    write_dicom(buf, [img])
    r = client.post("/api/predict", files={"file": ("exam.dcm", buf.getvalue(), "application/dicom")})
    assert r.status_code == 200, r.text
    assert "DOE^JANE" not in r.text


def test_bad_uploads_are_one_line_and_the_server_keeps_serving(client, phantoms):
    cases = [
        (("notes.txt", b"hello", "text/plain"), 415, "not an image"),
        (("scan.png", b"not a png at all", "image/png"), 415, "scan.png: not an image"),
        (("big.png", b"\\0" * (3 * 2**20), "image/png"), 413, "over the limit"),
    ]
    bomb = io.BytesIO()
    Image.new("L", (9000, 9000)).save(bomb, "PNG")                   # 81 megapixels, a few kB
    cases.append((("bomb.png", bomb.getvalue(), "image/png"), 413, "over the limit"))
    for upload, status, message in cases:
        r = client.post("/api/predict", files={"file": upload})
        assert r.status_code == status, (upload[0], r.text)
        assert message in r.json()["error"] and "\\n" not in r.json()["error"]
    ok = client.post("/api/predict", files={"file": ("a.png", _png(phantoms / "benign" / "benign (1).png"), "image/png")})
    assert ok.status_code == 200
