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
    assert card["classes"] == ["benign", "malignant"] and card["measured"]["auc"] is not None
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


def test_errors_are_json_with_one_line_even_for_missing_fields(client):
    for r, status in ((client.post("/api/predict", files={"other": ("a.png", b"x", "image/png")}), 422),
                      (client.post("/api/predict", json={"file": "scan.png"}), 415),
                      (client.get("/nowhere"), 404), (client.get("/api/predict"), 405)):
        assert r.status_code == status, r.text
        assert set(r.json()) == {"error"} and "\n" not in r.json()["error"]


def test_upload_is_read_in_memory_and_never_to_disk(client, monkeypatch):
    import tempfile

    import starlette.formparsers

    def refused(*args, **kwargs):
        raise AssertionError("an upload went to a temporary file")

    for module, name in ((starlette.formparsers, "SpooledTemporaryFile"), (tempfile, "SpooledTemporaryFile"),
                         (tempfile, "TemporaryFile"), (tempfile, "NamedTemporaryFile"), (tempfile, "mkstemp")):
        monkeypatch.setattr(module, name, refused)
    noise = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (1100, 1100), np.uint8)).save(noise, "PNG")
    assert 2**20 < len(noise.getvalue()) < 2 * 2**20                  # over Starlette's 1 MB spooling threshold
    r = client.post("/api/predict", files={"file": ("noise.png", noise.getvalue(), "image/png")})
    assert r.status_code == 200, r.text


class _Request:
    """Just what read_upload uses of a Starlette request: headers and an endless body, counting what is read."""

    def __init__(self, headers: dict, chunk: bytes):
        self.headers, self.chunk, self.read = headers, chunk, 0

    async def stream(self):
        while True:
            self.read += len(self.chunk)
            yield self.chunk


def test_upload_reading_stops_at_the_limit():
    import anyio

    from sonocad.serve.upload import OVERHEAD, UploadError, read_upload

    kind = {"content-type": "multipart/form-data; boundary=x"}
    declared = _Request({**kind, "content-length": str(2**30)}, b"\0" * 65536)
    chunked = _Request(kind, b"--x\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.png\"\r\n\r\n"
                       + b"\0" * 65536)
    for request, read_at_most in ((declared, 0), (chunked, 2**20 + OVERHEAD + 2 * 65536)):
        with pytest.raises(UploadError) as e:
            anyio.run(read_upload, request, 2**20)
        assert e.value.status == 413 and request.read <= read_at_most, request.read


def test_access_token_and_no_machine_paths(tiny_run, phantoms):
    token = "t0ken-for-the-tests-only"
    secured = TestClient(create_app(tiny_run, token=token))
    assert secured.get("/").status_code == 200 and "access token" in secured.get("/").text
    assert secured.get("/healthz").status_code == 200
    upload = {"file": ("a.png", _png(phantoms / "benign" / "benign (1).png"), "image/png")}
    for headers in ({}, {"Authorization": "Bearer wrong-token-of-the-tests"}, {"Authorization": token}):
        for r in (secured.get("/api/model", headers=headers), secured.post("/api/predict", files=upload,
                                                                           headers=headers)):
            assert r.status_code == 401 and "access token" in r.json()["error"]
    ok = {"Authorization": f"Bearer {token}"}
    card = secured.get("/api/model", headers=ok)
    assert card.status_code == 200 and secured.post("/api/predict", files=upload, headers=ok).status_code == 200
    assert card.json()["trained_on"] in (phantoms.name, [phantoms.name]) and str(phantoms.parent) not in card.text


def test_network_address_needs_a_token_or_insecure(tiny_run, monkeypatch):
    from sonocad.errors import OptionError
    from sonocad.serve.app import is_loopback, serve

    monkeypatch.delenv("SONOCAD_TOKEN", raising=False)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("scanner-pc")
    with pytest.raises(OptionError, match="serves to the network: give an access token") as e:
        serve(tiny_run, host="0.0.0.0")
    assert e.value.flag == "--host"
    with pytest.raises(OptionError, match="at least 16"):
        serve(tiny_run, host="0.0.0.0", token="short")
    for port in (0, -1, 70000):
        with pytest.raises(OptionError, match=f"must be between 1 and 65535, not {port}"):
            serve(tiny_run, port=port)


def test_requests_beyond_the_queue_get_503(tiny_run, phantoms, monkeypatch):
    import threading

    from sonocad.serve import app as app_module

    inside, release = threading.Event(), threading.Event()
    decode = app_module.decode_upload

    def slow_decode(*args):
        inside.set()
        release.wait(30)
        return decode(*args)

    monkeypatch.setattr(app_module, "decode_upload", slow_decode)
    c = TestClient(create_app(tiny_run, max_decoding=1, max_waiting=0))
    upload = {"file": ("a.png", _png(phantoms / "benign" / "benign (1).png"), "image/png")}
    first = []
    t = threading.Thread(target=lambda: first.append(c.post("/api/predict", files=upload)))
    t.start()
    try:
        assert inside.wait(30)
        busy = c.post("/api/predict", files=upload)
        assert busy.status_code == 503 and "busy" in busy.json()["error"] and busy.headers["retry-after"]
    finally:
        release.set()
        t.join(60)
    assert first[0].status_code == 200


def test_small_load_no_5xx_and_every_bad_file_a_json_4xx(tiny_run, phantoms):
    """16 requests, 8 in flight, on 127.0.0.1: good scans (PNG, DICOM, a 64-megapixel white PNG), bad files, a
    form without its file (bench/serve_load.py is the larger version)."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx
    from test_dicom import write_dicom
    from test_hostile import EPS, white_png

    from sonocad.serve.app import serve_in_background

    dcm = io.BytesIO()
    write_dicom(dcm, [np.asarray(Image.open(phantoms / "benign" / "benign (2).png").convert("L"))])
    png = _png(phantoms / "malignant" / "malignant (3).png")
    good = [("scan.png", png, "image/png")] * 5 + [("exam.dcm", dcm.getvalue(), "application/dicom")] * 2 + \
        [("white.png", white_png(7990), "image/png")]
    bad = [("scan.png", EPS, "image/png")] * 2 + [("t.png", png[:300], "image/png")] * 2 + \
        [("notes.txt", b"hello", "text/plain"), ("empty.png", b"", "image/png"), None, None]
    requests = [(u, True) for u in good] + [(u, False) for u in bad]
    url, server = serve_in_background(create_app(tiny_run))

    def send(job):
        upload, _ = job
        if upload is None:
            return httpx.post(url + "/api/predict", data={"note": "no file"}, timeout=120)
        return httpx.post(url + "/api/predict", files={"file": upload}, timeout=120)
    try:
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(send, requests[::2] + requests[1::2]))
    finally:
        server.should_exit = True
    for r, (_, ok) in zip(answers, requests[::2] + requests[1::2]):
        assert r.status_code == 200 if ok else 400 <= r.status_code < 500, r.text
        if not ok:
            assert set(r.json()) == {"error"} and "\n" not in r.json()["error"]
