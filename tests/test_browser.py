"""The page in a real browser: Playwright driving Debian's chromium (never a browser Playwright downloads)."""
import shutil

import pytest

playwright = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (pip install -e '.[test]')")
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def server(tiny_run):
    from sonocad.serve.app import create_app, serve_in_background

    url, srv = serve_in_background(create_app(tiny_run))
    yield url
    srv.should_exit = True


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (apt-get install chromium)")
def test_upload_a_scan_through_the_page(server, phantoms, tmp_path):
    import httpx

    scan = phantoms / "malignant" / "malignant (5).png"
    outside = []
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        try:
            page = browser.new_page()
            page.on("request", lambda r: None if r.url.startswith((server, "data:")) else outside.append(r.url))
            page.goto(server + "/")
            page.wait_for_selector("#card table", timeout=30_000)
            assert "not a diagnostic device" in page.inner_text("#notice")
            page.set_input_files("#file", str(scan))
            page.wait_for_selector("#result:not([hidden])", timeout=60_000)
            shown = float(page.inner_text("#prob"))
            assert page.eval_on_selector("#heatmap", "img => img.complete && img.naturalWidth > 0")
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
        finally:
            browser.close()
    api = httpx.post(server + "/api/predict", files={"file": (scan.name, scan.read_bytes(), "image/png")},
                     timeout=60).json()
    assert shown == pytest.approx(round(api["probability"], 4), abs=1e-4)
    assert (tmp_path / "page.png").stat().st_size > 10_000
    assert not outside, outside
